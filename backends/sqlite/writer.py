"""The SQLite writer thread: one connection's jobs, one at a time, mostly in order.

Jobs run in the order they were submitted, with one exception: a batch may run before
*waiting* batches of lower priority that write other tables. So a CRITICAL order does not
wait behind the LOW backlog batch queued ahead of it, while the batches of one table still
commit in the order the scheduler handed them over (what "later submission wins" needs).
Any other job (opening, describing or creating a table, maintenance, closing) is a barrier:
it runs in its place, nothing passes it and it passes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["WriterThread"]

T = TypeVar("T")


class _Job:
    __slots__ = ("args", "fn", "future", "priority", "table")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], table: str | None,
                 priority: int) -> None:
        self.fn = fn
        self.args = args
        self.table = table  # None: a barrier
        self.priority = priority
        self.future: Future[Any] = Future()


class WriterThread:
    """A single thread running submitted jobs (see the module's docstring for the order)."""

    def __init__(self, name: str) -> None:
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, table: str | None = None,
               priority: int = 0) -> Future[T]:
        """Queue ``fn(*args)``; a job with a ``table`` is a batch that may pass waiting
        batches of lower priority on other tables."""
        job = _Job(fn, args, table, priority)
        with self._cond:
            if self._closed:
                raise RuntimeError("the writer thread is shut down")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    @property
    def waiting(self) -> int:
        """Jobs queued and not started yet."""
        with self._cond:
            return len(self._jobs)

    def shutdown(self) -> None:
        """Run the jobs already queued, then stop the thread and wait for it."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> _Job | None:
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            jobs = self._jobs
            best = 0
            if jobs[0].table is not None:
                passed: set[str] = {jobs[0].table}
                for i in range(1, len(jobs)):
                    job = jobs[i]
                    if job.table is None:
                        break  # a barrier: nothing behind it may run first
                    if job.table not in passed and job.priority > jobs[best].priority:
                        best = i
                    passed.add(job.table)
            return jobs.pop(best)

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
