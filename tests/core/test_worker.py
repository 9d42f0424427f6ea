"""The one single-thread executor: order, errors, shutdown, and a policy choosing the job."""

from __future__ import annotations

import threading
import time

import pytest

from batchdb.worker import Job, Worker


def test_jobs_run_in_order_on_one_thread() -> None:
    worker = Worker("test-worker")
    seen: list[tuple[int, str]] = []
    futures = [worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
               for i in range(50)]
    for f in futures:
        f.result(timeout=5)
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-worker"}
    worker.shutdown()


def test_an_error_goes_to_its_future_and_the_next_job_runs() -> None:
    worker = Worker("test-worker")
    bad = worker.submit(lambda: 1 / 0)
    good = worker.submit(lambda: 42)
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=5)
    assert good.result(timeout=5) == 42
    worker.shutdown()


def test_shutdown_runs_what_is_queued_then_refuses() -> None:
    worker = Worker("test-worker")
    release = threading.Event()
    first = worker.submit(release.wait, 5)
    second = worker.submit(lambda: "after")
    stopper = threading.Thread(target=worker.shutdown)
    stopper.start()
    release.set()
    stopper.join(5)
    assert first.result(timeout=0) is True and second.result(timeout=0) == "after"
    with pytest.raises(RuntimeError, match="test-worker thread is shut down"):
        worker.submit(lambda: None)
    assert not worker._thread.is_alive() and worker._thread.daemon


def test_a_policy_picks_the_next_job_and_may_hold_one_back() -> None:
    class Highest(Worker):
        """The highest priority first; priority 0 held back until ``allow`` is set."""

        def __init__(self) -> None:
            self.allow = threading.Event()
            self.looks = 0
            super().__init__("test-policy")

        def _pick(self, jobs: list[Job]) -> int | float:
            self.looks += 1
            best = max(range(len(jobs)), key=lambda i: jobs[i].priority)
            if jobs[best].priority == 0 and not self.allow.is_set():
                return 0.001  # look again in a millisecond
            return best

    worker = Highest()
    order: list[int] = []
    release = threading.Event()
    blocker = worker.submit(release.wait, 5, priority=9)
    futures = [worker.submit(order.append, p, priority=p) for p in (0, 1, 3, 2)]
    release.set()
    assert blocker.result(timeout=5) is True
    for f in futures[1:]:
        f.result(timeout=5)
    looks = worker.looks
    time.sleep(0.05)
    assert order == [3, 2, 1] and not futures[0].done()
    assert worker.looks > looks  # held, and looked at again on its timer
    worker.allow.set()
    futures[0].result(timeout=5)
    assert order == [3, 2, 1, 0]
    worker.shutdown()
