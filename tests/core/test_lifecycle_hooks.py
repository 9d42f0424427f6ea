"""The life-cycle hooks: ``batchdb_manager_started(manager)`` and
``batchdb_manager_stopped(manager)`` (core/hookspecs.py, docs/hooks.md)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBError, BatchDBManager, NotRunningError, OperationType, hookimpl
from batchdb.backend import Backend, Batch
from tests.conftest import ManagerFactory, make_table


class Counter:
    """An observer registered by another plugin at start: counts committed rows."""

    def __init__(self) -> None:
        self.rows = 0

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        self.rows += batch.row_count


class LifeCycle:
    """Records the calls; registers a Counter on the manager's plugin manager at start."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.counter = Counter()

    @hookimpl
    def batchdb_manager_started(self, manager: BatchDBManager) -> None:
        loop = asyncio.get_running_loop()  # called on the manager's event loop
        status = manager.backend.status  # the backend is open: it can be used
        self.events.append(("started", manager, loop, callable(status)))
        manager.pm.register(self.counter)

    @hookimpl
    async def batchdb_manager_stopped(self, manager: BatchDBManager) -> None:
        await asyncio.sleep(0)  # an async implementation is awaited
        status = await manager.get_queue_status()
        self.events.append(("stopped", manager, status["running"],
                            status["total_queued_operations"]))


@pytest.fixture
def kv(db_path: Path) -> Path:
    make_table(db_path, "CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL);")
    return db_path


async def test_manager_started_is_called_once_on_the_loop_and_its_observers_count(
        kv: Path, make_manager: ManagerFactory) -> None:
    plugin = LifeCycle()
    manager = make_manager(plugins_extra=[plugin])
    await manager.start()
    await manager.start()  # already running: not called again
    assert [e[0] for e in plugin.events] == ["started"]
    _, seen, loop, backend_ok = plugin.events[0]
    assert seen is manager and loop is asyncio.get_running_loop() and backend_ok
    for i in range(5):
        await manager.queue_operation("kv", OperationType.INSERT, [{"k": i, "v": "x"}])
    await manager.flush()
    # the observer registered during the hook is called for this run's batches
    assert plugin.counter.rows == 5
    await manager.stop()


async def test_manager_stopped_is_called_after_the_drain(
        kv: Path, make_manager: ManagerFactory) -> None:
    plugin = LifeCycle()
    manager = make_manager(plugins_extra=[plugin])
    await manager.start()
    await manager.queue_operation("kv", OperationType.INSERT, [{"k": 1, "v": "x"}])
    await manager.stop()
    assert plugin.events[-1] == ("stopped", manager, False, 0)  # drained, not running
    assert sqlite3.connect(kv).execute("SELECT count(*) FROM kv").fetchone() == (1,)
    await manager.stop()  # not running: not called again
    assert [e[0] for e in plugin.events] == ["started", "stopped"]


class Refuses:
    def __init__(self) -> None:
        self.stopped = 0

    @hookimpl
    def batchdb_manager_started(self, manager: BatchDBManager) -> None:
        raise BatchDBError("refused by a plugin")

    @hookimpl
    def batchdb_manager_stopped(self, manager: BatchDBManager) -> None:
        self.stopped += 1


async def test_manager_started_raising_fails_start_and_closes_the_backend(
        kv: Path, make_manager: ManagerFactory) -> None:
    plugin = Refuses()
    manager = make_manager(plugins_extra=[plugin])
    with pytest.raises(BatchDBError, match="refused by a plugin"):
        await manager.start()
    assert plugin.stopped == 1  # the others can undo what they did at start
    with pytest.raises(NotRunningError):
        await manager.queue_operation("kv", OperationType.INSERT, [{"k": 1, "v": "x"}])
    # the writer was closed: another manager can take the file at once
    other = make_manager()
    await other.start()
    await other.queue_operation("kv", OperationType.INSERT, [{"k": 1, "v": "x"}])
    await other.flush()
    await other.stop()


class StopRaises:
    @hookimpl
    def batchdb_manager_stopped(self, manager: BatchDBManager) -> None:
        raise RuntimeError("a broken observer")


async def test_manager_stopped_raising_is_logged_not_raised(
        kv: Path, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture) -> None:
    manager = make_manager(plugins_extra=[StopRaises()])
    await manager.start()
    await manager.queue_operation("kv", OperationType.INSERT, [{"k": 7, "v": "x"}])
    with caplog.at_level(logging.ERROR, logger="batchdb"):
        await manager.stop()
    assert "batchdb_manager_stopped raised" in caplog.text
    assert sqlite3.connect(kv).execute("SELECT k FROM kv").fetchall() == [(7,)]
