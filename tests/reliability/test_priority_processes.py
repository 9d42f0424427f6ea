"""Priorities across the processes writing one SQLite file (backends/sqlite/coordination.py),
with real processes on a real file: every writer is a fresh ``priority_child.py``."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchdb.backends.sqlite.coordination import (
    PRIORITIES,
    coordination_path,
    open_claims,
)
from batchdb.workloads.bench import SQLiteStore

CHILD = Path(__file__).resolve().parent / "priority_child.py"
# one-row writes awaited one by one: without this, each would linger (NORMAL 0.1 s, LOW 0.5 s)
QUICK = {"linger_seconds": {"HIGH": 0.002, "NORMAL": 0.002, "LOW": 0.002}}
PRIORITY_NAMES = ("LOW", "NORMAL", "HIGH", "CRITICAL")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")


def make_database(path: Path) -> None:
    """``candles``, ``orders`` and ``bulk``, and a ``commit_log`` that triggers fill in
    commit order (SQLite runs one writer at a time: ``seq`` orders the transactions)."""
    SQLiteStore(path).reset()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript("""
            PRAGMA journal_mode = WAL;
            CREATE TABLE bulk (k INTEGER PRIMARY KEY, b INTEGER NOT NULL);
            CREATE TABLE commit_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT,
                                     n INTEGER);
            CREATE TRIGGER log_orders AFTER INSERT ON orders BEGIN
                INSERT INTO commit_log (what, n) VALUES ('order', NEW.order_id); END;
            CREATE TRIGGER log_bulk AFTER INSERT ON bulk BEGIN
                INSERT INTO commit_log (what, n) VALUES ('bulk', NEW.b); END;
        """)
    finally:
        conn.close()


class Child:
    """One writing process (see priority_child.py for the roles)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.proc = subprocess.Popen([sys.executable, str(CHILD), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def ready(self) -> None:
        """Wait for its manager to be open."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"child did not start: {line!r}"

    def go(self, start: float | None = None) -> None:
        """Let it write (at ``start``, a wall-clock time; now by default)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{time.time() if start is None else start}\n")
        self.proc.stdin.flush()

    def line(self) -> str:
        """Its next line of output."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        """Its results, once it has finished."""
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"child {self.cfg['role']} exited {self.proc.returncode}"
        return dict(json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Children started by a test; any still running at its end are killed."""
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def start(children: list[Child], cfg: dict[str, Any]) -> Child:
    child = Child(cfg)
    children.append(child)
    child.ready()
    return child


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def integrity(path: Path) -> list[str]:
    return [r[0] for r in rows(path, "PRAGMA integrity_check")]


def claimed(path: Path) -> dict[int, int]:
    """pid of a process holding each priority's byte, as another process sees it."""
    claims = open_claims(str(path))
    assert claims is not None
    try:
        found = {}
        for p in range(PRIORITIES):
            holder = claims.shared._probe(p, 1)
            if holder is not None:
                found[p] = holder[1]
        return found
    finally:
        claims.close()


def test_four_writers_at_four_priorities_all_commit(tmp_path: Path,
                                                    children: list[Child]) -> None:
    """The bot (CRITICAL), a monitor (HIGH), a chart (NORMAL) and a backtester (LOW), each
    its own process on one file: every write of each commits, and each one saw the others
    writing (the slot records: what ``batchdb status`` lists)."""
    path = tmp_path / "four.sqlite3"
    make_database(path)
    per = 100
    writers = []
    for p, name in enumerate(PRIORITY_NAMES):
        if name == "LOW":
            cfg = {"role": "backlog", "path": str(path), "priority": name, "ops": 40,
                   "op_rows": 500}
        else:
            cfg = {"role": "orders", "path": str(path), "priority": name, "count": per,
                   "first": p * 100_000, "interval": 0.002, "batch": QUICK}
        writers.append(start(children, cfg))
    at = time.time() + 0.2
    for child in writers:
        child.go(at)
    results = [child.result() for child in writers]
    assert [r["priority"] for r in results] == list(PRIORITY_NAMES)
    for p in (1, 2, 3):
        got = rows(path, f"SELECT count(*) FROM orders WHERE order_id / 100000 = {p}")
        assert got == [(per,)]
    assert rows(path, "SELECT count(*), count(DISTINCT b) FROM bulk") == [(40 * 500, 40)]
    assert integrity(path) == ["ok"]
    assert claimed(path) == {}  # every process gone: no sign left behind


def test_critical_commits_before_the_other_process_next_low_batch(
        tmp_path: Path, children: list[Child]) -> None:
    """A CRITICAL write queued while another process drains a LOW backlog commits before
    that process's next batch: between the moment it is queued (announced) and its commit,
    at most one LOW batch commits, the one already under way. Without the coordination the
    backlog's writer takes the lock again after each batch while the CRITICAL writer sleeps
    in SQLite's busy handler, and several batches pass it."""
    path = tmp_path / "order.sqlite3"
    make_database(path)
    # one operation per batch, so that the bulk rows' b tells the batches apart; a long
    # bound on the yield, so that a slow machine cannot turn the check into a race
    backlog = start(children, {"role": "backlog", "path": str(path), "priority": "LOW",
                               "ops": 1500, "op_rows": 200, "yield_seconds": 5.0,
                               "batch": {"insert_batch_size": 200}})
    bot = start(children, {"role": "ordered", "path": str(path), "count": 25,
                           "interval": 0.01, "first": 1, "delay": 0.1})
    at = time.time() + 0.1
    backlog.go(at)
    bot.go(at)
    rounds = bot.result()["rounds"]
    backlog.result()
    log = rows(path, "SELECT seq, what, n FROM commit_log ORDER BY seq")
    committed_at = {n: seq for seq, what, n in log if what == "order"}
    behind_backlog = 0
    for order_id, seen in rounds:
        batches = {n for seq, what, n in log
                   if what == "bulk" and seen < seq < committed_at[order_id]}
        assert len(batches) <= 1, (order_id, sorted(batches))
        later = [n for seq, what, n in log if what == "bulk" and seq > committed_at[order_id]]
        behind_backlog += bool(later)
    assert behind_backlog >= 10  # most orders were written while the backlog drained
    assert integrity(path) == ["ok"]


def test_status_lists_the_other_writers_and_a_killed_waiter_blocks_nobody(
        tmp_path: Path, children: list[Child]) -> None:
    """With the write lock held by this test, a CRITICAL writer and a LOW writer wait for
    it: ``batchdb status`` lists both with their priorities. The CRITICAL one is SIGKILLed
    while it waits for its turn: its sign is gone at once, and once the lock is free the
    LOW writer commits without yielding to a dead process."""
    path = tmp_path / "status.sqlite3"
    make_database(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        waiter = start(children, {"role": "hold", "path": str(path), "first": 7})
        waiter.go()
        assert waiter.line() == "queued"
        low = start(children, {"role": "backlog", "path": str(path), "priority": "LOW",
                               "ops": 3, "op_rows": 100})
        low.go()
        deadline = time.time() + 30
        while claimed(path).keys() != {0, 3} and time.time() < deadline:
            time.sleep(0.05)
        assert claimed(path) == {0: low.proc.pid, 3: waiter.proc.pid}
        env = {**os.environ, "BATCHDB_SQLITE__PATH": str(path), "BATCHDB_BACKEND": "sqlite"}
        shown = subprocess.run([sys.executable, "-m", "batchdb.cli", "status"],
                               capture_output=True, text=True, env=env, cwd=tmp_path,
                               timeout=60)
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert f"pid {waiter.proc.pid}" in text and "CRITICAL" in text
        assert f"pid {low.proc.pid}" in text and "LOW" in text
        waiter.kill()
        assert claimed(path) == {0: low.proc.pid}
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    low.result()
    assert rows(path, "SELECT count(*) FROM bulk") == [(300,)]
    assert rows(path, "SELECT count(*) FROM orders") == [(0,)]
    assert integrity(path) == ["ok"]
    assert claimed(path) == {}


def test_sigkill_at_random_moments_leaves_the_file_sound_and_nobody_blocked(
        tmp_path: Path, children: list[Child]) -> None:
    """Four writers at four priorities (the LOW one a bulk writer, so that kills land inside
    its transactions too), each SIGKILLed, then two of them again, in a seeded random order
    at seeded random moments, and restarted on the same file: after every kill the file passes
    ``integrity_check`` and every writer, survivors and the restarted one, goes on
    committing (none waits for the dead process's sign); at the end, fresh writers at every
    priority all finish and every one of their writes is there."""
    path = tmp_path / "kill.sqlite3"
    make_database(path)
    rng = random.Random(1603)
    generation = 0
    firsts: dict[int, int] = {}

    def writer(p: int) -> Child:
        nonlocal generation
        generation += 1
        firsts[p] = generation * 1_000_000
        cfg: dict[str, Any] = (
            {"role": "bulk", "rows": 10_000_000, "duration": 3600.0, "inflight": 2}
            if p == 0 else
            {"role": "orders", "count": 1_000_000, "first": firsts[p], "interval": 0.001})
        child = start(children, {**cfg, "path": str(path), "priority": PRIORITY_NAMES[p],
                                 "batch": QUICK})
        child.go()
        return child

    def progress(p: int) -> int:
        if p == 0:
            return int(rows(path, "SELECT count(*) FROM candles")[0][0])
        return _orders_between(path, firsts[p])

    running = [writer(p) for p in range(PRIORITIES)]
    for victim in rng.sample(range(PRIORITIES), PRIORITIES) + rng.sample(range(PRIORITIES), 2):
        time.sleep(rng.uniform(0.05, 0.5))
        running[victim].kill()
        assert integrity(path) == ["ok"]
        running[victim] = writer(victim)
        seen = {p: progress(p) for p in range(PRIORITIES)}
        deadline = time.monotonic() + 60
        while (any(progress(p) <= seen[p] for p in range(PRIORITIES))
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert all(progress(p) > seen[p] for p in range(PRIORITIES)), (victim, seen)
    for child in running:
        child.kill()
    assert integrity(path) == ["ok"]
    assert claimed(path) == {}
    final = [start(children, {"role": "orders", "path": str(path),
                              "priority": PRIORITY_NAMES[p], "count": 50,
                              "first": 900_000_000 + p * 1000, "batch": QUICK})
             for p in range(PRIORITIES)]
    for child in final:
        child.go()
    for child in final:
        child.result(timeout=60)
    assert rows(path, "SELECT count(*) FROM orders WHERE order_id >= 900000000") == [(200,)]
    assert integrity(path) == ["ok"]
    assert os.path.exists(coordination_path(str(path)))


def _orders_between(path: Path, first: int) -> int:
    conn = sqlite3.connect(path)
    try:
        found = conn.execute("SELECT count(*) FROM orders WHERE order_id BETWEEN ? AND ?",
                             (first, first + 999_999)).fetchone()
        return int(found[0])
    finally:
        conn.close()
