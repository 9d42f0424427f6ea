"""Writing through a PostgreSQL outage: throughput while spooling and while draining, against
the normal path, in one run; and how long a 10-minute outage at the demo's write rate takes
to drain.

    pytest benchmarks/test_spool.py -s [--bench-rows 150000]

On a PostgreSQL server of its own (tests/pgserver.py; stopped with ``pg_ctl stop -m
immediate``), one manager with ``[spool] enabled``:

1. **normal**: ``--bench-rows`` rows as 100-row INSERT operations into ``a``, each awaited
   (committed), the database up;
2. **spooling**: the server stopped, the same rows into ``a`` again, each awaited
   ``until="durable"`` (in the spool, fsynced);
3. **draining**: the server started; the spool drains into ``a`` while a producer writes
   the same rows into ``b`` (a table with nothing in the spool, so its writes go straight
   to the database): the drain's rows/s (from the replay's start to an empty spool) and
   ``b``'s rows/s meanwhile;
4. **demo rate**: ``batchdb demo``'s workload (core/demo.py) for 5 s on the same server:
   its rows committed per second. A 10-minute outage at that rate spools ``600 x rate``
   rows; draining them takes ``backlog / drain rate`` if the demo paused, and
   ``backlog / (drain rate - rate)`` with the demo writing on (its writes to the tables in
   the spool queue behind the backlog).

``extra_info`` holds every figure; a summary is printed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBManager, load_settings

# the server helpers of the test suite (benchmarks/ is not on the path of tests/)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.backends.postgres.outage import start_again, stop_immediate
from tests.pgserver import PostgresServer, sql_exec, sql_rows

OP_ROWS = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    reason = PostgresServer.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL server can be started here: {reason}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("pip install 'batchdb[postgres]'")
    server = PostgresServer.start(tmp_path_factory.mktemp("spool-bench"))
    try:
        yield server
    finally:
        server.stop()


def _manager(dsn: str, spool: Path) -> BatchDBManager:
    settings = load_settings(
        None, backend="postgres", maintenance={"enabled": False},
        postgres={"dsn": dsn, "connect_timeout_seconds": 2.0},
        spool={"enabled": True, "path": str(spool), "after_seconds": 1.0})
    return BatchDBManager(settings=settings)


async def _write(m: BatchDBManager, table: str, n_rows: int, start: int, until: str) -> float:
    """Write ``n_rows`` rows as 100-row INSERTs, awaiting each (a window at a time);
    return the seconds it took."""
    began = time.perf_counter()
    window: list[str] = []
    for first in range(start, start + n_rows, OP_ROWS):
        rows = [{"id": i, "price": i * 0.5, "note": f"row {i}"} for i in range(first,
                                                                           first + OP_ROWS)]
        window.append(await m.queue_operation(table, "INSERT", rows))
        if len(window) >= 200:
            for op_id in window:
                await m.wait(op_id, until=until)
            window.clear()
    for op_id in window:
        await m.wait(op_id, until=until)
    return time.perf_counter() - began


async def _scenario(server: PostgresServer, workdir: Path, n_rows: int) -> dict[str, Any]:
    from batchdb.demo import DEMO_TABLES, DemoWorkload

    name = server.create_database("spoolbench")
    dsn = server.dsn_for(server.user, dbname=name)
    sql_exec(dsn, *[f"CREATE TABLE {t} (id bigint NOT NULL, price double precision, note text)"
                    for t in ("a", "b")])
    loop = asyncio.get_running_loop()
    m = _manager(dsn, workdir / "spool")
    await m.start()
    figures: dict[str, Any] = {"rows_per_phase": n_rows}
    try:
        normal = await _write(m, "a", n_rows, 0, "committed")
        figures["normal_rows_per_s"] = round(n_rows / normal)
        await m.queue_operation("b", "INSERT", [{"id": -1, "price": 0.0, "note": "warm"}])
        await m.flush()

        await loop.run_in_executor(None, stop_immediate, server)
        spooling = await _write(m, "a", n_rows, n_rows, "durable")
        figures["spooling_rows_per_s"] = round(n_rows / spooling)
        status = (await m.get_queue_status())["spool"]
        figures["spool_bytes_per_row"] = round(status["bytes"] / max(1, n_rows), 1)

        await loop.run_in_executor(None, start_again, server)
        replay_start: list[float] = []
        drained: list[float] = []

        async def watch() -> None:
            while True:
                s = (await m.get_queue_status())["spool"]
                if s["replaying"] and not replay_start:
                    replay_start.append(time.perf_counter())
                if s["operations"] == 0 and s["database"] == "up":
                    drained.append(time.perf_counter())
                    return
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        beside = await _write(m, "b", n_rows, 0, "committed")
        await watcher
        started = replay_start[0] if replay_start else drained[0]
        drain = max(drained[0] - started, 1e-6)
        figures["draining_rows_per_s"] = round(n_rows / drain)
        figures["beside_drain_rows_per_s"] = round(n_rows / beside)
        assert sql_rows(dsn, "SELECT count(*) FROM a") == [(2 * n_rows,)]
    finally:
        await m.stop()

    demo_dsn = server.dsn_for(server.user, dbname=server.create_database("spooldemo"))
    demo = _manager(demo_dsn, workdir / "demo-spool")
    for table in DEMO_TABLES:
        demo.declare_table(table)
    await demo.start()
    try:
        report = await DemoWorkload(demo, seed=7).run(5.0)
    finally:
        await demo.stop()
    rate = report.throughput
    backlog = rate * 600
    figures["demo_rows_per_s"] = round(rate)
    figures["outage_10min_backlog_rows"] = round(backlog)
    figures["drain_10min_seconds_demo_paused"] = round(backlog / figures["draining_rows_per_s"],
                                                       1)
    spare = figures["draining_rows_per_s"] - rate
    figures["drain_10min_seconds_demo_writing"] = (round(backlog / spare, 1) if spare > 0
                                                   else None)
    return figures


def test_spool_throughput_and_drain(benchmark: Any, server: PostgresServer, tmp_path: Path,
                                    bench_rows: int) -> None:
    n_rows = max(OP_ROWS * 10, min(bench_rows, 150_000) // OP_ROWS * OP_ROWS)
    results: list[dict[str, Any]] = []

    def run() -> None:
        results.append(asyncio.run(_scenario(server, tmp_path / f"r{len(results)}", n_rows)))

    benchmark.group = "spool"
    benchmark.pedantic(run, rounds=1, iterations=1)
    figures = results[-1]
    benchmark.extra_info.update(figures)
    print("\nspool (PostgreSQL):", ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert figures["spooling_rows_per_s"] > 0 and figures["draining_rows_per_s"] > 0
