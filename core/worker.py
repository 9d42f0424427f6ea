"""The one single-thread executor: a thread of its own running submitted jobs one at a time.

Backends hand a driver connection's work to a :class:`Worker` (a connection belongs to one
thread, and a blocking call must not run on the event loop); ``asyncio.wrap_future`` makes
each job awaitable. Jobs run in submission order unless a subclass chooses otherwise in
:meth:`Worker._pick` (the SQLite writer lets a CRITICAL batch pass waiting batches of other
tables, and may hold a batch back for a moment).

Why not ``ThreadPoolExecutor(1)``: a subclass needs to choose the next job (and wait on a
timer while it holds one back), and its thread is a daemon: the interpreter does not join it
at exit, so a driver call that never returns cannot keep a finished program alive.

The callback runner (core/callbacks.py) keeps a thread of another shape: several of its
threads share one queue of operations, so the thread of a callback that hangs past its
timeout is abandoned while a fresh one takes the rest of the queue, with no future or lock
per operation on the one-row path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["Job", "Worker"]

T = TypeVar("T")


class Job:
    """One submitted call: ``fn(*args)``, its future, and what a policy may look at."""

    __slots__ = ("args", "fn", "future", "held_since", "priority", "table")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], table: str | None,
                 priority: int) -> None:
        self.fn = fn
        self.args = args
        self.table = table  # None: not a batch (a barrier for the SQLite writer's policy)
        self.priority = priority
        self.held_since: float | None = None
        self.future: Future[Any] = Future()


class Worker:
    """A single daemon thread running submitted jobs, in order by default."""

    def __init__(self, name: str) -> None:
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, table: str | None = None,
               priority: int = 0) -> Future[T]:
        """Queue ``fn(*args)``; ``table`` and ``priority`` are for a subclass's policy."""
        job = Job(fn, args, table, priority)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self._thread.name} thread is shut down")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    @property
    def waiting(self) -> int:
        """Jobs queued and not started yet."""
        with self._cond:
            return len(self._jobs)

    def shutdown(self) -> None:
        """Run the jobs already queued, then stop the thread and wait for it (from another
        thread: a job that shuts its own worker down would wait for itself)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _pick(self, jobs: list[Job]) -> int | float:
        """The index of the job to run next, or seconds to wait before choosing again
        (a submission wakes the thread earlier). Called with the lock held, ``jobs`` not
        empty."""
        return 0

    def _ran(self, job: Job) -> None:
        """Called in the thread after each job (without the lock)."""

    def _take(self) -> Job | None:
        with self._cond:
            while True:
                while not self._jobs:
                    if self._closed:
                        return None
                    self._cond.wait()
                choice = self._pick(self._jobs)
                if isinstance(choice, int):
                    return self._jobs.pop(choice)
                self._cond.wait(choice)

    def _run(self) -> None:
        while (job := self._take()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                result = job.fn(*job.args)
            except BaseException as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            self._ran(job)
