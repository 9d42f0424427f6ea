"""The everyday path as a new user meets it (issue #11), on every backend: the status before
start and after stop, a clear error for an unknown operation id, maintenance of the tables
the database holds."""

from __future__ import annotations

import time
from typing import Any

import pytest

from batchdb import BatchDBError, OperationFailed, OperationType
from batchdb.models import UnknownOperation

from .conftest import BackendEnv

KV = "CREATE TABLE kv (k BIGINT PRIMARY KEY, v DOUBLE PRECISION)"


def key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key of a nested status dict, as dotted paths (the values left out)."""
    if not isinstance(value, dict):
        return set()
    out: set[str] = set()
    for key, item in value.items():
        out.add(prefix + str(key))
        if key not in ("last_maintenance",):
            out |= key_paths(item, f"{prefix}{key}.")
    return out


async def test_queue_status_has_the_same_keys_before_start_and_after_stop(
        env: BackendEnv) -> None:
    env.execute(KV)
    manager = env.manager()
    before = await manager.get_queue_status()
    # the seed's example 3 works before start() (nothing done yet)
    assert before["stats"]["total_operations"] == 0
    assert before["stats"]["successful_operations"] == 0
    assert before["queue_sizes"] == {"CRITICAL": 0, "HIGH": 0, "NORMAL": 0, "LOW": 0}
    assert before["running"] is False
    await manager.start()
    for i in range(3):
        await manager.wait(await manager.queue_operation(
            "kv", OperationType.UPSERT, [{"k": i, "v": float(i)}]))
    running = await manager.get_queue_status()
    await manager.stop()
    after = await manager.get_queue_status()
    assert key_paths(before) == key_paths(running) == key_paths(after)
    assert running["running"] is True and after["running"] is False
    # the run's totals stay after stop()
    stats = after["stats"]
    assert stats["total_operations"] == stats["successful_operations"] == 3
    assert f"{stats['successful_operations'] / stats['total_operations']:.1%}" == "100.0%"
    assert stats["rows_committed"] == 3
    assert after["total_queued_operations"] == 0
    assert after["uptime_seconds"] >= running["uptime_seconds"] > 0


async def test_wait_for_an_unknown_operation_id_is_a_clear_batchdb_error(
        env: BackendEnv) -> None:
    manager = env.manager()
    await manager.start()
    with pytest.raises(UnknownOperation, match="unknown operation id 'unknown-id'") as info:
        await manager.wait("unknown-id")
    assert isinstance(info.value, BatchDBError) and isinstance(info.value, KeyError)
    # KeyError's repr-quoting of its message is not what the user reads
    assert str(info.value).startswith("unknown operation id 'unknown-id'")
    await manager.stop()
    with pytest.raises(UnknownOperation):
        await manager.wait("unknown-id")


async def test_maintenance_in_a_fresh_process_covers_the_tables_of_the_database(
        env: BackendEnv) -> None:
    """A manager that has written nothing (``batchdb maintain`` in a new process) still
    maintains the tables the database holds."""
    env.execute(KV, "CREATE INDEX kv_v ON kv (v)",
                *(f"INSERT INTO kv VALUES ({i}, {i}.5)" for i in range(20)))
    manager = env.manager()
    await manager.start()
    results = {task: await manager.maintain(task)
               for task in manager.backend.maintenance_tasks if task != "integrity_check"}
    await manager.stop()
    assert "analyze" in results
    env.check_maintained(results)


async def test_a_batch_that_fails_after_retrying_counts_its_retries(env: BackendEnv) -> None:
    """Another session holds the table locked for longer than every retry: the batch fails
    with the database's error, and the status counts each retry (SQLite retries inside its
    writer, PostgreSQL through the scheduler); no delay is longer than the maximum."""
    if not env.lockable_by_another_session:
        pytest.skip(f"{env.name}: one process holds the file and batchdb is its only writer, "
                    "so no other session can lock a table against it")
    env.execute(KV)
    retry = {"max_retries": 2, "retry_base_delay_seconds": 0.05,
             "retry_max_delay_seconds": 0.06}
    manager = env.manager(batch=retry, sqlite={"busy_timeout_ms": 0},
                          postgres={"statement_timeout_ms": 150})
    await manager.start()
    await manager.wait(await manager.queue_operation("kv", "UPSERT", [{"k": 0, "v": 0.0}]))
    blocker = env.hold_write_lock("kv")
    try:
        start = time.monotonic()
        op_id = await manager.queue_operation("kv", "UPSERT", [{"k": 1, "v": 1.0}])
        with pytest.raises(OperationFailed):
            await manager.wait(op_id)
        seconds = time.monotonic() - start
    finally:
        env.release(blocker)
    stats = (await manager.get_queue_status())["stats"]
    assert (stats["retries"], stats["failed_operations"]) == (2, 1)
    assert seconds < 2.0  # two delays of at most 0.06 s (and the statement timeouts)
    await manager.stop()
    assert (await manager.get_queue_status())["stats"]["retries"] == 2
