"""SQLite checks values against the declared column types of ordinary (non-STRICT) tables,
as a STRICT table, DuckDB and PostgreSQL do (the cross-backend cases are in
tests/conformance/test_everyday_path.py); ``[sqlite] check_types = false`` turns it off."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from batchdb import OperationFailed
from batchdb.backends.sqlite.types import affinity
from tests.conftest import ManagerFactory, make_table, rows_of

TABLE = ("CREATE TABLE t (k INTEGER PRIMARY KEY, r REAL, n NUMERIC, d DECIMAL(10, 2), "
         "s VARCHAR(10), b BLOB, any_value, at DATETIME, flag BOOLEAN)")


@pytest.mark.parametrize(("declared", "expected"), [
    ("INTEGER", "INTEGER"), ("BIGINT", "INTEGER"), ("TINYINT", "INTEGER"),
    ("VARCHAR(10)", "TEXT"), ("NCHAR", "TEXT"), ("CLOB", "TEXT"), ("text", "TEXT"),
    ("BLOB", "BLOB"), ("", "BLOB"), ("REAL", "REAL"), ("DOUBLE PRECISION", "REAL"),
    ("FLOAT", "REAL"), ("NUMERIC", "NUMERIC"), ("DECIMAL(10,5)", "NUMERIC"),
    ("BOOLEAN", "NUMERIC"), ("DATETIME", "NUMERIC"),
    ("FLOATING POINT", "INTEGER"),  # SQLite's own example: "INT" comes first
])
def test_affinity_follows_sqlites_rules(declared: str, expected: str) -> None:
    assert affinity(declared) == expected


async def outcome(make_manager: ManagerFactory, row: dict[str, Any],
                  **settings: Any) -> str | None:
    """The error of one INSERT of ``row`` into ``t`` (None: committed)."""
    manager = make_manager(**settings)
    await manager.start()
    try:
        await manager.wait(await manager.queue_operation("t", "INSERT", [row]))
    except OperationFailed as exc:
        return str(exc)
    finally:
        await manager.stop()
    return None


@pytest.mark.parametrize(("column", "value"), [
    ("r", "not-a-number"), ("r", b"\x01"), ("r", "0x10"), ("r", "1_000"), ("r", "inf"),
    ("n", "abc"), ("d", "12,5"), ("k", "seven"), ("s", b"bytes"), ("b", 5), ("b", 2.5),
    ("r", dt.date(2024, 1, 2)),  # sqlite3 adapts a date to its ISO text
])
async def test_a_value_that_does_not_fit_its_column_fails_naming_column_and_row(
        db_path: Path, make_manager: ManagerFactory, column: str, value: Any) -> None:
    make_table(db_path, TABLE)
    error = await outcome(make_manager, {"k": 1, column: value})
    assert error is not None
    assert f"ColumnTypeError: table 't' column {column!r}" in error and "row 0" in error
    assert "check_types = false" in error
    assert rows_of(db_path, "SELECT count(*) FROM t") == [(0,)]


@pytest.mark.parametrize(("column", "value", "stored"), [
    ("r", "1.5", (1.5, "real")), ("r", " -2e3 ", (-2000.0, "real")), ("r", ".5", (0.5, "real")),
    ("r", True, (1.0, "real")), ("n", "12", (12, "integer")), ("d", 3.25, (3.25, "real")),
    ("k", "7", (7, "integer")), ("s", 42, ("42", "text")), ("b", b"\x00", (b"\x00", "blob")),
    ("b", "text", ("text", "text")), ("any_value", "x", ("x", "text")),
    ("any_value", b"y", (b"y", "blob")), ("at", "2024-01-02 03:04:05",
                                          ("2024-01-02 03:04:05", "text")),
    ("flag", "true", ("true", "text")), ("r", None, (None, "null")),
])
async def test_values_the_column_takes_are_stored(db_path: Path, make_manager: ManagerFactory,
                                                  column: str, value: Any,
                                                  stored: tuple[Any, str]) -> None:
    make_table(db_path, TABLE)
    key = 7 if column == "k" else 1
    assert await outcome(make_manager, {"k": key, column: value} if column != "k"
                         else {"k": value}) is None
    assert rows_of(db_path, f"SELECT {column}, typeof({column}) FROM t") == [stored]


async def test_check_types_false_keeps_sqlites_flexible_typing(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, TABLE)
    assert await outcome(make_manager, {"k": 1, "r": "not-a-number", "s": b"x"},
                         sqlite={"check_types": False}) is None
    assert rows_of(db_path, "SELECT r, typeof(r), typeof(s) FROM t") == [
        ("not-a-number", "text", "blob")]


async def test_a_strict_table_is_left_to_sqlite(db_path: Path,
                                                make_manager: ManagerFactory) -> None:
    make_table(db_path, "CREATE TABLE t (k INTEGER PRIMARY KEY, r REAL) STRICT")
    error = await outcome(make_manager, {"k": 1, "r": "not-a-number"})
    assert error is not None and "cannot store TEXT value in REAL column t.r" in error


async def test_one_bad_row_among_coalesced_one_row_writes_fails_alone(
        db_path: Path, make_manager: ManagerFactory) -> None:
    make_table(db_path, TABLE)
    manager = make_manager(batch={"linger_seconds": {"NORMAL": 0.2}})
    await manager.start()
    ids = [await manager.queue_operation("t", "INSERT", [{"k": i, "r": float(i)}])
           for i in range(50)]
    bad = await manager.queue_operation("t", "INSERT", [{"k": 50, "r": "oops"}])
    ids += [await manager.queue_operation("t", "INSERT", [{"k": i, "r": float(i)}])
            for i in range(51, 100)]
    with pytest.raises(OperationFailed, match=r"column 'r' \(REAL\), row 0: the text 'oops'"):
        await manager.wait(bad)
    for op_id in ids:
        await manager.wait(op_id)
    await manager.stop()
    assert rows_of(db_path, "SELECT count(*), sum(r) FROM t") == [(99, 4950.0 - 50)]
