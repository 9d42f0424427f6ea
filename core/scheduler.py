"""The scheduler: priority queues, coalescing, memory budget, dispatch, retries, statistics.

One deque per (priority, table) keeps submission order per table and priority. The dispatcher
always serves the highest priority that has a batch ready, and among its tables the one whose
head has waited longest. A batch is ready when it is full, when its priority's linger has
elapsed, or when something forces it (``flush()``, ``stop()``, memory or queue-length pressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .backend import Backend, BackendContext, ErrorKind, RetryPolicy, retries_of
from .batch import Batch, BatchResult, count_affected
from .callbacks import CALLBACK_STATUS_KEYS, CallbackRunner, is_async_callable
from .models import (
    BatchOperation,
    NotRunningError,
    OperationFailed,
    OperationType,
    Priority,
    QueueFull,
)
from .ordering import Lane, Lanes
from .schema import TableInfo
from .settings import BatchConfig
from .stats import History, SchedulerStats

if TYPE_CHECKING:
    from .spooler import Spooler

__all__ = ["Scheduler", "SchedulerStats"]

log = logging.getLogger("batchdb.scheduler")

_PRIORITIES = sorted(Priority, reverse=True)  # CRITICAL first
_CRITICAL = Priority.CRITICAL  # a module constant: read on every submission
_OTHERS = {p: tuple(q for q in _PRIORITIES if q != p) for p in Priority}
_MB = 1024 * 1024
_KEYED = (OperationType.UPDATE, OperationType.DELETE)
_WAITING = ("queued", "spooled")  # not finished yet


class _StillDown(Exception):
    """A replayed batch failed transiently for longer than ``spool.after_seconds``."""


class Scheduler:
    """Queues operations and commits them through ``backend`` in batches.

    Dispatch is driven by events, not by a polling task: a submission that makes a batch
    ready, a finished batch, a linger timer, ``flush()`` and ``stop()`` each call
    :meth:`_dispatch`, which hands ready batches to the backend at once.
    """

    def __init__(
        self,
        config: BatchConfig,
        backend: Backend,
        table_of: Callable[[str], TableInfo],
        on_committed: Callable[[Batch, float], None] | None = None,
        on_failed: Callable[[Batch, BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self._table_of = table_of
        self._on_committed = on_committed
        self._on_failed = on_failed
        caps = backend.capabilities
        self._ordered = caps.ordered
        self._recovers_itself = caps.recovers_itself
        self.max_inflight = max(1, min(config.max_concurrent_batches, caps.max_writers))
        self._insert_size = caps.insert_batch_size or config.insert_batch_size
        self._update_size = caps.update_batch_size or config.update_batch_size
        self.backend_context = BackendContext(
            RetryPolicy(config.max_retries, config.retry_base_delay_seconds,
                        config.retry_max_delay_seconds),
            self.critical_waiting, self._insert_size)
        self.stats = SchedulerStats()
        self._queues = Lanes(table_of, self.stats)
        # the lanes' own dicts, read directly on the submission and dispatch paths
        self._lanes = self._queues.lanes
        self._queued_by_prio = self._queues.counts
        self._indexes = self._queues.indexes
        self._linger = {p: config.linger_for(p) for p in Priority}
        self.queued_ops = 0
        self.queued_bytes = 0
        self._budget = config.max_memory_mb * _MB
        self._max_queue = config.max_queue_size
        self._limits = {t: self._update_size if t in _KEYED else self._insert_size
                        for t in OperationType}
        # queued or in-flight operations by id, in submission order (a dict keeps it)
        self._pending: dict[str, BatchOperation] = {}
        self._history = History(config.completed_history)
        self._inflight = 0
        self._inflight_tables: dict[str, int] = {}
        self._inflight_critical = 0
        self._flush_barrier = -1
        self._seq = 0
        self._running = False
        self._stopping = False
        self._paused = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._last_yield = 0.0
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._callbacks: CallbackRunner | None = None
        self._async_callables: dict[Any, bool] = {}
        self._recoveries: set[asyncio.Task[None]] = set()
        #: set by the manager when ``[spool] enabled``: batches the database cannot take
        #: go there (see batchdb.spooler)
        self.spooler: Spooler | None = None
        self.on_spooled: Callable[[Batch], None] | None = None
        self._durable: dict[str, list[asyncio.Future[None]]] = {}  # wait(until="durable")

    # ------------------------------------------------------------------ life cycle
    def observe(self, on_committed: Callable[[Batch, float], None] | None,
                on_failed: Callable[[Batch, BaseException], None] | None) -> None:
        """Who hears of each committed and failed batch (before :meth:`start`); None: no
        one, and nothing is called per batch."""
        self._on_committed = on_committed
        self._on_failed = on_failed

    def start(self) -> None:
        """Accept operations (called on the event loop that will run the callbacks)."""
        self._running = True
        self._stopping = False
        if self._callbacks is None:
            self._callbacks = CallbackRunner(asyncio.get_running_loop(),
                                             self.config.callback_timeout_seconds,
                                             self._on_callbacks_progress)

    def abort(self, reason: str) -> None:
        """Fail every operation still queued (a stop that could not drain): each one gets
        ``reason`` as its error; nothing is dispatched any more."""
        self._stopping = True
        self._running = False
        self._indexes.clear()
        error = NotRunningError(reason)
        for prio in _PRIORITIES:
            lanes = self._lanes[prio]
            for table, lane in list(lanes.items()):
                ops = list(lane.ops)
                lane.ops.clear()
                self.queued_ops -= len(ops)
                self._queued_by_prio[prio] -= len(ops)
                self.queued_bytes -= sum(op.nbytes for op in ops)
                del lanes[table]
                self._finish(Batch(self._table_of(table), ops[0].operation_type,
                                   ops[0].columns, ops), error, 0.0)
        self._room.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def stop(self) -> None:
        """Commit everything queued, wait for callbacks, then refuse new operations."""
        if not self._running:
            return
        self._stopping = True
        self._room.set()
        if self.spooler is not None:
            self.spooler.stopping = True
        while self.queued_ops or self._inflight:
            self._dispatch()
            self._idle.clear()
            await self._idle.wait()
        if self.spooler is not None:
            await self.spooler.drain()  # replay what the spool holds if the database answers
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._check_flush_waiters()
        callbacks = self._callbacks
        if callbacks is not None:
            await callbacks.drain()  # each callback is bounded by its own timeout
            callbacks.close()

    @property
    def running(self) -> bool:
        """True between start() and the end of stop()."""
        return self._running

    # ------------------------------------------------------------------ submission
    def _over_budget(self, op: BatchOperation) -> bool:
        queued_ops, queued_bytes = self.queued_ops, self.queued_bytes
        callbacks = self._callbacks
        if callbacks is not None and callbacks.queued:
            # finished operations whose callbacks have not run yet count like queued ones:
            # callbacks slower than the commits slow the producers, they never pile up
            backlog_ops, backlog_bytes = callbacks.backlog()
            queued_ops += backlog_ops
            queued_bytes += backlog_bytes
        if queued_ops >= self._max_queue:
            return True
        # an operation larger than the whole budget gets in once the queue is empty
        return queued_bytes > 0 and queued_bytes + op.nbytes > self._budget

    def _on_callbacks_progress(self) -> None:
        self._room.set()

    async def submit(self, op: BatchOperation) -> None:
        """Queue ``op``, after waiting for room (or raising QueueFull) when over budget.

        An operation is never split: larger than a batch, it is a batch of its own.
        """
        if not self.try_submit(op):
            self._dispatch()  # pressure: dispatch without lingering
            if self.config.backpressure == "raise":
                raise QueueFull(
                    f"queue is full ({self.queued_ops} operations, "
                    f"{self.queued_bytes / _MB:.1f} MB of {self.config.max_memory_mb} MB): "
                    f"operation on {op.table_name!r} refused"
                )
            await self._wait_for_room(op)
            self._enqueue_new(op)
        elif self.yield_due():
            await asyncio.sleep(0)

    def yield_due(self) -> bool:
        """True once a millisecond: a producer that never awaits anything would starve the
        event loop, and with it the completions that feed the writer."""
        now = time.monotonic()
        if now - self._last_yield > 0.001:
            self._last_yield = now
            return True
        return False

    def try_submit(self, op: BatchOperation) -> bool:
        """Queue ``op`` if there is room (CRITICAL always has room); False if there is not."""
        if self._stopping or not self._running:
            raise NotRunningError("the manager is not running: call start() or use "
                                  "'async with'")
        if op.priority is not _CRITICAL and self._over_budget(op):
            return False
        self._enqueue_new(op)
        return True

    def _enqueue_new(self, op: BatchOperation) -> None:
        self._seq += 1
        op.seq = self._seq  # submission order, across all priorities
        table = op.table_name
        prio = op.priority
        all_lanes = self._lanes
        if table in self._indexes:
            prio = self._queues.order(op)
        else:
            for other in _OTHERS[prio]:
                if table in all_lanes[other]:  # the table has writes queued at another priority
                    prio = self._queues.order(op)
                    break
        op.lane = prio
        self._pending[op.operation_id] = op
        lanes = all_lanes[prio]
        lane = lanes.get(table)
        if lane is None:
            lane = lanes[table] = Lane()
        lane.ops.append(op)
        lane.rows += op.n_rows
        if prio is not op.priority:
            lane.promoted = True  # it joined a higher lane behind a write of one of its keys
        self.queued_ops += 1
        self._queued_by_prio[prio] += 1
        self.queued_bytes += op.nbytes
        # dispatch now only if this can make a batch ready before the armed timer
        if self._paused or self._inflight >= self.max_inflight + (prio is _CRITICAL):
            return  # a finished batch will dispatch
        linger = self._linger[prio]
        if (lane.rows >= self._limits[op.operation_type] or linger == 0
                or op.enqueued_at + linger < self._timer_at or self._pressure()):
            self._dispatch()

    async def _wait_for_room(self, op: BatchOperation) -> None:
        deadline = self.config.backpressure_timeout_seconds
        start = time.monotonic()
        while True:
            if self._callbacks is not None:
                self._callbacks.want_progress()  # wake up when a callback frees room
            if not self._over_budget(op):
                break
            if self._stopping:
                raise NotRunningError("the manager is stopping")
            self._room.clear()
            timeout = None if deadline is None else deadline - (time.monotonic() - start)
            if timeout is not None and timeout <= 0:
                raise QueueFull(f"no room in the queue after {deadline}s: operation on "
                                f"{op.table_name!r} refused")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout)

    # ------------------------------------------------------------------ completion API
    def get(self, operation_id: str) -> BatchOperation | None:
        """A pending or recently finished operation."""
        return self._pending.get(operation_id) or self._history.get(operation_id)

    async def wait(self, operation_id: str, until: str = "committed") -> BatchOperation:
        """Return the operation once committed (``until="durable"``: once committed or in
        the spool); raise OperationFailed if it failed."""
        op = self.get(operation_id)
        if op is None:
            raise KeyError(f"unknown operation id {operation_id!r} (never queued, or finished "
                           f"longer ago than the last {self.config.completed_history} operations)")
        if until == "durable":
            if op.state == "queued":
                durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._durable.setdefault(operation_id, []).append(durable)
                await asyncio.shield(durable)
        elif op.state in _WAITING:
            if op.future is None:
                op.future = asyncio.get_running_loop().create_future()
            await asyncio.shield(op.future)
        if op.error is not None:
            raise OperationFailed(
                f"operation {op.operation_id} on {op.table_name!r} failed: {op.error}",
                op.operation_id,
            ) from op.exception
        return op

    def _wake_durable(self, ops: list[BatchOperation]) -> None:
        """Operations that are in the spool or finished: ``wait(until="durable")`` returns."""
        durable = self._durable
        for op in ops:
            for fut in durable.pop(op.operation_id, ()):
                if not fut.done():
                    fut.set_result(None)

    async def flush(self) -> None:
        """Return when every operation queued before this call has finished and its
        callback has run (or timed out)."""
        if self._pending:
            barrier = self._seq  # the newest operation queued
            self._flush_barrier = max(self._flush_barrier, barrier)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._flush_waiters.append((barrier, fut))
            self._dispatch()
            await fut
        if self._callbacks is not None:
            await self._callbacks.drain()

    def _check_flush_waiters(self) -> None:
        if not self._flush_waiters:
            return
        oldest = next(iter(self._pending.values())).seq if self._pending else None
        keep = []
        for barrier, fut in self._flush_waiters:
            if oldest is None or oldest > barrier:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((barrier, fut))
        self._flush_waiters = keep

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the writer alone (for maintenance): no batch runs meanwhile."""
        self._paused += 1
        try:
            while self._inflight:
                self._idle.clear()
                await self._idle.wait()
            yield
        finally:
            self._paused -= 1
            self._dispatch()

    def critical_waiting(self) -> bool:
        """True while a CRITICAL operation is queued or handed to the backend."""
        return self._queued_by_prio[_CRITICAL] > 0 or self._inflight_critical > 0

    # ------------------------------------------------------------------ dispatch
    def batch_limit(self, op_type: OperationType) -> int:
        """Rows per batch for this kind of operation."""
        return self._limits[op_type]

    def _pressure(self) -> bool:
        return (
            self.queued_bytes >= self._budget / 2
            or self.queued_ops >= self._max_queue // 2
            or self._stopping
        )

    def _pick(self, now: float, critical_only: bool = False
              ) -> tuple[Batch | None, float | None]:
        """The next batch to run, or the time until one becomes ready.

        A lane is ready when its batch is full, its linger is over, a flush() covers it or
        the scheduler stops; the highest priority with a ready lane goes first. Under memory
        or queue-length pressure with no lane ready, the fullest lane goes: it frees the
        most room per batch (forcing the highest priority's few rows out first cut batches
        in pieces whenever producers outran the database at several priorities).
        """
        stopping = self._stopping
        pressure = self._pressure()  # stopping included
        fullest: tuple[int, Priority, str, Lane] | None = None
        next_deadline: float | None = None
        # a table's batches one at a time while spooling is on: a later batch must not
        # commit while an earlier one of its table is on its way to the spool
        busy = self._inflight_tables if not self._ordered or self.spooler else {}
        for prio in _PRIORITIES[:1] if critical_only else _PRIORITIES:
            lanes = self._lanes[prio]
            if not lanes:
                continue
            linger = self._linger[prio]
            best: tuple[str, Lane] | None = None
            for table, lane in lanes.items():
                if table in busy:
                    continue
                head = lane.ops[0]
                ready = (
                    stopping
                    or head.seq <= self._flush_barrier
                    or now - head.enqueued_at >= linger
                    or lane.rows >= self.batch_limit(head.operation_type)
                )
                if ready:
                    if best is None or head.seq < best[1].ops[0].seq:
                        best = (table, lane)
                else:
                    deadline = head.enqueued_at + linger
                    if next_deadline is None or deadline < next_deadline:
                        next_deadline = deadline
                    if pressure and (fullest is None or lane.rows > fullest[0]):
                        fullest = (lane.rows, prio, table, lane)
            if best is not None:
                return self._take(prio, *best), None
        if fullest is not None:
            return self._take(*fullest[1:]), None
        return None, next_deadline

    def _take(self, prio: Priority, table: str, lane: Lane) -> Batch:
        """The next batch of ``lane``: its head and the operations behind it of the same
        shape, up to the batch size; under memory or queue-length pressure, a batch that is
        not full then takes the heads of the table's other lanes too (see :meth:`Lanes.top_up`).
        Without pressure a lower priority keeps lingering beside a higher one."""
        head = lane.ops[0]
        op_type, columns = head.operation_type, head.columns
        limit = self._limits[op_type]
        ops: list[BatchOperation] = []
        one_priority = not lane.promoted
        rows = self._queues.take_from(prio, table, lane, ops, 0, limit)
        self._queued_by_prio[prio] -= len(ops)
        index = self._indexes.get(table)
        batch_prio = prio
        if rows < limit and index is not None and not index.malformed and self._pressure():
            own = len(ops)
            batch_prio = self._queues.top_up(prio, table, ops, rows, limit)
            one_priority = one_priority and len(ops) == own
        if index is not None:
            self._queues.unindex(table, ops)
        nbytes = sum([op.nbytes for op in ops])
        self.queued_ops -= len(ops)
        self.queued_bytes -= nbytes
        return Batch(self._table_of(table), op_type, columns, ops, priority=batch_prio,
                     _one_priority=one_priority)

    def _dispatch(self) -> None:
        """Hand every ready batch to the backend, up to the in-flight limit; arm the timer."""
        if not self._running:
            return
        deadline: float | None = None
        # CRITICAL has one slot more than the backend's writers: a live order never waits
        # for a backlog batch to finish before it is handed to the backend
        while self._inflight <= self.max_inflight and not self._paused:
            critical_only = self._inflight == self.max_inflight
            if critical_only and not self._queued_by_prio[_CRITICAL]:
                break
            batch, deadline = self._pick(time.monotonic(), critical_only)
            if batch is None:
                break
            self._launch(batch)
        if deadline is not None and deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            self._timer_at = deadline
            self._timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0.0002),
                                       self._on_timer)

    def wake(self) -> None:
        """Dispatch now (the spooler calls it when a table leaves the spool)."""
        self._dispatch()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._dispatch()

    # ------------------------------------------------------------------ execution
    def _launch(self, batch: Batch) -> None:
        self._inflight += 1
        self._inflight_critical += batch.priority is _CRITICAL
        name = batch.table.name
        self._inflight_tables[name] = self._inflight_tables.get(name, 0) + 1
        self._idle.clear()
        spooler = self.spooler
        if spooler is not None and spooler.routes(name):  # down, or the table has a spool
            self._start_recovery(self._spool(batch))
            return
        start = time.perf_counter()
        fut: asyncio.Future[BatchResult]
        try:
            fut = asyncio.ensure_future(self.backend.write_batch(batch))
        except Exception as exc:  # a backend that fails before returning an awaitable
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
        fut.add_done_callback(lambda f: self._on_written(batch, start, f))

    def _release(self, batch: Batch) -> None:
        self._inflight -= 1
        self._inflight_critical -= batch.priority is _CRITICAL
        name = batch.table.name
        left = self._inflight_tables[name] - 1
        if left:
            self._inflight_tables[name] = left
        else:
            del self._inflight_tables[name]
        self._room.set()
        self._dispatch()
        if not self._inflight:
            self._idle.set()

    def _on_written(self, batch: Batch, start: float, fut: asyncio.Future[BatchResult]) -> None:
        seconds = time.perf_counter() - start
        try:
            result = fut.result()
        except Exception as exc:
            self.stats.retries += retries_of(exc)  # a backend's own retries before it gave up
            kind = self.backend.classify_error(exc)
            if (self._recovers_itself and kind is ErrorKind.TRANSIENT
                    and self.spooler is not None):  # the backend retried it already
                self.spooler.mark_down()
                self._start_recovery(self._spool(batch))
            elif self._fails_as_is(batch, kind):
                self._finish(batch, exc, seconds)
                self._release(batch)
            else:
                self._start_recovery(self._recover(batch, exc, kind))
            return
        except BaseException as exc:  # cancelled: the operations are failed, never dropped
            self._finish(batch, exc, seconds)
            self._release(batch)
            return
        self._finish_result(batch, result, seconds)
        self._release(batch)

    def _fails_as_is(self, batch: Batch, kind: ErrorKind) -> bool:
        """Whether a batch that raised an error of ``kind`` fails as it is: nothing to
        retry or split (the backend did both itself, the database cannot take it, or the
        bad data is one operation's)."""
        return self._recovers_itself or kind is ErrorKind.RESOURCE or (
            kind is ErrorKind.DATA and len(batch.operations) == 1)

    def _start_recovery(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _spool(self, batch: Batch) -> None:
        """Append ``batch`` to the spool instead of writing it, then release it."""
        try:
            await self._to_spool(batch)
        except BaseException as err:
            self._finish(batch, err, 0.0)
            raise
        finally:
            self._release(batch)

    async def _to_spool(self, batch: Batch) -> None:
        spooler = self.spooler
        assert spooler is not None
        while True:
            refused, leftover = await spooler.spool_batch(batch)
            for op, err in refused:  # values the spool cannot keep
                self._finish(Batch(batch.table, batch.operation_type, batch.columns, [op]),
                             err, 0.0)
            if not leftover:
                return
            # no room in the spool, and the database answers again: write them there
            batch = Batch(batch.table, batch.operation_type, batch.columns, leftover,
                          priority=batch.priority)
            if await self.replay_write(batch):
                return
            spooler.mark_down()

    def spooled(self, batch: Batch) -> None:
        """``batch``'s operations are in the spool (called by the spooler)."""
        if self._durable:
            self._wake_durable(batch.operations)
        if self.on_spooled is not None:
            self.on_spooled(batch)

    def already_committed(self, batch: Batch) -> None:
        """Spooled operations the database's replay marks show committed (by a process
        that crashed before noting it in the spool): acknowledged without a write."""
        self._finish(batch, None, 0.0, batch.row_count)

    async def replay_write(self, batch: Batch) -> bool:
        """Write a batch replayed from the spool, splitting it on bad data as any batch;
        False (its operations left in the spool) if the database is away again."""
        start = time.perf_counter()
        try:
            result = await self.backend.write_batch(batch)
        except Exception as exc:
            self.stats.retries += retries_of(exc)
            kind = self.backend.classify_error(exc)
            if self._recovers_itself and kind is ErrorKind.TRANSIENT:
                return False
            if self._fails_as_is(batch, kind):
                self._finish(batch, exc, time.perf_counter() - start)
                return True
            try:
                await self._retry(batch, exc, kind, 0, replay=True)
            except _StillDown:
                return False
            return True
        self._finish_result(batch, result, time.perf_counter() - start)
        return True

    async def _recover(self, batch: Batch, exc: Exception, kind: ErrorKind) -> None:
        """Retry a transiently failed batch, or split a batch with bad data, then release it."""
        try:
            await self._retry(batch, exc, kind, 0)
        except BaseException as err:
            self._finish(batch, err, 0.0)
            raise
        finally:
            self._release(batch)

    async def _retry(self, batch: Batch, exc: Exception, kind: ErrorKind, attempt: int,
                     since: float | None = None, replay: bool = False) -> None:
        """Retry a transient failure with backoff; split a batch with bad data. With a
        spool, a transient failure that lasts ``spool.after_seconds`` (or outlasts the
        retries) sends the batch to the spool; a replayed one raises ``_StillDown``."""
        policy = self.backend_context.retry_policy
        since = time.monotonic() if since is None else since
        while True:
            spooler = self.spooler
            if kind is ErrorKind.TRANSIENT and spooler is not None and (
                    spooler.down or attempt >= policy.max_retries
                    or time.monotonic() - since >= spooler.after_seconds):
                if replay:
                    raise _StillDown
                spooler.mark_down()
                await self._to_spool(batch)
                return
            if kind is ErrorKind.TRANSIENT and attempt < policy.max_retries:
                attempt += 1
                self.stats.retries += 1
                delay = policy.delay(attempt)
                log.warning("batch on %r: %s; retry %d/%d in %.2fs", batch.table.name, exc,
                            attempt, policy.max_retries, delay)
                await asyncio.sleep(delay)
            elif kind is ErrorKind.DATA and len(batch.operations) > 1:
                self.stats.splits += 1
                for half in batch.split():
                    await self._retry_half(half, attempt, since, replay)
                return
            else:
                self._finish(batch, exc, 0.0)
                return
            start = time.perf_counter()
            try:
                result = await self.backend.write_batch(batch)
            except Exception as err:
                self.stats.retries += retries_of(err)
                exc, kind = err, self.backend.classify_error(err)
                continue
            self._finish_result(batch, result, time.perf_counter() - start)
            return

    async def _retry_half(self, batch: Batch, attempt: int, since: float | None = None,
                          replay: bool = False) -> None:
        start = time.perf_counter()
        try:
            result = await self.backend.write_batch(batch)
        except Exception as err:
            self.stats.retries += retries_of(err)
            await self._retry(batch, err, self.backend.classify_error(err), attempt, since,
                              replay)
            return
        self._finish_result(batch, result, time.perf_counter() - start)

    def _finish_result(self, batch: Batch, result: BatchResult, seconds: float) -> None:
        self.stats.retries += result.retries
        if batch.operation_type in _KEYED:
            count_affected(batch, result)
        if not result.errors:
            self._finish(batch, None, seconds, result.rows)
            return
        ops = batch.operations
        good = [op for i, op in enumerate(ops) if i not in result.errors]
        if good:
            self._finish(Batch(batch.table, batch.operation_type, batch.columns, good), None,
                         seconds, result.rows)
        for i, err in result.errors.items():
            self._finish(Batch(batch.table, batch.operation_type, batch.columns, [ops[i]]),
                         err, 0.0)

    def _finish(self, batch: Batch, exc: BaseException | None, seconds: float,
                written: int = 0) -> None:
        ops = batch.operations
        if [op for op in ops if op.state not in _WAITING]:  # a batch cancelled mid-split
            ops = [op for op in ops if op.state in _WAITING]  # ends once per operation
            if not ops:
                return
        stats = self.stats
        now_wall = time.time()
        now = time.monotonic()
        stats.total_processing_time += seconds
        if exc is None:
            stats.batches_committed += 1
            stats.rows_committed += written
        else:
            stats.batches_failed += 1
            log.error("%d operation(s) on %r failed: %s", len(ops), batch.table.name, exc)
        stats.total_operations += len(ops)
        if exc is None:
            stats.successful_operations += len(ops)
            latencies: list[float] = []
            keyed = batch.operation_type in _KEYED  # counted by _count_affected
            for op in ops:
                if not keyed:
                    op.rows_affected = op.n_rows
                op.state = "committed"
                op.is_processed = True
                op.processed_at = now_wall
                op.processing_time = seconds
                op.values = None
                latencies.append(now - op.enqueued_at)
            stats.latencies.extend(latencies)
            if ops is batch.operations:
                batch.latencies = latencies
        else:
            stats.failed_operations += len(ops)
            error = f"{type(exc).__name__}: {exc}"
            for op in ops:
                op.error, op.exception = error, exc
                op.state = "failed"
                op.processed_at = now_wall
                op.processing_time = seconds
                op.values = None
        self._complete(ops)
        if exc is None:
            if self._on_committed is not None:
                self._on_committed(batch, seconds)
        elif self._on_failed is not None:
            self._on_failed(batch, exc)
        self._check_flush_waiters()

    def _complete(self, ops: list[BatchOperation]) -> None:
        """Wake the waiters of finished operations, keep their records and hand their
        callbacks over, once per batch: the rows are released after the callback."""
        pending = self._pending
        known = self._async_callables
        plain: list[BatchOperation] = []
        coroutines: list[BatchOperation] = []
        for op in ops:
            pending.pop(op.operation_id, None)
            future = op.future
            if future is not None and not future.done():
                future.set_result(op)
            callback = op.callback
            if callback is None:
                op.data_rows = ()  # release the rows: the history keeps only the record
            else:
                try:
                    is_coroutine = known[callback]
                except KeyError:
                    is_coroutine = self._learn_callback(callback)
                except TypeError:  # an unhashable callable
                    is_coroutine = is_async_callable(callback)
                (coroutines if is_coroutine else plain).append(op)
        self._history.add(ops)
        if self._durable:
            self._wake_durable(ops)
        if (plain or coroutines) and self._callbacks is not None:
            self._callbacks.run(plain, coroutines)

    def _learn_callback(self, callback: Any) -> bool:
        """Whether ``callback`` is a coroutine function, remembered (``_complete`` looks it
        up once per operation; inspecting the callable each time would cost more)."""
        known = self._async_callables
        if len(known) > 4096:
            known.clear()
        found = known[callback] = is_async_callable(callback)
        return found

    # ------------------------------------------------------------------ status
    def queue_status(self) -> dict[str, Any]:
        """Queue sizes, memory estimate, ages and counters (see the README for every key)."""
        now = time.monotonic()
        sizes = {}
        ages = {}
        memory = {}
        for prio in _PRIORITIES:
            lanes = self._lanes[prio]
            sizes[prio.name] = self._queued_by_prio[prio]
            memory[prio.name] = sum([op.nbytes for lane in lanes.values()
                                     for op in lane.ops]) / _MB  # at status time only
            heads = [lane.ops[0].enqueued_at for lane in lanes.values()]
            ages[prio.name] = round(now - min(heads), 3) if heads else 0.0
        s = self.stats
        return {
            "total_queued_operations": self.queued_ops,
            "estimated_memory_mb": self.queued_bytes / _MB,
            "queue_sizes": sizes,
            "queue_memory_mb": memory,
            "oldest_wait_seconds": ages,
            "batches_in_flight": self._inflight,
            "max_concurrent_batches": self.max_inflight,
            "stats": {
                "total_operations": s.total_operations,
                "successful_operations": s.successful_operations,
                "failed_operations": s.failed_operations,
                "total_processing_time": s.total_processing_time,
                "rows_committed": s.rows_committed,
                "batches_committed": s.batches_committed,
                "batches_failed": s.batches_failed,
                "retries": s.retries,
                "splits": s.splits,
                "promotions": s.promotions,
            },
            "commit_latency": s.latency_quantiles(),
            "callbacks": (self._callbacks.status() if self._callbacks is not None
                          else dict.fromkeys(CALLBACK_STATUS_KEYS, 0)),
        }
