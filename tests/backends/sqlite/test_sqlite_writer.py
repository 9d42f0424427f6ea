"""The SQLite writer thread's order: submission order, except that a batch may pass waiting
batches of lower priority on other tables; other jobs are barriers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from batchdb.backends.sqlite.writer import WriterThread


def _hold(writer: WriterThread) -> tuple[threading.Event, Future[bool]]:
    """Occupy the writer thread until the returned event is set."""
    started, gate = threading.Event(), threading.Event()

    def blocker() -> bool:
        started.set()
        return gate.wait(10)

    job = writer.submit(blocker)
    assert started.wait(10)
    return gate, job


def _recorder(ran: list[str], name: str) -> Callable[[], str]:
    def job() -> str:
        ran.append(name)
        return name

    return job


def test_order_passes_only_lower_priority_batches_of_other_tables() -> None:
    writer = WriterThread("test-writer")
    ran: list[str] = []
    gate, blocker = _hold(writer)
    try:
        jobs = [
            writer.submit(_recorder(ran, "a: t1 LOW"), table="t1", priority=0),
            writer.submit(_recorder(ran, "b: t2 CRITICAL"), table="t2", priority=3),
            writer.submit(_recorder(ran, "c: t1 CRITICAL"), table="t1", priority=3),
            writer.submit(_recorder(ran, "d: barrier")),
            writer.submit(_recorder(ran, "e: t3 CRITICAL"), table="t3", priority=3),
            writer.submit(_recorder(ran, "f: t4 HIGH"), table="t4", priority=2),
        ]
        assert writer.waiting == 6
        gate.set()
        assert blocker.result(10) is True
        assert sorted(j.result(10) for j in jobs) == sorted(ran)
    finally:
        gate.set()
        writer.shutdown()
    # b passes a (other table); c may not pass a (same table); nothing passes the barrier d
    # and d passes nothing; e then f in submission order (e is higher anyway)
    assert ran == ["b: t2 CRITICAL", "a: t1 LOW", "c: t1 CRITICAL", "d: barrier",
                   "e: t3 CRITICAL", "f: t4 HIGH"]


def test_equal_priorities_keep_submission_order() -> None:
    writer = WriterThread("test-writer")
    ran: list[str] = []
    gate, _ = _hold(writer)
    try:
        jobs = [writer.submit(_recorder(ran, f"t{i}"), table=f"t{i}", priority=1)
                for i in range(5)]
        gate.set()
        for job in jobs:
            job.result(10)
    finally:
        gate.set()
        writer.shutdown()
    assert ran == [f"t{i}" for i in range(5)]


def test_errors_reach_the_caller_and_the_thread_goes_on() -> None:
    writer = WriterThread("test-writer")
    try:
        def boom() -> None:
            raise ValueError("bad batch")

        failing = writer.submit(boom, table="t", priority=1)
        after = writer.submit(lambda: "still running", table="t", priority=1)
        with pytest.raises(ValueError, match="bad batch"):
            failing.result(10)
        assert after.result(10) == "still running"
    finally:
        writer.shutdown()


def test_shutdown_runs_what_is_queued_then_refuses() -> None:
    writer = WriterThread("test-writer")
    ran: list[str] = []
    gate, _ = _hold(writer)
    queued = writer.submit(_recorder(ran, "queued"))
    stopper = threading.Thread(target=writer.shutdown)
    stopper.start()
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert queued.result(0) == "queued" and ran == ["queued"]
    with pytest.raises(RuntimeError, match="shut down"):
        writer.submit(_recorder(ran, "late"))
