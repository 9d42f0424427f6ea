"""The DuckDB backend end to end against raw DuckDB, same rows, same batch size, same run.

    python -m batchdb.backends.duckdb.bench --rows 200000 --batch 50000 --rounds 5

raw: for each batch of candle dicts, one Python list per column, ``pa.array`` with the
column's type, one Arrow table, ``INSERT … SELECT … ON CONFLICT DO UPDATE`` from it — the
fastest way from Python rows to DuckDB measured here (``pa.Table.from_pylist`` is about
twice as slow). batchdb: ``queue_operation(UPSERT)`` calls of 1000 rows, then ``flush()``;
the database and the manager are open before the clock starts on both sides.
Rounds alternate raw and batchdb so that noise from other work on the machine hits both;
the medians are reported. Each side writes the rows twice: new keys, then the same keys
with other values. The row count is checked after each batchdb run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchdb.manager import BatchDBManager
from batchdb.models import OperationType
from batchdb.schema import CANDLE_COLUMNS, candles_table

from .backend import load_drivers
from .sql import create_statements

__all__ = ["candle_rows", "main", "run_batchdb", "run_raw"]

_OP_ROWS = 1000


def candle_rows(n: int, bump: float) -> list[dict[str, Any]]:
    """``n`` candle-like dicts over 50 symbols; ``bump`` changes every price."""
    return [dict(zip(CANDLE_COLUMNS, (
        f"KRW-C{i % 50}", "1m", 1704067200000 + (i // 50) * 60000, 1.0 * i + bump, 2.0 * i,
        0.5 * i, 1.5 * i, 0.1 * i, None if i % 7 == 0 else 3.0 * i, "upbit",
        1700000000000 + int(bump)), strict=True)) for i in range(n)]


def _fresh(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)


def run_raw(path: Path, passes: Sequence[Sequence[dict[str, Any]]], batch: int) -> list[float]:
    """Rows per second of each pass through plain duckdb + pyarrow."""
    duckdb, pa = load_drivers()
    _fresh(path)
    conn = duckdb.connect(str(path))
    for stmt in create_statements(candles_table):
        conn.execute(stmt)
    kinds = {"symbol": pa.string(), "timeframe": pa.string(), "source": pa.string(),
             "ts": pa.int64(), "ingested_at": pa.int64()}
    types = [kinds.get(c, pa.float64()) for c in CANDLE_COLUMNS]
    names = [f"c{i}" for i in range(len(CANDLE_COLUMNS))]
    columns = ", ".join(CANDLE_COLUMNS)
    values = ", ".join(f"{c} = excluded.{c}" for c in CANDLE_COLUMNS[3:])
    upsert = (f"INSERT INTO candles ({columns}) SELECT {', '.join(names)} FROM raw_batch "  # noqa: S608
              f"ON CONFLICT (symbol, timeframe, ts) DO UPDATE SET {values}")
    rates = []
    for rows in passes:
        start = time.perf_counter()
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            arrays = [pa.array([r[c] for r in chunk], type=t)
                      for c, t in zip(CANDLE_COLUMNS, types, strict=True)]
            conn.register("raw_batch", pa.Table.from_arrays(arrays, names=names))
            conn.execute(upsert).fetchall()
            conn.unregister("raw_batch")
        rates.append(len(rows) / (time.perf_counter() - start))
    conn.close()
    return rates


async def run_batchdb(path: Path, passes: Sequence[Sequence[dict[str, Any]]],
                      batch: int) -> list[float]:
    """Rows per second of each pass through BatchDBManager on the duckdb backend."""
    _fresh(path)
    manager = BatchDBManager.from_settings(
        None, backend="duckdb", duckdb={"path": str(path), "batch_size": batch},
        maintenance={"enabled": False})
    rates = []
    async with manager:
        await manager.table_info("candles")
        for rows in passes:
            start = time.perf_counter()
            for i in range(0, len(rows), _OP_ROWS):
                await manager.queue_operation("candles", OperationType.UPSERT,
                                              rows[i:i + _OP_ROWS])
            await manager.flush()
            rates.append(len(rows) / (time.perf_counter() - start))
        status = await manager.get_queue_status()
        count = (await manager.fetch("SELECT count(*) FROM candles"))[0][0]
    if status["stats"]["failed_operations"] or count != len(passes[0]):
        raise RuntimeError(f"batchdb run wrote {count} rows, status {status['stats']}")
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    """Print raw and batchdb rows/s (medians) and their ratio, for new and existing keys."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    passes = [candle_rows(args.rows, 0.0), candle_rows(args.rows, 1.0)]
    raw: list[list[float]] = []
    managed: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="batchdb-duckdb-bench-") as folder:
        for _ in range(args.rounds):
            raw.append(run_raw(Path(folder) / "raw.duckdb", passes, args.batch))
            managed.append(asyncio.run(run_batchdb(Path(folder) / "batchdb.duckdb", passes,
                                                   args.batch)))
    print(f"{args.rows} candle rows, batch {args.batch}, median of {args.rounds} rounds")
    for j, kind in enumerate(("new keys", "existing keys")):
        r = statistics.median(x[j] for x in raw)
        b = statistics.median(x[j] for x in managed)
        print(f"{kind:14s} raw {r:>10,.0f} rows/s   batchdb {b:>10,.0f} rows/s   "
              f"ratio {b / r:.2f}")


if __name__ == "__main__":
    main()
