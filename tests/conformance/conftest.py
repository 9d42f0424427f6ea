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

BACKENDS = ("sqlite", "duckdb", "postgres")


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
    """A fresh database on one backend, with plain-driver access and manager building."""

    def __init__(self, name: str, tmp_path: Path, dsn: str | None = None) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.path = tmp_path / f"conformance.{'sqlite3' if name == 'sqlite' else name}"
        self.dsn = dsn
        self.managers: list[BatchDBManager] = []

    def manager(self, **overrides: Any) -> BatchDBManager:
        """A manager on this database (not started); stopped at the end of the test."""
        overrides.setdefault("maintenance", {"enabled": False})
        sections: dict[str, Any] = {
            "sqlite": {"path": str(self.path)},
            "duckdb": {"path": str(self.path)},
            "postgres": {"dsn": self.dsn or "postgresql://127.0.0.1:1/unused"},
        }
        for key, section in sections.items():
            section.update(overrides.pop(key, {}))
        manager = BatchDBManager.from_settings(None, backend=self.name, **sections, **overrides)
        self.managers.append(manager)
        return manager

    # ------------------------------------------------------------------ plain driver
    def execute(self, *statements: str) -> None:
        """Run DDL/DML through the backend's own driver, outside batchdb."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.path)
            try:
                for stmt in statements:
                    conn.execute(stmt)
                conn.commit()
            finally:
                conn.close()
        elif self.name == "duckdb":
            import duckdb

            dconn = duckdb.connect(str(self.path))
            try:
                for stmt in statements:
                    dconn.execute(stmt)
            finally:
                dconn.close()
        else:
            import psycopg

            assert self.dsn is not None
            with psycopg.connect(self.dsn, autocommit=True) as pconn:
                for stmt in statements:
                    pconn.execute(stmt)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` read through the backend's own driver, outside batchdb."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.path)
            try:
                return [tuple(r) for r in conn.execute(sql).fetchall()]
            finally:
                conn.close()
        if self.name == "duckdb":
            import duckdb

            dconn = duckdb.connect(str(self.path))
            try:
                return [tuple(r) for r in dconn.execute(sql).fetchall()]
            finally:
                dconn.close()
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as pconn:
            return [tuple(r) for r in pconn.execute(sql).fetchall()]  # type: ignore[arg-type]


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
    """A fresh database on each backend; every manager built from it is stopped after."""
    name: str = request.param
    monkeypatch.chdir(tmp_path)  # from_settings(None) reads ./settings.toml if any
    for key in [k for k in os.environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)
    registry = BackendRegistry(create_plugin_manager())
    if name not in registry.names():
        pytest.skip(f"backend {name!r} is not installed")
    dsn = None
    dbname = None
    if name == "postgres":
        server = request.getfixturevalue("postgres_server")
        if isinstance(server, str):
            pytest.skip(f"no PostgreSQL test server: {server}")
        import psycopg

        dbname = f"conformance_{secrets.token_hex(6)}"
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        dsn = server.dsn_for(server.user, dbname=dbname)
    environment = BackendEnv(name, tmp_path, dsn)
    yield environment
    for manager in environment.managers:
        await manager.stop()
    if dbname is not None:
        import psycopg

        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
