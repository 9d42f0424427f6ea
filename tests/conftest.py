"""Shared fixtures: managers on real SQLite files under tmp_path; one throwaway PostgreSQL
server for the session, a fresh schema per test on it and managers on that schema."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBManager
from tests.pgserver import PostgresServer, with_search_path


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The working directory is tmp_path (no stray settings.toml) and no BATCHDB_* variable
    of the caller leaks in."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)


@pytest.fixture
def db_path(tmp_path: Path, clean_env: None) -> Path:
    """A fresh SQLite path in a clean environment (see ``clean_env``)."""
    return tmp_path / "test.sqlite3"


def make_table(path: Path, ddl: str) -> None:
    """Create a table directly in the file, as a user's existing table."""
    conn = sqlite3.connect(path)
    conn.executescript(ddl)
    conn.commit()
    conn.close()


def rows_of(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a separate plain sqlite3 connection (what another process would see)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


ManagerFactory = Callable[..., BatchDBManager]


@contextlib.asynccontextmanager
async def managers(backend: str, section: dict[str, Any]) -> AsyncIterator[ManagerFactory]:
    """A factory of managers on ``backend``, maintenance off: its ``backend=`` entries are
    merged over ``section``, other keyword arguments go to ``from_settings`` as they are.
    Every manager it made is stopped at the end."""
    made: list[BatchDBManager] = []

    def factory(**overrides: Any) -> BatchDBManager:
        overrides.setdefault("maintenance", {"enabled": False})
        overrides[backend] = {**section, **overrides.get(backend, {})}
        manager = BatchDBManager.from_settings(None, backend=backend, **overrides)
        made.append(manager)
        return manager

    try:
        yield factory
    finally:
        for manager in made:
            await manager.stop()


@pytest.fixture
async def make_manager(db_path: Path) -> AsyncIterator[ManagerFactory]:
    """Build managers on ``db_path``; every one is stopped at the end."""
    async with managers("sqlite", {"path": str(db_path)}) as factory:
        yield factory


def upbit_candles(n: int, market: str = "KRW-BTC", start_minute: int = 0,
                  price: float = 50_000_000.0) -> list[dict[str, Any]]:
    """Candles as Upbit's /v1/candles/minutes/1 returns them (newest first)."""
    out = []
    for i in range(start_minute, start_minute + n):
        day, minute = divmod(i, 1440)
        hh, mm = divmod(minute, 60)
        utc = f"2024-01-{1 + day:02d}T{hh:02d}:{mm:02d}:00"
        out.append({
            "market": market,
            "candle_date_time_utc": utc,
            "candle_date_time_kst": utc,
            "opening_price": price + i,
            "high_price": price + i + 10,
            "low_price": price + i - 10,
            "trade_price": price + i + 5,
            "timestamp": 1704067200000 + i * 60000 + 59000,
            "candle_acc_trade_price": 123456.5 + i,
            "candle_acc_trade_volume": 0.25 + i / 1000,
            "unit": 1,
        })
    out.reverse()
    return out


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (``tests/backends/postgres``,
    ``tests/reliability``), stopped at the end; the test is skipped, with the reason,
    where none can be started."""
    reason = PostgresServer.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL server can be started here: {reason}")
    server = PostgresServer.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


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
    async with managers("postgres", {"dsn": pg_dsn}) as factory:
        yield factory


# tables and settings shared by the scheduler and SQLite backend tests
LOG_DDL = """
CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, tag TEXT NOT NULL);
CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER);
"""
LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO log (tag) VALUES ('locker')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def batch_cfg(**kw: Any) -> dict[str, Any]:
    return {"batch": kw}
