"""The cost of SQLite's type check of ordinary tables (``[sqlite] check_types``): the same
workload with the check on and off, each run in a fresh process on a fresh database file,
the order alternating from pair to pair so that both share the machine's drift.

    python benchmarks/type_check_ab.py one_row 30000 10   # one-row INSERTs, 6 columns
    python benchmarks/type_check_ab.py bulk 300000 8      # 1,000-row UPSERTs, 11 columns

Both tables are ordinary (not STRICT), every column typed: every value is checked. (The
``upsert_new`` benchmark writes the STRICT ``candles`` table, which SQLite checks itself.)
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchdb import BatchDBManager, OperationType
from batchdb.settings import Settings
from batchdb.workloads.bench import candle_rows, order_rows

ORDERS = ("CREATE TABLE orders (order_id INTEGER PRIMARY KEY, symbol TEXT NOT NULL, "
          "side TEXT NOT NULL, price REAL NOT NULL, quantity REAL NOT NULL, "
          "ts INTEGER NOT NULL)")
CANDLES = ("CREATE TABLE candles_loose (symbol TEXT NOT NULL, timeframe TEXT NOT NULL, "
           "ts INTEGER NOT NULL, open_price REAL NOT NULL, high_price REAL NOT NULL, "
           "low_price REAL NOT NULL, close_price REAL NOT NULL, volume REAL NOT NULL, "
           "quote_volume REAL, source TEXT, ingested_at INTEGER NOT NULL, "
           "PRIMARY KEY (symbol, timeframe, ts)) WITHOUT ROWID")


async def _run(workload: str, path: Path, check: bool, rows: list[dict[str, Any]]) -> float:
    conn = sqlite3.connect(path)
    conn.execute(ORDERS if workload == "one_row" else CANDLES)
    conn.commit()
    conn.close()
    settings = Settings(sqlite={"path": str(path), "check_types": check},
                        maintenance={"enabled": False})
    async with BatchDBManager(settings=settings) as manager:
        queue = manager.queue_operation
        start = time.perf_counter()
        if workload == "one_row":
            for i in range(len(rows)):
                await queue("orders", OperationType.INSERT, rows[i:i + 1])
        else:
            for i in range(0, len(rows), 1000):
                await queue("candles_loose", OperationType.UPSERT, rows[i:i + 1000])
        await manager.flush()
        return len(rows) / (time.perf_counter() - start)


def one_run(workload: str, n: int, check: bool) -> float:
    """Rows per second of one run (in this process)."""
    rows = order_rows(n) if workload == "one_row" else candle_rows(n)
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory() as folder:
        return asyncio.run(_run(workload, Path(folder) / "ab.sqlite3", check, rows))


def main(workload: str, n: int, pairs: int) -> None:
    results: dict[bool, list[float]] = {True: [], False: []}
    for i in range(pairs):
        for check in ((True, False) if i % 2 == 0 else (False, True)):
            out = subprocess.run(
                [sys.executable, __file__, "--one", workload, str(n), str(int(check))],
                capture_output=True, text=True, check=True).stdout
            results[check].append(float(out.split()[-1]))
    on, off = statistics.median(results[True]), statistics.median(results[False])
    pair = statistics.mean(a / b for a, b in zip(results[True], results[False], strict=True))
    print(f"{workload}, {n:,} rows, {pairs} pairs: check on {on:,.0f} rows/s "
          f"{[round(x) for x in results[True]]}")
    print(f"{' ' * len(workload)}  check off {off:,.0f} rows/s "
          f"{[round(x) for x in results[False]]}")
    print(f"on/off: {on / off:.3f} (medians), {pair:.3f} (mean of the pairs' ratios)")


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(one_run(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
