"""The SQLite backend under the scheduler: its writer thread's order (CRITICAL passing a
waiting backlog batch of another table, never one of its own), the WAL checkpoint beside the
writer, and how batches become statements (multi-row, one transaction, variable limits).
White-box tests of this backend: they look at its connection and writer directly."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchdb import OperationFailed, Priority
from batchdb.backend import Backend, Batch
from batchdb.backends.sqlite.backend import statement_rows
from batchdb.hookspecs import hookimpl
from tests.conftest import LOCKER, LOG_DDL, ManagerFactory, batch_cfg, make_table, rows_of


class _CommitOrder:
    """A plugin recording each committed batch as (table, queue priority, first id)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        self.seen.append((batch.table.name, batch.priority.name,
                          batch.operations[0].operation_id))


async def test_wal_is_checkpointed_beside_the_writer(db_path: Path,
                                                     make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(sqlite={"background_checkpoint_seconds": 0.02},
                     **batch_cfg(insert_batch_size=500))
    await m.start()
    # the writer never checkpoints inside a COMMIT: a separate connection does
    assert m.backend._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)  # type: ignore[attr-defined]
    for chunk in range(300):
        await m.queue_operation("kv", "INSERT", [{"k": chunk * 500 + i, "v": "x" * 200, "n": i}
                                                 for i in range(500)])
        if chunk % 10 == 0:
            await m.flush()
    await m.flush()
    await asyncio.sleep(0.1)
    status = await m.backend.status()
    assert status["background_checkpoints"] > 0 and status["background_checkpoint_error"] is None
    # the WAL was reset and reused instead of growing with every row written
    assert status["wal_bytes"] < status["file_bytes"] / 2
    await m.stop()
    assert rows_of(db_path, "PRAGMA integrity_check") == [("ok",)]
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(150000,)]


async def test_stop_checkpoints_at_once_without_waiting_out_the_interval(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(sqlite={"background_checkpoint_seconds": 60})
    await m.start()
    await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"} for i in range(1000)])
    await m.flush()
    checkpointer = m.backend._checkpointer  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)  # it woke on the commit and now waits out its 60 s interval
    assert checkpointer.checkpoints == 0
    await asyncio.wait_for(m.stop(), 10)  # stop() ends the wait: the last checkpoint runs now
    assert checkpointer.checkpoints == 1 and checkpointer.last_error is None
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(1000,)]


async def _backlog_held_by_lock(db_path: Path, make_manager: ManagerFactory,
                                order: _CommitOrder) -> tuple[Any, subprocess.Popen[str]]:
    """A manager whose first LOW batch is stuck on another process's lock in the writer
    thread and whose second LOW batch waits behind it (both writers busy)."""
    make_table(db_path, LOG_DDL)
    m = make_manager(sqlite={"busy_timeout_ms": 20},
                     **batch_cfg(max_retries=60, retry_base_delay_seconds=0.01,
                                 retry_max_delay_seconds=0.05,
                                 linger_seconds={"CRITICAL": 0, "HIGH": 0, "NORMAL": 0,
                                                 "LOW": 0}))
    m.pm.register(order)
    await m.start()
    for table in ("log", "kv"):  # read before the writer thread is busy
        await m.table_info(table)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db_path), "0.8"],
                              stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
    return m, locker


async def _writer_started_one(m: Any) -> None:
    """Until the writer thread runs the first batch and the second one waits."""
    for _ in range(500):
        if m.backend._writer.waiting == 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the writer thread did not start the first batch")


async def test_critical_passes_a_waiting_backlog_batch_of_another_table(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """Both writer slots hold LOW batches (one stuck on a lock, one waiting): a CRITICAL
    write still goes to the writer (one slot more) and commits right after the stuck
    batch, before the LOW batch that was waiting ahead of it."""
    order = _CommitOrder()
    m, locker = await _backlog_held_by_lock(db_path, make_manager, order)
    try:
        low = [await m.queue_operation("log", "INSERT", [{"tag": f"low{i}"}], Priority.LOW)
               for i in range(3)]
        await _writer_started_one(m)
        status = await m.get_queue_status()
        assert status["batches_in_flight"] == 2 and status["queue_sizes"]["LOW"] == 1
        crit = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "order"}],
                                       Priority.CRITICAL)
        status = await m.get_queue_status()
        assert status["batches_in_flight"] == 3 and status["queue_sizes"]["CRITICAL"] == 0
        # handed over but not committed: checkpoints and maintenance still hold back
        assert m.scheduler.critical_waiting()
        await asyncio.wait_for(m.flush(), 20)
    finally:
        locker.wait(10)
    assert [(t, p) for t, p, _ in order.seen] == [("log", "LOW"), ("kv", "CRITICAL"),
                                                  ("log", "LOW"), ("log", "LOW")]
    assert [op_id for _, _, op_id in order.seen] == [low[0], crit, low[1], low[2]]
    assert not m.scheduler.critical_waiting()
    assert [r[0] for r in rows_of(db_path, "SELECT tag FROM log ORDER BY id")] == [
        "locker", "low0", "low1", "low2"]


async def test_critical_does_not_pass_a_waiting_batch_of_its_own_table(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """Same situation, but the CRITICAL write is on the table of the waiting LOW batch
    and rewrites its key: it commits after it, so the later submission wins."""
    order = _CommitOrder()
    m, locker = await _backlog_held_by_lock(db_path, make_manager, order)
    try:
        first = await m.queue_operation("log", "INSERT", [{"tag": "stuck"}], Priority.LOW)
        waiting = await m.queue_operation("kv", "INSERT", [{"k": 7, "v": "backfill"}],
                                          Priority.LOW)
        await _writer_started_one(m)
        crit = await m.queue_operation("kv", "UPSERT", [{"k": 7, "v": "live"}],
                                       Priority.CRITICAL)
        await asyncio.wait_for(m.flush(), 20)
    finally:
        locker.wait(10)
    assert [op_id for _, _, op_id in order.seen] == [first, waiting, crit]
    assert rows_of(db_path, "SELECT k, v FROM kv") == [(7, "live")]


async def test_multi_row_statements_apply_rows_in_order(db_path: Path,
                                                        make_manager: ManagerFactory) -> None:
    """INSERT and UPSERT batches are written with multi-row statements (1,024 rows each,
    the rest in multiples of 64, of 8, then powers of two): the result is the one of
    applying the rows one by one, repeated keys included (the last row of a key wins)."""
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(insert_batch_size=5000))
    await m.start()
    rows = [{"k": i % 301, "v": f"v{i}", "n": i} for i in range(2150)]  # 2*1024+64+32+4+2
    inserted = [{"k": 5000 + i, "v": "i", "n": i} for i in range(1033)]  # 1024 + 8 + 1
    ids = [await m.queue_operation("kv", "UPSERT", rows),
           await m.queue_operation("kv", "INSERT", inserted)]
    for op_id in ids:
        assert (await m.wait(op_id)).succeeded
    reference = sqlite3.connect(":memory:")
    reference.executescript(LOG_DDL)
    reference.executemany("INSERT INTO kv (k, v, n) VALUES (:k, :v, :n) ON CONFLICT (k) DO "
                          "UPDATE SET v = excluded.v, n = excluded.n", rows)
    reference.executemany("INSERT INTO kv (k, v, n) VALUES (:k, :v, :n)", inserted)
    expected = reference.execute("SELECT k, v, n FROM kv ORDER BY k").fetchall()
    assert rows_of(db_path, "SELECT k, v, n FROM kv ORDER BY k") == expected
    assert len(expected) == 301 + 1033


async def test_a_full_batch_is_one_statement_and_its_own_transaction(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """Statements are what cost (the writer hands the GIL over at each): a full batch of
    one-row writes is one multi-row INSERT in autocommit, a single row one statement; a
    larger operation goes in statements of a full batch's rows and the rest, inside
    BEGIN IMMEDIATE ... COMMIT."""
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(insert_batch_size=1000))
    await m.start()
    await m.queue_operation("kv", "INSERT", [{"k": -1, "v": "x", "n": 0}])
    await m.flush()  # the table is known and the writer idle before tracing starts
    traced: list[str] = []
    m.backend._conn.set_trace_callback(traced.append)  # type: ignore[attr-defined]
    for i in range(1000):
        await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x", "n": i}])
    await m.flush()
    def statements() -> list[tuple[str, int]]:  # (verb, rows), from the SQL as executed
        return [(t.split()[0], t.count("),(") + 1 if " VALUES " in t else 0) for t in traced]

    assert statements() == [("INSERT", 1000)]
    traced.clear()
    await m.queue_operation("kv", "UPSERT", [{"k": i, "v": "y", "n": i} for i in range(2500)])
    await m.flush()
    assert statements() == [
        ("BEGIN", 0), ("INSERT", 1000), ("INSERT", 1000), ("INSERT", 448), ("INSERT", 48),
        ("INSERT", 4), ("COMMIT", 0)]
    assert rows_of(db_path, "SELECT COUNT(*), SUM(v = 'y') FROM kv") == [(2501, 2500)]
    traced.clear()  # a single row (a live order, say) of any kind: one statement too
    await m.queue_operation("kv", "UPDATE", [{"k": 7, "v": "z"}], Priority.CRITICAL)
    await m.queue_operation("kv", "INSERT", [{"k": 9000, "v": "z"}], Priority.CRITICAL)
    await m.flush()
    assert [t.split()[0] for t in traced] == ["UPDATE", "INSERT"]
    assert rows_of(db_path, "SELECT k FROM kv WHERE v = 'z' ORDER BY k") == [(7,), (9000,)]


@pytest.mark.parametrize("chunk", [1024, 64, 16, 1])
def test_statement_sizes_cover_every_row_from_a_small_set(chunk: int) -> None:
    sizes: set[int] = set()
    for n in range(1, 3 * 1024):
        parts = []
        while (done := sum(parts)) < n:
            parts.append(statement_rows(n - done, chunk))
        assert sum(parts) == n and max(parts) <= chunk
        assert len(parts) <= -(-n // chunk) + 5, (n, parts)  # whole chunks + at most 5
        sizes.update(parts)
    assert len(sizes) <= 30  # statement texts per table and column set
    assert [statement_rows(1000 - d, 1024) for d in (0, 960)] == [960, 40]


async def test_wide_tables_stay_under_the_variable_limit(db_path: Path,
                                                         make_manager: ManagerFactory) -> None:
    """A 300-column table: 1,024 rows would need 307,200 parameters (SQLite allows 32,766),
    so the chunks shrink; 1,000 rows commit in one batch."""
    columns = [f"c{j}" for j in range(300)]
    make_table(db_path, f"CREATE TABLE wide (id INTEGER PRIMARY KEY, {', '.join(columns)});")
    m = make_manager()
    await m.start()
    rows = [{"id": i, **{c: i * j for j, c in enumerate(columns)}} for i in range(1000)]
    assert (await m.wait(await m.queue_operation("wide", "INSERT", rows))).succeeded
    assert rows_of(db_path, "SELECT count(*), sum(c299) FROM wide") == [
        (1000, sum(i * 299 for i in range(1000)))]


async def test_a_bad_value_among_many_rows_is_named_like_one_row(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """A multi-row statement numbers parameters across rows; the error still carries the
    database's one-row message and the column, and the other operations commit."""
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()
    rows = [{"k": i, "v": "ok", "n": i} for i in range(300)]
    rows[280]["v"] = {"not": "bindable"}
    bad = await m.queue_operation("kv", "INSERT", rows, Priority.CRITICAL)
    good = await m.queue_operation("kv", "INSERT", [{"k": 999, "v": "fine", "n": 0}],
                                   Priority.CRITICAL)
    with pytest.raises(OperationFailed, match=r"parameter 2: type 'dict' is not supported "
                                              r"\(column 'v'\)"):
        await m.wait(bad)
    assert (await m.wait(good)).succeeded
    assert rows_of(db_path, "SELECT k FROM kv") == [(999,)]
