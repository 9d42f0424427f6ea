"""The everyday path as a new user meets it (issue #11), the same on every backend:
candles written with the seed's columns only, values of the wrong type, reads that try to
write. Each test runs once per backend (see ``conftest.py``) on a real database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from batchdb import BatchDBManager, BatchOperation, OperationType, Priority
from batchdb.models import OperationFailed
from batchdb.reads import ReadOnlyFetchError

from .conftest import BackendEnv

# the seed's example 4 writes candles with these columns, and only these
SEED_CANDLE_COLUMNS = ("symbol", "timeframe", "ts", "open_price", "high_price", "low_price",
                       "close_price", "volume", "quote_volume")

# the candles table as batchdb created it before its bookkeeping columns had defaults
OLD_CANDLES = (
    "CREATE TABLE candles (symbol TEXT NOT NULL, timeframe TEXT NOT NULL, ts BIGINT NOT NULL, "
    "open_price DOUBLE PRECISION NOT NULL, high_price DOUBLE PRECISION NOT NULL, "
    "low_price DOUBLE PRECISION NOT NULL, close_price DOUBLE PRECISION NOT NULL, "
    "volume DOUBLE PRECISION NOT NULL, quote_volume DOUBLE PRECISION, source TEXT, "
    "ingested_at BIGINT NOT NULL, PRIMARY KEY (symbol, timeframe, ts))")


def seed_candles(n: int, market: str = "KRW-XRP", price: float = 800.0) -> list[dict[str, Any]]:
    """Daily candles with the seed's columns (no ``source``, no ``ingested_at``)."""
    return [{"symbol": market, "timeframe": "1d", "ts": 1704067200000 + i * 86_400_000,
             "open_price": price, "high_price": price + 10, "low_price": price - 10,
             "close_price": price + 5, "volume": 1e6 + i, "quote_volume": 8e8 + i}
            for i in range(n)]


async def started(env: BackendEnv, **overrides: Any) -> BatchDBManager:
    manager = env.manager(**overrides)
    await manager.start()
    return manager


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------- 1. candle bookkeeping
async def seed_example_4(manager: BatchDBManager, data: list[dict[str, Any]]
                         ) -> list[BatchOperation]:
    """The seed's example 4, as written there; the operations its callback saw."""
    seen: list[BatchOperation] = []

    async def on_batch_complete(operation: BatchOperation) -> None:
        seen.append(operation)

    op_id = await manager.queue_operation(
        "candles", OperationType.UPSERT, data, Priority.NORMAL, on_batch_complete
    )
    await manager.wait(op_id)
    await manager.flush()
    return seen


@pytest.mark.parametrize("existing", [False, True], ids=["new-table", "old-table"])
async def test_candles_upsert_with_the_seed_columns_only(env: BackendEnv, existing: bool) -> None:
    if existing:  # a file written by an earlier version: ingested_at has no default there
        env.execute(OLD_CANDLES)
    m = await started(env)
    data = seed_candles(5)
    assert tuple(data[0]) == SEED_CANDLE_COLUMNS
    before = now_ms()
    seen = await seed_example_4(m, data)
    # an upsert of existing keys: new values, and the time of this write
    changed = seed_candles(2, price=900.0)
    middle = now_ms()
    await seed_example_4(m, changed)
    after = now_ms()
    await m.stop()
    assert len(seen) == 1 and seen[0].succeeded and seen[0].error is None
    assert data[0] == seed_candles(1)[0]  # the caller's rows are left as they were
    rows = env.query("SELECT ts, open_price, volume, quote_volume, source, ingested_at "
                     "FROM candles WHERE symbol = 'KRW-XRP' ORDER BY ts")
    assert [r[:5] for r in rows] == [
        (1704067200000 + i * 86_400_000, 900.0 if i < 2 else 800.0, 1e6 + i, 8e8 + i, None)
        for i in range(5)]
    stamps = [r[5] for r in rows]
    assert all(middle - 1000 <= s <= after + 1000 for s in stamps[:2]), (middle, stamps, after)
    assert all(before - 1000 <= s <= middle + 1000 for s in stamps[2:]), (before, stamps, middle)


@pytest.mark.parametrize("existing", [False, True], ids=["new-table", "old-table"])
async def test_a_candle_update_stamps_ingested_at_with_its_time(env: BackendEnv,
                                                               existing: bool) -> None:
    if existing:
        env.execute(OLD_CANDLES)
    m = await started(env)
    await m.wait(await m.queue_operation("candles", "INSERT", seed_candles(2)))
    (first,) = {r[0] for r in await m.fetch("SELECT ingested_at FROM candles")}
    time.sleep(0.01)
    before = now_ms()
    await m.wait(await m.queue_operation("candles", "UPDATE", [
        {"symbol": "KRW-XRP", "timeframe": "1d", "ts": 1704067200000, "close_price": 1.0}]))
    await m.wait(await m.queue_operation("candles", "DELETE", [
        {"symbol": "KRW-XRP", "timeframe": "1d", "ts": 1704067200000 + 86_400_000}]))
    after = now_ms()
    await m.stop()
    ((close, stamp),) = env.query("SELECT close_price, ingested_at FROM candles")
    assert close == 1.0 and stamp > first and before - 1000 <= stamp <= after + 1000


async def test_the_candles_table_gives_ingested_at_a_default(env: BackendEnv) -> None:
    """Other programs writing the table batchdb created need not know the bookkeeping."""
    m = await started(env)
    await m.table_info("candles")  # created on first use
    await m.stop()
    before = now_ms()
    env.execute("INSERT INTO candles (symbol, timeframe, ts, open_price, high_price, low_price, "
                "close_price, volume) VALUES ('KRW-BTC', '1m', 0, 1, 2, 0.5, 1.5, 10)")
    after = now_ms()
    ((source, stamp),) = env.query("SELECT source, ingested_at FROM candles")
    assert source is None
    assert isinstance(stamp, int) and before - 1000 <= stamp <= after + 1000, (before, stamp)


@pytest.mark.parametrize("existing", [False, True], ids=["new-table", "old-table"])
async def test_insert_candles_batch_still_fills_source_and_ingested_at(
        env: BackendEnv, existing: bool) -> None:
    from ..conftest import upbit_candles

    if existing:
        env.execute(OLD_CANDLES)
    m = await started(env)
    before = now_ms()
    await m.wait(await m.insert_candles_batch("KRW-BTC", "1m", upbit_candles(3)))
    after = now_ms()
    await m.stop()
    rows = env.query("SELECT source, ingested_at FROM candles")
    assert len(rows) == 3
    assert all(r[0] == "upbit" and before - 1000 <= r[1] <= after + 1000 for r in rows), rows


async def test_a_candle_row_carrying_ingested_at_keeps_it(env: BackendEnv) -> None:
    m = await started(env)
    rows = [{**r, "source": "mine", "ingested_at": 7} for r in seed_candles(2)]
    await m.wait(await m.queue_operation("candles", "UPSERT", rows))
    await m.stop()
    assert env.query("SELECT source, ingested_at FROM candles") == [("mine", 7), ("mine", 7)]


async def test_a_missing_not_null_candle_value_still_fails_alone(env: BackendEnv) -> None:
    m = await started(env)
    bad = [{k: v for k, v in r.items() if k != "volume"} for r in seed_candles(1, "KRW-ETH")]
    bad_id = await m.queue_operation("candles", "INSERT", bad)
    good_id = await m.queue_operation("candles", "INSERT", seed_candles(1))
    with pytest.raises(OperationFailed, match="volume"):
        await m.wait(bad_id)
    await m.wait(good_id)
    await m.stop()
    assert env.query("SELECT symbol FROM candles") == [("KRW-XRP",)]


# ---------------------------------------------------------------------- 3. fetch only reads
KV = "CREATE TABLE kv (k BIGINT PRIMARY KEY, v DOUBLE PRECISION, s TEXT)"
WRITES = [
    "DELETE FROM kv",
    "DELETE FROM kv WHERE k = ?",
    "UPDATE kv SET s = 'changed'",
    "INSERT INTO kv (k, v, s) VALUES (99, 9.9, 'sneaked in')",
    "CREATE TABLE sneaky (a INTEGER)",
    "DROP TABLE kv",
    "WITH gone AS (SELECT 1) DELETE FROM kv",
]


@pytest.mark.parametrize("sql", WRITES)
async def test_fetch_refuses_a_write_and_later_writes_still_commit(env: BackendEnv,
                                                                   sql: str) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'one')")
    m = await started(env, batch={"max_retries": 0})
    params = (1,) if "?" in sql else ()
    with pytest.raises(ReadOnlyFetchError, match=r"fetch\(\) is for reads") as info:
        await m.fetch(sql, params)
    assert "queue_operation" in str(info.value)
    assert await m.fetch("SELECT k, s FROM kv") == [(1, "one")]
    # nothing is locked: a write right after commits (at once, not after a lock timeout)
    op_id = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": 2.0, "s": "two"}])
    await asyncio.wait_for(m.wait(op_id), 10)
    assert await m.fetch("SELECT k, s FROM kv ORDER BY k") == [(1, "one"), (2, "two")]
    await m.stop()
    assert env.query("SELECT k, s FROM kv ORDER BY k") == [(1, "one"), (2, "two")]
    names = {r[0] for r in env.query(env.tables_sql)}
    assert "sneaky" not in names


async def test_fetch_still_reads_with_parameters_ctes_and_explain(env: BackendEnv) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'one')",
                "INSERT INTO kv VALUES (2, 2.0, 'two')")
    m = await started(env)
    assert await m.fetch("SELECT s FROM kv WHERE k = ?", (2,)) == [("two",)]
    assert await m.fetch("WITH t AS (SELECT k FROM kv) SELECT count(*) FROM t") == [(2,)]
    assert await m.fetch("EXPLAIN SELECT * FROM kv")
    await m.stop()


# ---------------------------------------------------------------------- 2. wrong types
# an ordinary table (on SQLite: not STRICT, so SQLite itself would store anything)
TV = "CREATE TABLE tv (k BIGINT PRIMARY KEY, r DOUBLE PRECISION, i BIGINT, t TEXT)"


@pytest.mark.parametrize(("column", "value"), [("r", "not-a-number"), ("i", "abc"),
                                               ("r", "0x1G"), ("i", "")])
async def test_a_value_of_the_wrong_type_fails_its_operation_alone(
        env: BackendEnv, column: str, value: Any) -> None:
    env.execute(TV)
    m = await started(env)
    before = await m.queue_operation("tv", "INSERT", [{"k": 1, "r": 1.0, "i": 1, "t": "a"}])
    bad = await m.queue_operation("tv", "INSERT", [{"k": 2, "r": 2.0, "i": 2, "t": "b"},
                                                   {"k": 3, "r": 3.0, "i": 3, "t": "c",
                                                    column: value}])
    after = await m.queue_operation("tv", "INSERT", [{"k": 4, "r": 4.0, "i": 4, "t": "d"}])
    with pytest.raises(OperationFailed, match=rf"column '?{column}'?\b") as info:
        await m.wait(bad)
    await m.wait(before)
    await m.wait(after)
    await m.stop()
    if env.cast_error_names_row:
        assert f"column '{column}'" in str(info.value) and "row 1" in str(info.value)
    assert env.query("SELECT k FROM tv ORDER BY k") == [(1,), (4,)]


async def test_values_sqlite_converts_to_the_column_type_are_kept(env: BackendEnv) -> None:
    env.execute(TV)
    m = await started(env)
    await m.wait(await m.queue_operation("tv", "UPSERT", [
        {"k": 1, "r": "1.5", "i": "12", "t": "x"},
        {"k": 2, "r": " 2.5 ", "i": " 7 ", "t": 5},
        {"k": 3, "r": 3, "i": True, "t": None},
        {"k": 4, "r": None, "i": None, "t": 1.5}]))
    await m.stop()
    assert env.query("SELECT k, r, i, t FROM tv ORDER BY k") == [
        (1, 1.5, 12, "x"), (2, 2.5, 7, "5"), (3, 3.0, 1, None), (4, None, None, "1.5")]


async def test_an_update_with_a_value_of_the_wrong_type_fails_alone(env: BackendEnv) -> None:
    env.execute(TV, "INSERT INTO tv VALUES (1, 1.0, 1, 'a')",
                "INSERT INTO tv VALUES (2, 2.0, 2, 'b')")
    m = await started(env)
    bad = await m.queue_operation("tv", "UPDATE", [{"k": 1, "r": "not-a-number"}])
    good = await m.queue_operation("tv", "UPDATE", [{"k": 2, "r": 2.5}])
    with pytest.raises(OperationFailed, match=r"column '?r'?\b"):
        await m.wait(bad)
    await m.wait(good)
    await m.stop()
    assert env.query("SELECT k, r FROM tv ORDER BY k") == [(1, 1.0), (2, 2.5)]
