"""One fixture, ``env``, parametrised over every backend: each test runs on each of them.

Each test gets a fresh database: a new SQLite or DuckDB file under ``tmp_path``, or a new
database on one throwaway PostgreSQL server started for the whole session (when this
machine has the PostgreSQL binaries; otherwise the postgres cases are skipped with the
reason). ``env.execute`` and ``env.query`` go through the plain driver, as another program
would, never through batchdb.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBManager
from batchdb.pluginmanager import BackendRegistry, create_plugin_manager


def _load_pgserver() -> Any:
    """``tests/pgserver.py``'s PostgresServer class, or None if the module is absent."""
    try:
        from tests.pgserver import PostgresServer  # type: ignore[import-not-found]
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "pgserver.py"
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location("batchdb_tests_pgserver", path)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        PostgresServer = module.PostgresServer
    return PostgresServer


class BackendEnv:
    """A fresh database on one backend, with plain-driver access and manager building.

    One subclass per backend holds what the conformance tests need to know about it: its
    settings section, its own driver, and its documented differences (flags and a few
    methods), so that the tests ask about behaviour and never check a backend's name.
    """

    name: str
    #: NaN stored and read back as NaN (sqlite3 binds NaN as NULL)
    stores_nan = True
    #: text may hold NUL characters
    text_holds_nul = True
    #: another session can hold a table's write lock against batchdb
    lockable_by_another_session = True
    #: a value of the wrong type fails with an error naming its row
    cast_error_names_row = True
    #: the tables of the database, one name per row
    tables_sql = ("SELECT table_name FROM information_schema.tables "
                  "WHERE table_schema = current_schema()")

    def __init__(self, tmp_path: Path, dsn: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.path = tmp_path / f"conformance.{self.name}"
        self.dsn = dsn
        self.managers: list[BatchDBManager] = []

    def section(self) -> dict[str, Any]:
        """This backend's settings section for a manager on this database."""
        return {"path": str(self.path)}

    def manager(self, **overrides: Any) -> BatchDBManager:
        """A manager on this database (not started); stopped at the end of the test.
        ``overrides`` may hold sections for every backend: only this one's applies."""
        overrides.setdefault("maintenance", {"enabled": False})
        section = self.section()
        for name in ENVS:
            own = overrides.pop(name, {})
            if name == self.name:
                section.update(own)
        manager = BatchDBManager.from_settings(None, backend=self.name, **{self.name: section},
                                               **overrides)
        self.managers.append(manager)
        return manager

    def execute(self, *statements: str) -> None:
        """Run DDL/DML through the backend's own driver, outside batchdb."""
        raise NotImplementedError

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` read through the backend's own driver, outside batchdb."""
        raise NotImplementedError

    def hold_write_lock(self, table: str) -> Any:
        """Another session holding ``table``'s write lock (release it with
        :meth:`release`)."""
        raise NotImplementedError

    def release(self, blocker: Any) -> None:
        """End what :meth:`hold_write_lock` started."""
        raise NotImplementedError

    def check_maintained(self, results: dict[str, dict[str, Any]]) -> None:
        """Assert that maintenance left its own traces in the database (nothing to check
        where the database keeps none)."""


class SQLiteEnv(BackendEnv):
    name = "sqlite"
    stores_nan = False
    tables_sql = "SELECT name FROM sqlite_master WHERE type = 'table'"

    def execute(self, *statements: str) -> None:
        conn = sqlite3.connect(self.path)
        try:
            for stmt in statements:
                conn.execute(stmt)
            conn.commit()
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()

    def hold_write_lock(self, table: str) -> Any:
        blocker = sqlite3.connect(self.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        return blocker

    def release(self, blocker: Any) -> None:
        blocker.execute("ROLLBACK")
        blocker.close()

    def check_maintained(self, results: dict[str, dict[str, Any]]) -> None:
        assert self.query("SELECT tbl FROM sqlite_stat1 WHERE idx = 'kv_v'") == [("kv",)]


class DuckDBEnv(BackendEnv):
    name = "duckdb"
    # one process holds the file and batchdb is its only writer
    lockable_by_another_session = False
    cast_error_names_row = False  # DuckDB's cast error names no row

    def execute(self, *statements: str) -> None:
        import duckdb

        conn = duckdb.connect(str(self.path))
        try:
            for stmt in statements:
                conn.execute(stmt)
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import duckdb

        conn = duckdb.connect(str(self.path))
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()


class PostgresEnv(BackendEnv):
    name = "postgres"
    text_holds_nul = False  # PostgreSQL text cannot hold NUL

    def section(self) -> dict[str, Any]:
        return {"dsn": self.dsn or "postgresql://127.0.0.1:1/unused"}

    def execute(self, *statements: str) -> None:
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt)  # type: ignore[arg-type]

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]  # type: ignore[arg-type]

    def hold_write_lock(self, table: str) -> Any:
        import psycopg
        from psycopg import sql

        assert self.dsn is not None
        blocker = psycopg.connect(self.dsn)
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(table)))
        return blocker

    def release(self, blocker: Any) -> None:
        blocker.rollback()
        blocker.close()

    def check_maintained(self, results: dict[str, dict[str, Any]]) -> None:
        for task in ("vacuum", "analyze"):
            assert "public.kv" in results[task]["tables"], results[task]
        assert results["vacuum"]["bytes_before"] > 0
        vacuumed, analyzed = self.query(
            "SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL "
            "FROM pg_stat_user_tables WHERE relname = 'kv'")[0]
        assert vacuumed and analyzed


#: the conformance set-up of each backend batchdb ships; a registered backend without one
#: is reported as skipped
ENVS: dict[str, type[BackendEnv]] = {env.name: env for env in (SQLiteEnv, DuckDBEnv,
                                                                PostgresEnv)}
#: every registered backend (the built-in ones and any other installed)
BACKENDS = sorted(BackendRegistry(create_plugin_manager()).names())


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One throwaway PostgreSQL server for the session, or the reason there is none."""
    server_cls = _load_pgserver()
    if server_cls is None:
        yield "tests/pgserver.py is not there"
        return
    if not server_cls.available():
        yield server_cls.unavailable_reason()
        return
    server = server_cls.start(tmp_path_factory.mktemp("pg"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BackendEnv]:
    """A fresh database on each registered backend; every manager built from it is
    stopped after."""
    name: str = request.param
    monkeypatch.chdir(tmp_path)  # from_settings(None) reads ./settings.toml if any
    for key in [k for k in os.environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)
    env_cls = ENVS.get(name)
    if env_cls is None:
        pytest.skip(f"backend {name!r} has no conformance set-up in tests/conformance")
    server = None
    dbname = None
    dsn = None
    if env_cls is PostgresEnv:  # a database of its own on the session's server
        server = request.getfixturevalue("postgres_server")
        if isinstance(server, str):
            pytest.skip(f"no PostgreSQL test server: {server}")
        import psycopg

        dbname = f"conformance_{secrets.token_hex(6)}"
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        dsn = server.dsn_for(server.user, dbname=dbname)
    environment = env_cls(tmp_path, dsn)
    yield environment
    for manager in environment.managers:
        await manager.stop()
    if server is not None and dbname is not None:
        import psycopg

        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
