"""Fixtures for the PostgreSQL backend tests: one real server per session, a fresh schema
per test (its DSN sets the search_path to it), and started managers on it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from batchdb import BatchDBManager
from tests.pgserver import PostgresServer


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One throwaway server for the session, stopped at the end."""
    reason = PostgresServer.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL server can be started here: {reason}")
    server = PostgresServer.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` whose sessions resolve unqualified names in ``schema`` (then public)."""
    options = quote(f"-c search_path={schema},public", safe="")
    return f"{dsn}{'&' if '?' in dsn else '?'}options={options}"


@pytest.fixture
def pg_schema(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh schema for one test, dropped afterwards."""
    name = f"t_{secrets.token_hex(4)}"
    pg_server.psql(f"CREATE SCHEMA {name}")
    yield name
    with contextlib.suppress(RuntimeError):  # a test may have stopped the server
        pg_server.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def pg_dsn(pg_server: PostgresServer, pg_schema: str) -> str:
    """The superuser's DSN with the search_path set to this test's schema."""
    return with_search_path(pg_server.dsn, pg_schema)


def sql_rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a separate, plain psycopg connection (what another client sees)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)  # type: ignore[arg-type]
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def sql_exec(dsn: str, *statements: str) -> None:
    """Run DDL/DML as a user of the database would, outside batchdb."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in statements:
            conn.execute(stmt)  # type: ignore[arg-type]


ManagerFactory = Callable[..., BatchDBManager]


@pytest.fixture
async def make_pg_manager(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> AsyncIterator[ManagerFactory]:
    """Build started managers on the test's schema; every one is stopped at the end.

    ``postgres=`` entries are merged over the test DSN; other keyword arguments go to
    ``BatchDBManager.from_settings`` as they are.
    """
    monkeypatch.chdir(tmp_path)  # from_settings reads ./settings.toml if present
    for key in [k for k in os.environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)
    made: list[BatchDBManager] = []

    def factory(**overrides: Any) -> BatchDBManager:
        pg = {"dsn": pg_dsn, **overrides.pop("postgres", {})}
        overrides.setdefault("maintenance", {"enabled": False})
        manager = BatchDBManager.from_settings(None, backend="postgres", postgres=pg,
                                               **overrides)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        await manager.stop()
