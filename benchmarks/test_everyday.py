"""What users do every day, measured against the same workload without the extra:

- ``callbacks``: one-row and 100-row INSERT operations with no callback, a plain callback and
  an ``async def`` callback, the three variants interleaved round by round in one run
  (targets: with a callback ≥ 0.8x without for one-row operations, ≥ 0.9x for 100-row ones);
- ``priorities``: 100-row UPSERTs into one table at one priority, against the same
  operations at rotating priorities CRITICAL, HIGH, NORMAL, LOW with distinct keys, and with
  10% of them rewriting a key queued at another priority (targets: ≥ 0.8x and ≥ 0.5x).

Each test's pytest-benchmark time is one round of all its variants; the per-variant medians,
every round and the ratios are in ``extra_info`` and printed. ``--bench-rows`` sizes them:
rows/10 one-row operations, rows/100 100-row operations (1M: 100,000 and 10,000).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBManager, BatchOperation, OperationType, Priority

ROTATION = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)


async def _timed(path: Path, ops: list[list[dict[str, Any]]], op_type: OperationType,
                 priority: Callable[[int], Priority],
                 callback: Callable[[BatchOperation], Any] | None) -> float:
    """Seconds from the first queue_operation to the end of flush() (callbacks included)."""
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                           maintenance={"enabled": False})
    async with manager:
        gc.collect()
        start = time.perf_counter()
        for i, rows in enumerate(ops):
            await manager.queue_operation("t", op_type, rows, priority(i), callback)
        await manager.flush()
        elapsed = time.perf_counter() - start
        status = await manager.get_queue_status()
    assert status["stats"]["failed_operations"] == 0
    return elapsed


@pytest.mark.parametrize("rows_per_op", [1, 100])
def test_callbacks(benchmark: Any, tmp_path: Path, bench_rows: int, bench_rounds: int,
                   interleaved: Callable[..., dict[str, Any]],
                   rows_per_op: int) -> None:
    """One table, one priority; no callback vs a plain vs an async completion callback."""
    n_ops = bench_rows // (10 if rows_per_op == 1 else rows_per_op)
    ops = [[{"id": i * rows_per_op + j, "v": 1.5, "s": "x"} for j in range(rows_per_op)]
           for i in range(n_ops)]
    acks: list[str] = []

    def plain(op: BatchOperation) -> None:
        acks.append(op.operation_id)

    async def coroutine(op: BatchOperation) -> None:
        acks.append(op.operation_id)

    def variant(callback: Callable[[BatchOperation], Any] | None) -> Callable[[Path], float]:
        def run(path: Path) -> float:
            acks.clear()
            seconds = asyncio.run(_timed(path, ops, OperationType.INSERT,
                                         lambda i: Priority.NORMAL, callback))
            assert len(acks) == (0 if callback is None else n_ops)
            return seconds
        return run

    info = interleaved(benchmark, tmp_path, bench_rounds, n_ops * rows_per_op,
                        {"no callback": variant(None), "plain callback": variant(plain),
                         "async callback": variant(coroutine)}, "no callback")
    assert min(info["rows_per_s"].values()) > 0


def test_priorities(benchmark: Any, tmp_path: Path, bench_rows: int,
                    bench_rounds: int, interleaved: Callable[..., dict[str, Any]]) -> None:
    """One table written at one priority vs at four rotating priorities (distinct keys), and
    with every tenth operation rewriting the keys of one queued five operations earlier
    (at another priority: 'the later submission wins' has work to do)."""
    n_ops = max(bench_rows // 100, 40)
    distinct = [[{"id": i * 100 + j, "v": 1.5, "s": "x"} for j in range(100)]
                for i in range(n_ops)]
    overlapping = [
        [{"id": (i - 5) * 100 + j, "v": 2.5, "s": "y"} for j in range(100)]
        if i % 10 == 9 else rows for i, rows in enumerate(distinct)]

    def variant(ops: list[list[dict[str, Any]]],
                priority: Callable[[int], Priority]) -> Callable[[Path], float]:
        def run(path: Path) -> float:
            return asyncio.run(_timed(path, ops, OperationType.UPSERT, priority, None))
        return run

    def rotating(i: int) -> Priority:
        return ROTATION[i % 4]

    info = interleaved(benchmark, tmp_path, bench_rounds, n_ops * 100, {
        "one priority": variant(distinct, lambda i: Priority.NORMAL),
        "four priorities, distinct": variant(distinct, rotating),
        "four priorities, 10% rewrite": variant(overlapping, rotating),
    }, "one priority")
    assert min(info["rows_per_s"].values()) > 0
