"""Completion callbacks: every callback of every finished operation runs exactly once.

Completion is handed over per batch, not per operation:

- **Plain callbacks** go, a batch at a time (one ``deque.extend``), to one worker thread that
  calls them in order. A watchdog on the event loop, armed only while callbacks are pending,
  abandons a worker whose *current* callback has run longer than the timeout (counted from
  that callback's own start; a callback waiting behind others is never timed out) and starts
  a fresh worker on the rest of the queue.
- **Coroutine callbacks** are started on the event loop, once per batch (``call_soon``), in
  order. Most complete without ever suspending (they log, append, set an event): those cost
  one ``send`` and no task. Only a coroutine that really awaits becomes a task, cancelled
  after the timeout counted from its start.

An operation's rows are released once its callback has run (the callback sees them). The
operations whose callbacks have not run yet are counted (:attr:`CallbackRunner.backlog`) so
that the scheduler can hold them against its queue budget: callbacks slower than the commits
slow the producers down instead of piling up.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import threading
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from .models import BatchOperation

__all__ = ["CALLBACK_STATUS_KEYS", "CallbackRunner", "is_async_callable"]

log = logging.getLogger("batchdb.scheduler")

_monotonic = time.monotonic


def is_async_callable(fn: Any) -> bool:
    """True for a coroutine function (also behind ``functools.partial``, or as the
    ``__call__`` of an object)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    call = None if inspect.isroutine(fn) else type(fn).__dict__.get("__call__")
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """Carry on a coroutine that was started by hand (``send(None)``) and suspended on
    ``waiting_on``, inside a task.

    Hand-written because asyncio has no way to adopt a started coroutine: a Task's first
    step sends ``None`` into it, which would resume it before what it awaits is done, and
    ``eager_task_factory`` (3.12+) still builds a task per call. This is ``yield from``
    without its first ``send``.
    """
    yielded = waiting_on
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and errors thrown in by the task
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(value)
        except StopIteration as stop:
            return stop.value


class _Worker:
    """One daemon thread calling plain callbacks from the runner's queue.

    Not a ThreadPoolExecutor: the interpreter joins those at exit, so a callback that never
    returns would keep the whole process from exiting after stop().
    """

    __slots__ = ("abandoned", "current", "done", "done_bytes", "lock", "raised", "runner",
                 "started")

    def __init__(self, runner: CallbackRunner) -> None:
        self.runner = runner
        self.lock = threading.Lock()  # between this thread and the watchdog
        self.current: BatchOperation | None = None
        self.started = 0.0
        self.abandoned = False
        # written by this thread only; read by the event loop
        self.done = 0
        self.done_bytes = 0
        self.raised = 0
        threading.Thread(target=self._run, name="batchdb-callback", daemon=True).start()

    def _run(self) -> None:
        runner = self.runner
        queue = runner._queue
        ready = runner._ready
        lock = self.lock
        while True:
            try:
                op = queue.popleft()  # atomic: each operation is taken by one worker
            except IndexError:
                if runner._closed:
                    return
                ready.clear()
                if not queue and not runner._closed:
                    ready.wait()
                continue
            self.started = _monotonic()  # before current: the watchdog reads them the other way
            self.current = op
            callback = op.callback
            assert callback is not None
            error: BaseException | None = None
            try:
                result = callback(op)
            except BaseException as exc:  # a callback's error is logged, never raised
                error = exc
            with lock:
                if self.abandoned:  # the watchdog counted it as timed out: this thread ends
                    self.current = None
                    log.warning("callback of operation %s returned %.1fs after it started, "
                                "after its timeout", op.operation_id, _monotonic() - self.started)
                    return
                self.current = None
            if error is not None:
                self.raised += 1
                log.error("callback of operation %s raised: %r", op.operation_id, error)
            elif inspect.isawaitable(result):  # a plain function that returned a coroutine
                runner._loop.call_soon_threadsafe(runner._adopt, op, result)
                continue  # counted when the coroutine ends
            op.data_rows = ()
            self.done_bytes += op.nbytes
            self.done += 1
            if runner._want_progress:
                runner._want_progress = False
                runner._loop.call_soon_threadsafe(runner._progress)


class CallbackRunner:
    """Runs the callbacks of finished operations; see the module's docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 on_progress: Callable[[], None]) -> None:
        self._loop = loop
        self.timeout = timeout
        self._on_progress = on_progress
        self._queue: collections.deque[BatchOperation] = collections.deque()
        self._ready = threading.Event()
        self._closed = False
        self._worker: _Worker | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._want_progress = False
        self._tasks: set[asyncio.Future[Any]] = set()  # asyncio keeps tasks weakly
        self._drain_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # counters kept on the event loop; the workers count their own
        self.queued = 0  # operations handed over, plain and coroutine
        self.queued_bytes = 0
        self._loop_done = 0  # finished on the loop: coroutines, timeouts, retired workers
        self._loop_done_bytes = 0
        self._retired_raised = 0
        self._raised_on_loop = 0
        self.timed_out = 0
        self._late: list[_Worker] = []  # abandoned workers, still inside their callback

    # ------------------------------------------------------------------ counting
    def _finished(self) -> tuple[int, int]:
        """Callbacks finished (returned, raised or timed out), and their operations' bytes."""
        worker = self._worker
        if worker is None:
            return self._loop_done, self._loop_done_bytes
        return self._loop_done + worker.done, self._loop_done_bytes + worker.done_bytes

    @property
    def done(self) -> int:
        """Callbacks finished (returned, raised or timed out)."""
        return self._finished()[0]

    def backlog(self) -> tuple[int, int]:
        """Operations whose callback has not finished yet, and their estimated bytes."""
        done, done_bytes = self._finished()
        return self.queued - done, self.queued_bytes - done_bytes

    def status(self) -> dict[str, int]:
        """Callbacks pending (queued or running), running late (past their timeout and still
        inside the user's code), timed out and raised, since start."""
        self._late = [w for w in self._late if w.current is not None]
        worker = self._worker
        raised = self._retired_raised + self._raised_on_loop + (
            worker.raised if worker is not None else 0)
        return {"pending": self.backlog()[0], "running_late": len(self._late),
                "timed_out": self.timed_out, "raised": raised, "completed": self.done}

    # ------------------------------------------------------------------ hand-over
    def run(self, plain: list[BatchOperation], coroutines: list[BatchOperation]) -> None:
        """Run the callbacks of one finished batch: ``plain`` on the worker thread,
        ``coroutines`` on the loop, each list in order."""
        if plain:
            self.queued += len(plain)
            self.queued_bytes += sum([op.nbytes for op in plain])
            if self._worker is None:
                self._worker = _Worker(self)
            self._queue.extend(plain)
            self._ready.set()
        if coroutines:
            self.queued += len(coroutines)
            self.queued_bytes += sum([op.nbytes for op in coroutines])
            self._loop.call_soon(self._run_coroutines, coroutines)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._watch_every(), self._watch)

    def _run_coroutines(self, ops: list[BatchOperation]) -> None:
        for op in ops:
            try:
                awaitable = op.callback(op)  # type: ignore[misc]
            except (Exception, asyncio.CancelledError) as exc:
                self._ended_on_loop(op, exc, notify=False)
                continue
            self._adopt(op, awaitable, notify=False)
        self._progress()

    def _adopt(self, op: BatchOperation, awaitable: Any, notify: bool = True) -> None:
        """Step a coroutine once; only one that suspends becomes a task."""
        if not asyncio.iscoroutine(awaitable):
            task = asyncio.ensure_future(awaitable)
        else:
            try:
                waiting_on = awaitable.send(None)
            except StopIteration:
                self._ended_on_loop(op, None, notify)
                return
            except (Exception, asyncio.CancelledError) as exc:
                self._ended_on_loop(op, exc, notify)
                return
            self._start_task(op, awaitable, waiting_on)
            return
        self._watch_task(op, task)

    def _start_task(self, op: BatchOperation, coro: Coroutine[Any, Any, Any],
                    waiting_on: Any) -> None:
        self._watch_task(op, self._loop.create_task(_resume(coro, waiting_on)))

    def _watch_task(self, op: BatchOperation, task: asyncio.Future[Any]) -> None:
        timer = self._loop.call_later(self.timeout, self._cancel_late, task, op)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, op, timer))

    def _cancel_late(self, task: asyncio.Future[Any], op: BatchOperation) -> None:
        if not task.done():
            log.error("callback of operation %s timed out after %.1fs: cancelled",
                      op.operation_id, self.timeout)
            self.timed_out += 1
            task.cancel()

    def _task_done(self, op: BatchOperation, timer: asyncio.TimerHandle,
                   task: asyncio.Future[Any]) -> None:
        timer.cancel()
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        self._ended_on_loop(op, error)

    def _ended_on_loop(self, op: BatchOperation, error: BaseException | None,
                       notify: bool = True) -> None:
        if error is not None:
            self._raised_on_loop += 1
            log.error("callback of operation %s raised: %r", op.operation_id, error)
        op.data_rows = ()
        self._loop_done += 1
        self._loop_done_bytes += op.nbytes
        if notify:
            self._progress()

    # ------------------------------------------------------------------ watchdog
    def _watch_every(self) -> float:
        return min(0.25, self.timeout / 4)

    def _watch(self) -> None:
        """Abandon a worker stuck in one callback past the timeout; re-arm while pending."""
        self._watchdog = None
        worker = self._worker
        op = worker.current if worker is not None else None
        late = False
        if worker is not None and op is not None and _monotonic() - worker.started > self.timeout:
            with worker.lock:  # still inside that callback? then it is abandoned
                late = worker.current is op
                if late:
                    worker.abandoned = True
            if late:
                assert op is not None
                log.error("callback of operation %s timed out after %.1fs (still running; "
                          "later callbacks go on in a new thread)", op.operation_id,
                          self.timeout)
                self.timed_out += 1
                # fold the retired worker's counts in, and its stuck operation as done
                self._loop_done += worker.done + 1
                self._loop_done_bytes += worker.done_bytes + op.nbytes
                self._retired_raised += worker.raised
                self._late.append(worker)
                self._worker = _Worker(self) if self._queue else None
                self._progress()
        if self.backlog()[0] > 0:
            self._watchdog = self._loop.call_later(self._watch_every(), self._watch)

    # ------------------------------------------------------------------ waiting
    def _progress(self) -> None:
        """Some callbacks finished: wake drain() waiters and the scheduler (room)."""
        if self._drain_waiters:
            done = self.done
            keep = []
            for target, fut in self._drain_waiters:
                if done >= target:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((target, fut))
            self._drain_waiters = keep
            if keep:
                self._want_progress = True
        self._on_progress()

    def want_progress(self) -> None:
        """Ask the worker to report the next callback it finishes (for waiters of room)."""
        self._want_progress = True

    async def drain(self) -> None:
        """Return once every callback handed over so far has finished or timed out."""
        target = self.queued
        if self.done >= target:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append((target, fut))
        self._want_progress = True
        self._progress()  # it may have finished between the check and now
        await fut

    def close(self) -> None:
        """Let the worker end once its queue is empty (after :meth:`drain`)."""
        self._closed = True
        self._ready.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


#: the keys of :meth:`CallbackRunner.status`, all zero before the first start
CALLBACK_STATUS_KEYS = ("pending", "running_late", "timed_out", "raised", "completed")
