"""The benchmark's data: the workload names, and the rows each workload writes.

Every generator is deterministic (no random numbers), so raw drivers and batchdb write the
very same rows, run after run. :class:`DataCache` keeps the latest data sets so that
consecutive runs share them instead of building them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sqlalchemy as sa

from batchdb.candles import CANDLE_COLUMNS

__all__ = [
    "CALL_ROWS",
    "ORDER_COLUMNS",
    "SYMBOLS",
    "T0_MS",
    "TIMEFRAME",
    "WORKLOADS",
    "DataCache",
    "candle_rows",
    "candle_tuples",
    "order_rows",
    "orders_table",
    "upbit_calls",
    "workload_rows",
]

#: workload names, in report order
WORKLOADS: tuple[str, ...] = (
    "upsert_new", "upsert_existing", "upbit_candles", "one_row", "critical_latency",
    "memory_flood",
)

CALL_ROWS = 1000  # rows per producer call (queue_operation / insert_candles_batch)
TIMEFRAME = "1m"
T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SYMBOLS: tuple[str, ...] = tuple(
    f"KRW-{c}" for c in ("BTC", "ETH", "XRP", "SOL", "ADA", "DOGE", "AVAX", "DOT", "LINK", "TRX")
)


def workload_rows(workload: str, rows: int) -> int:
    """Rows a workload writes for a benchmark size of ``rows`` (one_row: a tenth)."""
    return max(1, rows // 10) if workload == "one_row" else rows


def _slots(n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Symbol, minute and position-in-call of row i: each 1000-row call is one market's
    consecutive minutes, calls rotate over ten markets, every key is unique."""
    i = np.arange(n, dtype=np.int64)
    block, j = np.divmod(i, CALL_ROWS)
    minute = block // len(SYMBOLS) * CALL_ROWS + j
    symbols = [SYMBOLS[b] for b in (block % len(SYMBOLS)).tolist()]
    return symbols, minute, j


def candle_tuples(n: int, variant: int = 0) -> list[tuple[Any, ...]]:
    """``n`` candle rows as tuples in ``CANDLE_COLUMNS`` order; ``variant`` shifts the prices."""
    symbols, minute, j = _slots(n)
    ts = (T0_MS + minute * 60_000).tolist()
    price = (100.0 + j * 0.01 + variant).tolist()
    volume = (1.0 + j * 0.5 + variant).tolist()
    return [
        (s, TIMEFRAME, t, p, p + 1.0, p - 1.0, p + 0.5, v, v * p, "bench", T0_MS)
        for s, t, p, v in zip(symbols, ts, price, volume, strict=True)
    ]


def candle_rows(n: int, variant: int = 0) -> list[dict[str, Any]]:
    """``n`` generic candle rows as dicts (column -> value), the same values as tuples."""
    cols = CANDLE_COLUMNS
    return [dict(zip(cols, row, strict=True)) for row in candle_tuples(n, variant)]


def upbit_calls(n: int, variant: int = 0) -> list[tuple[str, list[dict[str, Any]]]]:
    """``n`` candles as Upbit's REST API returns them, as (market, up to 1000 candles) calls
    (newest first within a call, as Upbit sends them)."""
    symbols, minute, j = _slots(n)
    base = np.datetime64("2024-01-01T00:00:00", "s")
    utc = (base + minute.astype("timedelta64[m]")).astype(str).tolist()
    kst = (base + minute.astype("timedelta64[m]") + np.timedelta64(9, "h")).astype(str).tolist()
    price = (50_000_000.0 + j * 1000.0 + variant).tolist()
    stamp = (T0_MS + minute * 60_000 + 59_000).tolist()
    calls: list[tuple[str, list[dict[str, Any]]]] = []
    for start in range(0, n, CALL_ROWS):
        stop = min(start + CALL_ROWS, n)
        market = symbols[start]
        candles = [
            {
                "market": market,
                "candle_date_time_utc": utc[k],
                "candle_date_time_kst": kst[k],
                "opening_price": price[k],
                "high_price": price[k] + 10.0,
                "low_price": price[k] - 10.0,
                "trade_price": price[k] + 5.0,
                "timestamp": stamp[k],
                "candle_acc_trade_price": 123_456.5 + k % CALL_ROWS,
                "candle_acc_trade_volume": 0.25 + (k % CALL_ROWS) / 1000,
                "unit": 1,
            }
            for k in range(start, stop)
        ]
        candles.reverse()
        calls.append((market, candles))
    return calls


def order_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` order rows (one per single-row write), ids from ``start``."""
    return [
        {"order_id": i, "symbol": SYMBOLS[i % len(SYMBOLS)], "side": "buy" if i % 2 else "sell",
         "price": 100.0 + i % 1000 * 0.01, "quantity": 0.001 * (1 + i % 7), "ts": T0_MS + i}
        for i in range(start, start + n)
    ]


class DataCache:
    """Keeps the most recent data sets, so that consecutive runs (raw, batchdb, rounds)
    write the very same rows without building them again."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """The value for ``key``, built with ``make`` if it is not kept."""
        if key in self._items:
            value = self._items.pop(key)
        else:
            while len(self._items) >= max(1, self.size):
                self._items.pop(next(iter(self._items)))
            value = make()
        self._items[key] = value
        return value

    def clear(self) -> None:
        """Forget every data set."""
        self._items.clear()



_orders_metadata = sa.MetaData()
orders_table = sa.Table(
    "orders",
    _orders_metadata,
    sa.Column("order_id", sa.BigInteger().with_variant(sa.INTEGER(), "sqlite"),
              primary_key=True, autoincrement=False),
    sa.Column("symbol", sa.Text, nullable=False),
    sa.Column("side", sa.Text, nullable=False),
    sa.Column("price", sa.Double().with_variant(sa.REAL(), "sqlite"), nullable=False),
    sa.Column("quantity", sa.Double().with_variant(sa.REAL(), "sqlite"), nullable=False),
    sa.Column("ts", sa.BigInteger().with_variant(sa.INTEGER(), "sqlite"), nullable=False),
)
ORDER_COLUMNS: tuple[str, ...] = tuple(c.name for c in orders_table.columns)
