"""What users do every day, measured against the same workload without the extra:

- ``callbacks``: one-row and 100-row INSERT operations with no callback, a plain callback and
  an ``async def`` callback, the three variants interleaved round by round in one run
  (targets: with a callback ≥ 0.8x without for one-row operations, ≥ 0.9x for 100-row ones);
- ``priorities``: 100-row UPSERTs into one table at one priority, against the same
  operations at rotating priorities CRITICAL, HIGH, NORMAL, LOW with distinct keys, and with
  10% of them rewriting a key queued at another priority (targets: ≥ 0.8x and ≥ 0.5x).
  Then raw sqlite3 replays the batches each variant committed in its last round, in their
  order, one multi-row UPSERT per batch as batchdb sends it: the same ratio for the
  database alone. The CRITICAL operations go first, so the lower lanes' keys land in the
  gaps they leave, and SQLite splits B-tree pages that the one-priority run only appends to.

Each test's pytest-benchmark time is one round of all its variants; the per-variant medians,
every round and the ratios are in ``extra_info`` and printed. ``--bench-rows`` sizes them:
rows/10 one-row operations, rows/100 100-row operations (1M: 100,000 and 10,000).
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBManager, BatchOperation, OperationType, Priority, hookimpl
from batchdb.backend import Backend, Batch

ROTATION = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)


class _Batches:
    """A plugin noting the operation ids of each committed batch, in commit order;
    ``indexes``: the same batches as indexes into the operations queued (set by _timed)."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []
        self.indexes: list[list[int]] = []

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        self.ids.append([op.operation_id for op in batch.operations])


async def _timed(path: Path, ops: list[list[dict[str, Any]]], op_type: OperationType,
                 priority: Callable[[int], Priority],
                 callback: Callable[[BatchOperation], Any] | None,
                 batches: _Batches | None = None) -> float:
    """Seconds from the first queue_operation to the end of flush() (callbacks included);
    ``batches`` notes what each committed batch held, as indexes into ``ops``."""
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                           maintenance={"enabled": False},
                                           plugins_extra=[batches] if batches else ())
    ids: list[str] = []
    async with manager:
        gc.collect()
        start = time.perf_counter()
        for i, rows in enumerate(ops):
            ids.append(await manager.queue_operation("t", op_type, rows, priority(i), callback))
        await manager.flush()
        elapsed = time.perf_counter() - start
        status = await manager.get_queue_status()
    assert status["stats"]["failed_operations"] == 0
    if batches is not None:
        where = {op_id: i for i, op_id in enumerate(ids)}
        batches.indexes = [[where[op_id] for op_id in batch] for batch in batches.ids]
    return elapsed


def _raw_replay(path: Path, ops: list[list[dict[str, Any]]], batches: list[list[int]]) -> float:
    """Seconds raw sqlite3 takes to commit ``batches`` (indexes into ``ops``) in order: WAL,
    synchronous NORMAL, one multi-row UPSERT per batch (batchdb's statement for a batch of
    at most its batch size), the values bound ready-made."""
    statements: dict[int, str] = {}
    work = []
    for batch in batches:
        rows = [row for i in batch for row in ops[i]]
        sql = statements.get(len(rows))
        if sql is None:
            sql = statements[len(rows)] = (
                "INSERT INTO t (id, v, s) VALUES " + ",".join(["(?, ?, ?)"] * len(rows))
                + " ON CONFLICT (id) DO UPDATE SET v = excluded.v, s = excluded.s")
        work.append((sql, [value for row in rows for value in (row["id"], row["v"], row["s"])]))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        gc.collect()
        start = time.perf_counter()
        for sql, values in work:
            conn.execute(sql, values)
        elapsed = time.perf_counter() - start
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == len(
            {row["id"] for rows in ops for row in rows})
    finally:
        conn.close()
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
                    bench_rounds: int, interleaved: Callable[..., dict[str, Any]],
                    plain_table_at: Callable[[Path], None]) -> None:
    """One table written at one priority vs at four rotating priorities (distinct keys), and
    with every tenth operation rewriting the keys of one queued five operations earlier
    (at another priority: 'the later submission wins' has work to do)."""
    n_ops = max(bench_rows // 100, 40)
    distinct = [[{"id": i * 100 + j, "v": 1.5, "s": "x"} for j in range(100)]
                for i in range(n_ops)]
    overlapping = [
        [{"id": (i - 5) * 100 + j, "v": 2.5, "s": "y"} for j in range(100)]
        if i % 10 == 9 else rows for i, rows in enumerate(distinct)]

    recorded: dict[str, tuple[list[list[dict[str, Any]]], _Batches]] = {}

    def variant(name: str, ops: list[list[dict[str, Any]]],
                priority: Callable[[int], Priority]) -> Callable[[Path], float]:
        def run(path: Path) -> float:
            batches = _Batches()
            seconds = asyncio.run(_timed(path, ops, OperationType.UPSERT, priority, None,
                                         batches))
            recorded[name] = (ops, batches)
            return seconds
        return run

    def rotating(i: int) -> Priority:
        return ROTATION[i % 4]

    cases: dict[str, tuple[list[list[dict[str, Any]]], Callable[[int], Priority]]] = {
        "one priority": (distinct, lambda i: Priority.NORMAL),
        "four priorities, distinct": (distinct, rotating),
        "four priorities, 10% rewrite": (overlapping, rotating),
    }
    variants = {name: variant(name, ops, prio) for name, (ops, prio) in cases.items()}
    info = interleaved(benchmark, tmp_path, bench_rounds, n_ops * 100, variants,
                       "one priority")
    assert min(info["rows_per_s"].values()) > 0

    # the database alone: raw sqlite3 replays each variant's last batches, round by round
    raw: dict[str, list[float]] = {name: [] for name in variants}
    for k in range(bench_rounds):
        for j, name in enumerate(raw):
            path = tmp_path / f"raw-{k}-{j}.sqlite3"
            plain_table_at(path)
            ops, batches = recorded[name]
            raw[name].append(_raw_replay(path, ops, batches.indexes))
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
    base = statistics.median(raw["one priority"])
    info["raw_sqlite3_same_batches"] = {
        name: {"rows_per_s": round(n_ops * 100 / statistics.median(t)),
               "ratio": round(base / statistics.median(t), 3),
               "batches": len(recorded[name][1].indexes)} for name, t in raw.items()}
    benchmark.extra_info["raw_sqlite3_same_batches"] = info["raw_sqlite3_same_batches"]
    print("  raw sqlite3 replaying the same batches (one multi-row UPSERT each):")
    for name, figures in info["raw_sqlite3_same_batches"].items():
        print(f"  {name:<28} {figures['rows_per_s']:>10,} rows/s  {figures['ratio']:.3f}x  "
              f"({figures['batches']} batches)")
