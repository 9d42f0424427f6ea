"""batchdb end to end (enqueue → committed) against the raw driver path, same rows, same run.

    python tests/backends/postgres/bench_e2e.py [rows] [--repeat N]

raw: psycopg 3, per 20k rows BEGIN; binary COPY into a temporary staging table;
INSERT … SELECT … ON CONFLICT DO UPDATE; COMMIT — rows already as tuples.
batchdb: ``queue_operation(UPSERT)`` of the same rows as dicts (1000 per operation), then
``flush()``; and the same candles as Upbit JSON through ``insert_candles_batch`` (200 per
call, the API's page size). Each run writes into a fresh, empty table; ratios are given
from the medians and as the median of each run against the raw run just before it.
Starts its own throwaway server (tests/pgserver.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from batchdb import BatchDBManager
from tests.backends.postgres.bench_drivers import COLUMNS, DDL, make_rows, run_psycopg
from tests.pgserver import PostgresServer


def upbit_json(rows: list[tuple[Any, ...]]) -> dict[str, list[dict[str, Any]]]:
    """The rows as Upbit's candle API returns them, by market."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r[2] / 1000))
        out.setdefault(r[0], []).append({
            "market": r[0], "candle_date_time_utc": ts, "opening_price": r[3],
            "high_price": r[4], "low_price": r[5], "trade_price": r[6],
            "candle_acc_trade_volume": r[7], "candle_acc_trade_price": r[8], "unit": 1})
    return out


async def run_batchdb(dsn: str, table: str, dicts: list[dict[str, Any]], per_op: int) -> float:
    manager = BatchDBManager.from_settings(None, backend="postgres", postgres={"dsn": dsn},
                                           maintenance={"enabled": False})
    async with manager:
        await manager.table_info(table)  # describe once, outside the timing
        start = time.perf_counter()
        for i in range(0, len(dicts), per_op):
            await manager.queue_operation(table, "UPSERT", dicts[i:i + per_op])
        await manager.flush()
        seconds = time.perf_counter() - start
        assert (await manager.get_queue_status())["stats"]["failed_operations"] == 0
    return seconds


async def run_candles(dsn: str, by_market: dict[str, list[dict[str, Any]]]) -> float:
    manager = BatchDBManager.from_settings(None, backend="postgres", postgres={"dsn": dsn},
                                           maintenance={"enabled": False})
    async with manager:
        await manager.table_info("candles")
        start = time.perf_counter()
        pages = [(m, c[i:i + 200]) for m, c in by_market.items() for i in range(0, len(c), 200)]
        for market, page in pages:
            await manager.insert_candles_batch(market, "1m", page)
        await manager.flush()
        seconds = time.perf_counter() - start
        assert (await manager.get_queue_status())["stats"]["failed_operations"] == 0
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", type=int, nargs="?", default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = make_rows(args.rows)
    dicts = [dict(zip(COLUMNS, r, strict=True)) for r in rows]
    by_market = upbit_json(rows)
    results: dict[str, list[float]] = {"raw": [], "batchdb": [], "candles": []}
    with tempfile.TemporaryDirectory() as tmp, PostgresServer.start(Path(tmp)) as server:
        os.chdir(tmp)  # no stray settings.toml
        for r in range(args.repeat):
            raw_table, our_table = f"raw_{r}", f"ours_{r}"
            server.psql(DDL.format(name=raw_table))
            server.psql(DDL.format(name=our_table))
            start = time.perf_counter()
            await run_psycopg(server.dsn, raw_table, rows, 20_000)
            results["raw"].append(args.rows / (time.perf_counter() - start))
            results["batchdb"].append(args.rows / await run_batchdb(server.dsn, our_table,
                                                                    dicts, 1000))
            server.psql("DROP TABLE IF EXISTS candles")
            results["candles"].append(args.rows / await run_candles(server.dsn, by_market))
            for table in (raw_table, our_table, "candles"):
                count = int(server.psql(f"SELECT count(*) FROM {table}"))
                assert count == args.rows, (table, count)
                server.psql(f"DROP TABLE {table}")
    print(f"{args.rows} candle rows, {args.repeat} runs (rows/s per run, median)")
    med = {k: statistics.median(v) for k, v in results.items()}
    for name, values in results.items():
        shown = ", ".join(f"{v:,.0f}" for v in values)
        # each run's batchdb figure against the raw figure taken just before it: the
        # machine's load changes between runs, much less within one
        pairs = statistics.median(v / r for v, r in zip(values, results["raw"], strict=True))
        print(f"{name:<8} {shown:<48} median {med[name]:>10,.0f}  "
              f"{med[name] / med['raw']:.2f}x raw (paired runs: {pairs:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
