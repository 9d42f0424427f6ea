"""The duckdb backend plugin (being written)."""
