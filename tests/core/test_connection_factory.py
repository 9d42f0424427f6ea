"""The seed's connection factory, as new users write it: what works, and a clear error at
start() for what cannot (an in-memory database, one connection handed out for all)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from batchdb import BatchDBManager, OperationType
from batchdb.models import BatchDBError
from tests.conftest import rows_of


def batchdb_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("batchdb-")}


async def refused_at_start(factory: Callable[[], sqlite3.Connection], match: str) -> str:
    """start() raises a BatchDBError matching ``match``; nothing is left running."""
    threads = batchdb_threads()
    manager = BatchDBManager(factory)
    with pytest.raises(BatchDBError, match=match) as info:
        await manager.start()
    assert batchdb_threads() <= threads
    with pytest.raises(BatchDBError, match="not running"):
        await manager.queue_operation("candles", OperationType.INSERT, [{"symbol": "x"}])
    return str(info.value)


@pytest.mark.parametrize("name", [":memory:", ""], ids=["memory", "temporary"])
async def test_an_in_memory_database_is_refused_at_start(db_path: Path, name: str) -> None:
    message = await refused_at_start(lambda: sqlite3.connect(name),
                                     "in-memory .* cannot be shared between batchdb's writer "
                                     "and its readers")
    assert "Use a file" in message and "journal_mode" not in message


async def test_an_in_memory_path_in_the_settings_is_refused_at_start(db_path: Path) -> None:
    manager = BatchDBManager.from_settings(None, sqlite={"path": ":memory:"},
                                           maintenance={"enabled": False})
    with pytest.raises(BatchDBError, match="':memory:' is an in-memory"):
        await manager.start()


async def test_one_connection_made_beforehand_is_refused_at_start(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)  # sqlite3's default: usable only in this thread
    try:
        message = await refused_at_start(lambda: conn,
                                         "must open a new connection each time it is called")
        assert "another thread" in message and "lambda: sqlite3.connect(" in message
    finally:
        conn.close()


async def test_one_connection_for_every_thread_is_refused_at_start(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, check_same_thread=False)
    try:
        message = await refused_at_start(lambda: conn,
                                         "must open a new connection each time it is called")
        assert "the same connection again" in message
    finally:
        conn.close()


async def test_a_factory_of_new_connections_writes_and_reads(db_path: Path) -> None:
    calls: list[sqlite3.Connection] = []

    def factory() -> sqlite3.Connection:
        calls.append(sqlite3.connect(db_path))
        return calls[-1]

    async with BatchDBManager(factory) as manager:
        await manager.wait(await manager.queue_operation(
            "candles", "UPSERT", [{"symbol": "KRW-BTC", "timeframe": "1m", "ts": 0,
                                   "open_price": 1.0, "high_price": 1.0, "low_price": 1.0,
                                   "close_price": 1.0, "volume": 1.0, "quote_volume": None}]))
        assert await manager.fetch("SELECT count(*) FROM candles") == [(1,)]
    assert len(calls) >= 2 and len({id(c) for c in calls}) == len(calls)
    assert rows_of(db_path, "SELECT symbol FROM candles") == [("KRW-BTC",)]
