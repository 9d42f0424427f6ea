"""Promise 3: hostile input fails alone, with a clear error, and nothing else is lost.

A hypothesis property mixes good operations with hostile ones in the same flush window, at
mixed priorities, on four tables: a STRICT table, a non-STRICT table (SQLite type affinity),
a real table whose name and columns carry quotes, semicolons, comments and SQL keywords,
and the built-in STRICT ``candles`` table (also through ``insert_candles_batch``).

Hostile input: wrong types, NaN and ±infinity, integers past 64 bits, huge strings and
blobs (1 to 3 MB), unicode, NUL characters and lone surrogates, missing and extra columns,
rows that are not mappings, duplicated keys inside an operation and across operations,
hostile table and column names, bad operation types, priorities and row containers.

The expected outcome of every operation comes from a reference: the same operations
applied one by one, in submission order, each in its own savepoint, by plain ``sqlite3``
on a copy of the same database, with SQL written here. So the expected semantics are
SQLite's documented ones (NaN is stored as NULL: a NOT NULL column refuses it, a nullable
one gets NULL; a STRICT column refuses what it cannot convert losslessly; a non-STRICT
column applies type affinity), plus batchdb's type check of non-STRICT tables (``[sqlite]
check_types``): an operation is refused when SQLite would store one of its values with a
storage class its column's type does not take (text that is not a number in an INTEGER,
REAL or NUMERIC column, bytes in a TEXT column) — asked of SQLite itself, by storing the
value in a probe column of the same declared type. For each case:

- an operation the call must refuse raises ValueError/SchemaError naming the problem and
  queues nothing;
- an operation the reference refuses fails with OperationFailed carrying the database's
  own message (and, for a value that cannot be bound, the column's name); a malformed row
  is named by its index and its columns;
- every other operation commits, whatever else is in its batch;
- the database ends equal to the reference, table by table and row by row, and
  ``sqlite_master`` is unchanged: no table, index or row the caller did not ask for;
- no exception escapes the scheduler, and a final write commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchdb import (
    BatchDBManager,
    OperationFailed,
    OperationType,
    Priority,
    SchemaError,
)
from batchdb.plugins.upbit import normalize_upbit_candles

from . import hostile
from .hostile import (
    WEIRD,
    Op,
    Spec,
    assert_same_rows,
    check_outcomes,
    check_shape_message,
    final_write,
    q,
    shape_problem,
    submit,
)
from .reporting import record

DDL = f"""
CREATE TABLE s (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL, data BLOB,
                n INTEGER NOT NULL DEFAULT 0, anyv ANY) STRICT;
CREATE TABLE loose (k TEXT PRIMARY KEY, a, b INTEGER, c REAL NOT NULL, d TEXT, e NUMERIC);
CREATE TABLE "{WEIRD.replace('"', '""')}" ("sel""ect" INTEGER PRIMARY KEY,
    "-- c" TEXT NOT NULL, "x; y" REAL, "/* z */" TEXT, "DROP" INTEGER);
"""


SPECS: dict[str, Spec] = {
    "s": Spec("s", {"id": "INTEGER", "name": "TEXT", "score": "REAL", "data": "BLOB",
                    "n": "INTEGER", "anyv": "ANY"}, ("id",), ("id", "name"), rowid_key=True),
    "loose": Spec("loose", {"k": "TEXT", "a": "", "b": "INTEGER", "c": "REAL", "d": "TEXT",
                            "e": "NUMERIC"}, ("k",), ("k", "c")),
    WEIRD: Spec(WEIRD, {'sel"ect': "INTEGER", "-- c": "TEXT", "x; y": "REAL", "/* z */": "TEXT",
                        "DROP": "INTEGER"}, ('sel"ect',), ('sel"ect', "-- c"), rowid_key=True),
    "candles": Spec("candles", {"symbol": "TEXT", "timeframe": "TEXT", "ts": "INTEGER",
                                "open_price": "REAL", "high_price": "REAL", "low_price": "REAL",
                                "close_price": "REAL", "volume": "REAL", "quote_volume": "REAL",
                                "source": "TEXT", "ingested_at": "INTEGER"},
                    ("symbol", "timeframe", "ts"),
                    ("symbol", "timeframe", "ts", "open_price", "high_price", "low_price",
                     "close_price", "volume", "ingested_at")),
}


# ---------------------------------------------------------------------- the template
_LOOSE_TABLES = frozenset({"loose", WEIRD})  # not STRICT: batchdb checks their types


def _template_rows() -> dict[str, list[dict[str, Any]]]:
    return {
        "s": [{"id": i, "name": f"s{i}", "score": i / 2, "data": bytes([i]), "n": i,
               "anyv": i} for i in range(1, 6)],
        "loose": [{"k": f"k{i}", "a": i, "b": i, "c": float(i), "d": str(i), "e": i}
                  for i in range(1, 6)],
        WEIRD: [{'sel"ect': i, "-- c": f"w{i}", "x; y": i * 1.5, "/* z */": None, "DROP": i}
                for i in range(1, 6)],
        "candles": [{"symbol": "KRW-BTC", "timeframe": "1m", "ts": i * 60_000,
                     "open_price": 1.0, "high_price": 2.0, "low_price": 0.5,
                     "close_price": 1.5, "volume": 3.0, "quote_volume": 4.0, "source": "t",
                     "ingested_at": 0} for i in range(3)],
    }


TEMPLATE_ROWS = _template_rows()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with the four tables and a few rows; ``candles`` made by batchdb itself."""
    path = tmp_path_factory.mktemp("hostile") / "template.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(DDL)
    conn.close()

    async def create_candles() -> None:
        manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                               maintenance={"enabled": False})
        async with manager:
            await manager.table_info("candles")

    asyncio.run(create_candles())
    conn = sqlite3.connect(path)
    for table, rows in TEMPLATE_ROWS.items():
        cols = list(rows[0])
        conn.executemany(f"INSERT INTO {q(table)} ({', '.join(map(q, cols))}) VALUES "
                         f"({', '.join('?' * len(cols))})", [tuple(r.values()) for r in rows])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


# ---------------------------------------------------------------------- the model
def cases() -> st.SearchStrategy[list[Op]]:
    """Flush windows on the four SQLite tables (see ``hostile.cases``)."""
    return hostile.cases(SPECS, TEMPLATE_ROWS)


def _statement(spec: Spec, op_type: OperationType, columns: tuple[str, ...]) -> str:
    pos = {c: i + 1 for i, c in enumerate(columns)}
    if op_type in (OperationType.DELETE, OperationType.UPDATE):
        where = " AND ".join(f"{q(k)} = ?{pos[k]}" for k in spec.pk)
    if op_type is OperationType.DELETE:
        return f"DELETE FROM {q(spec.name)} WHERE {where}"
    values = [c for c in columns if c not in spec.pk]
    if op_type is OperationType.UPDATE:
        sets = ", ".join(f"{q(c)} = ?{pos[c]}" for c in values)
        return f"UPDATE {q(spec.name)} SET {sets} WHERE {where}"
    insert = (f"INSERT INTO {q(spec.name)} ({', '.join(map(q, columns))}) VALUES "
              f"({', '.join(f'?{i}' for i in range(1, len(columns) + 1))})")
    if op_type is OperationType.INSERT:
        return insert
    if not values:
        return f"{insert} ON CONFLICT ({', '.join(map(q, spec.pk))}) DO NOTHING"
    sets = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in values)
    return f"{insert} ON CONFLICT ({', '.join(map(q, spec.pk))}) DO UPDATE SET {sets}"


@dataclass
class Expected:
    """What the reference did with an operation that the call accepted."""

    ok: bool
    error: BaseException | None = None
    shape: tuple[int, str] | None = None  # malformed row: (index, what is wrong)
    columns: tuple[str, ...] = ()
    bad_row: int | None = None  # the first row the database refuses
    # values a non-STRICT column's type does not take: (row, column) pairs
    mistyped: frozenset[tuple[int, str]] = frozenset()


# the declared types of the non-STRICT tables, by what their values must be stored as
# (a column without a type takes anything)
_STORED_AS = {"INTEGER": ("integer", "real", "null"), "REAL": ("integer", "real", "null"),
              "NUMERIC": ("integer", "real", "null"),
              "TEXT": ("integer", "real", "text", "null")}
_PROBE = sqlite3.connect(":memory:", check_same_thread=False)
_PROBE.executescript("".join(f"CREATE TABLE probe_{t} (v {t});" for t in _STORED_AS))


def storage_class(declared: str, value: Any) -> str | None:
    """The storage class SQLite gives ``value`` in an ordinary column of type ``declared``
    (None: sqlite3 cannot bind it, and says so itself)."""
    try:
        _PROBE.execute(f"INSERT INTO probe_{declared} VALUES (?)", (value,))
    except (sqlite3.Error, OverflowError, UnicodeError):
        return None
    (kind,) = _PROBE.execute(f"SELECT typeof(v) FROM probe_{declared}").fetchone()
    _PROBE.execute(f"DELETE FROM probe_{declared}")
    return str(kind)


def mistyped(spec: Spec, columns: tuple[str, ...],
             tuples: list[tuple[Any, ...]]) -> frozenset[tuple[int, str]]:
    """The values of a non-STRICT table's rows stored with a class their column's type
    does not take, or that cannot be stored at all in a checked column."""
    if spec.name not in _LOOSE_TABLES:
        return frozenset()
    out = set()
    for j, column in enumerate(columns):
        declared = spec.types[column]
        if declared not in _STORED_AS:
            continue
        for i, row in enumerate(tuples):
            stored = storage_class(declared, row[j])
            if stored is None:
                if isinstance(row[j], str | bytes) and declared != "TEXT":
                    out.add((i, column))  # text batchdb refuses before binding it
            elif stored not in _STORED_AS[declared]:
                out.add((i, column))
    return frozenset(out)



def apply_reference(conn: sqlite3.Connection, op: Op) -> Expected:
    """Apply one accepted operation to the reference database, alone, in a savepoint."""
    spec = SPECS[op.table]
    op_type = OperationType.parse(op.op_type)
    if op.via == "candles":
        columns, tuples = normalize_upbit_candles(op.symbol, "1m", op.rows)
    else:
        problem = shape_problem(op.rows)
        if problem is not None:
            return Expected(False, shape=problem)
        row_columns = tuple(op.rows[0])
        columns = spec.pk if op_type is OperationType.DELETE else row_columns
        tuples = [tuple(row[c] for c in columns) for row in op.rows]
    if op_type is not OperationType.DELETE:
        wrong = mistyped(spec, tuple(columns), tuples)
        if any(storage_class(spec.types[c], tuples[i][tuple(columns).index(c)]) is not None
               for i, c in wrong):
            # batchdb refuses the operation before SQLite sees it
            return Expected(False, columns=tuple(columns), mistyped=wrong)
    else:
        wrong = frozenset()
    sql = _statement(spec, op_type, tuple(columns))
    conn.execute("SAVEPOINT ref")
    try:
        conn.executemany(sql, tuples)
    except Exception as exc:
        conn.execute("ROLLBACK TO ref")
        bad_row = None
        for i, row in enumerate(tuples):  # the first row that fails, applied one by one
            try:
                conn.execute(sql, row)
            except Exception:
                bad_row = i
                break
        conn.execute("ROLLBACK TO ref")
        conn.execute("RELEASE ref")
        return Expected(False, error=exc, columns=tuple(columns), bad_row=bad_row,
                        mistyped=wrong)
    conn.execute("RELEASE ref")
    return Expected(True)


def table_rows(conn: sqlite3.Connection) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every table's rows as a multiset (rowids left out; ``ingested_at`` too, which
    insert_candles_batch stamps with the time of the call)."""
    out = {}
    for spec in SPECS.values():
        cols = [c for c in spec.columns if c != "ingested_at"]
        out[spec.name] = Counter(conn.execute(
            f"SELECT {', '.join(map(q, cols))} FROM {q(spec.name)}").fetchall())
    return out


def schema(conn: sqlite3.Connection) -> set[tuple[Any, ...]]:
    """``sqlite_master`` as a set of (type, name, tbl_name, sql)."""
    return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


# ---------------------------------------------------------------------- the property
FIGURES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_hostile() -> Iterator[None]:
    yield
    if FIGURES["cases"]:
        record("hostile", {"hostile_cases_tried": FIGURES["cases"], **dict(FIGURES)})


_NAMED_PARAMETER = re.compile(r"parameter (\d+)")
# the database's message names no column: batchdb adds "(column 'c', row i)"
_NAMES_BY_BATCHDB = ("Python int too large to convert to SQLite INTEGER",
                     "surrogates not allowed", "datatype mismatch")


_MISTYPED = re.compile(r"ColumnTypeError: table .* column '(.*)' \(.*\), row (\d+): .* does "
                       r"not fit")


def _check_failure(op: Op, want: Expected, message: str) -> None:
    """The error of a failed operation names what was wrong."""
    if want.shape is not None:
        check_shape_message(op, want.shape, message)
        return
    refused = _MISTYPED.search(message)
    if refused is not None:  # batchdb's type check: a value the reference found mistyped
        where = (int(refused.group(2)), refused.group(1))
        assert where in want.mistyped, (where, want, message)
        return
    assert not want.mistyped or want.error is not None, (want, message)
    assert want.error is not None
    expected = str(want.error)
    assert expected in message, f"the database said {expected!r}, batchdb says {message!r}"
    match = _NAMED_PARAMETER.search(expected)
    if match:
        column = want.columns[int(match.group(1)) - 1]
        assert f"(column {column!r})" in message, message
    elif any(text in expected for text in _NAMES_BY_BATCHDB):
        assert re.search(rf"\(column '.*', row {want.bad_row}\)", message), (
            f"row {want.bad_row} is the first bad row: {message}")


async def run_case(path: Path, ops: list[Op], reference: sqlite3.Connection) -> None:
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    manager = BatchDBManager.from_settings(
        None, sqlite={"path": str(path)}, maintenance={"enabled": False},
        batch={"linger_seconds": {"CRITICAL": 0, "HIGH": 0.002, "NORMAL": 0.005,
                                  "LOW": 0.01}, "insert_batch_size": 6,
               "update_batch_size": 4})
    async with manager:
        before = schema(reference)
        accepted = await submit(manager, ops, SPECS, FIGURES)
        await manager.flush()
        await check_outcomes(manager, accepted, lambda op: apply_reference(reference, op),
                             _check_failure, FIGURES)
        await final_write(manager, accepted)
        reference.execute("INSERT OR REPLACE INTO s (id, name) VALUES (999999999, 'after')")
    assert not escaped, f"exceptions escaped to the event loop: {escaped}"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert schema(conn) == before, "sqlite_master changed"
        assert_same_rows(table_rows(conn), table_rows(reference))
    finally:
        conn.close()


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(ops=cases())
def test_hostile_operations_fail_alone(template: Path, ops: list[Op]) -> None:
    FIGURES["cases"] += 1
    with tempfile.TemporaryDirectory(prefix="batchdb-hostile-") as tmp:
        path = Path(tmp) / "db.sqlite3"
        shutil.copyfile(template, path)
        reference = sqlite3.connect(":memory:", isolation_level=None)
        source = sqlite3.connect(template)
        source.backup(reference)
        source.close()
        try:
            asyncio.run(run_case(path, ops, reference))
        finally:
            reference.close()


# ---------------------------------------------------------------------- found by the property
@pytest.mark.parametrize(("value", "fragment"), [
    (2**70, "too large"), ("\ud800", "surrogates"), ("abc", "datatype mismatch")])
async def test_every_value_error_names_its_column(template: Path, tmp_path: Path, value: Any,
                                                  fragment: str) -> None:
    """Regression (found by the property, fixed in 5c80c78): an int past 64 bits, a lone
    surrogate and SQLite's 'datatype mismatch' failed without naming the column."""
    path = tmp_path / "db.sqlite3"
    shutil.copyfile(template, path)
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                           maintenance={"enabled": False})
    async with manager:
        bad = await manager.queue_operation("s", "INSERT", [{"id": value, "name": "x"}])
        with pytest.raises(OperationFailed, match=fragment) as info:
            await manager.wait(bad)
    assert "'id'" in str(info.value), str(info.value)


async def test_keys_equal_in_sqlite_keep_submission_order(template: Path,
                                                          tmp_path: Path) -> None:
    """Regression (fixed in 5c80c78): '777' and 777 are one INTEGER PRIMARY KEY, but the
    scheduler compared keys with Python equality, so the later CRITICAL insert overtook the
    earlier LOW one."""
    path = tmp_path / "db.sqlite3"
    shutil.copyfile(template, path)
    manager = BatchDBManager.from_settings(
        None, sqlite={"path": str(path)}, maintenance={"enabled": False},
        batch={"linger_seconds": {"CRITICAL": 0, "LOW": 0.3}})
    async with manager:
        first = await manager.queue_operation("s", "INSERT", [{"id": "777", "name": "first"}],
                                              Priority.LOW)
        second = await manager.queue_operation("s", "INSERT", [{"id": 777, "name": "second"}],
                                               Priority.CRITICAL)
        await manager.flush()
        assert (await manager.wait(first)).succeeded
        with pytest.raises(OperationFailed, match="UNIQUE constraint failed: s.id"):
            await manager.wait(second)


KEY_TWINS = [
    pytest.param("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)", "nan", "nan", id="text-nan"),
    pytest.param("CREATE TABLE t (k TEXT PRIMARY KEY COLLATE NOCASE, v TEXT)", "krw-btc",
                 "KRW-BTC", id="nocase"),
    pytest.param("CREATE TABLE t (k TEXT PRIMARY KEY COLLATE RTRIM, v TEXT)", "krw-btc",
                 "krw-btc  ", id="rtrim"),
    pytest.param("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)", "7", 7, id="text-and-int"),
    pytest.param("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)", "7", 7.0,
                 id="integer-text-and-float"),
    pytest.param("CREATE TABLE t (k REAL PRIMARY KEY, v TEXT)", " 7.5", 7.5, id="real"),
]


@pytest.mark.parametrize(("rows", "where"), [
    pytest.param([{"id": 50, "name": "a"}, {"id": 9.3e18, "name": "b"}], "(column 'id', row 1)",
                 id="float-past-int64"),  # regression: was blamed on no column
    pytest.param([{"id": "12.0", "name": "a"}, {"id": "abc", "name": "b"}],
                 "(column 'id', row 1)", id="text-real-integer-blamed"),  # regression
    pytest.param([{"id": 50, "name": "a"}, {"id": 1.5, "name": "b"}], "(column 'id', row 1)",
                 id="fraction"),
])
async def test_datatype_mismatch_names_the_right_row(template: Path, tmp_path: Path,
                                                     rows: list[dict[str, Any]],
                                                     where: str) -> None:
    """SQLite says only 'datatype mismatch' for an INTEGER PRIMARY KEY; batchdb adds the
    column and the row, and they must be the right ones. Found by the property with a
    random seed."""
    path = tmp_path / "db.sqlite3"
    shutil.copyfile(template, path)
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                           maintenance={"enabled": False})
    async with manager:
        op_id = await manager.queue_operation("s", "INSERT", rows)
        with pytest.raises(OperationFailed, match="datatype mismatch") as info:
            await manager.wait(op_id)
    assert where in str(info.value), str(info.value)


@pytest.mark.parametrize(("ddl", "first", "second"), KEY_TWINS)
async def test_keys_the_database_finds_equal_keep_submission_order(
        tmp_path: Path, ddl: str, first: Any, second: Any) -> None:
    """Two inserts of what the database takes for one key, LOW then CRITICAL: the earlier
    one commits, the later one fails (the later submission wins across priorities).
    Regressions: the text key 'nan' (the scheduler's float canonicalisation made it unequal
    to itself) and keys equal under NOCASE/RTRIM collations overtook each other."""
    path = tmp_path / "twins.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(ddl)
    manager = BatchDBManager.from_settings(
        None, sqlite={"path": str(path)}, maintenance={"enabled": False},
        batch={"linger_seconds": {"CRITICAL": 0, "LOW": 0.3}})
    async with manager:
        earlier = await manager.queue_operation("t", "INSERT", [{"k": first, "v": "earlier"}],
                                                Priority.LOW)
        later = await manager.queue_operation("t", "INSERT", [{"k": second, "v": "later"}],
                                              Priority.CRITICAL)
        await manager.flush()
        assert (await manager.wait(earlier)).succeeded
        with pytest.raises(OperationFailed, match="UNIQUE constraint failed: t.k"):
            await manager.wait(later)


CANDLE_ROW = {"symbol": "KRW-BTC", "timeframe": "1m", "ts": 60_000, "open_price": 1.0,
              "high_price": 2.0, "low_price": 0.5, "close_price": 1.5, "volume": 3.0,
              "quote_volume": 4.0, "source": "t", "ingested_at": 0}


@pytest.mark.parametrize("backend", [
    "sqlite",
    "duckdb",
])
async def test_nan_in_a_not_null_column_fails_on_every_backend(tmp_path: Path,
                                                              backend: str) -> None:
    if backend == "duckdb":
        pytest.importorskip("duckdb")
    import sqlalchemy as sa

    manager = BatchDBManager.from_settings(
        None, backend=backend, maintenance={"enabled": False},
        **{backend: {"path": str(tmp_path / f"nan.{backend}")}})
    manager.declare_table(sa.Table("named", sa.MetaData(),
                                   sa.Column("k", sa.Integer, primary_key=True),
                                   sa.Column("name", sa.Text, nullable=False)))
    async with manager:
        good = await manager.queue_operation("candles", "UPSERT", [CANDLE_ROW])
        price = await manager.queue_operation(
            "candles", "UPSERT", [{**CANDLE_ROW, "ts": 120_000, "close_price": math.nan}])
        text = await manager.queue_operation("named", "INSERT", [{"k": 1, "name": math.nan}])
        await manager.flush()
        assert (await manager.wait(good)).succeeded
        with pytest.raises(OperationFailed, match=r"NOT NULL constraint failed.*close_price"):
            await manager.wait(price)
        with pytest.raises(OperationFailed, match=r"NOT NULL constraint failed.*name"):
            await manager.wait(text)
        assert await manager.fetch("SELECT COUNT(*) FROM candles") == [(1,)]


async def test_unhashable_table_name_is_a_schema_error(template: Path, tmp_path: Path) -> None:
    """Regression (fixed in 5c80c78): a list as table name raised a bare TypeError."""
    path = tmp_path / "db.sqlite3"
    shutil.copyfile(template, path)
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                           maintenance={"enabled": False})
    async with manager:
        with pytest.raises(SchemaError, match="table name must be a string"):
            await manager.queue_operation(["s"], "INSERT", [{"id": 1, "name": "x"}])  # type: ignore[arg-type]


def _candle(**changes: Any) -> dict[str, Any]:
    return {"market": "KRW-BTC", "candle_date_time_utc": "2024-01-01T00:01:00",
            "opening_price": 1.0, "high_price": 1.0, "low_price": 1.0, "trade_price": 1.0,
            "candle_acc_trade_price": 1.0, "candle_acc_trade_volume": 1.0, **changes}


NORMALISER_CASES = [
    pytest.param("market", {"a": 1}, r"candle 1", id="market-dict"),
    pytest.param("opening_price", [1, 2], r"candle 1: 'opening_price'", id="price-list"),
    pytest.param("opening_price", True, r"candle 1: 'opening_price' must be a number",
                 id="price-bool"),
    pytest.param("candle_date_time_utc", 12, r"candle 1: 'candle_date_time_utc' is not an ISO",
                 id="date-int"),
    pytest.param("candle_date_time_utc", "yesterday", r"candle 1: 'candle_date_time_utc' is "
                 "not an ISO", id="date-text"),
    pytest.param("trade_price", math.nan, r"candle 1: 'trade_price' must be a finite",
                 id="price-nan"),
    pytest.param("low_price", -math.inf, r"candle 1: 'low_price' must be a finite",
                 id="price-inf"),
    pytest.param("high_price", "12", r"candle 1: 'high_price' must be a number",
                 id="price-text"),
]


@pytest.mark.parametrize(("field_name", "value", "message"), NORMALISER_CASES)
async def test_normaliser_errors_name_the_candle(template: Path, tmp_path: Path,
                                                 field_name: str, value: Any,
                                                 message: str) -> None:
    """insert_candles_batch refuses a hostile candle at the call, naming it and its field,
    and queues nothing. Regressions (fixed in 5c80c78): an unhashable market raised a bare
    TypeError, a list price numpy's message, a bool price mixed with floats and an integer
    date were stored."""
    path = tmp_path / "db.sqlite3"
    shutil.copyfile(template, path)
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                           maintenance={"enabled": False})
    async with manager:
        with pytest.raises(ValueError, match=message):
            await manager.insert_candles_batch(
                "KRW-BTC", "1m", [_candle(), _candle(**{field_name: value})])
        assert (await manager.get_queue_status())["stats"]["total_operations"] == 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM candles").fetchone() == (3,)


# regression: the DuckDB backend's last-wins key dedup dropped a row that breaks a NOT NULL
# column unchecked when a later row of the same batch wrote the same key (and so did the
# PostgreSQL backend's, for UPDATE and for UPSERT: found by test_hostile_postgres.py)

@pytest.mark.parametrize("backend", [
    "sqlite", "duckdb", "postgres"])
@pytest.mark.parametrize("case", ["upsert-across-ops", "update-across-ops", "upsert-in-one-op"])
async def test_a_bad_row_fails_even_when_a_later_row_has_its_key(
        tmp_path: Path, backend: str, case: str, request: pytest.FixtureRequest) -> None:
    """A NULL in a NOT NULL column fails its operation, whatever comes after it in the
    batch. Found by comparing the DuckDB backend with SQLite on the same calls."""
    section: dict[str, Any] = {"path": str(tmp_path / f"dedup.{backend}")}
    if backend == "duckdb":
        pytest.importorskip("duckdb")
    elif backend == "postgres":
        section = {"dsn": request.getfixturevalue("pg_dsn")}
    import sqlalchemy as sa

    manager = BatchDBManager.from_settings(
        None, backend=backend, maintenance={"enabled": False}, **{backend: section})
    manager.declare_table(sa.Table("kv", sa.MetaData(),
                                   sa.Column("k", sa.Integer, primary_key=True),
                                   sa.Column("v", sa.Text, nullable=False)))
    async with manager:
        await manager.wait(await manager.queue_operation("kv", "INSERT", [{"k": 1, "v": "a"}]))
        kind = "UPDATE" if case.startswith("update") else "UPSERT"
        good = None
        if case == "upsert-in-one-op":
            bad = await manager.queue_operation("kv", kind, [{"k": 2, "v": None},
                                                             {"k": 2, "v": "later"}])
        else:
            bad = await manager.queue_operation("kv", kind, [{"k": 1, "v": None}], Priority.LOW)
            good = await manager.queue_operation("kv", kind, [{"k": 1, "v": "later"}],
                                                 Priority.LOW)
        await manager.flush()
        with pytest.raises(OperationFailed, match=r"NOT NULL constraint failed.*\bv\b|"
                                                  r'null value in column "v" of relation "kv"'):
            await manager.wait(bad)
        if good is not None:
            assert (await manager.wait(good)).succeeded
