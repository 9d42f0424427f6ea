"""Bad input fails alone, with an error naming what was wrong; nothing else is lost."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from batchdb import OperationFailed, Priority, SchemaError
from tests.conftest import ManagerFactory, make_table, rows_of, upbit_candles

DDL = 'CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL, "odd "" name" REAL);'
HOSTILE_NAMES = [
    "kv; DROP TABLE kv; --",
    'kv" WHERE 1=1; --',
    "kv/*",
    "' OR '1'='1",
    "sqlite_master",
    "",
    "a\x00b",
]


@pytest.fixture
async def started(db_path: Path, make_manager: ManagerFactory) -> Any:
    make_table(db_path, DDL)
    m = make_manager()
    await m.start()
    return m


async def good_write(m: Any, k: int) -> str:
    op_id: str = await m.queue_operation("kv", "INSERT", [{"k": k, "v": "ok"}])
    return op_id


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_table_names_are_refused(started: Any, db_path: Path, name: str) -> None:
    good = await good_write(started, 1)
    with pytest.raises(SchemaError):
        await started.queue_operation(name, "INSERT", [{"k": 2, "v": "x"}])
    await started.flush()
    assert (await started.wait(good)).succeeded
    tables = {r[0] for r in rows_of(db_path, "SELECT name FROM sqlite_master")}
    assert tables == {"kv"}
    assert rows_of(db_path, "SELECT k FROM kv") == [(1,)]


@pytest.mark.parametrize("column", ["v; DROP TABLE kv", 'v" = 1 --', "V ", "rowid", "k)--"])
async def test_hostile_column_names_are_refused(started: Any, db_path: Path, column: str) -> None:
    good = await good_write(started, 1)
    with pytest.raises(SchemaError, match="has no column"):
        await started.queue_operation("kv", "INSERT", [{"k": 2, "v": "x", column: 1}])
    await started.flush()
    assert (await started.wait(good)).succeeded
    assert rows_of(db_path, "SELECT k, v FROM kv") == [(1, "ok")]


async def test_quoted_real_column_names_work(started: Any, db_path: Path) -> None:
    op = await started.queue_operation("kv", "UPSERT", [{"k": 1, "v": "x", 'odd " name': 2.5}])
    assert (await started.wait(op)).succeeded
    assert rows_of(db_path, 'SELECT "odd "" name" FROM kv') == [(2.5,)]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("kv", "MERGE", [{"k": 1, "v": "x"}]), ValueError, "operation_type must be one of"),
        (("kv", "INSERT", [{"k": 1, "v": "x"}], "URGENT"), ValueError, "priority must be"),
        (("kv", "INSERT", [{"k": 1, "v": "x"}], 7), ValueError, "priority must be"),
        (("kv", "INSERT", []), ValueError, "empty"),
        (("kv", "INSERT", {"k": 1, "v": "x"}), ValueError, "list of row mappings"),
        (("kv", "INSERT", "k=1"), ValueError, "list of row mappings"),
        (("kv", "INSERT", [[1, "x"]]), ValueError, "row 0 .* not a mapping"),
        (("kv", "UPDATE", [{"v": "x"}]), SchemaError, "primary-key column"),
        (("kv", "UPSERT", [{"v": "x"}]), SchemaError, "primary-key column"),
        (("kv", "DELETE", [{"v": "x"}]), SchemaError, "primary-key column"),
        (("kv", "UPDATE", [{"k": 1}]), SchemaError, "nothing to update"),
        (("nope", "INSERT", [{"k": 1}]), SchemaError, "unknown table 'nope'"),
        (("kv", "INSERT", [{1: "x"}]), SchemaError, "column names must be strings"),
        (("kv", "INSERT", [{"k": 1, "v": "x"}], Priority.LOW, "not callable"), ValueError,
         "callback must be callable"),
    ],
)
async def test_bad_calls_raise_and_queue_nothing(started: Any, db_path: Path, args: tuple[Any, ...],
                                                 error: type[Exception], message: str) -> None:
    good = await good_write(started, 1)
    with pytest.raises(error, match=message):
        await started.queue_operation(*args)
    await started.flush()
    assert (await started.wait(good)).succeeded
    assert rows_of(db_path, "SELECT k, v FROM kv") == [(1, "ok")]
    assert (await started.get_queue_status())["stats"]["total_operations"] == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"k": 1, "v": "x"}, {"k": 2}], r"row 1 for table 'kv' has other columns than row 0: "
                                         r"missing \['v'\]"),
        ([{"k": 1, "v": "x"}, {"k": 2, "v": "y", "z": 1}], r"row 1 .* extra \['z'\]"),
        ([{"k": 1, "v": "x"}, {"k": 2, "w": "y"}], r"row 1 .* missing \['v'\] extra \['w'\]"),
        ([{"k": 1, "v": "x"}, {"k": 2, "v": "y"}, "row"], "row 2 .* is not a mapping: str"),
        ([{"k": 1, "v": "x"}, (2, "y")], "row 1 .* is not a mapping: tuple"),
    ],
)
async def test_malformed_later_rows_fail_their_operation_only(
        started: Any, db_path: Path, rows: list[Any], message: str) -> None:
    before = await good_write(started, 10)
    bad = await started.queue_operation("kv", "INSERT", rows)
    after = await good_write(started, 11)
    await started.flush()
    with pytest.raises(OperationFailed, match=message):
        await started.wait(bad)
    assert (await started.wait(before)).succeeded and (await started.wait(after)).succeeded
    assert rows_of(db_path, "SELECT k FROM kv ORDER BY k") == [(10,), (11,)]


@pytest.mark.parametrize(
    ("value", "message"),
    [({"nested": 1}, r"type 'dict' is not supported \(column 'v'\)"),
     ([1, 2], r"type 'list' is not supported \(column 'v'\)"),
     (object(), "is not supported"), (2**70, "too large")],
)
async def test_unbindable_values_fail_their_operation_only(started: Any, db_path: Path,
                                                           value: Any, message: str) -> None:
    before = await good_write(started, 1)
    bad = await started.queue_operation("kv", "INSERT", [{"k": 2, "v": value}])
    after = await good_write(started, 3)
    await started.flush()
    with pytest.raises(OperationFailed, match=message):
        await started.wait(bad)
    assert (await started.wait(before)).succeeded and (await started.wait(after)).succeeded
    assert rows_of(db_path, "SELECT k FROM kv ORDER BY k") == [(1,), (3,)]


async def test_typed_candles_table_refuses_wrong_types_and_nan(
        db_path: Path, make_manager: ManagerFactory) -> None:
    m = make_manager()
    await m.start()
    row = {"symbol": "KRW-BTC", "timeframe": "1m", "ts": 0, "open_price": 1.0,
           "high_price": 1.0, "low_price": 1.0, "close_price": 1.0, "volume": 1.0,
           "quote_volume": 1.0, "source": "t", "ingested_at": 0}
    good = await m.queue_operation("candles", "UPSERT", [row])
    text = await m.queue_operation("candles", "UPSERT", [{**row, "ts": 1, "open_price": "high"}])
    nan = await m.queue_operation("candles", "UPSERT", [{**row, "ts": 2, "close_price": math.nan}])
    ts_text = await m.queue_operation("candles", "UPSERT", [{**row, "ts": "soon"}])
    await m.flush()
    assert (await m.wait(good)).succeeded
    with pytest.raises(OperationFailed, match="cannot store TEXT value in REAL column "
                                              "candles.open_price"):
        await m.wait(text)
    with pytest.raises(OperationFailed, match="NOT NULL constraint failed: candles.close_price"):
        await m.wait(nan)
    with pytest.raises(OperationFailed, match="INTEGER column candles.ts"):
        await m.wait(ts_text)
    assert rows_of(db_path, "SELECT ts FROM candles") == [(0,)]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c[3].pop("trade_price"), "candle 3 has no 'trade_price'"),
        (lambda c: c[5].update(opening_price="abc"), "candle 5: 'opening_price' must be a number"),
        (lambda c: c[0].update(high_price=None), "candle 0 has no 'high_price'"),
        (lambda c: c[2].update(low_price=math.inf), "candle 2: 'low_price' must be a finite"),
        (lambda c: c[4].update(candle_date_time_utc="yesterday"),
         "candle 4: 'candle_date_time_utc' is not an ISO date-time"),
        (lambda c: c[1].update(market="KRW-ETH"), "candle 1 is for market 'KRW-ETH'"),
        (lambda c: c.__setitem__(6, "candle"), "candle 6 is not an object"),
    ],
)
async def test_bad_candles_fail_with_field_and_index(db_path: Path, make_manager: ManagerFactory,
                                                     mutate: Any, message: str) -> None:
    m = make_manager()
    await m.start()
    good = await m.insert_candles_batch("KRW-BTC", "1m", upbit_candles(10, start_minute=100))
    candles = upbit_candles(10)
    mutate(candles)
    with pytest.raises(ValueError, match=message):
        await m.insert_candles_batch("KRW-BTC", "1m", candles)
    assert (await m.wait(good)).succeeded
    assert rows_of(db_path, "SELECT COUNT(*) FROM candles") == [(10,)]


async def test_candles_argument_errors(db_path: Path, make_manager: ManagerFactory) -> None:
    m = make_manager()
    await m.start()
    with pytest.raises(ValueError, match="no candles"):
        await m.insert_candles_batch("KRW-BTC", "1m", [])
    with pytest.raises(ValueError, match="symbol must be"):
        await m.insert_candles_batch("", "1m", upbit_candles(1))
    with pytest.raises(ValueError, match="no plugin normalises candles from source 'binance'"):
        await m.insert_candles_batch("KRW-BTC", "1m", upbit_candles(1), source="binance")


async def test_a_lone_bad_value_names_its_column(started: Any) -> None:
    bad = await started.queue_operation("kv", "INSERT", [{"k": 9, "v": {"a": 1}}],
                                        Priority.CRITICAL)
    with pytest.raises(OperationFailed, match=r"parameter 2: type 'dict' is not supported "
                                              r"\(column 'v'\)"):
        await started.wait(bad)


async def test_a_row_list_changed_after_queueing_fails_by_name(started: Any,
                                                               db_path: Path) -> None:
    buffer = [{"k": 20 + i, "v": "x"} for i in range(3)]
    reused = await started.queue_operation("kv", "INSERT", buffer, Priority.LOW)
    buffer.clear()  # a producer reusing its list before the batch is written
    other = await good_write(started, 30)
    await started.flush()
    with pytest.raises(OperationFailed, match=r"row list of operation .* changed after it "
                                              r"was queued \(3 rows queued, 0 now\)"):
        await started.wait(reused)
    assert (await started.wait(other)).succeeded
    assert rows_of(db_path, "SELECT k FROM kv ORDER BY k") == [(30,)]
