"""A batch: operations of one table, operation type and column set, committed in one
transaction; what the backend reports back about it; and the UPDATE/DELETE row counts
taken from that report."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

from .models import BatchOperation, OperationType, Priority
from .schema import TableInfo

__all__ = ["Batch", "BatchResult", "count_affected"]


@dataclass
class BatchResult:
    """What ``write_batch`` committed: rows written, and operations that failed alone.

    ``errors`` maps an index into ``batch.operations`` to that operation's error; every
    other operation of the batch is committed.
    """

    rows: int
    errors: dict[int, BaseException] = field(default_factory=dict)
    retries: int = 0  # transient failures the backend retried itself
    #: UPDATE/DELETE: rows whose key matched, per operation (index into
    #: ``batch.operations``) where the backend can tell each operation's share ...
    affected: list[int] | None = None
    #: ... or only in total for the batch (None: the backend does not report it)
    changed: int | None = None


@dataclass(eq=False)
class Batch:
    """Operations of one (table, operation type, column set), committed in one transaction."""

    table: TableInfo
    operation_type: OperationType
    columns: tuple[str, ...]
    operations: list[BatchOperation]
    _rows: list[tuple[Any, ...]] | None = field(default=None, repr=False)
    #: the priority of the queue it was taken from (an operation promoted behind a
    #: higher-priority write of the same key keeps its own ``priority``)
    priority: Priority = Priority.NORMAL
    #: once committed: each operation's seconds from ``queue_operation()`` to the commit,
    #: in the order of ``operations`` (None before, and for a batch the scheduler only
    #: partly finished)
    latencies: list[float] | None = field(default=None, repr=False)
    #: every operation was queued at ``priority`` (the scheduler knows it of a batch taken
    #: from one queue that no promotion reached): :meth:`priority_counts` need not look
    _one_priority: bool = field(default=False, repr=False)

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        """All rows of all operations, in submission order (built once)."""
        if self._rows is None:
            ops = self.operations
            if len(ops) == 1:
                self._rows = ops[0].tuples()
            else:
                self._rows = _coalesced_rows(ops)
        return self._rows

    def flat_values(self) -> list[Any]:
        """All values of all rows in one list, row after row in ``columns`` order: what a
        multi-row statement binds. Rows given as mappings go straight into it, without
        the tuple per row of :attr:`rows` (a thousand objects fewer for the garbage
        collector to track per batch of one-row writes)."""
        if self._rows is None:
            flat = _mapped_values(self.operations, flat=True)
            if flat is not None:
                return flat
        return list(chain.from_iterable(self.rows))  # names a malformed row

    def priority_counts(self) -> dict[Priority, int]:
        """Operations per priority they were queued at (a promoted operation counts at its
        own ``priority``, not the batch's)."""
        if self._one_priority:
            return {self.priority: len(self.operations)}
        counts: dict[Priority, int] = {}
        for op in self.operations:
            counts[op.priority] = counts.get(op.priority, 0) + 1
        return counts

    @property
    def row_count(self) -> int:
        """Rows in the batch."""
        return sum([op.n_rows for op in self.operations])

    def split(self) -> tuple[Batch, Batch]:
        """Two halves by operation, to isolate a failing operation."""
        mid = len(self.operations) // 2
        return (
            Batch(self.table, self.operation_type, self.columns, self.operations[:mid],
                  priority=self.priority, _one_priority=self._one_priority),
            Batch(self.table, self.operation_type, self.columns, self.operations[mid:],
                  priority=self.priority, _one_priority=self._one_priority),
        )


def _mapped_values(ops: list[BatchOperation], flat: bool) -> list[Any] | None:
    """One conversion pass over operations whose rows all came as mappings with the same
    keys (many one-row writes coalesced): a tuple per row, or one flat list of values.
    None when they did not, or a row is malformed: the per-operation path names it.
    (List comprehensions: this runs in the writer thread, holding the GIL the producers
    need, and they beat attrgetter, generator and map passes.)"""
    keys = ops[0].row_columns
    if not keys or [op for op in ops if op.values is not None
                    or (op.row_columns is not keys and op.row_columns != keys)]:
        return None
    data = [row for op in ops for row in op.data_rows]
    if len(data) != sum([op.n_rows for op in ops]):
        return None  # a list changed length after it was queued
    columns = ops[0].columns
    getter: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    if len(columns) > 1:
        getter = itemgetter(*columns)
    else:
        column = columns[0]

        def getter(row: Mapping[str, Any]) -> tuple[Any, ...]:
            return (row[column],)

    try:
        values = list(chain.from_iterable(map(getter, data))) if flat else list(map(getter, data))
    except (KeyError, TypeError):
        return None
    width = len(keys)
    return None if [row for row in data if len(row) != width] else values


def _coalesced_rows(ops: list[BatchOperation]) -> list[tuple[Any, ...]]:
    """Rows of many operations; one conversion pass when they all came as mappings with
    the same keys, else operation by operation (which names a malformed row)."""
    values = _mapped_values(ops, flat=False)
    if values is not None:
        return values
    rows: list[tuple[Any, ...]] = []
    for op in ops:
        rows.extend(op.tuples())  # names the operation and row that is malformed
    return rows


def count_affected(batch: Batch, result: BatchResult) -> None:
    """Each UPDATE/DELETE operation's matched rows, as exactly as the backend tells them:
    per operation, or a batch total that settles it when the batch holds one operation or
    every key matched. Otherwise the operation counts the rows it sent."""
    ops = batch.operations
    if result.affected is not None:
        for op, n in zip(ops, result.affected, strict=True):
            op.rows_affected = n
        return
    changed = result.changed
    if changed is not None and len(ops) == 1:
        ops[0].rows_affected = changed
    else:  # every key matched (changed == the rows), or the backend cannot tell
        for op in ops:
            op.rows_affected = op.n_rows
