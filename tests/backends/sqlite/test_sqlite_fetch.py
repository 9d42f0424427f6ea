"""SQLite readers stay readers: what fetch() could otherwise use to take the write lock or
to turn its read-only mode off is refused, and writes go on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchdb.reads import ReadOnlyFetchError
from tests.conftest import ManagerFactory, make_table, rows_of


@pytest.mark.parametrize("sql", ["BEGIN IMMEDIATE", "BEGIN", "SAVEPOINT s",
                                 "PRAGMA query_only = OFF", "PRAGMA query_only = 0",
                                 "ATTACH DATABASE 'other.sqlite3' AS other",
                                 "INSERT INTO kv VALUES (5, 'x') RETURNING k"])
async def test_fetch_cannot_lock_or_unlock_a_reader(db_path: Path, make_manager: ManagerFactory,
                                                    sql: str) -> None:
    make_table(db_path, "CREATE TABLE kv (k INTEGER PRIMARY KEY, s TEXT)")
    manager = make_manager(sqlite={"readers": 1, "busy_timeout_ms": 2000},
                           batch={"max_retries": 0})
    await manager.start()
    with pytest.raises(ReadOnlyFetchError, match=r"fetch\(\) is for reads"):
        await manager.fetch(sql)
    # the one reader is still read-only, and the writer is not locked out
    with pytest.raises(ReadOnlyFetchError):
        await manager.fetch("DELETE FROM kv")
    op_id = await manager.queue_operation("kv", "INSERT", [{"k": 1, "s": "a"}])
    await asyncio.wait_for(manager.wait(op_id), 10)
    assert await manager.fetch("PRAGMA query_only") == [(1,)]
    await manager.stop()
    assert rows_of(db_path, "SELECT k, s FROM kv") == [(1, "a")]
    assert not (db_path.parent / "other.sqlite3").exists()
