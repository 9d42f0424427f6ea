"""Promise 1: an operation is acknowledged only after its COMMIT, and a crash at any moment
never loses an acknowledged operation nor leaves half an operation or batch.

- ``test_sigkill_sqlite_at_random_moments`` SIGKILLs a real ingesting process
  (``crash_child.py``) at seeded random moments and checks the file after every kill
  (``crashkit``). The seed comes from ``$BATCHDB_CRASH_SEED`` (printed with the figures);
  ``$BATCHDB_CRASH_KILLS`` changes the number of kills (default 30).
- The checker is itself tested: damaged databases must be reported.
- SIGTERM and SIGINT on a running ``batchdb ingest`` and ``batchdb demo``: they drain, print
  the summary and exit 0, and the database is consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from batchdb import BatchDBManager, BatchOperation, OperationFailed, Priority

from .crashkit import CrashRun, acked_insert, assert_sound, check_database, load_logs, snapshot
from .reporting import record

SEED = int(os.environ.get("BATCHDB_CRASH_SEED", "20240601"))
KILLS = int(os.environ.get("BATCHDB_CRASH_KILLS", "30"))


def _env() -> dict[str, str]:
    """The environment of a child: no BATCHDB_* settings leaking in, wide output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHDB_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return env


# ---------------------------------------------------------------------- SIGKILL
def test_sigkill_sqlite_at_random_moments(tmp_path: Path) -> None:
    run = CrashRun(tmp_path, "sqlite", SEED, KILLS)
    record("crash_sqlite", run.run())
    # the run must have exercised what it claims: commits, rewrites, deletes, candles
    assert_sound(run, {"insert", "update", "upsert", "delete", "candles", "recandle"}, 300)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> CrashRun:
    """A short crash run whose final database the checker self-tests damage."""
    run = CrashRun(tmp_path_factory.mktemp("small"), "sqlite", SEED + 1, 3, finish_ops=150)
    run.run()
    assert run.failure is None, run.failure
    return run


def _damaged(run: CrashRun, tmp_path: Path, sql: str) -> list[str]:
    """Apply ``sql`` to a copy of the run's database and return what the checker says."""
    copy = snapshot(run.db, tmp_path / "copy")
    conn = sqlite3.connect(copy)
    conn.executescript(sql)
    conn.close()
    return check_database(copy, load_logs(run.logs), "sqlite").problems


def test_checker_accepts_the_untouched_database(small_run: CrashRun, tmp_path: Path) -> None:
    assert _damaged(small_run, tmp_path, "") == []


@pytest.mark.parametrize("table", ["events", "notes"])
def test_checker_reports_a_lost_acknowledged_operation(small_run: CrashRun, tmp_path: Path,
                                                       table: str) -> None:
    n = acked_insert(small_run, table)
    problems = _damaged(small_run, tmp_path, f"DELETE FROM {table} WHERE grp = {n};")
    assert any("acknowledged operation lost" in p and f"group {n} " in p for p in problems)


def test_checker_reports_half_an_operation(small_run: CrashRun, tmp_path: Path) -> None:
    n = acked_insert(small_run, "events")
    problems = _damaged(small_run, tmp_path,
                        f"DELETE FROM events WHERE grp = {n} AND j = 1;")
    assert any(p.startswith("half-applied") and f"group {n} " in p for p in problems)


def test_checker_reports_a_changed_value(small_run: CrashRun, tmp_path: Path) -> None:
    n = acked_insert(small_run, "notes")
    problems = _damaged(small_run, tmp_path,
                        f"UPDATE notes SET body = body || 'x' WHERE grp = {n} AND j = 0;")
    assert any(f"notes group {n} " in p for p in problems)


def test_checker_reports_rows_nobody_wrote(small_run: CrashRun, tmp_path: Path) -> None:
    problems = _damaged(small_run, tmp_path,
                        "INSERT INTO events (grp, j, upd, val) VALUES (99999999, 0, 1, 1);")
    assert any("events group 99999999" in p and "no submitted insert" in p for p in problems)


def test_checker_reports_a_corrupt_file(small_run: CrashRun, tmp_path: Path) -> None:
    copy = snapshot(small_run.db, tmp_path / "copy")
    conn = sqlite3.connect(copy)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with copy.open("r+b") as fh:  # scribble over the middle of the file
        fh.seek(size * (pages // 2) + 100)
        fh.write(random.Random(SEED).randbytes(size * 2))
    try:
        problems = check_database(copy, load_logs(small_run.logs), "sqlite").problems
    except sqlite3.DatabaseError as exc:  # so corrupt that it cannot even be read
        problems = [str(exc)]
    assert problems


# ---------------------------------------------------------------------- ack after commit
ACKS = sa.Table("acks", sa.MetaData(), sa.Column("op", sa.Integer, nullable=False),
                sa.Column("j", sa.Integer, nullable=False),
                sa.Column("pad", sa.Text, nullable=True),
                sa.PrimaryKeyConstraint("op", "j"))


@pytest.mark.parametrize("backend", ["sqlite", "duckdb"])
async def test_acknowledgement_comes_after_the_commit(tmp_path: Path, backend: str) -> None:
    """At the moment an operation is acknowledged (wait() returns, a plain or a coroutine
    callback runs), another connection already sees all of its rows."""
    if backend == "duckdb":
        pytest.importorskip("duckdb")
    db = tmp_path / f"acks.{backend}"
    m = BatchDBManager.from_settings(None, backend=backend, maintenance={"enabled": False},
                                     batch={"insert_batch_size": 64},
                                     **{backend: {"path": str(db)}})
    m.declare_table(ACKS)
    loop = asyncio.get_running_loop()
    rng = random.Random(SEED)
    sizes = {n: rng.choice((1, 2, 5, 40, 300)) for n in range(300)}
    seen: dict[int, int] = {}

    def visible(n: int) -> int:  # from outside the manager's writer
        if backend == "sqlite":
            with contextlib.closing(sqlite3.connect(db)) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM acks WHERE op = ?",
                                        (n,)).fetchone()[0])
        fut = asyncio.run_coroutine_threadsafe(
            m.fetch("SELECT COUNT(*) FROM acks WHERE op = ?", (n,)), loop)
        return int(fut.result(30)[0][0])

    def plain(n: int) -> Any:
        def callback(op: BatchOperation) -> None:
            assert op.succeeded, op.error
            seen[n] = visible(n)
        return callback

    def coroutine(n: int) -> Any:
        async def callback(op: BatchOperation) -> None:
            assert op.succeeded, op.error
            seen[n] = await asyncio.to_thread(visible, n)
        return callback

    async with m:
        waits = []
        for n, k in sizes.items():
            style = n % 3
            callback = (None, plain(n), coroutine(n))[style]
            op_id = await m.queue_operation(
                "acks", "INSERT", [{"op": n, "j": j, "pad": "x" * (n % 50)} for j in range(k)],
                Priority(n % 4), callback)
            if style == 0:
                waits.append((n, op_id))
        for n, op_id in waits:
            assert (await m.wait(op_id)).succeeded
            seen[n] = await asyncio.to_thread(visible, n)
        await m.flush()
    assert seen == sizes, {n: (seen.get(n), k) for n, k in sizes.items() if seen.get(n) != k}


async def test_a_reused_buffer_is_not_acknowledged_without_its_rows(tmp_path: Path) -> None:
    """Regression: rows were read from the caller's list at commit, so `queue_operation(...,
    buf); buf.clear()` acknowledged 1000 rows and wrote none. Now such an operation must
    either commit its rows or fail; it is never acknowledged without them."""
    db = tmp_path / "buffer.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
    m = BatchDBManager.from_settings(None, sqlite={"path": str(db)},
                                     maintenance={"enabled": False})
    async with m:
        buffer: list[dict[str, Any]] = []
        ids = []
        for i in range(1000):  # the usual producer loop: fill, hand over, reuse
            buffer.append({"k": i, "v": f"v{i}"})
            if len(buffer) == 100:
                ids.append(await m.queue_operation("kv", "INSERT", buffer, Priority.LOW))
                buffer.clear()
        acknowledged = 0
        for op_id in ids:
            try:
                acknowledged += (await m.wait(op_id)).rows_affected
            except OperationFailed as exc:  # refused: fine, as long as it says why
                assert "changed after" in str(exc), str(exc)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        written = conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
    assert written == acknowledged, (
        f"{acknowledged} rows acknowledged as committed, {written} in the database")


@pytest.mark.xfail(strict=True, reason=(
    "by design since the buffer fix: rows are read in the writer thread and 'the list and "
    "its rows belong to batchdb until the operation completes' (core/manager.py "
    "queue_operation comment; snapshotting one-row operations cost ~25% of one-row "
    "throughput), so a dict changed in place after the call is committed and acknowledged "
    "as changed, silently; a list that changes length now fails its operation instead. "
    "Kept as a strict xfail so the contract stays visible until it is documented for users"))
async def test_the_committed_row_is_the_submitted_row(tmp_path: Path) -> None:
    """A row changed by its producer after queue_operation returned."""
    db = tmp_path / "mutate.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
    m = BatchDBManager.from_settings(None, sqlite={"path": str(db)},
                                     maintenance={"enabled": False})
    async with m:
        row = {"k": 1, "v": "submitted"}
        op_id = await m.queue_operation("kv", "INSERT", [row], Priority.LOW)
        row["v"] = "changed afterwards"
        assert (await m.wait(op_id)).succeeded
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT v FROM kv").fetchall() == [("submitted",)]


# ---------------------------------------------------------------------- declared tables
def test_tables_argument_declares_tables(tmp_path: Path) -> None:
    """Regression: ``from_settings(tables=[...])`` raised AttributeError (declare_table ran
    before ``self._tables`` existed); found while writing the crash child."""
    table = sa.Table("declared", sa.MetaData(), sa.Column("k", sa.Integer, primary_key=True))
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(tmp_path / "t.db")},
                                           tables=[table])
    assert "declared" in manager._declared


# ---------------------------------------------------------------------- SIGTERM / SIGINT
_MINUTE = timedelta(minutes=1)
_EPOCH = datetime(2023, 1, 1, tzinfo=UTC)
_LINE = ('{{"market":"{m}","candle_date_time_utc":"{t}","candle_date_time_kst":"{t}",'
         '"opening_price":{o},"high_price":{h},"low_price":{lo},"trade_price":{c},'
         '"timestamp":{ms},"candle_acc_trade_price":{q},"candle_acc_trade_volume":{v},'
         '"unit":1}}\n')


def _candle_price(market_no: int, i: int) -> float:
    return 1000.0 * (market_no + 1) + i / 4


def _write_candles(path: Path, market: str, market_no: int, count: int) -> None:
    """An Upbit-format NDJSON file, oldest candle first."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(count):
            when = _EPOCH + i * _MINUTE
            text = when.strftime("%Y-%m-%dT%H:%M:%S")
            p = _candle_price(market_no, i)
            fh.write(_LINE.format(m=market, t=text, o=p, h=p + 1, lo=p - 1, c=p + 0.5,
                                  ms=int(when.timestamp() * 1000) + 59_000, q=p * 3,
                                  v=1.25))


def _wait_for_rows(db: Path, table: str, proc: subprocess.Popen[bytes],
                   timeout: float = 60, more_than: int = 0) -> int:
    """Poll the file (as another process would) until ``table`` has more than
    ``more_than`` rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the command ended before writing (exit {proc.returncode})")
        if db.exists():
            conn = sqlite3.connect(db, timeout=1)
            try:
                count = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0  # table not created yet, or busy
            finally:
                conn.close()
            if count > more_than:
                return int(count)
        time.sleep(0.02)
    raise AssertionError(f"no rows in {table} after {timeout}s")


def _interrupt(proc: subprocess.Popen[bytes], sig: signal.Signals,
               timeout: float = 60) -> tuple[int, str, str]:
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"no exit {timeout}s after {sig.name}: {err.decode()[-2000:]}") from None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _integrity(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


SIGNALS = [signal.SIGTERM, signal.SIGINT]


def _ingest_setup(tmp_path: Path, per_file: int) -> tuple[list[Path], Path]:
    """Two NDJSON candle files of ``per_file`` candles and a settings.toml naming the db."""
    files = []
    for no, market in enumerate(("KRW-BTC", "KRW-ETH")):
        path = tmp_path / f"{market.lower()}.ndjson"
        _write_candles(path, market, no, per_file)
        files.append(path)
    db = tmp_path / "ingest.sqlite3"
    (tmp_path / "settings.toml").write_text(f'[sqlite]\npath = "{db}"\n')
    return files, db


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_ingest_drains_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    per_file = 60_000
    files, db = _ingest_setup(tmp_path, per_file)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchdb.cli", "ingest", *map(str, files), "--timeframe", "1m",
         "--chunk-size", "2000"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_rows(db, "candles", proc)
    time.sleep(random.Random(SEED + sig).uniform(0.1, 0.4))
    code, out, err = _interrupt(proc, sig)
    assert code == 0, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert f"Interrupted by {sig.name}" in out, out
    assert "summary" in out, out
    assert _integrity(db) == ["ok"]
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT symbol, timeframe, ts, open_price, high_price, low_price, "
                        "close_price, volume, quote_volume FROM candles "
                        "ORDER BY symbol, ts").fetchall()
    conn.close()
    total = len(rows)
    assert 0 < total < 2 * per_file, f"the signal did not interrupt the ingest ({total} rows)"
    assert f"{total:,}" in out, f"the summary does not show the {total:,} rows committed"
    # every committed candle is the file's candle, and per file they form a prefix of it:
    # no chunk is missing between two committed ones, no chunk is half there
    by_market: dict[str, list[tuple[object, ...]]] = {}
    for row in rows:
        by_market.setdefault(str(row[0]), []).append(row)
    for no, market in enumerate(("KRW-BTC", "KRW-ETH")):
        got = by_market.get(market, [])
        for i, row in enumerate(got):
            when = _EPOCH + i * _MINUTE
            p = _candle_price(no, i)
            assert row[1:] == ("1m", int(when.timestamp() * 1000), p, p + 1, p - 1, p + 0.5,
                               1.25, p * 3), f"{market} candle {i}: {row}"


def _check_prefixes(db: Path, per_file: int) -> int:
    """Integrity, and per market the committed candles are the file's first ones, exact."""
    assert _integrity(db) == ["ok"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT symbol, timeframe, ts, open_price, high_price, low_price, "
                            "close_price, volume, quote_volume FROM candles "
                            "ORDER BY symbol, ts").fetchall()
    by_market: dict[str, list[tuple[object, ...]]] = {}
    for row in rows:
        by_market.setdefault(str(row[0]), []).append(row)
    for no, market in enumerate(("KRW-BTC", "KRW-ETH")):
        got = by_market.get(market, [])
        assert len(got) <= per_file
        for i, row in enumerate(got):
            when = _EPOCH + i * _MINUTE
            p = _candle_price(no, i)
            assert row[1:] == ("1m", int(when.timestamp() * 1000), p, p + 1, p - 1, p + 0.5,
                               1.25, p * 3), f"{market} candle {i}: {row} (a hole or a change)"
    return len(rows)


def test_ingest_killed_then_rerun_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL a running `batchdb ingest` at random moments: every time the database is
    intact and holds, per file, an exact prefix of it (whole chunks, in order); a final run
    completes the data."""
    per_file = 40_000
    files, db = _ingest_setup(tmp_path, per_file)
    args = [sys.executable, "-m", "batchdb.cli", "ingest", *map(str, files), "--timeframe", "1m",
            "--chunk-size", "1500"]
    rng = random.Random(SEED)
    counts = [0]
    for _ in range(3):
        proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:  # kill once this run has gone past what the previous ones left
            _wait_for_rows(db, "candles", proc, more_than=counts[-1])
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.kill()
            proc.wait(timeout=30)
        counts.append(_check_prefixes(db, per_file))
    counts.pop(0)
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
    record("crash_cli_ingest", {"kills": len(counts), "rows_after_each_kill": counts})
    done = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert _check_prefixes(db, per_file) == 2 * per_file


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_demo_drains_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    db = tmp_path / "demo.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchdb.cli", "demo", "--seconds", "30", "--db", str(db)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_rows(db, "orders", proc)
    time.sleep(random.Random(SEED + sig).uniform(0.3, 0.8))
    started = time.monotonic()
    code, out, err = _interrupt(proc, sig)
    assert time.monotonic() - started < 20, "draining took longer than the run itself"
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert f"Interrupted by {sig.name}" in out, out[-3000:]
    assert _integrity(db) == ["ok"]
    conn = sqlite3.connect(db)
    counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
              for t in ("orders", "candles", "backtest_results")}
    statuses = {r[0] for r in conn.execute("SELECT DISTINCT status FROM orders")}
    conn.close()
    assert counts["orders"] > 0
    assert statuses <= {"open", "filled"}, statuses
    for table, count in counts.items():  # the summary reads the counts back after the drain
        assert f"{count:,}" in out, f"{table}: {count:,} rows not in the summary"


def test_checker_counts_committed_operations_not_yet_acknowledged(
        small_run: CrashRun, tmp_path: Path) -> None:
    """The lag the kill loop bounds: after the clean final run every commit is acknowledged;
    with that run's acknowledgements taken away, its commits are counted."""
    logs = load_logs(small_run.logs)
    assert check_database(small_run.db, logs, "sqlite").committed_unacked == 0
    last = max(spec["run"] for spec in logs.specs.values())
    ours = {n for n, spec in logs.specs.items() if spec["run"] == last}
    logs.acked -= ours
    assert check_database(small_run.db, logs, "sqlite").committed_unacked >= len(ours) // 2
