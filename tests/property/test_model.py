"""Property: any sequence of operations, at any priorities, leaves the database equal to a
simple model that applies them one by one in submission order."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchdb import BatchDBManager, OperationFailed, Priority

KEYS = st.integers(0, 11)
VALUES = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8))


@st.composite
def operations(draw: st.DrawFn) -> tuple[str, Priority, list[dict[str, Any]]]:
    kind = draw(st.sampled_from(["INSERT", "UPDATE", "UPSERT", "DELETE"]))
    prio = draw(st.sampled_from(list(Priority)))
    # priorities share the keys: whatever the priorities, the later submission must win
    keys = draw(st.lists(KEYS, min_size=1, max_size=4))
    # a key spelled as the number, its text or a float: one key to the INTEGER column
    keys = [draw(st.sampled_from((k, k, str(k), float(k)))) for k in keys]
    if kind == "DELETE":
        rows = [{"k": k} for k in keys]
    else:
        rows = [{"k": k, "v": draw(VALUES)} for k in keys]
    return kind, prio, rows


def key(spelled: int | str | float) -> int:
    """The key a spelling stands for."""
    return int(float(spelled))


def respelled(spelled: int | str | float, k: int) -> int | str | float:
    """Key ``k`` spelled as ``spelled`` is."""
    return type(spelled)(float(k)) if isinstance(spelled, float) else type(spelled)(k)


def apply_model(model: dict[int, Any], kind: str, rows: list[dict[str, Any]]) -> bool:
    """Apply one operation to the model; False if the database must refuse it whole."""
    if kind == "INSERT":
        keys = [key(r["k"]) for r in rows]
        if len(set(keys)) != len(keys) or any(k in model for k in keys):
            return False
    for row in rows:
        k = key(row["k"])
        if kind in ("INSERT", "UPSERT") or (kind == "UPDATE" and k in model):
            model[k] = row["v"]
        elif kind == "DELETE":
            model.pop(k, None)
    return True


async def run(path: Path, ops: list[tuple[str, Priority, list[dict[str, Any]]]],
              insert_batch: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v ANY) STRICT")
    conn.close()
    manager = BatchDBManager.from_settings(
        None, sqlite={"path": str(path)}, maintenance={"enabled": False},
        batch={"insert_batch_size": insert_batch, "update_batch_size": max(1, insert_batch // 2),
               "linger_seconds": {"CRITICAL": 0, "HIGH": 0.001, "NORMAL": 0.002, "LOW": 0.003}})
    model: dict[int, Any] = {}
    expected: list[tuple[str, bool]] = []
    async with manager:
        for kind, prio, rows in ops:
            op_id = await manager.queue_operation("kv", kind, rows, prio)
            expected.append((op_id, apply_model(model, kind, rows)))
        await manager.flush()
        for op_id, ok in expected:
            if ok:
                assert (await manager.wait(op_id)).succeeded
            else:
                try:
                    await manager.wait(op_id)
                except OperationFailed as exc:
                    assert "UNIQUE constraint failed: kv.k" in str(exc)
                else:
                    raise AssertionError(f"{op_id} should have failed")
    want = model
    conn = sqlite3.connect(path)
    got = dict(conn.execute("SELECT k, v FROM kv").fetchall())
    conn.close()
    assert got == want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operations(), min_size=1, max_size=40), insert_batch=st.integers(1, 6))
def test_any_sequence_matches_the_model(ops: list[tuple[str, Priority, list[dict[str, Any]]]],
                                        insert_batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "model.sqlite3", ops, insert_batch))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operations(), min_size=1, max_size=40), insert_batch=st.integers(1, 6),
       shift=st.integers(0, 12), back=st.sets(st.integers(0, 39), max_size=3))
def test_ascending_keys_at_several_priorities_match_the_model(
        ops: list[tuple[str, Priority, list[dict[str, Any]]]], insert_batch: int, shift: int,
        back: set[int]) -> None:
    """Keys that mostly grow with each operation (new candles, new orders), as producers
    at several priorities write them: the scheduler tells the lanes apart by their key
    bounds until an operation (one of ``back``) rewrites older keys, then by the exact
    index. The later submission must win throughout."""
    moved = [(kind, prio, [{**row, "k": respelled(row["k"],
                                                  key(row["k"]) + (0 if i in back else i * shift))}
                           for row in rows])
             for i, (kind, prio, rows) in enumerate(ops)]
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "model.sqlite3", moved, insert_batch))
