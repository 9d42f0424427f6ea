"""The crash harness: run ``crash_child.py``, SIGKILL it at seeded random moments, check.

After every kill the database is checked against the child's logs (see ``crash_child``):

- the file opens and passes ``PRAGMA integrity_check`` (SQLite); on PostgreSQL, once the
  killed child's sessions are gone from the server, ``pg_amcheck`` finds no corruption in
  any table or index of the run's database;
- every acknowledged operation's effect is there, in the state the logs allow;
- every group of rows (one operation's rows) is in exactly one whole state: all rows of an
  operation or none, never half a batch or half an operation;
- no row exists that no submitted operation wrote, and no row is there twice.

Then a new child continues on the same database from where the logs say.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import crash_child as cc

__all__ = [
    "CHILD",
    "CHILD_APPLICATION",
    "CheckResult",
    "CrashRun",
    "ForkedChild",
    "Zygote",
    "acked_insert",
    "assert_sound",
    "check_database",
    "load_logs",
    "pg_integrity",
    "wait_for_sessions_to_end",
]

CHILD = Path(__file__).with_name("crash_child.py")
Rows = frozenset[tuple[Any, ...]]
#: PostgreSQL ``application_name`` of the child's sessions (the checker's differ)
CHILD_APPLICATION = "batchdb-crash-child"
CHECKER_APPLICATION = "batchdb-crash-check"


# ---------------------------------------------------------------------- the processes
class Zygote:
    """``crash_child.py --zygote``: a fork server for children (see ``crash_child``)."""

    def __init__(self, args: list[str], stderr_path: Path, env: dict[str, str]) -> None:
        self._stderr = stderr_path.open("wb")
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, bufsize=0, env=env)
        self._buffer = b""

    def _line(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def ready(self, timeout: float = 60) -> None:
        """Wait until the fork server has imported everything."""
        if self._line(timeout) != "ready":
            raise AssertionError(f"the fork server did not start: {self.stderr_tail()}")

    def fork(self, run: int, finish: int | None, out: Path, err: Path) -> ForkedChild:
        """A new child (``run``), writing ``finish`` operations or until killed."""
        assert self.proc.stdin is not None
        request = json.dumps({"run": run, "finish": finish}) + "\n"
        self.proc.stdin.write(request.encode())
        self.proc.stdin.flush()
        line = self._line(30)
        if line is None or not line.startswith("pid "):
            raise AssertionError(f"the fork server did not fork: {line!r} "
                                 f"{self.stderr_tail()}")
        return ForkedChild(int(line.split()[1]), out, err)

    def stop(self) -> None:
        """End the fork server (close its stdin; kill it if it lingers)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def stderr_tail(self, chars: int = 3000) -> str:
        """The end of what the fork server wrote to stderr."""
        self._stderr.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")[-chars:]


def _state(pid: int) -> str | None:
    """The process state letter from /proc (None once the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


@dataclass
class ForkedChild:
    """A child forked by the fork server; it reports through its ``.out`` file."""

    pid: int
    out: Path
    err: Path

    def lines(self) -> list[str]:
        """What the child printed so far."""
        try:
            return self.out.read_text(encoding="utf-8", errors="replace").split()
        except FileNotFoundError:
            return []

    def expect(self, word: str, timeout: float) -> bool:
        """Wait until the child printed ``word`` (False on timeout or if it died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()
            if word in lines:
                return True
            if "error" in lines or not self.alive():
                return word in self.lines()
            time.sleep(0.002)
        return False

    def alive(self) -> bool:
        """True while the process runs (a zombie is dead: its files are closed)."""
        return _state(self.pid) not in (None, "Z", "X")

    def kill(self) -> None:
        """SIGKILL, and wait until the kernel has removed the process."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait_gone(30)

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the process no longer exists (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while _state(self.pid) is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def stderr_tail(self, chars: int = 3000) -> str:
        """The end of what the child wrote to stderr."""
        try:
            return self.err.read_text(encoding="utf-8", errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


# ---------------------------------------------------------------------- the logs
@dataclass
class Logs:
    """What the children wrote: operation definitions, acknowledgements, failures."""

    specs: dict[int, dict[str, Any]]
    acked: set[int]
    failed: list[str]
    ack_lines: int


def load_logs(logs: Path) -> Logs:
    """Read ``submitted.log``, ``acked.log`` and ``failed.log`` (complete lines only)."""
    specs = {}
    for line in cc.read_log_lines(logs / "submitted.log"):
        spec = json.loads(line)
        specs[spec["n"]] = spec
    ack_lines = cc.read_log_lines(logs / "acked.log")
    return Logs(specs, {int(x) for x in ack_lines},
                cc.read_log_lines(logs / "failed.log"), len(ack_lines))


# ---------------------------------------------------------------------- expected states
# A group's expected rows depend on (inserting op n, its k rows) and on the op that rewrote
# it, if any (u, kind, e). They never change, so they are computed once per run.
@functools.cache
def _events_state(n: int, k: int, u: int | None, kind: str | None, e: int) -> Rows:
    if u is None:
        return frozenset((j, n, cc.val(n, j), cc.note(n, j)) for j in range(k))
    if kind == "update":
        return frozenset((j, u, cc.val(u, j), cc.note(n, j)) for j in range(k))
    if kind == "upsert":
        return frozenset((j, u, cc.val(u, j), cc.note(u, j)) for j in range(k + e))
    return frozenset()


@functools.cache
def _notes_state(n: int, k: int, u: int | None, kind: str | None, e: int) -> Rows:
    if u is None:
        return frozenset((cc.note_key(n, j), j, n, cc.body(n, j), cc.data(n, j))
                         for j in range(k))
    if kind == "update":
        return frozenset((cc.note_key(n, j), j, u, cc.body(u, j), cc.data(n, j))
                         for j in range(k))
    if kind == "upsert":
        return frozenset((cc.note_key(n, j), j, u, cc.body(u, j), cc.data(u, j))
                         for j in range(k + e))
    return frozenset()


@functools.cache
def _candles_state(n: int, k: int, u: int | None, kind: str | None, e: int) -> Rows:
    w = n if u is None else u
    return frozenset((cc.candle_ts(n, j), *cc.candle_values(w, j)) for j in range(k))


_STATE_OF = {"events": _events_state, "notes": _notes_state, "candles": _candles_state}


def expected_rows(m: dict[str, Any], w: dict[str, Any] | None) -> Rows:
    """The rows of group ``m`` after its insert, or after ``w`` rewrote it."""
    state = _STATE_OF[m["table"]]
    if w is None:
        return state(m["n"], m["k"], None, None, 0)
    return state(m["n"], m["k"], w["n"], w["kind"], w["e"])


def read_groups(db: Path | str, backend: str
                ) -> tuple[dict[str, dict[int, set[tuple[Any, ...]]]], list[str]]:
    """Rows of each table grouped by the operation that inserted them, and oddities.

    ``db`` is the database file, or the DSN of the run's PostgreSQL database.
    """
    queries = {
        "events": "SELECT grp, j, upd, val, note FROM events",
        "notes": "SELECT grp, key, j, upd, body, data FROM notes",
        "candles": "SELECT ts, symbol, timeframe, source, open_price, high_price, low_price, "
                   "close_price, volume, quote_volume FROM candles",
    }
    groups: dict[str, dict[int, set[tuple[Any, ...]]]] = {t: defaultdict(set) for t in queries}
    odd: list[str] = []
    results: dict[str, list[tuple[Any, ...]]] = {}
    if backend == "postgres":
        import psycopg

        with psycopg.connect(str(db), autocommit=True,
                             application_name=CHECKER_APPLICATION) as pconn:
            present = {r[0] for r in pconn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()").fetchall()}
            results = {t: [tuple(r) for r in pconn.execute(q).fetchall()]
                       for t, q in queries.items() if t in present}
    elif not Path(db).exists():
        pass  # killed before the database file was created
    elif backend == "duckdb":
        import duckdb

        dconn = duckdb.connect(str(db), read_only=True)
        try:
            present = {r[0] for r in dconn.execute(
                "SELECT table_name FROM information_schema.tables").fetchall()}
            results = {t: dconn.execute(q).fetchall() for t, q in queries.items()
                       if t in present}
        finally:
            dconn.close()
    else:
        conn = sqlite3.connect(db)
        try:
            present = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            results = {t: conn.execute(q).fetchall() for t, q in queries.items()
                       if t in present}
        finally:
            conn.close()
    epoch = cc.candle_ts(0, 0)
    for table, rows in results.items():
        for row in rows:
            if table == "candles":
                ts, symbol, timeframe, source, *values = row
                if (symbol, timeframe, source) != (cc.SYMBOL, cc.TIMEFRAME, "upbit"):
                    odd.append(f"candle with unexpected key/source {row!r}")
                grp, item = (ts - epoch) // 60_000 // cc.CANDLE_SLOTS, (ts, *values)
            else:
                grp, item = row[0], tuple(row[1:])
            if item in groups[table][grp]:  # a set would hide it: a key written twice
                odd.append(f"{table} group {grp}: row there twice {_describe([row])}")
            groups[table][grp].add(item)
    return groups, odd


def pg_integrity(dsn: str) -> list[str]:
    """``pg_amcheck`` of the run's whole database: every table (heap and TOAST) and every
    B-tree index, with ``--heapallindexed`` (each row is in each index) and
    ``--parent-check``. ``["ok"]``, or what it reported. It installs the ``amcheck``
    extension in that database if missing."""
    from tests.pgserver import PostgresServer

    bin_dir = PostgresServer.bin_directory()
    tool = None if bin_dir is None else bin_dir / "pg_amcheck"
    if tool is None or not tool.is_file():
        return [f"pg_amcheck not found next to initdb ({bin_dir}): cannot check integrity"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGOPTIONS"] = "-c client_min_messages=warning"  # no NOTICE "already exists"
    proc = subprocess.run([str(tool), "--install-missing", "--heapallindexed",
                           "--parent-check", "--rootdescend", dsn],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    if proc.returncode == 0 and not proc.stdout.strip():  # it reports on stdout, exits 2
        return ["ok"]
    report = (proc.stdout + proc.stderr).strip()
    return report.splitlines() or [f"pg_amcheck exited with {proc.returncode}"]


def wait_for_sessions_to_end(dsn: str, timeout: float = 30.0) -> int:
    """Wait until no client session but the caller's is connected to the run's database.

    A SIGKILLed child's server sessions outlive it until the server notices the closed
    socket; until then a COMMIT it had sent may still complete. Once a session is gone
    from ``pg_stat_activity`` its transaction has committed or been rolled back for good
    (the server aborts it before it leaves), so the check after a kill waits for this.
    Returns how many sessions were still there when it started waiting.
    """
    import psycopg

    deadline = time.monotonic() + timeout
    first: int | None = None
    with psycopg.connect(dsn, autocommit=True, application_name=CHECKER_APPLICATION) as conn:
        while True:
            left = conn.execute(
                "SELECT pid, application_name, state, left(query, 80) "
                "FROM pg_catalog.pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchall()
            if first is None:
                first = len(left)
            if not left:
                return first
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(left)} session(s) still in the database "
                                     f"{timeout}s after the kill: {left[:4]}")
            time.sleep(0.005)


def integrity(db: Path) -> list[str]:
    """``PRAGMA integrity_check`` of an SQLite file, on a connection of its own."""
    if not db.exists():
        return ["ok"]  # killed before the database file was created
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


@dataclass
class CheckResult:
    """What one check of the database found."""

    acked_checked: int = 0
    groups_checked: int = 0
    committed_unacked: int = 0  # operations whose effect is in the database, not acknowledged
    lost: list[str] = field(default_factory=list)
    half: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    integrity: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every finding, integrity first."""
        bad_integrity = [] if self.integrity in ([], ["ok"]) else [
            f"integrity_check: {self.integrity[:5]}"]
        return bad_integrity + self.lost + self.half + self.unexpected


def _describe(rows: Iterable[tuple[Any, ...]], limit: int = 3) -> str:
    shown = sorted(rows, key=repr)[:limit]
    return ", ".join(repr(r)[:120] for r in shown)


def snapshot(db: Path, into: Path) -> Path:
    """Copy the database file and its write-ahead log as the crash left them.

    The checks run on the copy: opening it recovers the log there, while the original stays
    exactly as the kill left it, so the next child does the recovery itself.
    """
    into.mkdir(parents=True, exist_ok=True)
    copy = into / db.name
    for old in into.iterdir():
        old.unlink()
    for suffix in ("", "-wal", ".wal"):
        source = Path(f"{db}{suffix}")
        if source.exists():
            shutil.copyfile(source, f"{copy}{suffix}")
    return copy


def check_database(db: Path | str, logs: Logs, backend: str) -> CheckResult:
    """Compare the database with every state the logs allow (see the module docstring).

    ``db``: the database file (a snapshot, see :func:`snapshot`), or for ``postgres`` the
    DSN of the run's database, checked in place once no session is left in it
    (:func:`wait_for_sessions_to_end`).
    """
    result = CheckResult()
    if backend == "sqlite":
        result.integrity = integrity(Path(db))
    elif backend == "postgres":
        result.integrity = pg_integrity(str(db))
    groups, odd = read_groups(db, backend)
    result.unexpected.extend(odd)
    specs, acked = logs.specs, logs.acked
    for n in acked:
        if n not in specs:
            result.unexpected.append(f"operation {n} is acknowledged but was never submitted")
    writer_of: dict[int, dict[str, Any]] = {}
    for spec in specs.values():
        target = spec["target"]
        if target is None:
            continue
        if target in writer_of:
            result.unexpected.append(f"group {target} claimed twice: {writer_of[target]['n']} "
                                     f"and {spec['n']} (harness error)")
        writer_of[target] = spec
        if spec["n"] in acked and target not in acked:
            result.unexpected.append(f"operation {spec['n']} claimed group {target}, "
                                     "which was not acknowledged (harness error)")
    seen: dict[str, set[int]] = {t: set() for t in groups}
    latest = max((spec["run"] for spec in specs.values()), default=None)
    for m, spec in specs.items():
        if spec["target"] is not None:
            continue
        table = spec["table"]
        w = writer_of.get(m)
        allowed: list[tuple[str, Rows]] = []
        if m not in acked:
            allowed.append(("absent (never acknowledged)", frozenset()))
        if w is not None and w["n"] in acked:
            allowed = [(f"written by acknowledged {w['kind']} {w['n']}", expected_rows(spec, w))]
        else:
            allowed.append((f"inserted by {'acknowledged ' if m in acked else ''}"
                            f"{spec['kind']} {m}", expected_rows(spec, None)))
            if w is not None:
                allowed.append((f"written by unacknowledged {w['kind']} {w['n']}",
                                expected_rows(spec, w)))
        actual = frozenset(groups[table].get(m, set()))
        seen[table].add(m)
        result.groups_checked += 1
        result.acked_checked += (m in acked) + (w is not None and w["n"] in acked)
        # the last child's committed operations it had not acknowledged when it died
        if (actual and m not in acked and spec["run"] == latest
                and actual == expected_rows(spec, None)):
            result.committed_unacked += 1
        if (actual and w is not None and w["n"] not in acked and w["run"] == latest
                and actual == expected_rows(spec, w) != expected_rows(spec, None)):
            result.committed_unacked += 1
        if any(actual == rows for _, rows in allowed):
            continue
        names = "; ".join(name for name, _ in allowed)
        where = (f"{table} group {m} ({spec['kind']} of {spec['k']} rows, priority "
                 f"{spec['prio']}, run {spec['run']}"
                 + (f"; then {w['kind']} {w['n']} priority {w['prio']}, run {w['run']}"
                    if w else "") + ")")
        message = (f"{where}: {len(actual)} row(s) in the database [{_describe(actual)}] "
                   f"match none of the allowed states: {names}")
        full = [rows for _, rows in allowed if rows]
        if actual and not any(actual == rows for rows in full):
            result.half.append("half-applied: " + message)
        if m in acked or (w is not None and w["n"] in acked):
            result.lost.append("acknowledged operation lost or damaged: " + message)
    for table, by_group in groups.items():
        for grp, rows in by_group.items():
            if grp not in seen[table]:
                result.unexpected.append(f"{table} group {grp}: {len(rows)} row(s) no "
                                         f"submitted insert wrote: {_describe(rows)}")
    return result


# ---------------------------------------------------------------------- the run
@dataclass
class CrashRun:
    """Kill a child ``kills`` times at seeded random moments, checking after each kill."""

    workdir: Path
    backend: str
    seed: int
    kills: int
    early_kill_share: float = 0.15
    delay_range: tuple[float, float] = (0.05, 0.4)
    maintenance: str = "checkpoint,analyze,vacuum"
    finish_ops: int = 300
    figures: dict[str, Any] = field(default_factory=dict)
    #: ``postgres``: the DSN of an empty database of its own (nobody else connects to it)
    dsn: str | None = None

    def __post_init__(self) -> None:
        suffix = "duckdb" if self.backend == "duckdb" else "sqlite3"
        self.db = self.workdir / f"crash.{suffix}"  # the database file (not for postgres)
        self.target = str(self.db)  # what the child opens: the file, or the DSN
        if self.backend == "postgres":
            if self.dsn is None:
                raise ValueError("a postgres crash run needs the DSN of a database")
            from tests.pgserver import with_params

            self.target = with_params(self.dsn, application_name=CHILD_APPLICATION)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._runs = 0
        self._zygote: Zygote | None = None
        self.failure: str | None = None
        self.lost = 0
        self.half = 0
        self.ack_lag = 0  # the most operations of one child committed but not acknowledged
        self.outliving = 0  # checks that had to wait for sessions of the dead child
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHDB_")}
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.env["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS threads in the fork server

    def _fork(self, finish: int | None = None) -> ForkedChild:
        assert self._zygote is not None
        self._runs += 1
        run = self._runs
        return self._zygote.fork(run, finish, self.logs / f"run-{run:03d}.out",
                                 self.logs / f"run-{run:03d}.err")

    def _check(self, when: str) -> CheckResult:
        """Check the database; on a problem, remember it (``failure``) and say so."""
        logs = load_logs(self.logs)
        checked: Path | str
        if self.dsn is not None:  # a server: the state the kill left, once it is final
            self.outliving += wait_for_sessions_to_end(self.dsn) > 0
            checked = self.dsn
        else:
            checked = snapshot(self.db, self.workdir / "snapshot")
        result = check_database(checked, logs, self.backend)
        self.lost = max(self.lost, len(result.lost))
        self.half = max(self.half, len(result.half))
        problems = result.problems + [f"operation failed in the child: {line}"
                                      for line in logs.failed[:5]]
        self.ack_lag = max(self.ack_lag, result.committed_unacked)
        if result.committed_unacked > cc.ACK_LAG_BOUND:
            problems.append(f"the acknowledgements lag the commits by "
                            f"{result.committed_unacked} operations (bound {cc.ACK_LAG_BOUND})")
        if problems and self.failure is None:
            self.failure = (f"after {when} (seed {self.seed}):\n  "
                            + "\n  ".join(problems[:12]))
        return result

    def run(self) -> dict[str, Any]:
        """The kill loop, then one clean run; returns the figures.

        The first problem found stops the run and is kept in ``failure`` (the figures are
        still returned, so a failing run is reported with its real counts).
        """
        rng = random.Random(self.seed)
        kills = early = 0
        acked_checked = 0
        delays: list[float] = []
        started = time.monotonic()
        result = CheckResult()
        args = [sys.executable, str(CHILD), "--zygote", "--db", self.target, "--logs",
                str(self.logs), "--seed", str(self.seed), "--backend", self.backend,
                "--maintenance", self.maintenance]
        self._zygote = Zygote(args, self.logs / "zygote.err", self.env)
        child: ForkedChild | None = None
        try:
            self._zygote.ready()
            while kills < self.kills:
                child = self._fork()
                if rng.random() < self.early_kill_share:
                    delay = rng.uniform(0.0, 0.04)  # while it opens, recovers, creates tables
                    early += 1
                    moment = "fork"
                else:
                    if not child.expect("running", 60):
                        raise AssertionError(f"child did not start: {child.stderr_tail()}")
                    delay = rng.uniform(*self.delay_range)
                    moment = "running"
                time.sleep(delay)
                if not child.alive():
                    raise AssertionError(f"child {child.pid} died on its own: "
                                         f"{child.stderr_tail()}")
                child.kill()
                child = None
                kills += 1
                delays.append(delay)
                result = self._check(f"kill {kills} ({delay * 1000:.0f} ms after {moment})")
                acked_checked += result.acked_checked
                if self.failure is not None:
                    return self._figures(kills, early, delays, acked_checked, started, result)
            child = self._fork(finish=self.finish_ops)
            if not child.expect("done", 120):
                raise AssertionError(f"final child did not finish: {child.stderr_tail()}")
            if not child.wait_gone(60):
                raise AssertionError("final child did not exit after 'done'")
            child = None
            result = self._check("the final clean run")
            acked_checked += result.acked_checked
            logs = load_logs(self.logs)
            last = [n for n, s in logs.specs.items() if s["run"] == self._runs]
            unacked = [n for n in last if n not in logs.acked]
            if (len(last) != self.finish_ops or unacked) and self.failure is None:
                self.failure = (f"clean stop: {len(last)} operations submitted, "
                                f"{len(unacked)} never acknowledged: {unacked[:10]}")
        finally:
            if child is not None:
                child.kill()
            self._zygote.stop()
        return self._figures(kills, early, delays, acked_checked, started, result)

    def _figures(self, kills: int, early: int, delays: list[float], acked_checked: int,
                 started: float, result: CheckResult) -> dict[str, Any]:
        logs = load_logs(self.logs)
        self.figures = {
            "backend": self.backend,
            "integrity_check": {"sqlite": "PRAGMA integrity_check",
                                "postgres": "pg_amcheck"}.get(self.backend, "none"),
            "seed": self.seed,
            "kills": kills,
            "early_kills": early,
            "kill_delay_ms": {"min": round(min(delays) * 1000, 1),
                              "max": round(max(delays) * 1000, 1)} if delays else {},
            "operations_submitted": len(logs.specs),
            "operations_acknowledged": len(logs.acked),
            "acknowledged_ops_checked": acked_checked,
            "groups_checked_last": result.groups_checked,
            "operations_lost": self.lost,
            "max_committed_unacknowledged": self.ack_lag,
            "half_applied_operations": self.half,
            "failure": self.failure,
            "child_runs": self._runs,
            **({"checks_that_waited_for_server_sessions": self.outliving}
               if self.backend == "postgres" else {}),
            "seconds": round(time.monotonic() - started, 1),
        }
        return self.figures


# ---------------------------------------------------------------------- for the tests
def assert_sound(run: CrashRun, kinds: set[str], acknowledged: int) -> None:
    """A finished run found no problem, killed at least 25 times, and exercised what it
    claims: operations of ``kinds`` acknowledged, ``acknowledged`` of them at least."""
    assert run.failure is None, run.failure
    assert run.figures["kills"] >= 25
    logs = load_logs(run.logs)
    done = {logs.specs[n]["kind"] for n in logs.acked}
    assert done >= kinds, done
    assert run.figures["operations_acknowledged"] >= acknowledged


def acked_insert(run: CrashRun, table: str) -> int:
    """An acknowledged insert into ``table`` that nothing rewrote later, with >= 2 rows."""
    logs = load_logs(run.logs)
    claimed = {s["target"] for s in logs.specs.values()}
    return next(n for n in sorted(logs.acked)
                if logs.specs[n]["kind"] == "insert" and logs.specs[n]["table"] == table
                and n not in claimed and logs.specs[n]["k"] >= 2)
