"""The built-in ``candles`` table: OHLCV candles keyed by market, timeframe and start time.

:meth:`BatchDBManager.insert_candles_batch <batchdb.manager.BatchDBManager.insert_candles_batch>`
writes it through a ``batchdb_normalize_candles`` plugin (the Upbit one ships with batchdb),
which returns rows in :data:`CANDLE_COLUMNS` order. The table is declared in the shared
:data:`batchdb.schema.metadata`, so every backend creates it like any declared table.

SQLite gets ``REAL``/``INTEGER`` column types (a ``STRICT`` table accepts only its own type
names); every other database gets ``DOUBLE``/``BIGINT``.
"""

from __future__ import annotations

import sqlalchemy as sa

from .schema import epoch_ms_now, metadata

__all__ = ["CANDLE_COLUMNS", "candles_table"]

_REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
_BIGINT: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.INTEGER(), "sqlite")

candles_table = sa.Table(
    "candles",
    metadata,
    sa.Column("symbol", sa.Text, nullable=False, comment="market code, e.g. KRW-BTC"),
    sa.Column("timeframe", sa.Text, nullable=False, comment="candle unit, e.g. 1m, 1d"),
    sa.Column("ts", _BIGINT, nullable=False, comment="candle start, epoch milliseconds UTC"),
    sa.Column("open_price", _REAL, nullable=False),
    sa.Column("high_price", _REAL, nullable=False),
    sa.Column("low_price", _REAL, nullable=False),
    sa.Column("close_price", _REAL, nullable=False),
    sa.Column("volume", _REAL, nullable=False, comment="base-currency volume"),
    sa.Column("quote_volume", _REAL, nullable=True, comment="quote-currency volume"),
    sa.Column("source", sa.Text, nullable=True, comment="where the candle came from"),
    sa.Column("ingested_at", _BIGINT, nullable=False, server_default=epoch_ms_now(),
              comment="epoch ms of the write"),
    sa.PrimaryKeyConstraint("symbol", "timeframe", "ts", name="candles_pk"),
    sqlite_with_rowid=False,
    sqlite_strict=True,
)

CANDLE_COLUMNS: tuple[str, ...] = tuple(c.name for c in candles_table.columns)
