"""Non-storage plugins shipped with batchdb (the Upbit candle normaliser, …)."""
