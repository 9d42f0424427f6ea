"""Every backend gives the same results for the same operations.

Each test runs once per backend (see ``conftest.py``) and asserts one literal expected
result, so passing on all of them means they agree. Results are read back through the
backend's plain driver (``env.query``) or through ``manager.fetch``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from batchdb import BatchDBManager, OperationType, Priority
from batchdb.models import OperationFailed, SchemaError

from ..conftest import upbit_candles
from .conftest import BackendEnv

KV = ("CREATE TABLE kv (k BIGINT PRIMARY KEY, v DOUBLE PRECISION, s TEXT NOT NULL, "
      "n BIGINT)")
ALL_KV = "SELECT k, v, s, n FROM kv ORDER BY k"
LONG_LINGER = {"linger_seconds": {"LOW": 10.0}, "flush_interval_seconds": 10.0}


async def started(env: BackendEnv, **overrides: Any) -> BatchDBManager:
    """A started manager on ``env``."""
    manager = env.manager(**overrides)
    await manager.start()
    return manager


async def commit(manager: BatchDBManager, table: str, op: str,
                 rows: list[dict[str, Any]]) -> int:
    """Queue one operation, wait for its commit, return its rows_affected."""
    done = await manager.wait(await manager.queue_operation(table, op, rows))
    return done.rows_affected


# ---------------------------------------------------------------------- operation types
async def test_each_operation_type(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env)
    await commit(m, "kv", "INSERT", [{"k": 1, "v": 1.0, "s": "a", "n": 10},
                                     {"k": 2, "v": 2.0, "s": "b", "n": 20},
                                     {"k": 3, "v": 3.0, "s": "c", "n": 30}])
    await commit(m, "kv", "UPDATE", [{"k": 2, "v": 2.5, "s": "B"}])
    await commit(m, "kv", "UPSERT", [{"k": 3, "v": 3.5, "s": "C", "n": 31},
                                     {"k": 4, "v": 4.0, "s": "d", "n": 40}])
    await commit(m, "kv", "DELETE", [{"k": 1}])
    assert await m.fetch(ALL_KV) == [(2, 2.5, "B", 20), (3, 3.5, "C", 31), (4, 4.0, "d", 40)]
    await m.stop()
    assert env.query(ALL_KV) == [(2, 2.5, "B", 20), (3, 3.5, "C", 31), (4, 4.0, "d", 40)]


async def test_upsert_inserts_new_keys_and_updates_existing_ones(env: BackendEnv) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'old', 1)",
                "INSERT INTO kv VALUES (2, 2.0, 'same', 2)")
    m = await started(env)
    await commit(m, "kv", "UPSERT", [{"k": 1, "v": 1.5, "s": "new", "n": 100},
                                     {"k": 2, "v": 2.0, "s": "same", "n": 2},
                                     {"k": 3, "v": 3.0, "s": "fresh", "n": None}])
    # a subset of the columns: the others keep their values, on existing keys
    await commit(m, "kv", "UPSERT", [{"k": 1, "s": "newer"}, {"k": 5, "s": "only s"}])
    await m.stop()
    assert env.query(ALL_KV) == [(1, 1.5, "newer", 100), (2, 2.0, "same", 2),
                                 (3, 3.0, "fresh", None), (5, None, "only s", None)]


async def test_update_and_delete_of_missing_keys_change_nothing(env: BackendEnv) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'one', 1)")
    m = await started(env)
    await commit(m, "kv", "UPDATE", [{"k": 404, "v": 9.0, "s": "ghost"}])
    await commit(m, "kv", "DELETE", [{"k": 405}, {"k": 406}])
    await commit(m, "kv", "UPDATE", [{"k": 1, "n": 2}, {"k": 407, "n": 3}])
    await m.stop()
    assert env.query(ALL_KV) == [(1, 1.0, "one", 2)]


async def test_delete_reads_only_the_key_of_each_row(env: BackendEnv) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'one', 1)",
                "INSERT INTO kv VALUES (2, 2.0, 'two', 2)")
    m = await started(env)
    await commit(m, "kv", "DELETE", [{"k": 1, "v": 123.0, "s": "whatever", "n": None}])
    await m.stop()
    assert env.query(ALL_KV) == [(2, 2.0, "two", 2)]


# ---------------------------------------------------------------------- values
EDGE_ROWS = [
    {"k": 1, "v": None, "s": "", "n": None},
    {"k": 2, "v": 1.7976931348623157e308, "s": "한국어 ✓ 🚀 日本語", "n": 2**63 - 1},
    {"k": 3, "v": -1.7976931348623157e308, "s": "quote ' dq \" back\\slash", "n": -(2**63 - 1)},
    {"k": 4, "v": 5e-324, "s": "new\nline\ttab\r", "n": -(2**63)},
    {"k": 5, "v": 2.2250738585072014e-308, "s": "Ünïcödé ÆØÅ ß", "n": 0},
    {"k": 6, "v": math.inf, "s": "inf", "n": 1},
    {"k": 7, "v": -math.inf, "s": "-inf", "n": -1},
    {"k": 8, "v": 0.1 + 0.2, "s": "x" * 10_000, "n": 2**53 + 1},
    {"k": 2**63 - 1, "v": 1e-300, "s": "largest key", "n": 7},
    {"k": -(2**63 - 1), "v": -1e-300, "s": "smallest key", "n": 8},
]


@pytest.mark.parametrize("op", ["INSERT", "UPSERT"])
async def test_nulls_unicode_extreme_floats_and_64_bit_integers(env: BackendEnv,
                                                                 op: str) -> None:
    env.execute(KV)
    m = await started(env)
    await commit(m, "kv", op, EDGE_ROWS)
    fetched = await m.fetch(ALL_KV)
    await m.stop()
    expected = sorted(tuple(r.values()) for r in EDGE_ROWS)
    assert fetched == expected
    assert env.query(ALL_KV) == expected


async def test_values_survive_update_and_read_back_by_parameter(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env)
    await commit(m, "kv", "INSERT", [{"k": r["k"], "s": "before"} for r in EDGE_ROWS])
    await commit(m, "kv", "UPDATE", [{"k": r["k"], "v": r["v"], "s": r["s"], "n": r["n"]}
                                     for r in EDGE_ROWS])
    one = await m.fetch("SELECT s, n FROM kv WHERE k = ?", (2**63 - 1,))
    await m.stop()
    assert one == [("largest key", 7)]
    assert env.query(ALL_KV) == sorted(tuple(r.values()) for r in EDGE_ROWS)


async def test_nan_round_trips(env: BackendEnv, request: pytest.FixtureRequest) -> None:
    if not env.stores_nan:
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="sqlite3 binds NaN as NULL: the SQLite backend stores NULL "
                                "instead of NaN, and no error says so"))
    env.execute(KV)
    m = await started(env)
    await commit(m, "kv", "INSERT", [{"k": 1, "v": math.nan, "s": "nan"}])
    await m.stop()
    rows = env.query("SELECT k, v, s FROM kv")
    assert len(rows) == 1 and rows[0][1] is not None and math.isnan(rows[0][1])


async def test_nul_characters_in_text(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env)
    op_id = await m.queue_operation("kv", "INSERT", [{"k": 1, "s": "nul\x00inside"}])
    ok = await m.queue_operation("kv", "INSERT", [{"k": 2, "s": "plain"}])
    if not env.text_holds_nul:  # (PostgreSQL) that operation fails alone, with its error
        with pytest.raises(OperationFailed, match="0x00") as info:
            await m.wait(op_id)
        assert info.value.__cause__ is not None
        expected = [(2, "plain")]
    else:
        await m.wait(op_id)
        expected = [(1, "nul\x00inside"), (2, "plain")]
    await m.wait(ok)
    await m.stop()
    assert env.query("SELECT k, s FROM kv ORDER BY k") == expected


# ---------------------------------------------------------------------- ordering
async def test_operations_on_one_key_apply_in_submission_order(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env)
    ids = [
        await m.queue_operation("kv", "INSERT", [{"k": 1, "v": 1.0, "s": "insert", "n": 1}]),
        await m.queue_operation("kv", "UPDATE", [{"k": 1, "v": 2.0, "s": "update"}]),
        await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": 3.0, "s": "upsert", "n": 3}]),
        await m.queue_operation("kv", "DELETE", [{"k": 1}]),
        await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": 5.0, "s": "again", "n": 5}]),
        await m.queue_operation("kv", "UPDATE", [{"k": 1, "n": 6}]),
        await m.queue_operation("kv", "UPSERT", [{"k": 2, "v": 1.0, "s": "gone", "n": 0}]),
        await m.queue_operation("kv", "DELETE", [{"k": 2}]),
    ]
    # many writes of one key: coalesced into batches, the last one must win
    ids += [await m.queue_operation("kv", "UPSERT", [{"k": 3, "v": float(i), "s": f"v{i}",
                                                      "n": i}]) for i in range(300)]
    # and several rows of one key inside one operation: the last row wins
    ids.append(await m.queue_operation("kv", "UPSERT", [
        {"k": 4, "v": 1.0, "s": "first", "n": 1}, {"k": 4, "v": 2.0, "s": "last", "n": 2}]))
    ids.append(await m.queue_operation("kv", "UPDATE", [
        {"k": 4, "s": "u1"}, {"k": 4, "s": "u2"}, {"k": 4, "s": "u3"}]))
    for op_id in ids:
        await m.wait(op_id)
    await m.stop()
    assert env.query(ALL_KV) == [(1, 5.0, "again", 6), (3, 299.0, "v299", 299),
                                 (4, 2.0, "u3", 2)]


async def test_same_key_same_priority_keeps_order_inside_one_window(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env, batch=LONG_LINGER)
    ids = []
    for i in range(120):
        op = ("UPSERT", "UPDATE", "UPSERT")[i % 3]
        row = {"k": i % 7, "v": float(i), "s": f"w{i}"} | ({"n": i} if op == "UPSERT" else {})
        ids.append(await m.queue_operation("kv", op, [row], Priority.LOW))
    assert await m.fetch("SELECT count(*) FROM kv") == [(0,)]  # all of it still queued
    await m.flush()
    for op_id in ids:
        await m.wait(op_id)
    await m.stop()
    expected = {}
    for i in range(120):
        k = i % 7
        if i % 3 == 1:  # UPDATE: only an existing row changes, n stays
            if k in expected:
                expected[k] = (k, float(i), f"w{i}", expected[k][3])
        else:
            expected[k] = (k, float(i), f"w{i}", i)
    assert env.query(ALL_KV) == sorted(expected.values())


# ---------------------------------------------------------------------- failure isolation
async def test_a_failing_operation_fails_alone_in_its_window(env: BackendEnv) -> None:
    env.execute(KV, "INSERT INTO kv VALUES (1, 1.0, 'existing', 1)")
    m = await started(env, batch=LONG_LINGER)
    good = [await m.queue_operation("kv", "INSERT", [{"k": 10 + i, "v": 1.0, "s": f"g{i}"}],
                                    Priority.LOW) for i in range(3)]
    duplicate = await m.queue_operation("kv", "INSERT", [{"k": 20, "v": 0.0, "s": "ok"},
                                                         {"k": 1, "v": 0.0, "s": "dup"}],
                                        Priority.LOW)
    good += [await m.queue_operation("kv", "INSERT", [{"k": 30 + i, "v": 2.0, "s": f"h{i}"}],
                                     Priority.LOW) for i in range(3)]
    not_null = await m.queue_operation("kv", "INSERT", [{"k": 40, "v": 0.0, "s": None}],
                                       Priority.LOW)
    good.append(await m.queue_operation("kv", "INSERT", [{"k": 50, "v": 3.0, "s": "last"}],
                                        Priority.LOW))
    update_good = await m.queue_operation("kv", "UPDATE", [{"k": 10, "s": "updated"}],
                                          Priority.LOW)
    update_null = await m.queue_operation("kv", "UPDATE", [{"k": 11, "s": None}], Priority.LOW)
    update_good2 = await m.queue_operation("kv", "UPDATE", [{"k": 12, "s": "updated too"}],
                                           Priority.LOW)
    assert await m.fetch("SELECT count(*) FROM kv") == [(1,)]  # all of it still queued
    await m.flush()
    for op_id in (*good, update_good, update_good2):
        await m.wait(op_id)
    for op_id in (duplicate, not_null, update_null):
        with pytest.raises(OperationFailed) as info:
            await m.wait(op_id)
        assert info.value.__cause__ is not None
    status = await m.get_queue_status()
    await m.stop()
    assert status["stats"]["failed_operations"] == 3
    assert env.query("SELECT k, s FROM kv ORDER BY k") == [
        (1, "existing"), (10, "updated"), (11, "g1"), (12, "updated too"),
        (30, "h0"), (31, "h1"), (32, "h2"), (50, "last")]


async def test_a_malformed_row_fails_its_operation_alone(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env, batch=LONG_LINGER)
    before = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": 1.0, "s": "a"}],
                                     Priority.LOW)
    bad = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": 1.0, "s": "b"},
                                                   {"k": 3, "v": 1.0, "x": "c"}], Priority.LOW)
    after = await m.queue_operation("kv", "INSERT", [{"k": 4, "v": 1.0, "s": "d"}],
                                    Priority.LOW)
    await m.flush()
    await m.wait(before)
    await m.wait(after)
    with pytest.raises(OperationFailed, match="row 1"):
        await m.wait(bad)
    await m.stop()
    assert env.query("SELECT k FROM kv ORDER BY k") == [(1,), (4,)]


async def test_unknown_columns_and_tables_are_refused_at_once(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env)
    with pytest.raises(SchemaError, match="no column"):
        await m.queue_operation("kv", "INSERT", [{"k": 1, "s": "a", "nope": 1}])
    with pytest.raises(SchemaError, match="unknown table"):
        await m.queue_operation("kv; DROP TABLE kv", "INSERT", [{"k": 1}])
    with pytest.raises(SchemaError, match="primary-key"):
        await m.queue_operation("kv", "UPDATE", [{"s": "no key"}])
    await m.stop()
    assert env.query("SELECT count(*) FROM kv") == [(0,)]


async def test_tables_without_a_key_and_with_only_key_columns(env: BackendEnv) -> None:
    env.execute('CREATE TABLE events ("at" BIGINT NOT NULL, what TEXT)',  # AT: reserved in DuckDB
                "CREATE TABLE tags (name TEXT NOT NULL, owner TEXT NOT NULL, "
                "PRIMARY KEY (name, owner))")
    m = await started(env)
    await commit(m, "events", "INSERT", [{"at": 1, "what": "a"}, {"at": 1, "what": "a"}])
    for op in ("UPSERT", "UPDATE", "DELETE"):
        with pytest.raises(SchemaError, match="no primary key"):
            await m.queue_operation("events", op, [{"at": 1, "what": "b"}])
    # every column is a key column: an upsert of an existing row leaves it as it is
    await commit(m, "tags", "UPSERT", [{"name": "btc", "owner": "me"},
                                       {"name": "btc", "owner": "me"},
                                       {"name": "eth", "owner": "me"}])
    await commit(m, "tags", "UPSERT", [{"name": "btc", "owner": "me"}])
    with pytest.raises(SchemaError, match="only key columns"):
        await m.queue_operation("tags", "UPDATE", [{"name": "btc", "owner": "me"}])
    await m.stop()
    assert env.query('SELECT "at", what FROM events') == [(1, "a"), (1, "a")]
    assert env.query("SELECT name, owner FROM tags ORDER BY name") == [("btc", "me"),
                                                                       ("eth", "me")]


# ---------------------------------------------------------------------- life cycle
async def test_stop_commits_everything_queued(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env, batch=LONG_LINGER)
    for i in range(500):
        await m.queue_operation("kv", "UPSERT", [{"k": i % 200, "v": float(i), "s": str(i)}],
                                Priority.LOW)
    await m.queue_operation("kv", "DELETE", [{"k": 0}], Priority.LOW)
    await m.queue_operation("kv", "UPDATE", [{"k": 1, "n": 1}], Priority.LOW)
    assert (await m.get_queue_status())["total_queued_operations"] > 0
    await m.stop()
    rows = env.query("SELECT k, v, s, n FROM kv ORDER BY k")
    assert len(rows) == 199
    assert rows[0] == (1, 401.0, "401", 1)
    assert rows[-1] == (199, 399.0, "399", None)
    assert all(v == float(k + 400 if k < 100 else k + 200) for k, v, _, _ in rows)


async def test_existing_tables_with_composite_keys_and_quoted_names(env: BackendEnv) -> None:
    env.execute('CREATE TABLE "Order Book" (venue TEXT NOT NULL, "sym bol" TEXT NOT NULL, '
                'px DOUBLE PRECISION, qty BIGINT, PRIMARY KEY (venue, "sym bol"))',
                """INSERT INTO "Order Book" VALUES ('upbit', 'KRW-BTC', 1.0, 1)""")
    m = await started(env)
    await commit(m, "Order Book", "UPSERT", [
        {"venue": "upbit", "sym bol": "KRW-BTC", "px": 2.0, "qty": 2},
        {"venue": "upbit", "sym bol": "KRW-ETH", "px": 3.0, "qty": 3},
        {"venue": "bithumb", "sym bol": "KRW-BTC", "px": 4.0, "qty": 4}])
    await commit(m, "Order Book", "UPDATE", [{"venue": "bithumb", "sym bol": "KRW-BTC",
                                              "qty": 40}])
    await commit(m, "Order Book", "DELETE", [{"venue": "upbit", "sym bol": "KRW-ETH"}])
    info = await m.table_info("Order Book")
    await m.stop()
    assert info.primary_key == ("venue", "sym bol")
    assert info.columns == ("venue", "sym bol", "px", "qty")
    assert env.query('SELECT venue, "sym bol", px, qty FROM "Order Book" '
                     'ORDER BY venue, "sym bol"') == [
        ("bithumb", "KRW-BTC", 4.0, 40), ("upbit", "KRW-BTC", 2.0, 2)]


# ---------------------------------------------------------------------- candles
CANDLE_READ = ("SELECT symbol, timeframe, ts, open_price, high_price, low_price, close_price, "
               "volume, quote_volume, source FROM candles ORDER BY symbol, ts")


def expected_candles(n: int, market: str, start: int = 0,
                     price: float = 50_000_000.0) -> list[tuple[Any, ...]]:
    """The rows ``upbit_candles`` becomes in the candles table."""
    return [(market, "1m", 1704067200000 + i * 60000, price + i, price + i + 10,
             price + i - 10, price + i + 5, 0.25 + i / 1000, 123456.5 + i, "upbit")
            for i in range(start, start + n)]


async def test_candles_from_upbit_json(env: BackendEnv) -> None:
    m = await started(env)
    first = await m.insert_candles_batch("KRW-BTC", "1m", upbit_candles(200, "KRW-BTC"),
                                         Priority.HIGH)
    await m.insert_candles_batch("KRW-ETH", "1m", upbit_candles(50, "KRW-ETH", price=3e6))
    # the newest 20 again, with corrected prices: upserted, not duplicated
    fixed = await m.insert_candles_batch("KRW-BTC", "1m",
                                         upbit_candles(20, "KRW-BTC", 180, price=60_000_000.0))
    assert (await m.wait(first)).rows_affected == 200
    await m.wait(fixed)
    await m.flush()
    info = await m.table_info("candles")
    stamps = await m.fetch("SELECT min(ingested_at), count(*) FROM candles")
    await m.stop()
    assert info.primary_key == ("symbol", "timeframe", "ts")
    assert stamps[0][0] > 1_600_000_000_000 and stamps[0][1] == 250
    assert env.query(CANDLE_READ) == (
        expected_candles(180, "KRW-BTC")
        + expected_candles(20, "KRW-BTC", 180, price=60_000_000.0)
        + expected_candles(50, "KRW-ETH", price=3e6))


async def test_malformed_candles_are_refused_and_others_commit(env: BackendEnv) -> None:
    m = await started(env)
    candles = upbit_candles(3, "KRW-BTC")
    candles[1]["trade_price"] = "not a number"
    with pytest.raises(ValueError, match="candle 1"):
        await m.insert_candles_batch("KRW-BTC", "1m", candles)
    await m.wait(await m.insert_candles_batch("KRW-XRP", "1m", upbit_candles(3, "KRW-XRP",
                                                                             price=700.0)))
    await m.stop()
    assert env.query(CANDLE_READ) == expected_candles(3, "KRW-XRP", price=700.0)


async def test_operation_type_names_are_accepted_in_any_case(env: BackendEnv) -> None:
    env.execute(KV)
    m = await started(env)
    await commit(m, "kv", "insert", [{"k": 1, "s": "a"}])
    await commit(m, "kv", OperationType.UPSERT, [{"k": 1, "s": "b"}])
    await m.stop()
    assert env.query("SELECT k, s FROM kv") == [(1, "b")]
