"""Which driver writes candles fastest: asyncpg or psycopg 3, same rows, same server, same run.

Each path: per batch BEGIN; binary COPY into a temporary staging table (ON COMMIT DELETE
ROWS); INSERT … SELECT … ON CONFLICT (pk) DO UPDATE … WHERE changed; COMMIT.

    python tests/backends/postgres/bench_drivers.py [rows] [batch]

Starts its own throwaway server (tests/pgserver.py). Prints rows/s for new rows (empty table)
and for existing rows (the same rows with a changed price upserted again), and the client's
CPU time for both, median of ``--repeat`` runs taken in turns.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import asyncpg
import psycopg

from tests.pgserver import PostgresServer

COLUMNS = ("symbol", "timeframe", "ts", "open_price", "high_price", "low_price", "close_price",
           "volume", "quote_volume", "source", "ingested_at")
PK = ("symbol", "timeframe", "ts")
DDL = """
CREATE TABLE {name} (
    symbol TEXT NOT NULL, timeframe TEXT NOT NULL, ts BIGINT NOT NULL,
    open_price DOUBLE PRECISION NOT NULL, high_price DOUBLE PRECISION NOT NULL,
    low_price DOUBLE PRECISION NOT NULL, close_price DOUBLE PRECISION NOT NULL,
    volume DOUBLE PRECISION NOT NULL, quote_volume DOUBLE PRECISION, source TEXT,
    ingested_at BIGINT NOT NULL, CONSTRAINT {name}_pk PRIMARY KEY (symbol, timeframe, ts))
"""


def make_rows(n: int) -> list[tuple[Any, ...]]:
    """``n`` candle rows over 20 markets, one minute apart."""
    rnd = random.Random(7)
    now = int(time.time() * 1000)
    rows = []
    for i in range(n):
        p = 100.0 + rnd.random()
        rows.append((f"KRW-C{i % 20:02d}", "1m", 1_600_000_000_000 + (i // 20) * 60_000,
                     p, p + 1.0, p - 1.0, p + 0.5, rnd.random() * 10, rnd.random() * 1000,
                     "bench", now))
    return rows


def upsert_sql(table: str, staging: str) -> str:
    cols = ", ".join(COLUMNS)
    values = [c for c in COLUMNS if c not in PK]
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in values)
    old = ", ".join(f"{table}.{c}" for c in values)
    new = ", ".join(f"EXCLUDED.{c}" for c in values)
    return (f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {staging} "
            f"ON CONFLICT ({', '.join(PK)}) DO UPDATE SET {sets} "
            f"WHERE ({old}) IS DISTINCT FROM ({new})")


async def run_asyncpg(dsn: str, table: str, rows: list[tuple[Any, ...]], batch: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TEMP TABLE stg ON COMMIT DELETE ROWS AS "
                           f"SELECT {', '.join(COLUMNS)} FROM {table} WITH NO DATA")
        sql = upsert_sql(table, "stg")
        for i in range(0, len(rows), batch):
            await conn.execute("BEGIN")
            await conn.copy_records_to_table("stg", records=rows[i:i + batch],
                                             columns=COLUMNS, schema_name="pg_temp")
            await conn.execute(sql)
            await conn.execute("COMMIT")
    finally:
        await conn.close()


async def run_psycopg(dsn: str, table: str, rows: list[tuple[Any, ...]], batch: int) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await conn.execute(f"CREATE TEMP TABLE stg ON COMMIT DELETE ROWS AS "
                           f"SELECT {', '.join(COLUMNS)} FROM {table} WITH NO DATA")
        sql = upsert_sql(table, "stg")
        types = ["text", "text", "int8", *["float8"] * 6, "text", "int8"]
        for i in range(0, len(rows), batch):
            async with conn.transaction():
                cur = conn.cursor()
                async with cur.copy(f"COPY stg ({', '.join(COLUMNS)}) FROM STDIN "
                                    "(FORMAT BINARY)") as copy:
                    copy.set_types(types)
                    for row in rows[i:i + batch]:
                        await copy.write_row(row)
                await cur.execute(sql)
    finally:
        await conn.close()


def _psycopg_sync(dsn: str, table: str, rows: list[tuple[Any, ...]], batch: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TEMP TABLE stg ON COMMIT DELETE ROWS AS "
                     f"SELECT {', '.join(COLUMNS)} FROM {table} WITH NO DATA")
        sql = upsert_sql(table, "stg")
        types = ["text", "text", "int8", *["float8"] * 6, "text", "int8"]
        for i in range(0, len(rows), batch):
            with conn.transaction():
                cur = conn.cursor()
                with cur.copy(f"COPY stg ({', '.join(COLUMNS)}) FROM STDIN "
                              "(FORMAT BINARY)") as copy:
                    copy.set_types(types)
                    for row in rows[i:i + batch]:
                        copy.write_row(row)
                cur.execute(sql)


async def run_psycopg_thread(dsn: str, table: str, rows: list[tuple[Any, ...]],
                             batch: int) -> None:
    await asyncio.to_thread(_psycopg_sync, dsn, table, rows, batch)


Runner = Callable[[str, str, list[tuple[Any, ...]], int], Awaitable[None]]


async def measure(server: PostgresServer, name: str, runner: Runner,
                  rows: list[tuple[Any, ...]], batch: int, run: int) -> tuple[float, float, float]:
    """One run of one driver on a fresh table: new rows/s, changed rows/s, client CPU s."""
    table = f"bench_{name}_{run}"
    server.psql(DDL.format(name=table))
    cpu = time.process_time()
    start = time.perf_counter()
    await runner(server.dsn, table, rows, batch)
    new = len(rows) / (time.perf_counter() - start)
    changed_rows = [(*row[:3], row[3] + 1.0, *row[4:]) for row in rows]
    start = time.perf_counter()
    await runner(server.dsn, table, changed_rows, batch)
    changed = len(rows) / (time.perf_counter() - start)
    cpu = time.process_time() - cpu
    count = int(server.psql(f"SELECT count(*) FROM {table}"))
    assert count == len(rows), (name, count)
    server.psql(f"DROP TABLE {table}")
    return new, changed, cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", type=int, nargs="?", default=200_000)
    parser.add_argument("batch", type=int, nargs="?", default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = make_rows(args.rows)
    runners: dict[str, Runner] = {
        "asyncpg": run_asyncpg,
        "psycopg_async": run_psycopg,
        "psycopg_thread": run_psycopg_thread,
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runners}
    with tempfile.TemporaryDirectory() as tmp, PostgresServer.start(Path(tmp)) as server:
        for run in range(args.repeat):  # drivers take turns, so load changes hit all alike
            for name, runner in runners.items():
                results[name].append(await measure(server, name, runner, rows, args.batch,
                                                   run))
    print(f"{args.rows} candle rows, {args.batch} per transaction, median of {args.repeat}")
    print(f"{'driver':<16}{'new rows/s':>12}{'changed rows/s':>16}{'client CPU s':>14}")
    for name, values in results.items():
        new, changed, cpu = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"{name:<16}{new:>12,.0f}{changed:>16,.0f}{cpu:>14.2f}")

if __name__ == "__main__":
    asyncio.run(main())
