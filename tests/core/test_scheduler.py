"""Scheduler behaviour on a real SQLite file: priorities, coalescing, triggers, budget,
ordering, isolation, retries, callbacks, maintenance and shutdown."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchdb import (
    BatchOperation,
    OperationFailed,
    OperationType,
    Priority,
    QueueFull,
    hookimpl,
)
from batchdb.backend import Backend, Batch
from tests.conftest import (
    LOCKER,
    LOG_DDL,
    ManagerFactory,
    batch_cfg,
    make_table,
    rows_of,
    upbit_candles,
)

SLOW_LINGER = {"CRITICAL": 0, "HIGH": 100, "NORMAL": 100, "LOW": 100}



async def test_dispatch_takes_highest_priority_first(db_path: Path,
                                                     make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds={"CRITICAL": 0, "HIGH": 0, "NORMAL": 0, "LOW": 0},
                                 max_concurrent_batches=1))
    await m.start()
    async with m.scheduler.exclusive():  # hold the writer so all four wait together
        for prio in (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL):
            await m.queue_operation("log", OperationType.INSERT, [{"tag": prio.name}], prio)
    await m.flush()
    tags = [r[0] for r in rows_of(db_path, "SELECT tag FROM log ORDER BY id")]
    assert tags == ["CRITICAL", "HIGH", "NORMAL", "LOW"]


async def test_one_row_operations_are_coalesced(db_path: Path,
                                                make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(insert_batch_size=500))
    await m.start()
    for i in range(2000):
        await m.queue_operation("kv", "INSERT", [{"k": i, "v": str(i), "n": i}])
    await m.flush()
    status = await m.get_queue_status()
    assert rows_of(db_path, "SELECT COUNT(*), SUM(n) FROM kv") == [(2000, sum(range(2000)))]
    assert status["stats"]["successful_operations"] == 2000
    # 2000 one-row writes become a handful of transactions, not 2000
    assert status["stats"]["batches_committed"] <= 8


async def test_different_column_sets_are_not_merged(db_path: Path,
                                                    make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()
    a = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "a", "n": 1}])
    b = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": "b"}])
    c = await m.queue_operation("kv", "UPDATE", [{"k": 1, "n": 7}])
    await m.flush()
    for op_id in (a, b, c):
        assert (await m.wait(op_id)).succeeded
    assert rows_of(db_path, "SELECT k, v, n FROM kv ORDER BY k") == [(1, "a", 7), (2, "b", None)]


async def test_critical_goes_at_once_while_low_lingers(db_path: Path,
                                                       make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds=SLOW_LINGER, flush_interval_seconds=100))
    await m.start()
    low = await m.queue_operation("log", "INSERT", [{"tag": "low"}], Priority.LOW)
    crit = await m.queue_operation("log", "INSERT", [{"tag": "crit"}], Priority.CRITICAL)
    await asyncio.wait_for(m.wait(crit), 5)
    low_op = m.scheduler.get(low)
    assert low_op is not None and not low_op.is_processed
    status = await m.get_queue_status()
    assert status["queue_sizes"]["LOW"] == 1
    assert status["oldest_wait_seconds"]["LOW"] > 0
    await m.flush()
    assert low_op.is_processed
    assert [r[0] for r in rows_of(db_path, "SELECT tag FROM log ORDER BY id")] == ["crit", "low"]


async def test_flush_interval_bounds_linger(db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds=SLOW_LINGER, flush_interval_seconds=0.2))
    await m.start()
    start = time.monotonic()
    op_id = await m.queue_operation("log", "INSERT", [{"tag": "x"}], Priority.LOW)
    op = await asyncio.wait_for(m.wait(op_id), 5)  # no flush(): the interval triggers it
    assert op.succeeded and time.monotonic() - start >= 0.15


async def test_full_batch_is_dispatched_without_waiting(db_path: Path,
                                                        make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds=SLOW_LINGER, flush_interval_seconds=100,
                                 insert_batch_size=10))
    await m.start()
    ids = [await m.queue_operation("log", "INSERT", [{"tag": str(i)}], Priority.LOW)
           for i in range(10)]
    ops = await asyncio.wait_for(asyncio.gather(*(m.wait(i) for i in ids)), 5)
    assert all(op.succeeded for op in ops)
    extra = await m.queue_operation("log", "INSERT", [{"tag": "late"}], Priority.LOW)
    await asyncio.sleep(0.2)
    extra_op = m.scheduler.get(extra)
    assert extra_op is not None and not extra_op.is_processed  # a partial batch still lingers


@pytest.mark.parametrize("pressure", [{"max_memory_mb": 0.001}, {"max_queue_size": 4}])
async def test_memory_and_queue_pressure_dispatch(db_path: Path, make_manager: ManagerFactory,
                                                  pressure: dict[str, Any]) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds=SLOW_LINGER, flush_interval_seconds=100,
                                 **pressure))
    await m.start()
    ids = [await m.queue_operation("log", "INSERT", [{"tag": "p" * 50}], Priority.LOW)
           for _ in range(6)]
    ops = await asyncio.wait_for(asyncio.gather(*(m.wait(i) for i in ids)), 5)
    assert all(op.succeeded for op in ops)


async def test_backpressure_raise(db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(backpressure="raise", max_queue_size=2))
    await m.start()
    async with m.scheduler.exclusive():
        await m.queue_operation("log", "INSERT", [{"tag": "a"}], Priority.LOW)
        await m.queue_operation("log", "INSERT", [{"tag": "b"}], Priority.LOW)
        with pytest.raises(QueueFull, match="queue is full"):
            await m.queue_operation("log", "INSERT", [{"tag": "c"}], Priority.LOW)
        # CRITICAL is never refused
        await m.queue_operation("log", "INSERT", [{"tag": "crit"}], Priority.CRITICAL)
    await m.flush()
    assert sorted(r[0] for r in rows_of(db_path, "SELECT tag FROM log")) == ["a", "b", "crit"]


async def test_backpressure_wait(db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(max_queue_size=2, max_memory_mb=100))
    await m.start()
    async with m.scheduler.exclusive():
        await m.queue_operation("log", "INSERT", [{"tag": "a"}], Priority.LOW)
        await m.queue_operation("log", "INSERT", [{"tag": "b"}], Priority.LOW)
        blocked = asyncio.ensure_future(
            m.queue_operation("log", "INSERT", [{"tag": "c"}], Priority.LOW))
        await asyncio.sleep(0.2)
        assert not blocked.done()  # the producer waits for room instead of growing the queue
        assert m.scheduler.queued_ops == 2
    await asyncio.wait_for(blocked, 5)
    await m.flush()
    assert sorted(r[0] for r in rows_of(db_path, "SELECT tag FROM log")) == ["a", "b", "c"]


async def test_backpressure_wait_timeout(db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(max_queue_size=1, backpressure_timeout_seconds=0.1))
    await m.start()
    async with m.scheduler.exclusive():
        await m.queue_operation("log", "INSERT", [{"tag": "a"}], Priority.LOW)
        with pytest.raises(QueueFull, match="no room"):
            await m.queue_operation("log", "INSERT", [{"tag": "b"}], Priority.LOW)


async def test_same_key_same_priority_keeps_submission_order(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(insert_batch_size=7, update_batch_size=3))
    await m.start()
    for i in range(200):
        await m.queue_operation("kv", "UPSERT", [{"k": i % 5, "v": f"v{i}", "n": i}])
        if i % 17 == 0:
            await m.queue_operation("kv", "UPDATE", [{"k": i % 5, "n": -i}])
    await m.flush()
    got = dict(rows_of(db_path, "SELECT k, n FROM kv"))
    assert got == {k: max(i for i in range(200) if i % 5 == k) for k in range(5)}


async def test_failing_operation_fails_alone(db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()
    await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "first", "n": 0}])
    await m.flush()
    good1 = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": "x", "n": 0}])
    bad = await m.queue_operation("kv", "INSERT", [{"k": 3, "v": "y", "n": 0},
                                                   {"k": 1, "v": "dup", "n": 0}])
    null = await m.queue_operation("kv", "INSERT", [{"k": 4, "v": None, "n": 0}])
    good2 = await m.queue_operation("kv", "INSERT", [{"k": 5, "v": "z", "n": 0}])
    await m.flush()
    assert (await m.wait(good1)).succeeded and (await m.wait(good2)).succeeded
    with pytest.raises(OperationFailed, match=r"UNIQUE constraint failed: kv\.k") as err:
        await m.wait(bad)
    assert err.value.operation_id == bad
    with pytest.raises(OperationFailed, match=r"NOT NULL constraint failed: kv\.v"):
        await m.wait(null)
    # the failed operation left nothing behind (k=3 was in the same operation as the dup)
    assert rows_of(db_path, "SELECT k, v FROM kv ORDER BY k") == [(1, "first"), (2, "x"),
                                                                 (5, "z")]
    stats = (await m.get_queue_status())["stats"]
    assert (stats["successful_operations"], stats["failed_operations"]) == (3, 2)





async def test_locked_database_is_retried_with_backoff(db_path: Path,
                                                       make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(sqlite={"busy_timeout_ms": 20},
                     **batch_cfg(max_retries=30, retry_base_delay_seconds=0.02,
                                 retry_max_delay_seconds=0.2))
    await m.start()
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db_path), "1.0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        op_id = await m.queue_operation("log", "INSERT", [{"tag": "after"}], Priority.CRITICAL)
        op = await asyncio.wait_for(m.wait(op_id), 10)
    finally:
        locker.wait(10)
    assert op.succeeded
    assert [r[0] for r in rows_of(db_path, "SELECT tag FROM log ORDER BY id")] == ["locker",
                                                                                  "after"]
    assert (await m.get_queue_status())["stats"]["retries"] > 0


async def test_locked_too_long_is_reported_not_dropped(db_path: Path,
                                                       make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(sqlite={"busy_timeout_ms": 10},
                     **batch_cfg(max_retries=2, retry_base_delay_seconds=0.01))
    await m.start()
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db_path), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        op_id = await m.queue_operation("log", "INSERT", [{"tag": "x"}], Priority.HIGH)
        with pytest.raises(OperationFailed, match="database is locked"):
            await asyncio.wait_for(m.wait(op_id), 10)
    finally:
        locker.wait(10)
    again = await m.queue_operation("log", "INSERT", [{"tag": "again"}], Priority.HIGH)
    assert (await m.wait(again)).succeeded


async def test_large_operation_is_one_atomic_batch(db_path: Path,
                                                  make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(insert_batch_size=100))
    await m.start()
    small = [await m.queue_operation("kv", "INSERT", [{"k": -i, "v": "s", "n": 0}])
             for i in range(1, 4)]
    op_id = await m.queue_operation("kv", "INSERT",
                                    [{"k": i, "v": "r", "n": i} for i in range(1050)])
    op = await m.wait(op_id)
    assert op.succeeded and op.rows_affected == 1050
    assert all([(await m.wait(s)).succeeded for s in small])
    status = await m.get_queue_status()
    assert status["stats"]["batches_committed"] == 2  # the 3 small ones, then the large one
    # a bad row anywhere fails the whole operation and leaves none of its rows behind
    bad_rows = [{"k": 5000 + i, "v": "r", "n": i} for i in range(250)] + [{"k": 1, "v": "d",
                                                                           "n": 0}]
    bad = await m.queue_operation("kv", "INSERT", bad_rows)
    with pytest.raises(OperationFailed, match="UNIQUE"):
        await m.wait(bad)
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv WHERE k >= 5000") == [(0,)]


async def test_callbacks_plain_async_raising_and_hanging(
        db_path: Path, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(callback_timeout_seconds=0.2))
    await m.start()
    seen: list[tuple[str, bool]] = []

    def plain(op: BatchOperation) -> None:
        seen.append(("plain", op.succeeded))

    async def coro(op: BatchOperation) -> None:
        await asyncio.sleep(0)
        seen.append(("async", op.succeeded))

    def raising(op: BatchOperation) -> None:
        raise RuntimeError("callback bug")

    async def hanging(op: BatchOperation) -> None:
        await asyncio.sleep(3600)

    caplog.set_level(logging.ERROR, "batchdb")
    for cb in (plain, coro, raising, hanging):
        await m.queue_operation("log", "INSERT", [{"tag": cb.__name__}], Priority.HIGH, cb)
    failing = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": None, "n": 1}],
                                      Priority.HIGH, plain)
    await m.flush()
    await asyncio.sleep(0.4)
    after = await m.queue_operation("log", "INSERT", [{"tag": "after"}], Priority.CRITICAL)
    assert (await m.wait(after)).succeeded  # the scheduler kept going
    assert ("plain", True) in seen and ("async", True) in seen and ("plain", False) in seen
    assert "callback bug" in caplog.text and "timed out" in caplog.text
    with pytest.raises(OperationFailed):
        await m.wait(failing)
    assert len(rows_of(db_path, "SELECT * FROM log")) == 5


async def test_wait_unknown_id(make_manager: ManagerFactory, db_path: Path) -> None:
    m = make_manager()
    await m.start()
    with pytest.raises(KeyError, match="unknown operation id"):
        await m.wait("nope")


async def test_stop_drains_everything(db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds=SLOW_LINGER, flush_interval_seconds=100))
    await m.start()
    for prio in Priority:
        for i in range(25):
            await m.queue_operation("kv", "UPSERT", [{"k": prio * 100 + i, "v": prio.name,
                                                      "n": i}], prio)
    await m.stop()
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(100,)]
    with pytest.raises(RuntimeError, match="not running"):
        await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": "x", "n": 1}])


async def test_in_flight_limit_capped_by_backend(db_path: Path,
                                                 make_manager: ManagerFactory) -> None:
    m = make_manager(**batch_cfg(max_concurrent_batches=8))
    await m.start()
    assert m.scheduler.max_inflight == m.backend.capabilities.max_writers == 2
    m1 = make_manager(**batch_cfg(max_concurrent_batches=1))
    await m1.start()
    assert m1.scheduler.max_inflight == 1


async def test_periodic_maintenance_runs_on_schedule(db_path: Path,
                                                     make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(maintenance={"enabled": True, "wal_checkpoint_interval_seconds": 0.2,
                                  "analyze_interval_seconds": 0.2,
                                  "vacuum_interval_seconds": 0})
    await m.start()
    await m.queue_operation("log", "INSERT", [{"tag": "t"}] * 10, Priority.HIGH)
    await m.flush()
    await asyncio.sleep(0.8)
    status = await m.get_queue_status()
    assert status["last_maintenance"]["checkpoint"] is not None
    assert status["last_maintenance"]["analyze"] is not None
    assert status["last_maintenance"]["vacuum"] is None
    assert rows_of(db_path, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_stat1'") \
        == [(1,)]


async def test_manual_maintenance(db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()
    await m.queue_operation("log", "INSERT", [{"tag": "x" * 1000}] * 500)
    await m.flush()
    await m.queue_operation("log", "DELETE", [{"id": i} for i in range(1, 501)])
    await m.flush()
    result = await m.maintain("vacuum")
    assert result["bytes_after"] < result["bytes_before"]
    assert (await m.maintain("integrity_check"))["ok"] is True
    assert (await m.maintain("checkpoint"))["busy"] is False
    with pytest.raises(ValueError, match="no maintenance task 'defrag'"):
        await m.maintain("defrag")


async def test_reads_go_through_the_reader_pool_while_writes_wait(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(sqlite={"busy_timeout_ms": 20, "readers": 2},
                     **batch_cfg(max_retries=30, retry_base_delay_seconds=0.02))
    await m.start()
    await m.queue_operation("log", "INSERT", [{"tag": "before"}], Priority.CRITICAL)
    await m.flush()
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db_path), "0.8"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        pending = await m.queue_operation("log", "INSERT", [{"tag": "during"}], Priority.CRITICAL)
        # WAL: readers see the last commit while another process holds the write lock
        reads = await asyncio.gather(*(m.fetch("SELECT tag FROM log ORDER BY id")
                                       for _ in range(5)))
        assert reads == [[("before",)]] * 5
        assert await m.fetch("SELECT COUNT(*) FROM log WHERE tag = ?", ("before",)) == [(1,)]
        assert (await m.wait(pending)).succeeded
    finally:
        locker.wait(10)
    assert await m.fetch("SELECT tag FROM log ORDER BY id") == [("before",), ("locker",),
                                                                ("during",)]


async def test_delete_accepts_whole_rows_and_reads_only_the_key(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()
    rows = [{"k": i, "v": str(i), "n": i} for i in range(10)]
    await m.queue_operation("kv", "INSERT", rows)
    gone = await m.queue_operation("kv", "DELETE", rows[:4])
    missing = await m.queue_operation("kv", "DELETE", [{"k": 99, "v": "x", "n": 0}])
    await m.flush()
    assert (await m.wait(gone)).rows_affected == 4
    assert (await m.wait(missing)).succeeded  # deleting a missing key is not an error
    assert rows_of(db_path, "SELECT k FROM kv ORDER BY k") == [(k,) for k in range(4, 10)]


async def test_later_submission_wins_across_priorities(db_path: Path,
                                                       make_manager: ManagerFactory) -> None:
    """A LOW backfill and a HIGH live update of the same candle: the HIGH (later) one wins,
    and LOW writes of other keys keep lingering at LOW."""
    m = make_manager(**batch_cfg(linger_seconds={**SLOW_LINGER, "HIGH": 0},
                                 flush_interval_seconds=100))
    await m.start()
    backfill = upbit_candles(5, price=100.0)  # minutes 0..4, old values
    other = upbit_candles(5, start_minute=600, price=100.0)
    low = await m.insert_candles_batch("KRW-BTC", "1m", backfill, Priority.LOW)
    low_other = await m.insert_candles_batch("KRW-BTC", "1m", other, Priority.LOW)
    live = upbit_candles(1, start_minute=2, price=999.0)  # minute 2, the live value
    high = await m.insert_candles_batch("KRW-BTC", "1m", live, Priority.HIGH)
    await m.wait(high)
    assert m.scheduler.get(low).is_processed  # type: ignore[union-attr]
    assert not m.scheduler.get(low_other).is_processed  # type: ignore[union-attr]
    await m.flush()
    got = dict(rows_of(db_path, "SELECT ts, open_price FROM candles ORDER BY ts"))
    assert got[1704067200000 + 2 * 60000] == 999.0 + 2
    assert got[1704067200000] == 100.0
    assert (await m.get_queue_status())["stats"]["promotions"] == 1


class _Committed:
    """A plugin noting what each committed batch says of itself."""

    def __init__(self) -> None:
        self.seen: list[tuple[Priority, dict[Priority, int], list[str], list[float] | None]] = []

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        self.seen.append((batch.priority, batch.priority_counts(),
                          [op.operation_id for op in batch.operations], batch.latencies))


async def test_a_batch_counts_its_operations_at_the_priorities_they_were_queued_at(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """A batch of one queue holds operations of other priorities once one was promoted into
    it, or queued behind a higher write of its key: ``priority_counts()`` counts each at its
    own, and ``latencies`` gives each operation's queue-to-commit seconds."""
    make_table(db_path, LOG_DDL)
    seen = _Committed()
    m = make_manager(plugins_extra=[seen], **batch_cfg(linger_seconds=SLOW_LINGER,
                                                       flush_interval_seconds=100))
    await m.start()
    q = m.queue_operation
    # a LOW write of key 1, then a CRITICAL rewrite: LOW's is promoted into CRITICAL's batch
    low = await q("kv", OperationType.UPSERT, [{"k": 1, "v": "low"}], Priority.LOW)
    crit = await q("kv", OperationType.UPSERT, [{"k": 1, "v": "crit"}], Priority.CRITICAL)
    await m.wait(crit)
    # a HIGH write of key 2 held back, then a LOW write of it: LOW joins HIGH's queue
    high = await q("kv", OperationType.UPSERT, [{"k": 2, "v": "high"}], Priority.HIGH)
    late = await q("kv", OperationType.UPSERT, [{"k": 2, "v": "late"}], Priority.LOW)
    # and a batch of one priority alone
    plain = [await q("log", OperationType.INSERT, [{"tag": str(i)}], Priority.NORMAL)
             for i in range(20)]
    await m.flush()
    batches = {tuple(ids): (prio, counts, latencies) for prio, counts, ids, latencies in seen.seen}
    assert batches[(low, crit)][:2] == (Priority.CRITICAL, {Priority.CRITICAL: 1, Priority.LOW: 1})
    assert batches[(high, late)][:2] == (Priority.HIGH, {Priority.HIGH: 1, Priority.LOW: 1})
    assert batches[tuple(plain)][:2] == (Priority.NORMAL, {Priority.NORMAL: 20})
    for ids, (_, _, latencies) in batches.items():
        assert latencies is not None and len(latencies) == len(ids)
        assert all(0 < s < 60 for s in latencies)
    # submitted in order, committed together: the earlier waited at least as long
    latencies = batches[tuple(plain)][2]
    assert latencies == sorted(latencies, reverse=True)
    assert rows_of(db_path, "SELECT k, v FROM kv ORDER BY k") == [(1, "crit"), (2, "late")]


async def test_cross_priority_delete_then_insert(db_path: Path,
                                                 make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds=SLOW_LINGER, flush_interval_seconds=100))
    await m.start()
    await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "old", "n": 1}], Priority.CRITICAL)
    await m.flush()
    await m.queue_operation("kv", "DELETE", [{"k": 1}], Priority.LOW)
    await m.queue_operation("kv", "UPDATE", [{"k": 2, "n": 5}], Priority.NORMAL)  # unrelated
    ins = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "new", "n": 2}],
                                  Priority.CRITICAL)
    assert (await m.wait(ins)).succeeded  # the earlier LOW delete went first, so no conflict
    await m.flush()
    assert rows_of(db_path, "SELECT k, v FROM kv") == [(1, "new")]


async def test_later_lower_priority_write_waits_for_an_earlier_higher_one(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """Found by the model property: a HIGH insert still lingering, then a LOW update of the
    same key whose batch is already full — the update must not run first."""
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(linger_seconds={**SLOW_LINGER, "HIGH": 0.3, "LOW": 0},
                                 flush_interval_seconds=100, update_batch_size=1))
    await m.start()
    ins = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "new", "n": 0}], Priority.HIGH)
    upd = await m.queue_operation("kv", "UPDATE", [{"k": 1, "n": 42}], Priority.LOW)
    other = await m.queue_operation("kv", "UPDATE", [{"k": 2, "n": 7}], Priority.LOW)
    assert (await asyncio.wait_for(m.wait(other), 5)).succeeded  # unrelated: not held back
    await m.flush()
    assert (await m.wait(ins)).succeeded and (await m.wait(upd)).succeeded
    assert rows_of(db_path, "SELECT k, v, n FROM kv") == [(1, "new", 42)]


async def test_wait_answers_for_the_last_completed_history_operations(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(completed_history=100, insert_batch_size=7))
    await m.start()
    ids = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": str(i)}]) for i in range(400)]
    await m.flush()
    for op_id in ids[-100:]:  # the last 100 finished are all kept...
        op = await m.wait(op_id)
        assert op.succeeded and op.operation_id == op_id
    with pytest.raises(KeyError, match="longer ago than the last 100 operations"):
        await m.wait(ids[0])  # ...and memory stays bounded: the oldest are forgotten
    assert 100 <= len(m.scheduler._history) <= 100 + 2 * (100 // 8 + 7)  # gens of 1/8 + batches
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(400,)]


async def test_no_history_kept_when_completed_history_is_zero(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**batch_cfg(completed_history=0))
    await m.start()
    done = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "a"}])
    await m.flush()
    with pytest.raises(KeyError, match="unknown operation id"):
        await m.wait(done)
    queued = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": "b"}])
    assert (await m.wait(queued)).succeeded  # a pending operation is always found
