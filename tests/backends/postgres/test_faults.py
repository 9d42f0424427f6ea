"""Faults on a real server: a restart in the middle of an ingest, connections cut during
COPY and during COMMIT (through a proxy that drops the server's answer), and several
writer processes into one table."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchdb import OperationFailed
from tests.pgserver import PostgresServer

from .conftest import ManagerFactory, sql_exec, sql_rows
from .faultproxy import FaultProxy

WRITER = Path(__file__).with_name("_writer.py")


async def test_server_restart_during_ingest(pg_server: PostgresServer,
                                            make_pg_manager: ManagerFactory,
                                            pg_dsn: str) -> None:
    # no primary key on "log": a batch applied twice would show as duplicate ids
    sql_exec(pg_dsn, "CREATE TABLE log (id bigint NOT NULL, v text)",
             "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL)")
    loop = asyncio.get_running_loop()
    async with make_pg_manager(batch={"max_retries": 12, "retry_max_delay_seconds": 1.0,
                                      "insert_batch_size": 500},
                               postgres={"batch_size": 500}) as m:
        ops: list[str] = []
        restart: asyncio.Future[None] | None = None
        restarted_at_op = -1
        i = 0
        # the restart begins at operation 100; the ingest goes on at least 50 operations
        # after the server is back
        while i < 300 or restarted_at_op < 0 or i < restarted_at_op + 50:
            rows = [{"id": i * 50 + k, "v": f"op{i}"} for k in range(50)]
            ops.append(await m.queue_operation("log", "INSERT", rows))
            ops.append(await m.queue_operation("kv", "UPSERT", [{"k": i % 40, "v": i}]))
            if i == 100:
                restart = loop.run_in_executor(None, pg_server.restart)
            if restart is not None and restart.done() and restarted_at_op < 0:
                restarted_at_op = i
            i += 1
            await asyncio.sleep(0.002)
        assert restart is not None
        await restart
        await m.flush()
        failed = []
        for op_id in ops:
            try:
                await m.wait(op_id)
            except OperationFailed as exc:
                failed.append(exc)
        status = await m.get_queue_status()
        pool = (await m.backend.status())["pool"]
    assert not failed, failed[:3]
    assert restarted_at_op > 100
    total = i * 50
    assert sql_rows(pg_dsn, "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM log") == [
        (total, total, 0, total - 1)]
    # the last upsert of each key won
    expected = {k: max(j for j in range(i) if j % 40 == k) for k in range(40)}
    assert dict(sql_rows(pg_dsn, "SELECT k, v FROM kv")) == expected
    assert pool["connections_discarded"] >= 1  # the restart was noticed …
    assert status["stats"]["retries"] >= 1  # … and survived by retrying


@pytest.mark.parametrize(("marker", "after_answer", "outcome"), [
    (b"COMMIT\x00", True, "committed"),  # COMMIT done on the server, its answer lost
    (b"COMMIT\x00", False, "aborted"),  # cut before COMMIT reached the server
    (b"COPY ", False, None),  # cut in the middle of a batch: a plain retry
], ids=["commit-answer-lost", "commit-never-arrived", "cut-during-copy"])
async def test_connection_cut_during_a_batch(pg_server: PostgresServer,
                                             make_pg_manager: ManagerFactory, pg_dsn: str,
                                             marker: bytes, after_answer: bool,
                                             outcome: str | None) -> None:
    sql_exec(pg_dsn, "CREATE TABLE nk (id bigint NOT NULL, v text)")  # no key: no dedup
    proxy = await FaultProxy(pg_server.port).start()
    try:
        async with make_pg_manager(postgres={"dsn": proxy.dsn(pg_dsn)}) as m:
            await m.wait(await m.queue_operation("nk", "INSERT", [{"id": 0, "v": "warm"}]))
            proxy.arm(marker, after_answer=after_answer)
            op = await m.queue_operation("nk", "INSERT",
                                         [{"id": i, "v": "x"} for i in range(1, 101)])
            done = await m.wait(op)
            assert done.rows_affected == 100
            assert proxy.cuts == 1
            resolved = dict(m.backend.outcomes_resolved)  # type: ignore[attr-defined]
            retries = (await m.get_queue_status())["stats"]["retries"]
    finally:
        await proxy.close()
    # every row exactly once: neither lost nor written twice by the retry
    assert sql_rows(pg_dsn, "SELECT count(*), count(DISTINCT id) FROM nk") == [(101, 101)]
    assert retries >= 1
    if outcome is None:
        assert resolved == {"committed": 0, "aborted": 0}
    else:
        assert resolved[outcome] == 1 and sum(resolved.values()) == 1



async def test_first_write_to_a_table_while_the_server_is_away(
        pg_server: PostgresServer, make_pg_manager: ManagerFactory, pg_dsn: str) -> None:
    """Describing a table is retried like a batch while the server cannot be reached."""
    sql_exec(pg_dsn, "CREATE TABLE late (id int PRIMARY KEY)")
    proxy = await FaultProxy(pg_server.port).start()
    try:
        async with make_pg_manager(postgres={"dsn": proxy.dsn(pg_dsn)}) as m:
            port = proxy.port
            await proxy.close()  # connection refused, the pooled connection cut
            queued = asyncio.ensure_future(m.queue_operation("late", "INSERT", [{"id": 1}]))
            await asyncio.sleep(0.3)
            assert not queued.done()
            proxy = await FaultProxy(pg_server.port).start(port)  # back, same address
            await m.wait(await queued)
    finally:
        await proxy.close()
    assert sql_rows(pg_dsn, "SELECT id FROM late") == [(1,)]

def test_several_writer_processes_into_one_table(pg_dsn: str, tmp_path: Path) -> None:
    sql_exec(pg_dsn, "CREATE TABLE shared (id bigint NOT NULL, writer int NOT NULL, "
                     "payload text NOT NULL)")
    writers, n_ops, per_op = 4, 60, 50
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(WRITER), pg_dsn, str(w), str(n_ops),
                               str(per_op)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        outputs.append((proc.returncode, out, err[-2000:]))
    for code, out, err in outputs:
        assert code == 0 and out.strip() == f"OK {n_ops + 1}", (code, out, err)
    per_writer = sum(1 if i % 3 == 0 else per_op for i in range(n_ops))
    rows = sql_rows(pg_dsn, "SELECT writer, count(*), count(DISTINCT id), min(id), max(id) "
                            "FROM shared GROUP BY writer ORDER BY writer")
    assert rows == [(w, per_writer, per_writer, w * 1_000_000, w * 1_000_000 + per_writer - 1)
                    for w in range(writers)]
    assert sql_rows(pg_dsn, "SELECT count(*) FROM shared WHERE payload NOT LIKE 'w%'") == [(0,)]
    candles = sql_rows(pg_dsn, "SELECT symbol, count(*) FROM candles GROUP BY symbol "
                               "ORDER BY symbol")
    assert candles == [(f"KRW-W{w}", 240) for w in range(writers)]
    assert time.monotonic() - start < 60
