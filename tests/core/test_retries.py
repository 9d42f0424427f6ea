"""Retries (issue #11, item 9): the delay never exceeds the maximum, and a batch that
fails after retrying counts its retries, also when the backend retried it itself (SQLite
retries inside its writer thread and reports them on the error it gives up with)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from batchdb import OperationFailed
from batchdb.backend import RetryPolicy, note_retries, retries_of
from tests.conftest import ManagerFactory


def test_retry_delay_never_exceeds_the_maximum() -> None:
    random.seed(11)
    policy = RetryPolicy(max_retries=8, base_delay=0.05, max_delay=2.0)
    delays = {attempt: [policy.delay(attempt) for _ in range(2000)] for attempt in range(1, 13)}
    assert max(max(d) for d in delays.values()) <= 2.0
    # still exponential with jitter below the cap: attempt 1 spreads over 0.025..0.075 s
    assert 0.025 <= min(delays[1]) < 0.03 and 0.07 < max(delays[1]) <= 0.075
    assert len({round(d, 6) for d in delays[5]}) > 1000  # 0.8 s +-50%, under the cap
    assert max(delays[12]) == 2.0  # saturated: the cap itself, never more
    assert policy.delay(10_000) == 2.0  # no overflow for a huge attempt number


def test_note_retries_marks_the_error() -> None:
    exc = sqlite3.OperationalError("database is locked")
    assert retries_of(exc) == 0
    assert note_retries(exc, 3) is exc and retries_of(exc) == 3
    assert retries_of(note_retries(ValueError("x"), 0)) == 0


async def test_sqlite_batch_that_fails_after_retrying_counts_its_retries(
        make_manager: ManagerFactory, db_path: Path) -> None:
    manager = make_manager(
        sqlite={"busy_timeout_ms": 0},
        batch={"max_retries": 3, "retry_base_delay_seconds": 0.01,
               "retry_max_delay_seconds": 0.02})
    await manager.start()
    await manager.wait(await manager.queue_operation(
        "candles", "UPSERT", [{"symbol": "KRW-BTC", "timeframe": "1m", "ts": 0,
                               "open_price": 1.0, "high_price": 1.0, "low_price": 1.0,
                               "close_price": 1.0, "volume": 1.0, "ingested_at": 0}]))
    assert (await manager.get_queue_status())["stats"]["retries"] == 0
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock throughout
    try:
        op_id = await manager.queue_operation(
            "candles", "UPSERT", [{"symbol": "KRW-BTC", "timeframe": "1m", "ts": 60_000,
                                   "open_price": 1.0, "high_price": 1.0, "low_price": 1.0,
                                   "close_price": 1.0, "volume": 1.0, "ingested_at": 0}])
        with pytest.raises(OperationFailed, match="locked"):
            await manager.wait(op_id)
    finally:
        other.execute("ROLLBACK")
        other.close()
    status = await manager.get_queue_status()
    assert status["stats"]["failed_operations"] == 1
    assert status["stats"]["retries"] == 3
    await manager.stop()
    assert (await manager.get_queue_status())["stats"]["retries"] == 3
