"""Lanes and the order across priorities: one queue per (priority, table), and the rule
that keeps "the later submission wins" when one table is written at several priorities.

An operation that writes a key already queued at a higher priority joins that priority's
lane, behind the earlier write; operations queued at a lower priority that write one of its
keys are promoted with it (a prefix of their lane, so each lane keeps its own order). A
per-table index from key to its last queued writer, kept only while the table has
operations at more than one priority, makes that cost follow the operation's keys, not the
length of the queues.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from itertools import repeat
from operator import itemgetter
from typing import Any

from .models import BatchOperation, Priority
from .schema import TableInfo
from .stats import SchedulerStats

__all__ = ["MALFORMED", "KeyIndex", "Lane", "Lanes", "keys_of"]

PRIORITIES = sorted(Priority, reverse=True)  # CRITICAL first
_PRIORITIES = PRIORITIES
_LOWER = {p: tuple(q for q in _PRIORITIES if q < p) for p in Priority}


MALFORMED: list[Any] = [object()]  # an operation's keys that could not be read


def keys_of(op: BatchOperation, primary_key: tuple[str, ...]) -> list[Any] | None:
    """The primary-key values an operation writes (cached), or None if its rows are bad.

    Rows that do not carry the key (an INSERT relying on AUTOINCREMENT) have no identity
    and conflict with nothing.
    """
    if op.keys is None:
        op.keys = _compute_keys(op, primary_key)
    return None if op.keys is MALFORMED else op.keys


def _compute_keys(op: BatchOperation, primary_key: tuple[str, ...]) -> list[Any]:
    """The keys as a list (repeats allowed): building a set of them cost more than the
    index it feeds."""
    if not set(primary_key) <= set(op.columns):
        return []
    try:
        if op.values is not None:
            where = [op.columns.index(k) for k in primary_key]
            keys = list(map(itemgetter(*where), op.values))
        else:
            keys = list(map(itemgetter(*primary_key), op.data_rows))
        if len(primary_key) == 1:
            return _canonical_column(keys)
        columns = [_canonical_column(list(column)) for column in zip(*keys, strict=True)]
        return list(zip(*columns, strict=True))
    except (KeyError, TypeError, ValueError, OverflowError):
        return MALFORMED  # the operation will fail: keep it in order with everything


_PLAIN_KEY_TYPES = frozenset({int, bool, float})
_canonical_texts: dict[str, Any] = {}


def _canonical_column(values: list[Any]) -> list[Any]:
    """:func:`_canonical` of one key column's values: numbers as they are, a text's form
    cached (key texts such as markets and timeframes repeat)."""
    types = set(map(type, values))
    if types <= _PLAIN_KEY_TYPES:
        return values
    if types == {str}:
        texts = _canonical_texts
        if len(texts) > 65536:
            texts.clear()
        out = []
        for value in values:
            canonical = texts.get(value, texts)
            if canonical is texts:
                canonical = texts[value] = _canonical(value)
            out.append(canonical)
        return out
    out = list(map(_canonical, values))
    for _ in map(hash, out):  # an unhashable value (TypeError): the rows are malformed
        pass
    return out


def _canonical(value: Any) -> Any:
    """A key value as the database may compare it: '7', 7, 7.0 and True are one key for an
    INTEGER column (type affinity). Numbers are their own form (as dict keys, 7, 7.0 and True
    are one key already, and large integers stay exact); numeric text becomes its number,
    other text is stripped and case-folded. Erring towards "same key" only promotes more."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return text.casefold()  # NOCASE / RTRIM collations: one key
        if number != number or number in (math.inf, -math.inf):
            return text.casefold()  # 'nan' is text, and equal to itself
        return number
    return value


def _plain_span(op: BatchOperation, primary_key: tuple[str, ...]) -> tuple[Any, Any] | None:
    """The lowest and highest key ``op`` writes, read without keeping its keys, when the
    key is one column of plain numbers (their own canonical form): what the key ranges need
    per submission, at a quarter of :func:`keys_of`'s cost. None for anything else (a key
    of several columns or of text, rows without it, a bad row): :func:`keys_of` decides."""
    if op.keys is not None or len(primary_key) != 1:
        return None
    name = primary_key[0]
    try:
        if op.values is not None:
            column = list(map(itemgetter(op.columns.index(name)), op.values))
        else:
            column = list(map(itemgetter(name), op.data_rows))
        if not column:
            return None
        low, high = min(column), max(column)
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    # text, the one key type whose canonical form differs, never compares with a number:
    # had the column held some, min() or max() raised, or one of them is text
    if type(low) not in _PLAIN_KEY_TYPES or type(high) not in _PLAIN_KEY_TYPES:
        return None
    return low, high


class KeyIndex:
    """What a table's queued operations write, kept while the table has operations queued
    at more than one priority, in one of two modes.

    First, the *bounds* of each lane's keys (``bounds[lane] = [lowest, highest]``, grown as
    operations join, forgotten when the lane empties): an operation whose keys lie outside
    the bounds of every other lane writes no key queued elsewhere, so it joins its own lane
    after two comparisons per lane. That is what producers writing ascending keys (new
    candles, new orders) at several priorities do.

    Then, from the first operation whose keys fall inside another lane's bounds (or cannot
    be compared) until the table has nothing queued, the exact index: ``last`` holds each
    key's last queued writer. The ordering across priorities keeps every queued writer of a
    key in one lane, so that writer's lane is the key's.
    """

    __slots__ = ("bounds", "last", "malformed")

    def __init__(self) -> None:
        self.bounds: dict[int, list[Any]] | None = {}  # None: the exact index is kept
        self.last: dict[Any, BatchOperation] = {}
        self.malformed = 0  # queued operations whose keys could not be read


def _bounds(keys: list[Any]) -> tuple[Any, Any] | None:
    """The lowest and highest of ``keys``, or None if they cannot be ordered (mixed types)."""
    try:
        return min(keys), max(keys)
    except TypeError:
        return None


class Lane:
    """Queued operations of one table at one priority; ``promoted``: an operation of a lower
    priority joined it (promoted, or queued behind a write of one of its keys) since it was
    last empty."""

    __slots__ = ("ops", "promoted", "rows")

    def __init__(self) -> None:
        self.ops: deque[BatchOperation] = deque()
        self.rows = 0
        self.promoted = False


class Lanes:
    """The queued operations: ``lanes[priority][table]`` is a :class:`Lane`, ``counts``
    the operations queued per priority, ``indexes`` the key index of each table queued at
    more than one priority. The scheduler reads these directly on its hot path."""

    def __init__(self, table_of: Callable[[str], TableInfo], stats: SchedulerStats) -> None:
        self.lanes: dict[Priority, dict[str, Lane]] = {p: {} for p in Priority}
        self.counts: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self.indexes: dict[str, KeyIndex] = {}
        self._table_of = table_of
        self.stats = stats

    def order(self, op: BatchOperation) -> Priority:
        """Keep "the later submission wins" across priorities; return the lane for ``op``.

        The rule is :meth:`_order_by_scan`'s; this finds the conflicting operations through
        the table's key index instead of scanning the queues, so that its cost follows the
        operation's keys (and what it promotes), not the length of the queues.
        """
        table = op.table_name
        info = self._table_of(table)
        if not info.primary_key:
            return op.priority  # rows without identity: nothing can be overwritten
        pk = info.primary_key
        index = self.indexes.get(table)
        if index is None:
            index = self.indexes[table] = self._start_index(table, pk)
        if index.bounds is not None:
            if self._apart(index.bounds, op.priority, op, pk):
                return op.priority
            self._index_keys(index, table, pk)  # a key may be queued in another lane
        own = keys_of(op, pk)
        last = index.last
        if own is None or index.malformed:  # rows with unreadable keys: the slow, safe way
            target = self._order_by_scan(op)
            if own is None:
                index.malformed += 1
            else:
                last.update(zip(own, repeat(op)))
            return target
        target = op.priority
        writers = list(filter(None, map(last.get, own)))
        for writer in writers:  # the highest lane holding one of op's keys
            if writer.lane > target:
                target = Priority(writer.lane)
        while writers:  # lower lanes: promote up to their last writer of a promoted key
            cutoffs: dict[int, int] = {}
            for writer in writers:
                if 0 <= writer.lane < target and writer.seq > cutoffs.get(writer.lane, -1):
                    cutoffs[writer.lane] = writer.seq
            promoted: list[Any] = []
            for lane_prio, cutoff in cutoffs.items():
                src = Priority(lane_prio)
                queue = self.lanes[src][table].ops
                moved = []
                while queue and queue[0].seq <= cutoff:
                    moved.append(queue.popleft())
                if moved:
                    self._move(src, target, table, moved)
                for queued in moved:
                    promoted.extend(queued.keys or ())
            writers = list(filter(None, map(last.get, promoted)))
        last.update(zip(own, repeat(op)))
        return target

    @staticmethod
    def _apart(bounds: dict[int, list[Any]], prio: int, op: BatchOperation,
               pk: tuple[str, ...]) -> bool:
        """Whether the keys ``op`` writes lie outside the bounds of every lane but
        ``prio``'s; if so they join ``prio``'s bounds. False when some key may be queued in
        another lane (or the keys cannot be read or compared with the others)."""
        span = _plain_span(op, pk)
        if span is None:
            keys = keys_of(op, pk)
            if keys is None:
                return False
            if not keys:
                return True  # rows without the key (AUTOINCREMENT): they overwrite nothing
            span = _bounds(keys)
            if span is None:
                return False
        low, high = span
        try:
            for lane, (lane_low, lane_high) in bounds.items():
                if lane != prio and not (high < lane_low or low > lane_high):
                    return False
            own = bounds.get(prio)
            if own is None:
                bounds[prio] = [low, high]
            else:
                if low < own[0]:
                    own[0] = low
                if high > own[1]:
                    own[1] = high
        except TypeError:  # keys of other types than the queued ones'
            return False
        return True

    def _start_index(self, table: str, pk: tuple[str, ...]) -> KeyIndex:
        """The key index of a table that now has operations at a second priority: the
        bounds of what its lanes hold, or the exact index if those cannot be told apart."""
        index = KeyIndex()
        bounds = index.bounds
        assert bounds is not None
        for prio in _PRIORITIES:
            lane = self.lanes[prio].get(table)
            for op in lane.ops if lane is not None else ():
                if not self._apart(bounds, prio, op, pk):
                    self._index_keys(index, table, pk)
                    return index
        return index

    def _index_keys(self, index: KeyIndex, table: str, pk: tuple[str, ...]) -> None:
        """Switch ``index`` to the exact index of every queued operation of ``table``."""
        index.bounds = None
        queued = [op for prio in _PRIORITIES if (lane := self.lanes[prio].get(table))
                  for op in lane.ops]
        for op in sorted(queued, key=lambda o: o.seq):
            keys = keys_of(op, pk)
            if keys is None:
                index.malformed += 1
            else:
                index.last.update(zip(keys, repeat(op)))

    def unindex(self, table: str, ops: list[BatchOperation]) -> None:
        """``ops`` are taken out of the queues: forget them as their keys' last writers (the
        index goes once the table has nothing queued)."""
        if not any(table in self.lanes[prio] for prio in _PRIORITIES):
            del self.indexes[table]
            return
        index = self.indexes[table]
        bounds = index.bounds
        if bounds is not None:  # forget the bounds of the lanes that emptied
            for lane in [lane for lane in bounds if table not in self.lanes[Priority(lane)]]:
                del bounds[lane]
            return
        last = index.last
        for op in ops:
            keys = op.keys
            if keys is MALFORMED:
                index.malformed -= 1
            elif keys:
                # pop every key in C, then put back the few a later writer owns (or that
                # repeat in the operation): a Python loop per key cost twice as much
                popped = list(map(last.pop, keys, repeat(None)))
                if popped.count(op) != len(popped):
                    last.update([(key, writer) for key, writer in zip(keys, popped, strict=True)
                                 if writer is not None and writer is not op])

    def _order_by_scan(self, op: BatchOperation) -> Priority:
        """Keep "the later submission wins" across priorities; return the lane for ``op``.

        An operation queued earlier at a *higher* priority that writes one of ``op``'s keys
        must commit first: ``op`` joins that priority's lane, behind it. Operations queued
        earlier at a *lower* priority that write one of the same keys must commit first
        too: each lower lane is promoted up to its last such operation (a prefix, so the
        lane's own order holds), repeated until no queued lower-priority operation touches a
        promoted key. Key sets are built only when a table has operations queued at two
        priorities, once per operation.
        """
        table = op.table_name
        info = self._table_of(table)
        if not info.primary_key:
            return op.priority  # rows without identity: nothing can be overwritten
        pk = info.primary_key
        own = keys_of(op, pk)
        every = own is None  # keys unknown (malformed rows): keep everything in order
        keys = set(own or ())
        target = op.priority
        for prio in _PRIORITIES:  # CRITICAL first: the highest conflicting lane wins
            if prio <= op.priority:
                break
            lane = self.lanes[prio].get(table)
            if lane is not None and any(
                    every or (theirs := keys_of(queued, pk)) is None
                    or not keys.isdisjoint(theirs) for queued in lane.ops):
                target = prio
                break
        lower = [p for p in _LOWER[target] if table in self.lanes[p]]
        changed = True
        while changed:
            changed = False
            for prio in lower:
                lane = self.lanes[prio].get(table)
                if lane is None:
                    continue
                last = len(lane.ops) - 1 if every else -1
                if not every:
                    for i, queued in enumerate(lane.ops):
                        theirs = keys_of(queued, pk)
                        if theirs is None or not keys.isdisjoint(theirs):
                            last = i
                if last < 0:
                    continue
                moved = [lane.ops.popleft() for _ in range(last + 1)]
                for queued in moved:
                    theirs = keys_of(queued, pk)
                    if theirs is None:
                        every = True
                    else:
                        keys.update(theirs)
                self._move(prio, target, table, moved)
                changed = True
        return target

    def _move(self, src: Priority, dst: Priority, table: str,
              ops: list[BatchOperation]) -> None:
        src_lane = self.lanes[src][table]
        rows = sum(o.n_rows for o in ops)
        src_lane.rows -= rows
        if not src_lane.ops:
            del self.lanes[src][table]
        dst_lane = self.lanes[dst].get(table)
        if dst_lane is None:
            dst_lane = self.lanes[dst][table] = Lane()
        for queued in ops:
            queued.lane = dst
        dst_lane.promoted = True
        if not dst_lane.ops or dst_lane.ops[-1].seq < ops[0].seq:
            dst_lane.ops.extend(ops)
        else:
            dst_lane.ops = deque(heapq.merge(dst_lane.ops, ops, key=lambda o: o.seq))
        dst_lane.rows += rows
        self.counts[src] -= len(ops)
        self.counts[dst] += len(ops)
        self.stats.promotions += len(ops)

    def take_from(self, prio: Priority, table: str, lane: Lane, ops: list[BatchOperation],
                   rows: int, limit: int) -> int:
        """Move the operations at the head of ``lane`` that have ``ops``' shape (the first
        one's if ``ops`` is empty) into ``ops`` while they fit in ``limit`` rows."""
        q = lane.ops
        first = ops[0] if ops else q[0]
        op_type, columns = first.operation_type, first.columns
        taken = 0
        while q and (rows < limit or not ops):
            nxt = q[0]
            if ops and (nxt.operation_type is not op_type or rows + nxt.n_rows > limit
                        or (nxt.columns is not columns and nxt.columns != columns)):
                break
            ops.append(q.popleft())
            rows += nxt.n_rows
            taken += nxt.n_rows
        lane.rows -= taken
        if not q:
            del self.lanes[prio][table]
        return rows

    def top_up(self, prio: Priority, table: str, ops: list[BatchOperation], rows: int,
               limit: int) -> Priority:
        """Fill a batch that is not full with the heads of the table's other lanes (same
        shape), oldest submission first across them: fewer, fuller batches when producers
        outrun the database on one table at several priorities (a CRITICAL batch of the few
        rows that came in during the last batch otherwise went alone), whose rows follow
        the producers' order as one priority's would (the database appends in key order
        instead of at four places), and lanes that drain at the same pace. Safe for
        "the later submission wins": the key index keeps every queued writer of a key in one
        lane, so operations of different lanes share no key, and each lane still gives up
        its operations in order. Those operations only commit earlier than they had to.
        Returns the batch's priority: the highest of its operations' lanes."""
        first = ops[0]
        op_type, columns = first.operation_type, first.columns
        lanes = [(other, lane) for other in _PRIORITIES
                 if other is not prio and (lane := self.lanes[other].get(table)) is not None]
        batch_prio = prio
        while lanes and rows < limit:
            # the lane whose head was submitted first
            at = min(range(len(lanes)), key=lambda i: lanes[i][1].ops[0].seq)
            other, lane = lanes[at]
            nxt = lane.ops[0]
            if (nxt.operation_type is not op_type or rows + nxt.n_rows > limit
                    or (nxt.columns is not columns and nxt.columns != columns)):
                del lanes[at]  # its head does not fit: the lane keeps its order
                continue
            ops.append(lane.ops.popleft())
            rows += nxt.n_rows
            lane.rows -= nxt.n_rows
            self.counts[other] -= 1
            if other > batch_prio:
                batch_prio = other
            if not lane.ops:
                del self.lanes[other][table]
                del lanes[at]
        return batch_prio
