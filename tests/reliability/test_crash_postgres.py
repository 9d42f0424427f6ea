"""Promise 1 on the PostgreSQL backend: SIGKILL at random moments loses no acknowledged
operation and leaves no half operation (same child, harness and checks as ``test_crash``).

The child writes into a database of its own on the session's throwaway server and runs
``analyze`` and ``vacuum`` between writes. After each kill the harness waits until the
server has ended the dead child's sessions (a COMMIT it had sent may still complete until
then), runs ``pg_amcheck`` on the database and compares the tables with the child's logs.
The checker is tested on damaged copies of a run's database, as on SQLite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import PostgresServer, sql_exec, sql_rows

from .crashkit import (
    CrashRun,
    acked_insert,
    assert_sound,
    check_database,
    load_logs,
    wait_for_sessions_to_end,
)
from .reporting import record

pytest.importorskip("psycopg")

SEED = int(os.environ.get("BATCHDB_CRASH_SEED", "20240601"))
KILLS = int(os.environ.get("BATCHDB_CRASH_KILLS_POSTGRES", "25"))


def _run(pg_server: PostgresServer, workdir: Path, seed: int, kills: int,
         finish_ops: int) -> tuple[CrashRun, str]:
    """A crash run on a new database; returns the run and the database's name."""
    name = pg_server.create_database("crash")
    run = CrashRun(workdir, "postgres", seed, kills, maintenance="analyze,vacuum",
                   finish_ops=finish_ops, dsn=pg_server.dsn_for(pg_server.user, dbname=name))
    run.run()
    return run, name


def test_sigkill_postgres_at_random_moments(pg_server: PostgresServer, tmp_path: Path) -> None:
    run, name = _run(pg_server, tmp_path, SEED, KILLS, finish_ops=150)
    try:
        record("crash_postgres", run.figures)
        assert_sound(run, {"insert", "update", "upsert", "delete", "candles", "recandle"}, 150)
    finally:
        pg_server.drop_database(name)


# ---------------------------------------------------------------------- the checker
@pytest.fixture(scope="module")
def small_run(pg_server: PostgresServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CrashRun, str]]:
    """A short crash run whose final database the checker self-tests damage (in copies)."""
    run, name = _run(pg_server, tmp_path_factory.mktemp("pg-small"), SEED + 1, 3,
                     finish_ops=150)
    try:
        assert run.failure is None, run.failure
        yield run, name
    finally:
        pg_server.drop_database(name)


def _damaged(pg_server: PostgresServer, small_run: tuple[CrashRun, str],
             *statements: str) -> list[str]:
    """Run ``statements`` in a copy of the run's database; return what the checker says."""
    import psycopg

    run, name = small_run
    copy = pg_server.create_database("damaged", template=name)
    try:
        dsn = pg_server.dsn_for(pg_server.user, dbname=copy)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt)
        return check_database(dsn, load_logs(run.logs), "postgres").problems
    finally:
        pg_server.drop_database(copy)


def test_checker_accepts_the_untouched_database(pg_server: PostgresServer,
                                                small_run: tuple[CrashRun, str]) -> None:
    assert _damaged(pg_server, small_run) == []


@pytest.mark.parametrize("table", ["events", "notes"])
def test_checker_reports_a_lost_acknowledged_operation(pg_server: PostgresServer,
                                                       small_run: tuple[CrashRun, str],
                                                       table: str) -> None:
    n = acked_insert(small_run[0], table)
    problems = _damaged(pg_server, small_run, f"DELETE FROM {table} WHERE grp = {n}")
    assert any("acknowledged operation lost" in p and f"group {n} " in p for p in problems)


def test_checker_reports_half_an_operation(pg_server: PostgresServer,
                                           small_run: tuple[CrashRun, str]) -> None:
    n = acked_insert(small_run[0], "events")
    problems = _damaged(pg_server, small_run, f"DELETE FROM events WHERE grp = {n} AND j = 1")
    assert any(p.startswith("half-applied") and f"group {n} " in p for p in problems)


def test_checker_reports_a_changed_value(pg_server: PostgresServer,
                                         small_run: tuple[CrashRun, str]) -> None:
    n = acked_insert(small_run[0], "notes")
    problems = _damaged(pg_server, small_run,
                        f"UPDATE notes SET body = body || 'x' WHERE grp = {n} AND j = 0")
    assert any(f"notes group {n} " in p for p in problems)


def test_checker_reports_rows_nobody_wrote(pg_server: PostgresServer,
                                           small_run: tuple[CrashRun, str]) -> None:
    problems = _damaged(pg_server, small_run,
                        "INSERT INTO events (grp, j, upd, val) VALUES (99999999, 0, 1, 1)")
    assert any("events group 99999999" in p and "no submitted insert" in p for p in problems)


def test_checker_reports_a_row_there_twice(pg_server: PostgresServer,
                                           small_run: tuple[CrashRun, str]) -> None:
    """A key written twice (possible only without the primary key) is not hidden by the
    set the checker groups rows in."""
    n = acked_insert(small_run[0], "events")
    problems = _damaged(pg_server, small_run, "ALTER TABLE events DROP CONSTRAINT events_pkey",
                        f"INSERT INTO events SELECT * FROM events WHERE grp = {n} AND j = 0")
    assert any(f"events group {n}: row there twice" in p for p in problems), problems


def test_checker_reports_a_corrupt_index(pg_server: PostgresServer,
                                         small_run: tuple[CrashRun, str]) -> None:
    """pg_amcheck runs and its findings are reported: an expression index whose IMMUTABLE
    function is then changed no longer matches the rows it indexes."""
    problems = _damaged(
        pg_server, small_run,
        "CREATE FUNCTION f(t text) RETURNS text IMMUTABLE LANGUAGE sql AS $$ SELECT t $$",
        "CREATE INDEX notes_f ON notes (f(body))",
        "CREATE OR REPLACE FUNCTION f(t text) RETURNS text IMMUTABLE LANGUAGE sql "
        "AS $$ SELECT reverse(t) $$")
    assert problems and problems[0].startswith("integrity_check:"), problems
    assert "notes_f" in problems[0], problems


def test_the_check_waits_for_a_dead_clients_transaction(pg_server: PostgresServer) -> None:
    """Why the check waits for the killed child's sessions: a client killed after it sent
    its statements leaves a server session that goes on and COMMITs. Checked at once, the
    database would show a state that is not final."""
    name = pg_server.create_database("dead")
    try:
        dsn = pg_server.dsn_for(pg_server.user, dbname=name)
        sql_exec(dsn, "CREATE TABLE t (k int)")
        script = ("import psycopg, sys, time\n"
                  "conn = psycopg.connect(sys.argv[1], autocommit=True)\n"
                  "conn.pgconn.send_query(b'BEGIN; INSERT INTO t VALUES (1); "
                  "SELECT pg_sleep(1); COMMIT')\n"
                  "while conn.pgconn.flush():\n    pass\n"
                  "print('sent', flush=True)\n"
                  "time.sleep(60)\n")
        proc = subprocess.Popen([sys.executable, "-c", script, dsn], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"sent\n"
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert sql_rows(dsn, "SELECT count(*) FROM t") == [(0,)]  # not committed yet
        assert wait_for_sessions_to_end(dsn) >= 1
        assert sql_rows(dsn, "SELECT count(*) FROM t") == [(1,)]  # the dead client's COMMIT
    finally:
        pg_server.drop_database(name)
