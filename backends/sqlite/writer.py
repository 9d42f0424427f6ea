"""The SQLite writer thread: one connection's jobs, one at a time, mostly in order.

Jobs run in the order they were submitted, with one exception: a batch may run before
*waiting* batches of lower priority that write other tables. So a CRITICAL order does not
wait behind the LOW backlog batch queued ahead of it, while the batches of one table still
commit in the order the scheduler handed them over (what "later submission wins" needs).
Any other job (opening, describing or creating a table, maintenance, closing) is a barrier:
it runs in its place, nothing passes it and it passes nothing.

A *gate* may hold a batch back before it starts (the backend's: while a writer of a higher
priority in another process waits for the file's write lock, or while a checkpoint that
restarts the WAL finishes). The thread then waits in short steps, and picks again at each
step, so a batch of a higher priority submitted meanwhile starts at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batchdb.worker import Job, Worker

__all__ = ["WriterThread"]

#: a batch held back by the gate is looked at again this often (seconds)
GATE_POLL_SECONDS = 0.0005

#: after a batch of this priority (CRITICAL) the thread pauses HAND_OVER_SECONDS before it
#: takes the next job, when a batch of a lower priority waits (idle, the thread lets go of
#: the GIL anyway; CRITICAL after CRITICAL is not slowed). The batch's completion is the
#: event loop's to deliver (wait() returning), and the loop needs the GIL for it: without
#: the pause this thread went straight on to the next LOW batch, building and binding its
#: values with the GIL held, and the loop got the GIL back only when SQLite started
#: stepping or after the 5 ms switch interval. Measured behind a 1M-row backlog:
#: commit-to-wait() p99 3.2-3.7 ms without, 1.5-1.9 ms with.
HAND_OVER_PRIORITY = 3
HAND_OVER_SECONDS = 0.0002

Gate = Callable[[int, float], bool]
"""``gate(priority, seconds_held)``: True holds a batch of ``priority`` back a little longer
(it has been held ``seconds_held`` so far); it must be quick and bound the hold itself."""


class WriterThread(Worker):
    """The SQLite writer: a :class:`~batchdb.worker.Worker` whose order is the module's."""

    def __init__(self, name: str, gate: Gate | None = None) -> None:
        self._gate = gate
        super().__init__(name)

    def _pick(self, jobs: list[Job]) -> int | float:
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
        job = jobs[best]
        # never hold a batch back that a higher one waits behind (same table: it may not
        # pass): the higher one's priority is the held one's too
        if (job.table is not None and self._gate is not None
                and not [j for j in jobs if j.priority > job.priority]):
            now = time.monotonic()
            held = 0.0 if job.held_since is None else now - job.held_since
            if self._gate(job.priority, held):
                if job.held_since is None:
                    job.held_since = now
                return GATE_POLL_SECONDS  # woken early by a submission: pick again
        return best

    def _ran(self, job: Job) -> None:
        if (job.priority >= HAND_OVER_PRIORITY and job.table is not None
                and [j for j in self._jobs if j.priority < HAND_OVER_PRIORITY]):
            time.sleep(HAND_OVER_SECONDS)  # (a racy look at the list: a hint only)
