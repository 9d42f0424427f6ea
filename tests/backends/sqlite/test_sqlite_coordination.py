"""The pieces of priority across processes (backends/sqlite/coordination.py, the writer
thread's gate, the writer's own wait for the write lock, the WAL restart), each on its own;
tests/reliability/test_priority_processes.py runs them together in real processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchdb import Priority
from batchdb.backends.sqlite import backend as sqlite_backend
from batchdb.backends.sqlite.coordination import PriorityClaims, open_claims
from batchdb.backends.sqlite.writer import WriterThread
from tests.conftest import ManagerFactory, make_table, rows_of

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")

LOW, NORMAL, HIGH, CRITICAL = (int(p) for p in (Priority.LOW, Priority.NORMAL,
                                                Priority.HIGH, Priority.CRITICAL))

# another process: opens claims on the file, claims what argv[2] lists, says so, then waits
_OTHER = """
import sys
from batchdb.backends.sqlite.coordination import open_claims
claims = open_claims(sys.argv[1])
for p in sys.argv[2].split(","):
    claims.claim(int(p))
print("claimed", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "c.sqlite3"
    make_table(path, "CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
    return path


@pytest.fixture
def other_process(database: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def claim_elsewhere(database: Path, procs: list[subprocess.Popen[str]],
                    priorities: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _OTHER, str(database), priorities],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
    return proc


def claims_on(database: Path) -> PriorityClaims:
    claims = open_claims(str(database))
    assert claims is not None
    return claims


def test_another_process_claim_is_seen_above_and_not_below(
        database: Path, other_process: list[subprocess.Popen[str]]) -> None:
    mine = claims_on(database)
    try:
        assert not mine.higher_waiting(LOW)
        other = claim_elsewhere(database, other_process, f"{HIGH}")
        assert mine.higher_waiting(LOW) and mine.higher_waiting(NORMAL)
        assert not mine.higher_waiting(HIGH) and not mine.higher_waiting(CRITICAL)
        [info] = mine.others()
        assert info.pid == other.pid and info.priorities == (HIGH,) and info.waiting == (HIGH,)
        other.kill()
        other.wait()  # the kernel dropped its locks: nothing is left to yield to
        assert not mine.higher_waiting(LOW) and mine.others() == []
    finally:
        mine.close()


def test_own_claims_never_hold_back_own_batches_but_another_manager_sees_them(
        database: Path) -> None:
    first, second = claims_on(database), claims_on(database)
    try:
        assert first.shared is second.shared  # one descriptor per process and file
        first.claim(CRITICAL)
        assert not first.higher_waiting(LOW)  # its own writer orders its own batches
        assert second.higher_waiting(LOW)  # another manager of the process must yield
        first.release(CRITICAL)
        assert not second.higher_waiting(LOW)
    finally:
        first.close()
        second.close()


def test_one_manager_closing_keeps_the_locks_of_another(
        database: Path, other_process: list[subprocess.Popen[str]]) -> None:
    """POSIX drops every lock of a process on a file when any of its descriptors of that
    file is closed: the process keeps one descriptor, closed with its last user."""
    first, second = claims_on(database), claims_on(database)
    first.claim(CRITICAL)
    second.close()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom batchdb.backends.sqlite.coordination import "
         "open_claims\nprint(open_claims(sys.argv[1]).higher_waiting(0))", str(database)],
        capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "True", probe.stderr
    first.close()


def test_the_gate_holds_a_batch_back_while_it_says_so_and_passes_a_higher_one() -> None:
    held = threading.Event()
    held.set()
    asked: list[tuple[int, float]] = []

    def gate(priority: int, seconds: float) -> bool:
        asked.append((priority, seconds))
        return priority < CRITICAL and held.is_set() and seconds < 30

    ran: list[str] = []
    writer = WriterThread("test-gate", gate)
    try:
        low = writer.submit(ran.append, "low", table="a", priority=LOW)
        while not asked:
            time.sleep(0.001)
        critical = writer.submit(ran.append, "critical", table="b", priority=CRITICAL)
        critical.result(10)
        assert ran == ["critical"]  # the held LOW batch did not block it
        held.clear()
        low.result(10)
        assert ran == ["critical", "low"]
        assert max(seconds for p, seconds in asked if p == LOW) > 0  # it was held
    finally:
        held.clear()
        writer.shutdown()


def test_the_gate_never_holds_a_batch_a_higher_one_waits_behind() -> None:
    """A CRITICAL batch of the same table may not pass a held LOW one (table order), so
    the LOW batch goes at once: the hold would hold the CRITICAL one too."""
    asked = threading.Event()

    def gate(priority: int, seconds: float) -> bool:
        asked.set()
        return priority < CRITICAL and seconds < 30

    ran: list[str] = []
    writer = WriterThread("test-gate", gate)
    try:
        low = writer.submit(ran.append, "low", table="a", priority=LOW)
        assert asked.wait(10)
        critical = writer.submit(ran.append, "critical", table="a", priority=CRITICAL)
        critical.result(10)
        low.result(10)
        assert ran == ["low", "critical"]
    finally:
        writer.shutdown()


def test_the_gate_bounds_the_hold_itself() -> None:
    writer = WriterThread("test-gate", lambda priority, seconds: seconds < 0.05)
    try:
        job = writer.submit(lambda: "done", table="a", priority=LOW)
        assert job.result(10) == "done"  # held while the gate said so, then run
    finally:
        writer.shutdown()


async def test_a_batch_waits_for_the_lock_in_short_steps_and_commits(
        database: Path, make_manager: ManagerFactory) -> None:
    """The writer's busy handler is off (busy_timeout 0); the batch retries on its own while
    another connection holds the write lock, and commits once it is released, without a
    transient-error retry of the scheduler."""
    manager = make_manager(sqlite={"path": str(database), "busy_timeout_ms": 20_000},
                           batch={"max_retries": 0})
    await manager.start()
    conn = manager.backend._conn  # type: ignore[attr-defined]
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (0,)
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, holder.execute, ("COMMIT",)).start()
    op = await manager.queue_operation("kv", "INSERT", [{"k": 1, "v": "x"}], Priority.CRITICAL)
    await manager.wait(op)
    holder.close()
    status = await manager.get_queue_status()
    assert status["stats"]["retries"] == 0
    assert rows_of(database, "SELECT k, v FROM kv") == [(1, "x")]
    await manager.stop()


async def test_batches_below_critical_wait_for_the_wal_restart_checkpoint(
        database: Path, make_manager: ManagerFactory) -> None:
    manager = make_manager(sqlite={"path": str(database)})
    await manager.start()
    backend = manager.backend
    checkpointer = backend._checkpointer  # type: ignore[attr-defined]
    assert checkpointer is not None
    backend._reset_pass = checkpointer._started + 1000  # type: ignore[attr-defined]
    gate = backend._gate  # type: ignore[attr-defined]
    assert gate(LOW, 0.0) and gate(HIGH, 0.0)
    assert not gate(CRITICAL, 0.0)  # a CRITICAL batch goes beside the checkpoint
    assert not gate(LOW, sqlite_backend._RESET_WAIT_SECONDS)  # bounded
    pending = backend._reset_pass  # type: ignore[attr-defined]
    op = await manager.queue_operation("kv", "INSERT", [{"k": 1, "v": "x"}], Priority.CRITICAL)
    await manager.wait(op)  # written beside the checkpoint, which it leaves pending
    assert backend._reset_pass == pending  # type: ignore[attr-defined]
    first = backend._reset_pass = checkpointer.hurry()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while gate(LOW, 0.0) and time.monotonic() < deadline:
        time.sleep(0.001)
    # the CRITICAL batch's frames came after the pass began: one more pass copied them
    assert backend._reset_pass > first  # type: ignore[attr-defined]
    assert checkpointer.finished(backend._reset_pass)  # type: ignore[attr-defined]
    await manager.queue_operation("kv", "INSERT", [{"k": 2, "v": "y"}], Priority.LOW)
    await manager.flush()
    assert backend._reset_pass is None  # type: ignore[attr-defined]
    await manager.stop()
    assert rows_of(database, "SELECT k FROM kv ORDER BY k") == [(1,), (2,)]
