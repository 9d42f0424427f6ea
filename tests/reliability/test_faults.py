"""Promise 2: a fault is survived or reported, never a silently emptied queue.

Real faults, made by real processes and real files: another process holding the SQLite
write lock, a database that runs out of pages and a filesystem that runs out of space,
read-only and missing files and directories, corrupt databases and settings files,
callbacks that raise or hang, and the same operation submitted from many tasks and threads.
Permission cases run in a child process without CAP_DAC_OVERRIDE (the tests run as root,
which file modes would not stop otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batchdb import (
    BatchDBError,
    BatchDBManager,
    BatchOperation,
    OperationFailed,
    OperationType,
    Priority,
)
from batchdb.settings import load_settings

from ..conftest import ManagerFactory, make_table, rows_of
from .reporting import record

FAULTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_faults() -> Iterator[None]:
    yield
    record("faults", {"faults_injected": sum(FAULTS.values()), "by_kind": dict(FAULTS)})


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHDB_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return env


LOG_DDL = """
CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, tag TEXT NOT NULL, prio TEXT NOT NULL);
CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL);
"""


# ---------------------------------------------------------------------- another process locks
LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
"""


class Locker:
    """A process holding the database's write lock (BEGIN EXCLUSIVE) until released."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env())
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"
        self.since = time.monotonic()
        FAULTS["write_lock_held_by_another_process"] += 1

    def release(self) -> None:
        """Commit in the other process, ending the lock."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"
        self.proc.wait(timeout=10)

    def kill(self) -> None:
        """End the process whatever its state."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def locker(db_path: Path) -> Iterator[Callable[[], Locker]]:
    made: list[Locker] = []

    def start() -> Locker:
        made.append(Locker(db_path))
        return made[-1]

    yield start
    for lock in made:
        lock.kill()


async def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Plain callbacks run on batchdb's callback thread, a moment after wait() returns."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _lock_settings(max_retries: int, **batch: Any) -> dict[str, Any]:
    return {"sqlite": {"busy_timeout_ms": 50},
            "batch": {"max_retries": max_retries, "retry_base_delay_seconds": 0.02,
                      "retry_max_delay_seconds": 0.15, **batch}}


async def test_locked_database_waits_retries_then_commits_critical_first(
        db_path: Path, make_manager: ManagerFactory, locker: Callable[[], Locker]) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**_lock_settings(
        80, linger_seconds={"CRITICAL": 0, "HIGH": 0.01, "NORMAL": 0.05, "LOW": 0.2}))
    await m.start()
    await m.wait(await m.queue_operation("log", "INSERT", [{"tag": "before", "prio": "-"}]))
    lock = locker()
    low = []
    for i in range(40):  # some LOW batches reach the writer and wait on the lock there
        low.append(await m.queue_operation("log", "INSERT", [{"tag": f"low-{i}", "prio": "LOW"}],
                                           Priority.LOW))
        await asyncio.sleep(0.015)
    status = await m.get_queue_status()
    still_queued = status["queue_sizes"]["LOW"]
    assert 0 < still_queued < len(low), status  # some in the writer, some still queued
    crit = [await m.queue_operation("log", "INSERT", [{"tag": f"crit-{i}", "prio": "CRITICAL"}],
                                    Priority.CRITICAL) for i in range(10)]
    await asyncio.sleep(0.8)
    # during the lock: nothing failed, nothing committed, and readers still read (WAL)
    assert await m.fetch("SELECT COUNT(*) FROM log") == [(1,)]
    status = await m.get_queue_status()
    assert status["stats"]["failed_operations"] == 0
    assert all(m.scheduler.get(op_id).state == "queued" for op_id in low + crit)  # type: ignore[union-attr]
    while time.monotonic() - lock.since < 2.5:
        await asyncio.sleep(0.05)
    lock.release()
    await asyncio.wait_for(m.flush(), 30)
    for op_id in low + crit:
        assert (await m.wait(op_id)).succeeded
    status = await m.get_queue_status()
    assert status["stats"]["retries"] > 0
    ids = {tag: i for i, tag in rows_of(db_path, "SELECT id, tag FROM log")}
    queued_low = [f"low-{i}" for i in range(len(low) - still_queued, len(low))]
    assert max(ids[f"crit-{i}"] for i in range(10)) < min(ids[t] for t in queued_low), (
        "a LOW operation that was still queued when the CRITICAL ones came committed first")
    # LOW keeps its own order
    low_ids = [ids[f"low-{i}"] for i in range(len(low))]
    assert low_ids == sorted(low_ids)


async def test_lock_outlasting_the_retries_is_reported_not_dropped(
        db_path: Path, make_manager: ManagerFactory, locker: Callable[[], Locker]) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**_lock_settings(3))
    await m.start()
    lock = locker()
    seen: list[BatchOperation] = []
    ops = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}], Priority.HIGH,
                                   seen.append) for i in range(5)]
    for op_id in ops:
        with pytest.raises(OperationFailed, match="database is locked"):
            await asyncio.wait_for(m.wait(op_id), 10)
    await _eventually(lambda: len(seen) == 5)
    assert all(op.error and "database is locked" in op.error for op in seen)
    status = await m.get_queue_status()
    assert status["total_queued_operations"] == 0
    assert status["stats"]["failed_operations"] == 5
    lock.release()
    again = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}]) for i in range(5)]
    for op_id in again:
        assert (await m.wait(op_id)).succeeded
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(5,)]


async def test_stop_during_a_lock_commits_everything_after_it(
        db_path: Path, make_manager: ManagerFactory, locker: Callable[[], Locker]) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(**_lock_settings(80))
    await m.start()
    lock = locker()
    ops = [await m.queue_operation("log", "INSERT", [{"tag": f"t{i}", "prio": p.name}], p)
           for i, p in enumerate(list(Priority) * 25)]
    stopping = asyncio.create_task(m.stop())
    await asyncio.sleep(1.0)
    assert not stopping.done()  # stop() waits for the lock, it does not drop the queue
    await asyncio.to_thread(lock.release)
    await asyncio.wait_for(stopping, 30)
    assert rows_of(db_path, "SELECT COUNT(*) FROM log") == [(len(ops),)]


async def test_cancelled_stop_fails_queued_operations_clearly(
        db_path: Path, locker: Callable[[], Locker]) -> None:
    """Regression: a cancelled stop() closed the backend under the scheduler and the
    queued operations failed as 'AssertionError: ' or 'Cannot operate on a closed
    database.'; now they fail with a message saying the manager was stopped."""
    make_table(db_path, LOG_DDL)
    m = BatchDBManager.from_settings(
        None, sqlite={"path": str(db_path), "busy_timeout_ms": 50},
        maintenance={"enabled": False}, **{k: v for k, v in _lock_settings(200).items()
                                           if k == "batch"})
    await m.start()
    lock = locker()
    release = asyncio.get_running_loop().call_later(1.5, lock.release)
    ops = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "a"}],
                                   (Priority.CRITICAL, Priority.LOW)[i % 2]) for i in range(20)]
    records = [m.scheduler.get(op_id) for op_id in ops]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(m.stop(), 0.3)
    FAULTS["stop_cancelled_under_lock"] += 1
    await asyncio.sleep(2.0)
    release.cancel()
    committed = {k for (k,) in rows_of(db_path, "SELECT k FROM kv")}
    for i, op in enumerate(records):
        assert op is not None and op.state in ("committed", "failed"), (
            f"operation {i} neither committed nor failed")
        if op.error is None:
            assert i in committed
        else:
            assert i not in committed
            assert re.search(r"stop|cancel|shut", op.error, re.I), op.error


async def test_wait_after_a_clean_stop_reports_the_outcome(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """Regression: wait(op_id) raised NotRunningError after a clean stop()."""
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()
    good = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "a"}], Priority.LOW)
    bad = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": None}], Priority.LOW)
    await m.stop()
    assert rows_of(db_path, "SELECT k FROM kv") == [(1,)]
    assert (await m.wait(good)).succeeded
    with pytest.raises(OperationFailed, match="NOT NULL constraint failed: kv.v"):
        await m.wait(bad)


async def test_first_write_to_a_declared_table_waits_for_the_lock(
        db_path: Path, make_manager: ManagerFactory, locker: Callable[[], Locker]) -> None:
    """Regression (fixed in 5c80c78): creating a declared table on first use was not
    retried while another process held the write lock."""
    import sqlalchemy as sa

    make_table(db_path, LOG_DDL)
    m = make_manager(**_lock_settings(80))
    m.declare_table(sa.Table("declared", sa.MetaData(),
                             sa.Column("k", sa.Integer, primary_key=True),
                             sa.Column("v", sa.Text)))
    await m.start()
    lock = locker()
    release = asyncio.get_running_loop().call_later(1.0, lock.release)
    try:
        op_id = await m.queue_operation("declared", "INSERT", [{"k": 1, "v": "a"}])
        assert (await m.wait(op_id)).succeeded
    finally:
        release.cancel()
    assert rows_of(db_path, "SELECT k, v FROM declared") == [(1, "a")]


# ---------------------------------------------------------------------- disk full
async def test_database_full_is_reported_and_freed_space_is_used(db_path: Path) -> None:
    make_table(db_path, LOG_DDL + "CREATE TABLE ballast (k INTEGER PRIMARY KEY, b BLOB);")
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executemany("INSERT INTO ballast VALUES (?, ?)", [(i, bytes(4000)) for i in range(100)])
    conn.commit()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    limit = pages + 6

    def connect() -> sqlite3.Connection:  # the seed's form, with a page budget
        c = sqlite3.connect(db_path, check_same_thread=False)
        c.execute(f"PRAGMA max_page_count = {limit}")
        return c

    m = BatchDBManager(connect, settings=load_settings(None, maintenance={"enabled": False}))
    await m.start()
    try:
        first = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "small"}])
        assert (await m.wait(first)).succeeded
        big = [await m.queue_operation("kv", "INSERT", [{"k": 100 + i, "v": "y" * 60_000}])
               for i in range(4)]
        FAULTS["database_full"] += 1
        for op_id in big:
            with pytest.raises(OperationFailed, match="database or disk is full"):
                await m.wait(op_id)
        status = await m.get_queue_status()
        assert status["running"] and status["total_queued_operations"] == 0
        assert status["stats"]["failed_operations"] == 4
        small = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": "still fits"}])
        assert (await m.wait(small)).succeeded  # the manager keeps running
        # space returns: old data is deleted (through the manager), freeing pages
        freed = await m.queue_operation("ballast", "DELETE", [{"k": i} for i in range(100)])
        assert (await m.wait(freed)).succeeded
        retried = [await m.queue_operation("kv", "INSERT", [{"k": 100 + i, "v": "y" * 60_000}])
                   for i in range(4)]
        for op_id in retried:
            assert (await m.wait(op_id)).succeeded
    finally:
        await m.stop()
    check = sqlite3.connect(db_path)
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert check.execute("SELECT k, length(v) FROM kv ORDER BY k").fetchall() == [
        (1, 5), (2, 10), (100, 60_000), (101, 60_000), (102, 60_000), (103, 60_000)]
    check.close()


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted for this test (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def _write_big_rows(m: BatchDBManager, size: int, error: str) -> list[int]:
    """Queue 8 one-row INSERTs of ``size`` bytes each; the indices of those that failed, each
    with ``error`` in its message."""
    big = [await m.queue_operation("kv", "INSERT", [{"k": 1000 + i, "v": "z" * size}])
           for i in range(8)]
    failed = []
    for i, op_id in enumerate(big):
        try:
            await m.wait(op_id)
        except OperationFailed as exc:
            assert error in str(exc), str(exc)
            failed.append(i)
    return failed


async def test_filesystem_full_is_reported_and_recovers(small_filesystem: Path) -> None:
    db = small_filesystem / "full.sqlite3"
    make_table(db, "CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL);")
    m = BatchDBManager.from_settings(None, sqlite={"path": str(db)},
                                     maintenance={"enabled": False})
    await m.start()
    ballast = small_filesystem / "ballast"
    try:
        early = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": f"early-{i}"}])
                 for i in range(50)]
        for op_id in early:
            assert (await m.wait(op_id)).succeeded
        st = os.statvfs(small_filesystem)
        with ballast.open("wb") as fh:  # leave 48 kB
            fh.write(bytes(st.f_bavail * st.f_frsize - 48 * 1024))
        FAULTS["filesystem_full"] += 1
        failed = await _write_big_rows(m, 30_000, "database or disk is full")
        assert failed, "nothing failed: the filesystem did not fill up"
        assert (await m.get_queue_status())["running"]
        assert await m.fetch("SELECT COUNT(*) FROM kv WHERE k < 1000") == [(50,)]
        ballast.unlink()  # space returns
        retried = [await m.queue_operation("kv", "INSERT", [{"k": 1000 + i, "v": "z" * 30_000}])
                   for i in failed]
        new = await m.queue_operation("kv", "INSERT", [{"k": 5000, "v": "after"}])
        for op_id in [*retried, new]:
            assert (await m.wait(op_id)).succeeded
    finally:
        await m.stop()
    assert rows_of(db, "PRAGMA integrity_check") == [("ok",)]
    assert rows_of(db, "SELECT k, v FROM kv WHERE k < 1000 ORDER BY k") == [
        (i, f"early-{i}") for i in range(50)]
    assert rows_of(db, "SELECT COUNT(*) FROM kv WHERE k >= 1000") == [(9,)]


# ---------------------------------------------------------------------- bad files
PROBE = """
import asyncio, json, sys
from batchdb import BatchDBManager, BatchDBError
case = json.loads(sys.argv[1])
out = {"stage": "from_settings"}
async def run(m):
    out["stage"] = "start"
    await m.start()
    try:
        out["stage"] = "write"
        op = await m.queue_operation("kv", "INSERT", [{"k": 7, "v": "x"}])
        await m.wait(op)
        out["stage"] = "ok"
    finally:
        await m.stop()
try:
    overrides = {"maintenance": {"enabled": False}}
    if case["db"]:
        overrides["sqlite"] = {"path": case["db"]}
    m = BatchDBManager.from_settings(case["settings"], **overrides)
    asyncio.run(asyncio.wait_for(run(m), 20))
except BaseException as exc:
    out.update(type=type(exc).__name__, message=str(exc),
               batchdb_error=isinstance(exc, BatchDBError))
print(json.dumps(out))
"""

NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search", "--"]


def _unprivileged() -> list[str]:
    """A command prefix that makes file modes apply to this root process's children."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is needed to drop CAP_DAC_OVERRIDE")
    return NO_DAC


def _good_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("INSERT INTO kv VALUES (1, 'kept')")
    conn.commit()
    conn.close()


def _case_readonly_file(d: Path) -> tuple[Path, None]:
    db = d / "ro.sqlite3"
    _good_db(db)
    db.chmod(0o444)
    return db, None


def _case_readonly_dir_new(d: Path) -> tuple[Path, None]:
    ro = d / "ro-dir"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "new.sqlite3", None


def _case_readonly_dir_existing(d: Path) -> tuple[Path, None]:
    ro = d / "ro-dir"
    ro.mkdir()
    _good_db(ro / "old.sqlite3")
    sqlite3.connect(ro / "old.sqlite3").execute("PRAGMA journal_mode = DELETE").close()
    ro.chmod(0o555)
    return ro / "old.sqlite3", None


def _case_missing_dir(d: Path) -> tuple[Path, None]:
    return d / "no-such-dir" / "x.sqlite3", None


def _case_corrupt_db(d: Path) -> tuple[Path, None]:
    db = d / "corrupt.sqlite3"
    db.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(16384)))  # not SQLite
    return db, None


def _settings(d: Path, text: bytes) -> tuple[Path, Path]:
    path = d / "settings.toml"
    path.write_bytes(text)
    return d / "ok.sqlite3", path


def _case_settings_not_toml(d: Path) -> tuple[Path, Path]:
    return _settings(d, b"[batch\nmax_retries = 3\n")


def _case_settings_binary(d: Path) -> tuple[Path, Path]:
    return _settings(d, bytes(range(256)) * 4)


def _case_settings_bad_value(d: Path) -> tuple[Path, Path]:
    return _settings(d, b"[batch]\nmax_retries = -1\n")


def _case_settings_unknown_key(d: Path) -> tuple[Path, Path]:
    return _settings(d, b"[batch]\nmax_retrys = 3\n")


def _case_settings_wrong_type(d: Path) -> tuple[Path, Path]:
    return _settings(d, b'[sqlite]\nbusy_timeout_ms = "soon"\n')


def _case_settings_unreadable(d: Path) -> tuple[Path, Path]:
    db, path = _settings(d, b"[batch]\nmax_retries = 3\n")
    path.chmod(0o000)
    return db, path


# case: (setup, where the path in the message comes from, what the cause must say)
BAD_FILES: dict[str, tuple[Callable[[Path], tuple[Path, Path | None]], str, str]] = {
    "readonly_file": (_case_readonly_file, "db", r"read-?only|permission"),
    "readonly_dir_new": (_case_readonly_dir_new, "db", r"read-?only|permission|not writable"),
    "readonly_dir_existing": (_case_readonly_dir_existing, "db",
                              r"read-?only|permission|not writable"),
    "missing_dir": (_case_missing_dir, "db", r"does not exist"),
    "corrupt_db": (_case_corrupt_db, "db", r"not a database|malformed|corrupt"),
    "settings_not_toml": (_case_settings_not_toml, "settings", r"not valid TOML"),
    "settings_binary": (_case_settings_binary, "settings", r"UTF-8|not valid TOML|decode"),
    "settings_bad_value": (_case_settings_bad_value, "settings", r"batch\.max_retries"),
    "settings_unknown_key": (_case_settings_unknown_key, "settings", r"batch\.max_retrys"),
    "settings_wrong_type": (_case_settings_wrong_type, "settings", r"sqlite\.busy_timeout_ms"),
    "settings_unreadable": (_case_settings_unreadable, "settings",
                            r"cannot be read: Permission denied|not readable"),
}
@pytest.fixture
def bad_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "bad"
    d.mkdir()
    yield d
    for p in [d, *d.rglob("*")]:  # let pytest clean up what the cases made read-only
        with contextlib.suppress(OSError):
            p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_gives_one_clear_error_from_the_api(bad_dir: Path, case: str) -> None:
    """Regressions: readonly_file, readonly_dir_new and settings_binary failed here (start()
    accepted a read-only file, 'unable to open database file' gave no reason, a non-UTF-8
    settings file raised a bare UnicodeDecodeError); fixed in ab8bb14."""
    setup, named, cause = BAD_FILES[case]
    db, settings = setup(bad_dir)
    FAULTS[f"bad_file:{case}"] += 1
    arg = json.dumps({"db": str(db), "settings": None if settings is None else str(settings)})
    done = subprocess.run([*_unprivileged(), sys.executable, "-c", PROBE, arg],
                          capture_output=True, text=True, timeout=60, env=_env(),
                          cwd=bad_dir)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["stage"] in ("from_settings", "start"), (
        f"no error before writing: {out}")
    assert out["batchdb_error"], f"not a BatchDBError: {out}"
    path = str(db if named == "db" else settings)
    assert path in out["message"], f"the message does not name {path}: {out['message']}"
    assert re.search(cause, out["message"], re.I), out["message"]


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_gives_one_clear_error_from_the_cli(bad_dir: Path, case: str) -> None:
    """Regressions: on a read-only file `batchdb ingest` crashed with a traceback (a raw
    sqlite3.OperationalError from creating the candles table); fixed in ab8bb14."""
    setup, named, cause = BAD_FILES[case]
    db, settings = setup(bad_dir)
    FAULTS[f"bad_file_cli:{case}"] += 1
    candles = bad_dir / "candles.ndjson"
    candles.write_text(json.dumps({
        "market": "KRW-BTC", "candle_date_time_utc": "2024-01-01T00:00:00",
        "opening_price": 1.0, "high_price": 1.0, "low_price": 1.0, "trade_price": 1.0,
        "candle_acc_trade_price": 1.0, "candle_acc_trade_volume": 1.0, "unit": 1}) + "\n")
    if settings is None:
        settings = bad_dir / "cli-settings.toml"
        settings.write_text(f'[sqlite]\npath = "{db}"\n')
    done = subprocess.run(
        [*_unprivileged(), sys.executable, "-m", "batchdb.cli", "ingest", str(candles),
         "--timeframe", "1m", "--settings", str(settings)],
        capture_output=True, text=True, timeout=60, env=_env(), cwd=bad_dir)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "Traceback" not in text, text[-3000:]
    path = str(db if named == "db" else settings)
    flat = " ".join(text.split())  # rich may wrap long lines
    assert path in flat.replace(" ", "") or path in flat, f"{path} not named: {text[-2000:]}"
    assert re.search(cause, flat, re.I), text[-2000:]


# ---------------------------------------------------------------------- callbacks
async def test_raising_callbacks_do_not_stall_the_scheduler(
        db_path: Path, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()

    def bad_sync(op: BatchOperation) -> None:
        raise RuntimeError(f"sync callback of {op.operation_id} broke")

    async def bad_async(op: BatchOperation) -> None:
        raise ValueError("async callback broke")

    good: list[str] = []
    ids = []
    for i in range(30):
        callback = (bad_sync, bad_async, lambda op: good.append(op.operation_id))[i % 3]
        ids.append(await m.queue_operation("kv", "INSERT", [{"k": i, "v": "x"}],
                                           Priority.NORMAL, callback))
    FAULTS["callback_raises"] += 20
    with caplog.at_level(logging.ERROR, logger="batchdb"):
        await asyncio.wait_for(m.flush(), 10)
        for op_id in ids:
            assert (await m.wait(op_id)).succeeded
        await _eventually(lambda: len(good) == 10 and "sync callback of" in caplog.text)
    assert len(good) == 10
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(30,)]
    text = caplog.text
    assert "sync callback of" in text and "async callback broke" in text
    later = await m.queue_operation("kv", "INSERT", [{"k": 99, "v": "later"}], Priority.CRITICAL)
    assert (await asyncio.wait_for(m.wait(later), 5)).succeeded


async def test_hanging_async_callback_times_out_without_stalling(
        db_path: Path, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager(batch={"callback_timeout_seconds": 1.0})
    await m.start()
    released = asyncio.Event()

    async def hang(op: BatchOperation) -> None:
        await released.wait()

    with caplog.at_level(logging.ERROR, logger="batchdb"):
        stuck = await m.queue_operation("kv", "INSERT", [{"k": 0, "v": "x"}], Priority.HIGH,
                                        hang)
        FAULTS["callback_hangs"] += 1
        assert (await m.wait(stuck)).succeeded
        start = time.monotonic()
        after = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": "y"}], Priority.HIGH,
                                         hang if i % 2 else None) for i in range(1, 21)]
        for op_id in after:
            assert (await m.wait(op_id)).succeeded
        assert time.monotonic() - start < 0.9, "writes waited for the hanging callback"
        start = time.monotonic()
        await asyncio.wait_for(m.stop(), 10)
        assert time.monotonic() - start < 3.0
    assert "timed out" in caplog.text
    assert rows_of(db_path, "SELECT COUNT(*) FROM kv") == [(21,)]


async def test_callback_raising_cancelled_error_does_not_stall(db_path: Path) -> None:
    """Regression: a plain callback raising CancelledError (a BaseException) escaped
    Scheduler._run_callback and aborted _finish half-way: the rest of the batch never
    completed and stop() never returned; fixed in ab8bb14."""
    make_table(db_path, LOG_DDL)
    m = BatchDBManager.from_settings(None, sqlite={"path": str(db_path)},
                                     maintenance={"enabled": False},
                                     batch={"linger_seconds": {"NORMAL": 0.05}})
    await m.start()

    def cancelled(op: BatchOperation) -> None:
        raise asyncio.CancelledError  # e.g. reading a cancelled future's result

    FAULTS["callback_raises_base_exception"] += 1
    first = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "a"}], Priority.NORMAL,
                                    cancelled)
    others = [await m.queue_operation("kv", "INSERT", [{"k": k, "v": "b"}])
              for k in (2, 3)]  # same batch
    stopping = None
    try:
        for op_id in (first, *others):
            assert (await asyncio.wait_for(m.wait(op_id), 3)).succeeded
        stopping = asyncio.create_task(m.stop())
        await asyncio.wait_for(asyncio.shield(stopping), 5)
    finally:
        if stopping is None or not stopping.done():  # stuck: free the writer thread at least
            if stopping is not None:
                stopping.cancel()
                with contextlib.suppress(BaseException):
                    await stopping
            await m.backend.close()


async def test_blocking_sync_callback_does_not_stall_other_writes(
        db_path: Path, make_manager: ManagerFactory) -> None:
    """Regression: plain callbacks ran inline on the event loop, so a blocking one stalled
    every producer and every commit; since ab8bb14 they run on a callback thread."""
    make_table(db_path, LOG_DDL)
    m = make_manager(batch={"callback_timeout_seconds": 0.3})
    await m.start()
    loop = asyncio.get_running_loop()

    def block(op: BatchOperation) -> None:
        time.sleep(2.0)

    FAULTS["callback_blocks"] += 1
    await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "a"}], Priority.HIGH, block)

    def other_producer() -> float:  # another thread: a trading bot's CRITICAL write
        time.sleep(0.2)
        start = time.monotonic()
        fut = asyncio.run_coroutine_threadsafe(
            m.queue_operation("kv", "INSERT", [{"k": 2, "v": "b"}], Priority.CRITICAL), loop)
        op_id = fut.result(10)
        asyncio.run_coroutine_threadsafe(m.wait(op_id), loop).result(10)
        return time.monotonic() - start

    took = await asyncio.to_thread(other_producer)
    assert took < 0.5, f"a CRITICAL write took {took:.2f}s behind a blocking callback"


HUNG_CALLBACK = """
import asyncio, sqlite3, sys, threading
from batchdb import BatchDBManager
never = threading.Event()
async def main():
    m = BatchDBManager.from_settings(None, sqlite={"path": sys.argv[1]},
                                     maintenance={"enabled": False},
                                     batch={"callback_timeout_seconds": 0.3})
    async with m:
        op = await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": "a"}], "HIGH",
                                     lambda op: never.wait())
        await m.wait(op)
    print("stopped", flush=True)
asyncio.run(main())
print("returned", flush=True)
"""


def test_process_exits_although_a_plain_callback_hangs(db_path: Path) -> None:
    """Regression (fixed in 5c80c78): plain callbacks ran on a ThreadPoolExecutor worker,
    which the interpreter joins at exit, so a hung one kept the process alive forever."""
    make_table(db_path, LOG_DDL)
    FAULTS["callback_hangs_forever"] += 1
    proc = subprocess.Popen([sys.executable, "-c", HUNG_CALLBACK, str(db_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert "stopped" in out and "returned" in out, out
    assert proc.returncode == 0, f"the process did not exit on its own ({proc.returncode})"
    assert rows_of(db_path, "SELECT v FROM kv WHERE k = 1") == [("a",)]


# ---------------------------------------------------------------------- concurrent submission
async def test_same_operation_from_many_tasks_and_threads(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, LOG_DDL)
    m = make_manager()
    await m.start()
    rows = [{"tag": "same", "prio": "shared"}, {"tag": "same-2", "prio": "shared"}]
    upsert = [{"k": 1, "v": "same"}]
    # the very same list objects from 50 asyncio tasks at once
    tasks = [m.queue_operation("log", OperationType.INSERT, rows, Priority(i % 4))
             for i in range(50)]
    tasks += [m.queue_operation("kv", OperationType.UPSERT, upsert, Priority(i % 4))
              for i in range(50)]
    from_tasks = await asyncio.gather(*tasks)
    loop = asyncio.get_running_loop()
    barrier = threading.Barrier(8, timeout=30)

    def worker(n: int) -> list[str]:
        barrier.wait()
        out = []
        for i in range(25):
            fut = asyncio.run_coroutine_threadsafe(
                m.queue_operation("log", "INSERT", rows, Priority((n + i) % 4)), loop)
            out.append(fut.result(30))
        return out

    with ThreadPoolExecutor(8) as pool:  # 8 threads at once (the barrier waits for all)
        chunks = await asyncio.gather(*(loop.run_in_executor(pool, worker, n)
                                        for n in range(8)))
    from_threads = [op for chunk in chunks for op in chunk]
    FAULTS["concurrent_submissions"] += len(from_tasks) + len(from_threads)
    every = from_tasks + from_threads
    assert len(set(every)) == len(every) == 300  # each submission its own id
    await m.flush()
    for op_id in every:
        assert (await m.wait(op_id)).succeeded
    assert rows_of(db_path, "SELECT COUNT(*) FROM log") == [(2 * 250,)]
    assert rows_of(db_path, "SELECT k, v FROM kv") == [(1, "same")]
    assert rows == [{"tag": "same", "prio": "shared"}, {"tag": "same-2", "prio": "shared"}]


# ---------------------------------------------------------------------- DuckDB
HOLDER = """
import duckdb, sys
conn = duckdb.connect(sys.argv[1])
conn.execute("CREATE TABLE IF NOT EXISTS other (a INTEGER)")
print("held", flush=True)
sys.stdin.readline()
"""


async def test_duckdb_file_held_by_another_process_is_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    db = tmp_path / "held.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        FAULTS["duckdb_file_locked"] += 1
        m = BatchDBManager.from_settings(None, backend="duckdb", duckdb={"path": str(db)},
                                         maintenance={"enabled": False})
        start = time.monotonic()
        with pytest.raises(BatchDBError) as info:
            await asyncio.wait_for(m.start(), 30)
        assert time.monotonic() - start < 10
        message = str(info.value)
        assert str(db) in message and "lock" in message.lower(), message
    finally:
        holder.kill()
        holder.wait(timeout=10)


def _duckdb_manager(path: Path, **batch: Any) -> BatchDBManager:
    import sqlalchemy as sa

    m = BatchDBManager.from_settings(None, backend="duckdb", duckdb={"path": str(path)},
                                     maintenance={"enabled": False}, batch=batch)
    m.declare_table(sa.Table("kv", sa.MetaData(), sa.Column("k", sa.Integer, primary_key=True),
                             sa.Column("v", sa.Text)))
    return m


async def _fill_then_free(m: BatchDBManager, fs: Path) -> tuple[list[int], float]:
    """Commit 20 rows, fill the filesystem, write 8 big rows; return the failed ones and
    how long the failures took to be reported."""
    early = [await m.queue_operation("kv", "INSERT", [{"k": i, "v": f"e{i}"}])
             for i in range(20)]
    for op_id in early:
        assert (await m.wait(op_id)).succeeded
    st = os.statvfs(fs)
    (fs / "ballast").write_bytes(bytes(st.f_bavail * st.f_frsize - 32 * 1024))
    FAULTS["duckdb_filesystem_full"] += 1
    start = time.monotonic()
    failed = await _write_big_rows(m, 100_000, "No space left on device")
    return failed, time.monotonic() - start


async def test_duckdb_filesystem_full_is_reported_and_recovers(small_filesystem: Path) -> None:
    pytest.importorskip("duckdb")
    db = small_filesystem / "full.duckdb"
    m = _duckdb_manager(db, max_retries=1, retry_base_delay_seconds=0.01)
    await m.start()
    try:
        failed, _ = await _fill_then_free(m, small_filesystem)
        assert failed, "nothing failed: the filesystem did not fill up"
        assert await m.fetch("SELECT COUNT(*) FROM kv WHERE k < 1000") == [(20,)]
        (small_filesystem / "ballast").unlink()
        again = [await m.queue_operation("kv", "INSERT", [{"k": 1000 + i, "v": "z" * 100_000}])
                 for i in failed]
        for op_id in again:
            assert (await m.wait(op_id)).succeeded
    finally:
        await m.stop()
    import duckdb

    conn = duckdb.connect(str(db), read_only=True)
    try:
        assert conn.execute("SELECT k, v FROM kv WHERE k < 1000 ORDER BY k").fetchall() == [
            (i, f"e{i}") for i in range(20)]
        assert conn.execute("SELECT COUNT(*) FROM kv").fetchone() == (20 + len(failed),)
    finally:
        conn.close()


async def test_duckdb_full_disk_is_reported_without_transient_retries(
        small_filesystem: Path) -> None:
    """Regression (fixed in 5c80c78): a full disk on DuckDB was classified TRANSIENT and
    retried max_retries times before being reported."""
    pytest.importorskip("duckdb")
    m = _duckdb_manager(small_filesystem / "full.duckdb", max_retries=4,
                        retry_base_delay_seconds=0.25, retry_max_delay_seconds=0.25)
    await m.start()
    try:
        failed, seconds = await _fill_then_free(m, small_filesystem)
        assert failed
        retries = (await m.get_queue_status())["stats"]["retries"]
        assert retries == 0, f"a full disk was retried {retries} times ({seconds:.1f}s)"
    finally:
        (small_filesystem / "ballast").unlink(missing_ok=True)
        await m.stop()
async def test_duckdb_writes_after_vacuum(tmp_path: Path) -> None:
    """Regression: ``vacuum`` once left an unfinished result on DuckDB's writer connection
    (``_blocks()`` used ``fetchone()``) and every later write failed with
    ResourceInUseException (found by the crash run; fixed in d5ff14e)."""
    pytest.importorskip("duckdb")
    import sqlalchemy as sa

    table = sa.Table("kv", sa.MetaData(), sa.Column("k", sa.Integer, primary_key=True),
                     sa.Column("v", sa.Text))
    m = BatchDBManager.from_settings(None, backend="duckdb",
                                     duckdb={"path": str(tmp_path / "v.duckdb")},
                                     maintenance={"enabled": False})
    m.declare_table(table)
    await m.start()
    try:
        await m.wait(await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": "a"}]))
        await m.maintain("vacuum")
        FAULTS["duckdb_vacuum"] += 1
        for k in range(2, 5):
            assert (await m.wait(await m.queue_operation("kv", "UPSERT",
                                                         [{"k": k, "v": "b"}]))).succeeded
    finally:
        await m.stop()
