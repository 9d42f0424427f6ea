"""The read side, the same on every backend (issues #12 and #15): ``list_tables()``,
``fetch()`` with named parameters and column names, ``fetch_chunks()``, ``read_candles()``
and the plan it runs. Each test runs once per backend (see ``conftest.py``) on a real
database: a SQLite file, a DuckDB file, a throwaway PostgreSQL server."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest

from batchdb import BatchDBManager, OperationType, Priority
from batchdb.models import BatchDBError
from batchdb.reads import ReadOnlyFetchError, candles_query

from .conftest import BackendEnv

KV = "CREATE TABLE kv (k BIGINT PRIMARY KEY, v DOUBLE PRECISION, s TEXT)"
KV_ROWS = "INSERT INTO kv VALUES (1, 1.5, 'one'), (2, 2.5, 'two'), (3, NULL, 'o%3'), (4, 4.0, NULL)"

# one SQL text for every backend: named parameters, one used twice, a literal '%' and a
# literal colon (neither is a parameter)
NAMED_SQL = ("SELECT k, s, '12:30' AS hhmm FROM kv WHERE s LIKE 'o%' AND k >= :low "
             "AND (k <= :high OR k = :low) ORDER BY k")


def candle(symbol: str, ts: int, price: float = 100.0, timeframe: str = "1m") -> dict[str, Any]:
    return {"symbol": symbol, "timeframe": timeframe, "ts": ts, "open_price": price,
            "high_price": price + 1, "low_price": price - 1, "close_price": price + 0.5,
            "volume": 1.25, "quote_volume": None}


async def started(env: BackendEnv, **overrides: Any) -> BatchDBManager:
    manager = env.manager(**overrides)
    await manager.start()
    return manager


# ---------------------------------------------------------------------- list_tables
async def test_list_tables_lists_user_tables_sorted(env: BackendEnv) -> None:
    env.execute(KV, "CREATE TABLE \"Zeta table\" (id INTEGER PRIMARY KEY)",
                "CREATE TABLE alpha (id INTEGER PRIMARY KEY)",
                "CREATE VIEW kv_view AS SELECT k FROM kv")
    if env.name == "sqlite":  # AUTOINCREMENT makes SQLite's own sqlite_sequence table
        env.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY AUTOINCREMENT)",
                    "INSERT INTO counter DEFAULT VALUES")
        assert env.query("SELECT name FROM sqlite_master WHERE name = 'sqlite_sequence'")
    if env.name == "postgres":  # another schema is not the default schema's
        env.execute("CREATE SCHEMA other", "CREATE TABLE other.hidden (id INTEGER)")
    m = await started(env)
    await m.queue_operation("candles", OperationType.UPSERT, [candle("KRW-BTC", 0)],
                            Priority.NORMAL)
    await m.flush()
    expected = ["Zeta table", "alpha", "candles", "kv"]
    if env.name == "sqlite":
        expected = ["Zeta table", "alpha", "candles", "counter", "kv"]
    assert await m.list_tables() == expected


# ---------------------------------------------------------------------- named parameters
async def test_named_parameters_one_sql_on_every_backend(env: BackendEnv) -> None:
    env.execute(KV, KV_ROWS)
    m = await started(env)
    assert await m.fetch(NAMED_SQL, {"low": 1, "high": 2}) == [(1, "one", "12:30")]
    assert await m.fetch(NAMED_SQL, {"low": 3, "high": 1}) == [(3, "o%3", "12:30")]
    # the positional form documented before still works (PostgreSQL rewrites ?)
    assert await m.fetch("SELECT s FROM kv WHERE k = ?", (2,)) == [("two",)]
    # no parameter at all: a literal % stays one on every backend
    assert await m.fetch("SELECT s FROM kv WHERE s LIKE 'o%' ORDER BY k", {}) == [
        ("one",), ("o%3",)]
    assert await m.fetch("SELECT COUNT(*) FROM kv WHERE s = :s", {"s": None}) == [(0,)]


async def test_named_parameter_mistakes_name_the_parameter(env: BackendEnv) -> None:
    env.execute(KV, KV_ROWS)
    m = await started(env)
    with pytest.raises(ValueError, match=r"no value for :high"):
        await m.fetch(NAMED_SQL, {"low": 1})
    with pytest.raises(ValueError, match=r"'hihg' given but not in the SQL"):
        await m.fetch(NAMED_SQL, {"low": 1, "high": 2, "hihg": 3})
    with pytest.raises(TypeError, match="mapping of :name parameters"):
        await m.fetch("SELECT s FROM kv WHERE k = ?", "1")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="as_ must be one of tuples, dicts, arrow"):
        await m.fetch("SELECT 1", as_="rows")  # type: ignore[call-overload]


# ---------------------------------------------------------------------- column names
async def test_fetch_dicts_and_arrow_carry_column_names(env: BackendEnv) -> None:
    env.execute(KV, KV_ROWS)
    m = await started(env)
    sql = "SELECT k, v, s FROM kv WHERE k <= :n ORDER BY k"
    assert await m.fetch(sql, {"n": 3}) == [(1, 1.5, "one"), (2, 2.5, "two"), (3, None, "o%3")]
    assert await m.fetch(sql, {"n": 2}, as_="dicts") == [
        {"k": 1, "v": 1.5, "s": "one"}, {"k": 2, "v": 2.5, "s": "two"}]
    table = await m.fetch(sql, {"n": 4}, as_="arrow")
    assert isinstance(table, pa.Table)
    assert table.schema == pa.schema([("k", pa.int64()), ("v", pa.float64()),
                                      ("s", pa.string())])
    assert table.to_pydict() == {"k": [1, 2, 3, 4], "v": [1.5, 2.5, None, 4.0],
                                 "s": ["one", "two", "o%3", None]}
    # an empty result still has its columns; a repeated name is kept apart, not lost
    assert (await m.fetch("SELECT k, s FROM kv WHERE k < 0", as_="arrow")).column_names == [
        "k", "s"]
    assert await m.fetch("SELECT k, s AS k FROM kv WHERE k = 1", as_="dicts") == [
        {"k": 1, "k_2": "one"}]


async def test_fetch_arrow_without_pyarrow_names_the_extra(
        env: BackendEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    if env.name == "duckdb":
        pytest.skip("the DuckDB backend itself needs pyarrow")
    env.execute(KV, KV_ROWS)
    m = await started(env)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(BatchDBError, match=re.escape("pip install 'batchdb[arrow]'")):
        await m.fetch("SELECT k FROM kv", as_="arrow")
    assert await m.fetch("SELECT k FROM kv WHERE k = 1", as_="dicts") == [{"k": 1}]


async def test_reads_in_every_shape_refuse_writes(env: BackendEnv) -> None:
    env.execute(KV, KV_ROWS)
    m = await started(env)
    for shape in ("dicts", "arrow"):
        with pytest.raises(ReadOnlyFetchError, match=r"fetch\(\) is for reads"):
            await m.fetch("DELETE FROM kv WHERE k = :k", {"k": 1}, as_=shape)  # type: ignore[call-overload]
    with pytest.raises(ReadOnlyFetchError):
        async for _ in m.fetch_chunks("UPDATE kv SET s = 'x'"):
            pass
    assert await m.fetch("SELECT COUNT(*) FROM kv WHERE s = 'x'") == [(0,)]
    await m.stop()
    assert env.query("SELECT COUNT(*) FROM kv") == [(4,)]


# ---------------------------------------------------------------------- chunks
async def test_fetch_chunks_streams_and_gives_the_reader_back(env: BackendEnv) -> None:
    env.execute("CREATE TABLE n (i BIGINT PRIMARY KEY)")
    m = await started(env)
    await m.queue_operation("n", OperationType.INSERT, [{"i": i} for i in range(1000)])
    await m.flush()
    sizes = []
    seen: list[int] = []
    async for chunk in m.fetch_chunks("SELECT i FROM n WHERE i >= :low ORDER BY i",
                                      {"low": 10}, chunk_rows=300):
        assert chunk.columns == ("i",)
        sizes.append(len(chunk.rows))
        seen.extend(r[0] for r in chunk.rows)
    assert sizes == [300, 300, 300, 90]
    assert seen == list(range(10, 1000))
    # left after the first chunk, many times: each reader is given back
    for _ in range(12):
        async for chunk in m.fetch_chunks("SELECT i FROM n", chunk_rows=10):
            assert len(chunk.rows) == 10
            break
    empty = [c async for c in m.fetch_chunks("SELECT i AS no_rows FROM n WHERE i < 0")]
    assert [(c.columns, c.rows) for c in empty] == [(("no_rows",), [])]
    assert await m.fetch("SELECT COUNT(*) FROM n") == [(1000,)]
    with pytest.raises(ValueError, match="chunk_rows"):
        m.fetch_chunks("SELECT 1", chunk_rows=0)


# ---------------------------------------------------------------------- read_candles
async def test_read_candles_in_time_order_within_bounds(env: BackendEnv) -> None:
    m = await started(env)
    minute = 60_000
    t0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    # written out of order, with other markets and timeframes around them
    rows = [candle("KRW-BTC", t0 + i * minute, 100.0 + i) for i in (5, 1, 9, 0, 3, 7, 2)]
    rows += [candle("KRW-ETH", t0 + i * minute) for i in range(10)]
    rows += [candle("KRW-BTC", t0 + i * minute, timeframe="5m") for i in range(10)]
    await m.queue_operation("candles", OperationType.UPSERT, rows, Priority.NORMAL)
    await m.flush()
    everything = await m.read_candles("KRW-BTC", "1m")
    assert [r[2] for r in everything] == [t0 + i * minute for i in (0, 1, 2, 3, 5, 7, 9)]
    assert everything[0][:8] == ("KRW-BTC", "1m", t0, 100.0, 101.0, 99.0, 100.5, 1.25)
    # [start, end): epoch ms, datetimes (naive = UTC) and ISO 8601 text say the same
    for start, end in ((t0 + 2 * minute, t0 + 7 * minute),
                       (datetime(2024, 1, 1, 0, 2), datetime(2024, 1, 1, 0, 7, tzinfo=UTC)),
                       ("2024-01-01T00:02:00Z", "2024-01-01T09:07:00+09:00")):
        got = await m.read_candles("KRW-BTC", "1m", start, end, as_="dicts")
        assert [r["ts"] for r in got] == [t0 + i * minute for i in (2, 3, 5)]
    assert await m.read_candles("KRW-BTC", "1m", start=t0 + 8 * minute) == [everything[-1]]
    assert await m.read_candles("KRW-XRP", "1m") == []
    table = await m.read_candles("KRW-ETH", "1m", end=t0 + 3 * minute, as_="arrow")
    assert table.column("ts").to_pylist() == [t0, t0 + minute, t0 + 2 * minute]
    with pytest.raises(ValueError, match="start: 'yesterday' is neither epoch milliseconds"):
        await m.read_candles("KRW-BTC", "1m", "yesterday")


def _plan_text(rows: list[tuple[Any, ...]]) -> str:
    return "\n".join(str(r[-1]) for r in rows)


async def test_read_candles_reads_along_the_primary_key(env: BackendEnv) -> None:
    """What each backend's planner really does with ``read_candles``' query."""
    m = await started(env, postgres={"pool_size": 1})  # one connection: settings stay
    rows = [candle(f"M{s:03d}", t * 60_000) for s in range(40) for t in range(500)]
    await m.queue_operation("candles", OperationType.UPSERT, rows, Priority.NORMAL)
    await m.flush()
    await m.maintain("analyze")
    sql, params = candles_query("M007", "1m", 60_000, 400 * 60_000)
    assert len(await m.read_candles("M007", "1m", 60_000, 400 * 60_000)) == 399
    if env.name == "sqlite":
        plan = _plan_text(await m.fetch("EXPLAIN QUERY PLAN " + sql, params))
        # a range search in the WITHOUT ROWID table's key, in key order: no sort step
        assert plan == ("SEARCH candles USING PRIMARY KEY "
                        "(symbol=? AND timeframe=? AND ts>? AND ts<?)"), plan
        assert "TEMP B-TREE" not in plan
    elif env.name == "duckdb":
        plan = _plan_text(await m.fetch("EXPLAIN " + sql, params))
        # DuckDB does not scan its ART index for a range over a three-column key: it scans
        # the table with the filters pushed into the scan (row groups whose min/max rule
        # them out are skipped) and sorts the rows it keeps
        assert "Seq Scan" in plan and "Table: " in plan, plan
        assert re.search(r"Filters:[\s│]*symbol = 'M007'", plan), plan
        assert "Order By" in plan and "ts ASC" in plan, plan
    else:
        plan = _plan_text(await m.fetch("EXPLAIN " + sql, params))
        # the key's index finds the rows (an ordered Index Scan, or a Bitmap Index Scan
        # plus a sort of the few rows when the planner finds that cheaper); never the table
        assert "candles_pk" in plan and "Seq Scan" not in plan, plan
        await m.fetch("SELECT set_config('enable_bitmapscan', 'off', false), "
                      "set_config('enable_seqscan', 'off', false)")
        plan = _plan_text(await m.fetch("EXPLAIN " + sql, params))
        # read along the index, in its order: no sort at all
        assert plan.splitlines()[0].startswith("Index Scan using candles_pk on candles"), plan
        assert "Sort" not in plan, plan
