"""Completion callbacks on a real SQLite file: exactly once, in commit order, a timeout
counted from each callback's own start, flush()/stop() waiting for them, the seed's
semantics inside a callback, and a callback backlog held to the queue budget."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchOperation, OperationFailed, Priority
from tests.conftest import ManagerFactory, make_table, rows_of

KV_DDL = "CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER);"


def cfg(**batch: Any) -> dict[str, Any]:
    return {"batch": batch}


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_every_callback_runs_exactly_once_in_commit_order(
        db_path: Path, make_manager: ManagerFactory, kind: str) -> None:
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(insert_batch_size=100))
    await m.start()
    seen: list[str] = []

    def plain(op: BatchOperation) -> None:
        seen.append(op.operation_id)

    async def coro(op: BatchOperation) -> None:
        seen.append(op.operation_id)

    callback = plain if kind == "plain" else coro
    ids = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}], Priority.NORMAL,
                                   callback) for i in range(2_000)]
    await m.flush()  # returns after the callbacks, not only the commits
    assert seen == ids  # one table, one priority: commit order is submission order
    await m.stop()
    assert seen == ids  # stop() ran nothing twice
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(2_000,)]
    status = await m.get_queue_status()
    assert status["callbacks"]["completed"] == 2_000
    assert status["callbacks"]["pending"] == 0


async def test_a_callback_times_out_from_its_own_start_not_while_it_waits(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """40 plain callbacks of 50 ms each take 2 s in line; a 0.5 s timeout applies to each
    alone, so every one of them runs (they used to be cancelled while they waited)."""
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(callback_timeout_seconds=0.5))
    await m.start()
    ran: list[str] = []

    def slow(op: BatchOperation) -> None:
        time.sleep(0.05)
        ran.append(op.operation_id)

    ids = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}], Priority.HIGH, slow)
           for i in range(40)]
    await m.flush()
    assert ran == ids
    status = (await m.get_queue_status())["callbacks"]
    assert (status["timed_out"], status["pending"], status["completed"]) == (0, 0, 40)


async def test_a_hung_plain_callback_is_abandoned_and_the_others_run(
        db_path: Path, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture) -> None:
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(callback_timeout_seconds=0.3))
    await m.start()
    release = threading.Event()
    ran: list[int] = []

    def callback(op: BatchOperation) -> None:
        key = op.data_rows[0]["k"]
        if key == 0:
            release.wait(30)  # hangs until the test lets it go
        ran.append(key)

    with caplog.at_level(logging.ERROR, logger="batchdb"):
        hung = await m.queue_operation("kv", "INSERT", [{"k": 0, "v": "x"}], Priority.HIGH,
                                       callback)
        await m.wait(hung)
        others = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}],
                                          Priority.HIGH, callback) for i in range(1, 11)]
        await asyncio.wait_for(m.flush(), 5)
    assert ran == list(range(1, 11))  # in order, in a fresh worker
    assert f"callback of operation {hung} timed out" in caplog.text
    status = (await m.get_queue_status())["callbacks"]
    assert (status["timed_out"], status["running_late"], status["pending"]) == (1, 1, 0)
    release.set()
    for _ in range(100):
        if ran[-1] == 0:
            break
        await asyncio.sleep(0.02)
    assert ran[-1] == 0  # the late one finished, once
    assert (await m.get_queue_status())["callbacks"]["running_late"] == 0
    assert all([(await m.wait(op_id)).succeeded for op_id in others])


async def test_a_hung_async_callback_is_cancelled_after_its_timeout(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(callback_timeout_seconds=0.3))
    await m.start()
    cancelled: list[str] = []
    fast: list[str] = []

    async def callback(op: BatchOperation) -> None:
        if op.data_rows[0]["k"] == 0:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(op.operation_id)
                raise
        fast.append(op.operation_id)

    hung = await m.queue_operation("kv", "INSERT", [{"k": 0, "v": "x"}], Priority.HIGH,
                                   callback)
    rest = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}], Priority.HIGH,
                                    callback) for i in range(1, 6)]
    await m.wait(rest[-1])
    start = time.monotonic()
    await asyncio.wait_for(m.flush(), 5)  # waits for the hung one's timeout
    assert time.monotonic() - start < 2.0
    assert cancelled == [hung] and fast == rest
    status = (await m.get_queue_status())["callbacks"]
    assert (status["timed_out"], status["pending"]) == (1, 0)


async def test_flush_and_stop_wait_for_callbacks_wait_does_not(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(callback_timeout_seconds=10))
    await m.start()
    gate = threading.Event()
    done: list[str] = []

    def gated(op: BatchOperation) -> None:
        gate.wait(10)
        done.append(op.operation_id)

    async def awaiting(op: BatchOperation) -> None:
        await asyncio.sleep(0.2)
        done.append(op.operation_id)

    first = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "a"}], Priority.HIGH,
                                    gated)
    op = await asyncio.wait_for(m.wait(first), 5)  # committed; its callback still blocked
    assert op.succeeded and done == []
    flushing = asyncio.ensure_future(m.flush())
    await asyncio.sleep(0.2)
    assert not flushing.done()  # flush() waits for the callback of what it committed
    gate.set()
    await asyncio.wait_for(flushing, 5)
    assert done == [first]
    second = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": "b"}], Priority.HIGH,
                                     awaiting)
    await m.stop()  # drains the writes, then the callbacks
    assert done == [first, second]


async def test_the_seeds_semantics_inside_a_callback(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, KV_DDL + "INSERT INTO kv VALUES (1, 'one', 1);")
    m = make_manager()
    await m.start()
    seen: dict[str, tuple[Any, ...]] = {}

    def record(op: BatchOperation) -> None:
        seen[op.operation_id] = (op.is_processed, op.succeeded, op.state, op.error is None,
                                 list(op.data_rows), op.rows_affected)

    rows = [{"k": 2, "v": "two"}, {"k": 3, "v": "three"}]
    good = await m.queue_operation("kv", "INSERT", rows, Priority.NORMAL, record)
    bad = await m.queue_operation("kv", "INSERT", [{"k": 4, "v": None}], Priority.NORMAL,
                                  record)
    missing = await m.queue_operation("kv", "UPDATE", [{"k": 404, "v": "ghost"}],
                                      Priority.NORMAL, record)
    gone = await m.queue_operation("kv", "DELETE", [{"k": 1}, {"k": 405}], Priority.NORMAL,
                                   record)
    await m.flush()
    assert seen[good] == (True, True, "committed", True, rows, 2)
    assert seen[bad][:4] == (False, False, "failed", False)  # a failure is not "processed"
    assert seen[bad][4] == [{"k": 4, "v": None}]
    assert seen[missing] == (True, True, "committed", True, [{"k": 404, "v": "ghost"}], 0)
    assert seen[gone] == (True, True, "committed", True, [{"k": 1}, {"k": 405}], 1)
    failed = m.scheduler.get(bad)
    assert failed is not None and "NOT NULL" in (failed.error or "")
    with pytest.raises(OperationFailed):
        await m.wait(bad)
    # the rows are released once the callback has run
    assert m.scheduler.get(good).data_rows == ()  # type: ignore[union-attr]


async def test_rows_affected_per_operation_in_one_shared_batch(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """UPDATE/DELETE operations coalesced into one batch each get their own count."""
    make_table(db_path, KV_DDL + "".join(f"INSERT INTO kv VALUES ({k}, 'v', 0);"
                                         for k in range(10)))
    m = make_manager(**cfg(linger_seconds={"NORMAL": 0.2}))
    await m.start()
    updates = [await m.queue_operation("kv", "UPDATE", [{"k": k, "n": 1}, {"k": 100 + k,
                                                                           "n": 1}][: 1 + k % 2])
               for k in range(6)]
    deletes = [await m.queue_operation("kv", "DELETE", [{"k": k}]) for k in (7, 700, 8)]
    await m.flush()
    assert [(await m.wait(u)).rows_affected for u in updates] == [1, 1, 1, 1, 1, 1]
    assert [(await m.wait(d)).rows_affected for d in deletes] == [1, 0, 1]
    status = await m.get_queue_status()
    assert status["stats"]["batches_committed"] == 2  # they were coalesced
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv WHERE n = 1") == [(6,)]


async def test_a_callback_backlog_counts_against_the_queue_budget(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """Callbacks slower than the commits slow the producer down: the operations queued or
    waiting for their callback stay within max_queue_size (plus what is in flight, which
    counts in neither, as before), and CRITICAL still gets through."""
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(max_queue_size=50, callback_timeout_seconds=5))
    await m.start()
    worst = 0
    worst_pending = 0

    def slow(op: BatchOperation) -> None:
        time.sleep(0.002)

    for i in range(400):
        await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}], Priority.LOW, slow)
        status = await m.get_queue_status()
        worst = max(worst, status["total_queued_operations"] + status["callbacks"]["pending"])
        worst_pending = max(worst_pending, status["callbacks"]["pending"])
    start = time.monotonic()
    crit = await m.queue_operation("kv", "INSERT", [{"k": -1, "v": "now"}], Priority.CRITICAL)
    await asyncio.wait_for(m.wait(crit), 5)
    assert time.monotonic() - start < 1.0  # not behind the callback backlog
    await m.flush()
    # the budget, plus at most the budget's worth handed to the writer meanwhile (400
    # callbacks of 2 ms behind ~400 fast commits piled up before)
    assert worst <= 100 and worst_pending <= 100
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(401,)]


async def test_four_priorities_on_one_table_the_later_submission_wins(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """One table written at rotating priorities with keys rewritten across them (the key
    index path), and an operation with unreadable keys in the middle (the scan path): every
    key ends as its last submission left it."""
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(linger_seconds={"HIGH": 0.05, "NORMAL": 0.1, "LOW": 0.2}))
    await m.start()
    expected: dict[int, str] = {}
    rotation = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)
    for i in range(400):
        base = (i - 7) * 10 if i % 5 == 4 and i >= 7 else i * 10  # 20% rewrite older keys
        rows = [{"k": base + j, "v": f"op{i}"} for j in range(10)]
        await m.queue_operation("kv", "UPSERT", rows, rotation[i % 4])
        expected.update((base + j, f"op{i}") for j in range(10))
        if i == 200:
            bad = await m.queue_operation("kv", "UPSERT", [{"k": [1], "v": "x"}],
                                          Priority.HIGH)
    await m.flush()
    with pytest.raises(OperationFailed):
        await m.wait(bad)
    assert dict(rows_of(db_path, "SELECT k, v FROM kv")) == expected
    assert (await m.get_queue_status())["stats"]["promotions"] > 0


async def test_the_later_submission_wins_with_many_keys_queued(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """70,000 keys queued at three priorities, then every key rewritten at CRITICAL, one
    operation at a time: each rewrite must find the queued writers of its keys and promote
    them (an index that once rebuilt itself past 65,536 keys lost the keys of the operation
    that made it grow)."""
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(linger_seconds={"HIGH": 100, "NORMAL": 100, "LOW": 100},
                           flush_interval_seconds=100, max_memory_mb=1000,
                           insert_batch_size=200_000))  # nothing dispatched before flush
    await m.start()
    rotation = (Priority.HIGH, Priority.NORMAL, Priority.LOW)
    n_ops = 700  # 70,000 keys
    for i in range(n_ops):
        await m.queue_operation("kv", "UPSERT", [{"k": i * 100 + j, "v": "old"}
                                                 for j in range(100)], rotation[i % 3])
    for i in range(n_ops):  # one at a time: each commits before the next is queued
        await m.wait(await m.queue_operation("kv", "UPSERT", [{"k": i * 100 + j, "v": "new"}
                                                              for j in range(100)],
                                             Priority.CRITICAL))
    await m.flush()
    assert rows_of(db_path, "SELECT v, COUNT(*) FROM kv GROUP BY v") == [("new", 70_000)]


async def test_under_pressure_batches_mix_the_lanes_of_a_table_and_the_later_write_wins(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """A producer outrunning the database on one table at four priorities: batches that are
    not full take operations of the table's other lanes (fewer, fuller batches), and every
    key still ends as its last submission left it."""
    make_table(db_path, KV_DDL)
    m = make_manager(**cfg(max_queue_size=64, insert_batch_size=100))
    await m.start()
    rotation = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)
    expected: dict[int, str] = {}
    batch_of: dict[str, tuple[float | None, Priority]] = {}
    ids: list[str] = []

    def record(op: BatchOperation) -> None:
        batch_of[op.operation_id] = (op.processed_at, op.priority)

    for i in range(600):
        # distinct keys for the first 400 (only the top-up mixes lanes), then rewrites
        base = (i - 9) * 10 if i % 5 == 4 and i >= 400 else i * 10
        ids.append(await m.queue_operation("kv", "UPSERT", [{"k": base + j, "v": f"op{i}"}
                                                            for j in range(10)],
                                           rotation[i % 4], record))
        expected.update((base + j, f"op{i}") for j in range(10))
    await m.flush()
    assert dict(rows_of(db_path, "SELECT k, v FROM kv")) == expected
    priorities_by_batch: dict[float | None, set[Priority]] = {}
    for op_id in ids[:400]:
        processed_at, priority = batch_of[op_id]
        priorities_by_batch.setdefault(processed_at, set()).add(priority)
    assert any(len(p) > 1 for p in priorities_by_batch.values())
