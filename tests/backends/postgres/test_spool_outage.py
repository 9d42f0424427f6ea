"""Writing through a PostgreSQL outage with ``[spool] enabled``, on a real server stopped
with ``pg_ctl stop -m immediate`` and started again (a server of this module's own).

Short outages here (a few seconds) for behaviour; the ≥ 20 s outage under a 4-priority
ingest is tests/backends/postgres/test_spool_ingest.py, the producer SIGKILLed during the outage is
tests/reliability/test_spool_kill.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchdb import (
    BatchDBManager,
    OperationFailed,
    Priority,
    SchemaError,
    hookimpl,
    load_settings,
)
from batchdb.spooler import SpoolClosed
from tests.pgserver import PostgresServer, sql_exec, sql_rows

from .outage import outage_server, start_again, stop_immediate

pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    yield from outage_server(tmp_path_factory.mktemp("outage"))


@pytest.fixture
def dsn(server: PostgresServer) -> Iterator[str]:
    if not server.running:
        start_again(server)
    name = server.create_database("spool")
    dsn = server.dsn_for(server.user, dbname=name)
    sql_exec(dsn, "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL, src text)",
             "CREATE TABLE log (id bigint NOT NULL, v text)")  # no key: a replay twice shows
    yield dsn
    if not server.running:
        start_again(server)
    server.drop_database(name)


class Recorder:
    """Records the spool hooks."""

    def __init__(self) -> None:
        self.spooled: list[str] = []
        self.replayed: list[str] = []
        self.callbacks: list[tuple[str, str]] = []

    @hookimpl
    def batchdb_spooled(self, batch: Any) -> None:
        assert all(op.state == "spooled" for op in batch.operations)
        self.spooled += [op.operation_id for op in batch.operations]

    @hookimpl
    def batchdb_spool_replayed(self, batch: Any) -> None:
        self.replayed += [op.operation_id for op in batch.operations]


def _manager(dsn: str, spool: Path, plugins: list[object] = (), **spool_cfg: Any
             ) -> BatchDBManager:
    settings = load_settings(
        None, backend="postgres", maintenance={"enabled": False},
        postgres={"dsn": dsn, "connect_timeout_seconds": 2.0},
        batch={"retry_base_delay_seconds": 0.02, "retry_max_delay_seconds": 0.2},
        spool={"enabled": True, "path": str(spool), "after_seconds": 0.3, **spool_cfg})
    return BatchDBManager(settings=settings, plugins=plugins)


async def _wait_for(predicate: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _drained(m: BatchDBManager, seconds: float = 60.0) -> dict[str, Any]:
    """The queue status once the spool is empty and its bookkeeping done."""
    deadline = time.monotonic() + seconds
    while True:
        status = await m.get_queue_status()
        if status["spool"]["operations"] == 0 and not status["spool"]["replaying"]:
            return status
        assert time.monotonic() < deadline, status["spool"]
        await asyncio.sleep(0.05)


async def test_writes_go_on_through_an_outage_and_commit_once_in_order(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    async with _manager(dsn, tmp_path / "spool", [recorder]) as m:
        before = [await m.queue_operation("log", "INSERT", [{"id": i, "v": "before"}])
                  for i in range(50)]
        before.append(await m.queue_operation("kv", "UPSERT", [{"k": 0, "v": -1}]))
        for op_id in before:
            await m.wait(op_id)
        await loop.run_in_executor(None, stop_immediate, server)
        with pytest.raises(SchemaError, match="'fresh' cannot be described: the database "
                                              "does not answer"):
            await m.queue_operation("fresh", "INSERT", [{"k": 1}])
        ops: list[str] = []
        with_callback: list[str] = []
        done: list[tuple[str, str]] = []
        for i in range(300):
            prio = list(Priority)[i % 4]
            with_callback.append(await m.queue_operation(
                "kv", "UPSERT", [{"k": i % 20, "v": i, "src": prio.name}], prio,
                callback=lambda op: done.append((op.operation_id, op.state))))
            ops.append(with_callback[-1])
            ops.append(await m.queue_operation("log", "INSERT", [{"id": 1000 + i, "v": "out"}],
                                               prio))
        for op_id in ops:  # durable: in the spool (the database is down)
            op = await asyncio.wait_for(m.wait(op_id, until="durable"), 30)
            assert op.state == "spooled", op
        assert done == []  # callbacks run on the final outcome only
        status = await m.get_queue_status()
        spool = status["spool"]
        assert spool["enabled"] and spool["operations"] == len(ops)
        assert spool["bytes"] > 0 and spool["oldest_age_seconds"] >= 0
        assert spool["database"].startswith("down since ")
        assert set(recorder.spooled) == set(ops)
        await loop.run_in_executor(None, start_again, server)
        for op_id in ops:
            op = await asyncio.wait_for(m.wait(op_id), 60)
            assert op.state == "committed"
        await m.flush()
        status = await _drained(m)
        assert status["spool"]["database"] == "up"
        assert status["spool"]["replayed_operations"] == len(ops)
        after = await m.queue_operation("log", "INSERT", [{"id": 5000, "v": "after"}])
        await m.wait(after)
    assert sorted(recorder.replayed) == sorted(ops)
    assert sorted(done) == sorted((op_id, "committed") for op_id in with_callback)
    # every INSERT once; the later submission of each key won
    assert sql_rows(dsn, "SELECT count(*), count(DISTINCT id) FROM log") == [(351, 351)]
    expected = {k: max(i for i in range(300) if i % 20 == k) for k in range(20)}
    assert dict(sql_rows(dsn, "SELECT k, v FROM kv")) == expected
    assert sql_rows(dsn, "SELECT count(*) FROM batchdb_spool_applied") == [(0,)]  # forgotten


async def test_a_manager_starts_on_a_spool_while_the_database_is_down(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    """The first manager stops during the outage: what it spooled stays on disk. A second
    one starts while the database is still down (the spool describes the tables), takes
    writes into the spool behind the old ones, and replays everything in order once the
    database is back."""
    loop = asyncio.get_running_loop()
    spool = tmp_path / "spool"
    first = _manager(dsn, spool)
    await first.start()
    await first.queue_operation("kv", "UPSERT", [{"k": 1, "v": 0, "src": "warm"}])
    await first.flush()
    await loop.run_in_executor(None, stop_immediate, server)
    early = [await first.queue_operation("kv", "UPSERT", [{"k": 1, "v": i, "src": "first"}])
             for i in range(1, 40)]
    for op_id in early:
        await asyncio.wait_for(first.wait(op_id, until="durable"), 30)
    waiting = asyncio.ensure_future(first.wait(early[-1]))
    await first.stop()  # the database is down: the spool keeps them
    with pytest.raises(SpoolClosed, match="committed when a manager is started on that spool"):
        await waiting
    assert (await first.get_queue_status())["spool"]["operations"] == 39

    second = _manager(dsn, spool)
    await second.start()  # the database is still down
    try:
        status = await second.get_queue_status()
        assert status["running"] and status["spool"]["database"].startswith("down since")
        late = await second.queue_operation("kv", "UPSERT", [{"k": 1, "v": 99, "src": "second"}])
        await asyncio.wait_for(second.wait(late, until="durable"), 30)
        await loop.run_in_executor(None, start_again, server)
        await asyncio.wait_for(second.wait(late), 60)
        assert sql_rows(dsn, "SELECT v, src FROM kv WHERE k = 1") == [(99, "second")]
        for op_id in early:  # replayed with their own ids
            assert (await second.wait(op_id)).state == "committed"
    finally:
        await second.stop()


async def test_bad_data_in_the_spool_fails_its_operation_alone(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with _manager(dsn, tmp_path / "spool") as m:
        await m.queue_operation("kv", "UPSERT", [{"k": 0, "v": 0}])
        await m.flush()
        await loop.run_in_executor(None, stop_immediate, server)
        good1 = await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": 1}])
        bad = await m.queue_operation("kv", "UPSERT", [{"k": 2, "v": None}])  # NOT NULL
        good2 = await m.queue_operation("kv", "UPSERT", [{"k": 3, "v": 3}])
        for op_id in (good1, bad, good2):
            await asyncio.wait_for(m.wait(op_id, until="durable"), 30)
        await loop.run_in_executor(None, start_again, server)
        await asyncio.wait_for(m.wait(good2), 60)
        with pytest.raises(OperationFailed, match="not-null|null value"):
            await m.wait(bad)
        await m.wait(good1)
    assert sorted(sql_rows(dsn, "SELECT k FROM kv")) == [(0,), (1,), (3,)]


async def test_the_spool_directory_of_a_running_manager_is_refused(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    from batchdb.spool import SpoolLocked

    async with _manager(dsn, tmp_path / "spool"):
        other = _manager(dsn, tmp_path / "spool")
        with pytest.raises(SpoolLocked, match=f"pid {os.getpid()}"):
            await other.start()


CRASH_AFTER_REPLAY = Path(__file__).resolve().parents[2] / "reliability" / "crash_after_replay.py"


async def test_a_crash_between_the_replayed_commit_and_the_spools_note_writes_nothing_twice(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    """The replay marks: a process that dies after its replayed batch committed, before
    the spool noted it, leaves the records pending; the next replay finds their marks in
    the database and does not write them again (``log`` has no key: a second INSERT of a
    row would show)."""
    import subprocess
    import sys

    loop = asyncio.get_running_loop()
    spool = tmp_path / "spool"
    first = _manager(dsn, spool)
    await first.start()
    await first.queue_operation("log", "INSERT", [{"id": -1, "v": "warm"}])
    await first.flush()
    await loop.run_in_executor(None, stop_immediate, server)
    ops = [await first.queue_operation("log", "INSERT", [{"id": i, "v": "x"}, {"id": -i - 2,
                                                                               "v": "y"}])
           for i in range(100)]
    for op_id in ops:
        await asyncio.wait_for(first.wait(op_id, until="durable"), 30)
    await first.stop()
    await loop.run_in_executor(None, start_again, server)
    proc = await loop.run_in_executor(None, lambda: subprocess.run(
        [sys.executable, str(CRASH_AFTER_REPLAY), json.dumps({
            "backend": "postgres", "maintenance": {"enabled": False}, "postgres": {"dsn": dsn},
            "spool": {"enabled": True, "path": str(spool)}})],
        capture_output=True, text=True, timeout=120))
    assert proc.returncode == 9, proc.stderr[-2000:]  # crash_after_replay.CRASH_EXIT
    committed = sql_rows(dsn, "SELECT count(*) FROM log")[0][0]
    assert committed > 1  # the crashed process did commit (some of) the replay
    async with _manager(dsn, spool) as second:
        status = await _drained(second)
        assert status["spool"]["skipped_as_committed"] > 0
    assert sql_rows(dsn, "SELECT count(*), count(DISTINCT id) FROM log") == [(201, 201)]


async def test_batchdb_status_shows_the_spool_and_the_database_down(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    """``batchdb status`` reads the spool of a running producer without taking its lock:
    operations, bytes, the oldest one's age and ``down since …``; exit 1 while the
    database does not answer, the spool's figures still shown."""
    from typer.testing import CliRunner

    from batchdb.cli import app

    loop = asyncio.get_running_loop()
    spool = tmp_path / "spool"
    conf = tmp_path / "settings.toml"
    conf.write_text(f'backend = "postgres"\n[postgres]\ndsn = "{dsn}"\n'
                    f'connect_timeout_seconds = 2.0\n'
                    f'[spool]\nenabled = true\npath = "{spool}"\n')

    def status() -> Any:
        return CliRunner().invoke(app, ["status", "-s", str(conf)], env={"COLUMNS": "200"})

    async with _manager(dsn, spool) as m:
        await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": 1}])
        await m.flush()
        up = await loop.run_in_executor(None, status)
        assert up.exit_code == 0, up.output
        lines = [" ".join(line.split()) for line in up.stdout.splitlines()]
        assert "database up" in lines and "operations 0" in lines
        await loop.run_in_executor(None, stop_immediate, server)
        ops = [await m.queue_operation("kv", "UPSERT", [{"k": i, "v": i}]) for i in range(7)]
        for op_id in ops:
            await asyncio.wait_for(m.wait(op_id, until="durable"), 30)
        down = await loop.run_in_executor(None, status)
        assert down.exit_code == 1, down.output
        lines = [" ".join(line.split()) for line in down.stdout.splitlines()]
        assert any(line.startswith("database down since 20") for line in lines), lines
        assert "operations 7" in lines and "tables kv" in lines
        assert any(line.startswith("bytes ") for line in lines)
        await loop.run_in_executor(None, start_again, server)
        await asyncio.wait_for(m.wait(ops[-1]), 60)
        await _drained(m)
    again = await loop.run_in_executor(None, status)
    assert again.exit_code == 0 and "database up" in " ".join(again.stdout.split())


async def test_a_full_disk_under_the_spool_makes_producers_wait_and_loses_nothing(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    """The spool on a file system of 384 KB that fills up during the outage: the append is
    reported (``status["spool"]["error"]``) and retried, the producers wait on the memory
    budget; once the database is back the spool drains, the appends go on, and every
    operation is committed once."""
    from tests.core.test_spool import _tmpfs

    loop = asyncio.get_running_loop()
    with _tmpfs(tmp_path / "small", "size=384k", "mode=0700") as mount:
        settings_dsn = dsn
        m = _manager(settings_dsn, mount / "spool")
        m.config.max_memory_mb = 1.0
        await m.start()
        try:
            await m.queue_operation("log", "INSERT", [{"id": -1, "v": "warm"}])
            await m.flush()
            await loop.run_in_executor(None, stop_immediate, server)
            ids: list[str] = []

            async def produce() -> None:
                for i in range(400):
                    ids.append(await m.queue_operation(
                        "log", "INSERT", [{"id": i * 10 + j, "v": os.urandom(500).hex()}
                                          for j in range(10)]))

            producer = asyncio.ensure_future(produce())
            await _wait_for(lambda: (m._spooler is not None
                                     and m._spooler.error is not None), 60)
            status = await m.get_queue_status()
            assert "disk is full" in status["spool"]["error"]
            await asyncio.sleep(1.0)
            assert not producer.done()  # waiting for room, not failing
            held = len(ids)
            assert 0 < held < 400
            await loop.run_in_executor(None, start_again, server)
            await asyncio.wait_for(producer, 120)
            for op_id in ids:
                await asyncio.wait_for(m.wait(op_id), 120)
            status = await _drained(m)
            assert status["spool"]["error"] is None
        finally:
            await m.stop()
    assert sql_rows(dsn, "SELECT count(*), count(DISTINCT id) FROM log") == [(4001, 4001)]


async def test_over_max_mb_producers_get_queue_full_with_backpressure_raise(
        server: PostgresServer, dsn: str, tmp_path: Path) -> None:
    """``spool.max_mb`` is a budget like the memory budget: over it the batch waits in
    memory, the queue fills, and a producer gets QueueFull (``backpressure = "raise"``);
    nothing already accepted is lost."""
    from batchdb import QueueFull

    loop = asyncio.get_running_loop()
    m = _manager(dsn, tmp_path / "spool", max_mb=0.05)
    m.config.max_memory_mb = 0.5
    m.config.backpressure = "raise"
    await m.start()
    try:
        await m.queue_operation("log", "INSERT", [{"id": -1, "v": "warm"}])
        await m.flush()
        await loop.run_in_executor(None, stop_immediate, server)
        accepted: list[str] = []
        with pytest.raises(QueueFull):
            for i in range(5000):
                accepted.append(await m.queue_operation(
                    "log", "INSERT", [{"id": i, "v": os.urandom(100).hex()}]))
                await asyncio.sleep(0.001)  # a producer's pace: the spool fills first
        status = await m.get_queue_status()
        assert 0 < status["spool"]["bytes"] <= 0.05 * 1024 * 1024
        await loop.run_in_executor(None, start_again, server)
        for op_id in accepted:
            await asyncio.wait_for(m.wait(op_id), 120)
    finally:
        await m.stop()
    assert sql_rows(dsn, "SELECT count(*) FROM log") == [(len(accepted) + 1,)]
