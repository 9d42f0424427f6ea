"""Completion callbacks behave the same on every backend (see ``conftest.py``): each runs
exactly once, in commit order, after its commit (or failure), with the seed's semantics,
and flush() returns after them."""

from __future__ import annotations

import asyncio

from batchdb import BatchOperation, Priority

from .conftest import BackendEnv
from .test_conformance import ALL_KV, KV, started


async def test_callbacks_exactly_once_in_order_with_the_seeds_semantics(
        env: BackendEnv) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'one', 1)")
    m = await started(env)
    plain: list[tuple[str, bool, str, object]] = []
    coro: list[tuple[str, bool, str, object]] = []

    def on_plain(op: BatchOperation) -> None:
        plain.append((op.operation_id, op.is_processed, op.state, list(op.data_rows)))

    async def on_coro(op: BatchOperation) -> None:
        await asyncio.sleep(0)  # a coroutine that really awaits
        coro.append((op.operation_id, op.is_processed, op.state, list(op.data_rows)))

    rows = [[{"k": 10 + i, "v": float(i), "s": "x", "n": i}] for i in range(300)]
    ids_plain = [await m.queue_operation("kv", "INSERT", r, Priority.NORMAL, on_plain)
                 for r in rows[:150]]
    ids_coro = [await m.queue_operation("kv", "INSERT", r, Priority.NORMAL, on_coro)
                for r in rows[150:]]
    bad = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": 0.0, "s": "dup", "n": 0}],
                                  Priority.HIGH, on_plain)
    await m.flush()  # returns after the callbacks
    assert [p[0] for p in plain if p[0] != bad] == ids_plain
    assert [c[0] for c in coro] == ids_coro
    first = next(p for p in plain if p[0] == ids_plain[0])
    assert first[1:] == (True, "committed", rows[0])
    assert coro[-1][1:] == (True, "committed", rows[-1])
    failed = [p for p in plain if p[0] == bad]
    assert len(failed) == 1 and failed[0][1:3] == (False, "failed")
    status = await m.get_queue_status()
    assert status["callbacks"]["completed"] == 301
    await m.stop()
    assert len(plain) == 151 and len(coro) == 150  # stop() ran none of them again
    assert env.query("SELECT COUNT(*) FROM kv") == [(301,)]


async def test_rows_affected_of_update_and_delete_count_matched_keys(env: BackendEnv) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'one', 1)",
                "INSERT INTO kv VALUES (2, 2.0, 'two', 2)")
    m = await started(env)

    async def alone(op_type: str, rows: list[dict[str, object]]) -> int:
        done = await m.wait(await m.queue_operation("kv", op_type, rows, Priority.CRITICAL))
        return done.rows_affected

    assert await alone("UPDATE", [{"k": 1, "n": 10}, {"k": 404, "n": 0}]) == 1
    assert await alone("UPDATE", [{"k": 405, "n": 0}]) == 0
    assert await alone("DELETE", [{"k": 2}, {"k": 406}]) == 1
    assert await alone("DELETE", [{"k": 2}]) == 0
    await m.stop()
    assert env.query(ALL_KV) == [(1, 1.0, "one", 10)]
