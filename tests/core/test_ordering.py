"""The order across priorities: lanes told apart by their key bounds while producers write
ascending keys, the exact key index once a key may be queued in two lanes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from batchdb import BatchOperation, OperationType, Priority
from batchdb.ordering import Lane, Lanes
from batchdb.schema import TableInfo
from batchdb.stats import SchedulerStats

INFO = TableInfo("t", ("id", "v"), ("id",), {"id": sa.Integer(), "v": sa.Float()})


def _queue(lanes: Lanes, op_id: str, prio: Priority, keys: list[Any]) -> BatchOperation:
    """What the scheduler does on submission: the lane the order gives, then the queue."""
    op = BatchOperation(op_id, "t", OperationType.UPSERT, [{"id": k, "v": 1.0} for k in keys],
                        prio)
    others = [p for p in Priority if p != prio and "t" in lanes.lanes[p]]
    lane_prio = lanes.order(op) if others or "t" in lanes.indexes else prio
    op.lane = lane_prio
    op.seq = int(op_id.removeprefix("op"))
    lane = lanes.lanes[lane_prio].setdefault("t", Lane())
    lane.ops.append(op)
    lanes.counts[lane_prio] += 1
    return op


def _lanes() -> Lanes:
    return Lanes(lambda name: INFO, SchedulerStats())


def test_ascending_keys_keep_their_lanes_by_bounds_alone() -> None:
    lanes = _lanes()
    for i in range(12):
        op = _queue(lanes, f"op{i}", list(Priority)[i % 4], [i * 10 + j for j in range(10)])
        assert op.lane == op.priority
    index = lanes.indexes["t"]
    assert index.bounds is not None and not index.last  # no key was indexed
    assert index.bounds[Priority.CRITICAL] == [30, 119]


def test_a_key_inside_another_lanes_bounds_switches_to_the_exact_index() -> None:
    lanes = _lanes()
    _queue(lanes, "op1", Priority.LOW, [1, 2, 8])
    _queue(lanes, "op2", Priority.HIGH, [10, 11])
    # inside LOW's bounds but no shared key: its own lane, now through the exact index
    gap = _queue(lanes, "op3", Priority.HIGH, [5])
    index = lanes.indexes["t"]
    assert gap.lane == Priority.HIGH and index.bounds is None
    assert set(index.last) == {1, 2, 8, 5, 10, 11}
    # a real rewrite of a LOW key at CRITICAL: LOW's queue is promoted up to that write
    rewrite = _queue(lanes, "op4", Priority.CRITICAL, [2])
    assert rewrite.lane == Priority.CRITICAL
    assert [op.operation_id for op in lanes.lanes[Priority.CRITICAL]["t"].ops] == ["op1", "op4"]


def test_keys_that_cannot_be_ordered_use_the_exact_index() -> None:
    lanes = _lanes()
    _queue(lanes, "op1", Priority.LOW, [1, 2])
    _queue(lanes, "op2", Priority.HIGH, ["not-a-number"])
    assert lanes.indexes["t"].bounds is None


def test_bounds_of_an_emptied_lane_are_forgotten() -> None:
    lanes = _lanes()
    low = _queue(lanes, "op1", Priority.LOW, [1, 2, 3])
    _queue(lanes, "op2", Priority.HIGH, [10])
    queue = lanes.lanes[Priority.LOW].pop("t").ops  # the LOW batch is taken
    assert list(queue) == [low]
    lanes.counts[Priority.LOW] -= 1
    lanes.unindex("t", [low])
    index = lanes.indexes["t"]
    assert index.bounds == {Priority.HIGH: [10, 10]}
    again = _queue(lanes, "op3", Priority.NORMAL, [2])  # LOW's old keys are no longer queued
    assert again.lane == Priority.NORMAL and index.bounds is not None


def test_a_key_spelled_as_text_or_float_is_the_same_key() -> None:
    """'2', 2.0 and 2 are one key to an INTEGER column: a rewrite spelled differently still
    promotes the earlier writes of that key (the fast reading of plain numbers leaves text
    to the canonical keys)."""
    for queued, spelling in (([1, 2, 3], "2"), ([1, 2, 3], 2.0), ([1, 2, 3], " 2"),
                             (["1", "2", "3"], "02"), (["2"], "2.0"), (["1", "2", "3"], 2)):
        lanes = _lanes()
        low = _queue(lanes, "op1", Priority.LOW, queued)
        _queue(lanes, "op2", Priority.HIGH, [type(queued[0])(10)])
        rewrite = _queue(lanes, "op3", Priority.CRITICAL, [spelling])
        assert rewrite.lane == Priority.CRITICAL
        assert list(lanes.lanes[Priority.CRITICAL]["t"].ops) == [low, rewrite], spelling


def test_numbers_and_text_in_one_operation_are_read_as_keys() -> None:
    lanes = _lanes()
    _queue(lanes, "op1", Priority.LOW, [1, "5"])  # 1 and 5, apart from HIGH's range
    high = _queue(lanes, "op2", Priority.HIGH, [10, 11])
    assert high.lane == Priority.HIGH and lanes.indexes["t"].bounds is not None
    later = _queue(lanes, "op3", Priority.HIGH, ["5"])  # inside LOW's range: rewrite of 5
    assert later.lane == Priority.HIGH
    assert [op.operation_id for op in lanes.lanes[Priority.HIGH]["t"].ops] == [
        "op1", "op2", "op3"]


def test_rows_given_as_tuples_are_ordered_like_mappings() -> None:
    """Operations whose rows the manager already turned into tuples (normalised candles)."""
    lanes = _lanes()

    def queue(op_id: str, prio: Priority, keys: list[int]) -> BatchOperation:
        op = BatchOperation.queued(op_id, "t", OperationType.UPSERT, [], prio, None,
                                   columns=("v", "id"), values=[(1.0, k) for k in keys],
                                   row_columns=(), n_rows=len(keys), nbytes=0)
        op.lane = lanes.order(op) if lanes.lanes[Priority.LOW] else prio
        op.seq = int(op_id.removeprefix("op"))
        lanes.lanes[op.lane].setdefault("t", Lane()).ops.append(op)
        lanes.counts[op.lane] += 1
        return op

    low = queue("op1", Priority.LOW, [1, 2, 3])
    apart = queue("op2", Priority.HIGH, [7, 8])
    assert apart.lane == Priority.HIGH and lanes.indexes["t"].bounds is not None
    rewrite = queue("op3", Priority.HIGH, [3])
    assert rewrite.lane == Priority.HIGH
    assert list(lanes.lanes[Priority.HIGH]["t"].ops) == [low, apart, rewrite]
