"""Values checked against the declared column types of ordinary (non-STRICT) SQLite tables.

SQLite stores a value of the wrong type without a word in an ordinary table: text
``"not-a-number"`` in a ``REAL`` column stays text, bytes in a ``TEXT`` column stay a BLOB.
DuckDB and PostgreSQL refuse the same operation. So that one operation has one outcome on
every backend, the writer thread checks each batch's values by the column's affinity, as
a STRICT table would, before SQLite sees them; an operation with a bad value fails alone
with an error naming the column and the row. ``[sqlite] check_types = false`` turns it off.

- INTEGER and REAL affinity (``INT``, ``BIGINT``, ``REAL``, ``DOUBLE``, ``FLOAT`` ...), and
  NUMERIC affinity declared as ``NUMERIC``, ``DECIMAL`` or ``NUMBER``: numbers (bool
  included), NULL, and text SQLite converts to a number (``"12"``, ``" 1.5e3 "``).
  Other NUMERIC-affinity types (``DATE``, ``DATETIME``, ``BOOLEAN`` ...) are left alone:
  text is what such columns usually hold in SQLite.
- TEXT affinity: anything but bytes (numbers become text, as in DuckDB and PostgreSQL).
- declared ``BLOB``: anything but numbers. A column without a type takes anything.

Cost: one C loop over each checked column per batch (``sum`` of a number column,
``"".join`` of a text column; the type of each value when those refuse, e.g. for NULLs),
a small cost per value; STRICT tables (the built-in ``candles``) are not checked, SQLite does.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

from batchdb.models import SchemaError
from batchdb.schema import TableInfo

__all__ = ["ColumnTypeError", "TypeChecks", "affinity", "check_values"]

_NONE = type(None)
_BYTES = (bytes, bytearray, memoryview)
# the types a column of each kind takes without looking at the value
_FAST = {
    "number": frozenset({int, float, bool, _NONE}),
    "text": frozenset({str, int, float, bool, _NONE}),
    "blob": frozenset({bytes, bytearray, memoryview, str, _NONE}),
}
_WANTED = {"number": "a number (or text that is one)", "text": "text (not bytes)",
           "blob": "bytes or text (not a number)"}
# text SQLite's numeric affinity turns into a number (sqlite3AtoF's well-formed literals)
_NUMBER_TEXT = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*\Z")
_NUMERIC_NAMES = ("NUMERIC", "DECIMAL", "NUMBER")


class ColumnTypeError(SchemaError):
    """A value that does not fit its column's declared type (the operation fails alone)."""


def affinity(declared: str) -> str:
    """SQLite's type affinity of a declared column type (the rules of section 3.1 of
    https://www.sqlite.org/datatype3.html, in their order)."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if "CHAR" in t or "CLOB" in t or "TEXT" in t:
        return "TEXT"
    if "BLOB" in t or not t.strip():
        return "BLOB"
    if "REAL" in t or "FLOA" in t or "DOUB" in t:
        return "REAL"
    return "NUMERIC"


def _kind(declared: str) -> str | None:
    """What a column of this declared type is checked for, or None (not checked)."""
    aff = affinity(declared)
    if aff in ("INTEGER", "REAL"):
        return "number"
    if aff == "NUMERIC":
        return "number" if any(n in declared.upper() for n in _NUMERIC_NAMES) else None
    if aff == "TEXT":
        return "text"
    return "blob" if declared.strip() else None


def _fits(kind: str, value: Any) -> bool:
    if not isinstance(value, str | int | float | bytes | bytearray | memoryview):
        adapter = sqlite3.adapters.get((type(value), sqlite3.PrepareProtocol))
        if adapter is None:
            return True  # sqlite3 cannot bind it and says so, naming the parameter
        value = adapter(value)  # what sqlite3 would store (a date as its ISO text, say)
        if not isinstance(value, str | int | float | bytes | bytearray | memoryview):
            return True
    if kind == "number":
        return (not isinstance(value, str | bytes | bytearray | memoryview)
                or (isinstance(value, str) and _NUMBER_TEXT.match(value) is not None))
    if kind == "text":
        return not isinstance(value, _BYTES)
    return not isinstance(value, int | float)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the text {shown!r}"
    if isinstance(value, _BYTES):
        return f"a {type(value).__name__} value of {len(value)} byte(s)"
    return f"{type(value).__name__} {value!r:.40}"


Check = tuple[int, str, str, str]  # (position in the batch's columns, column, kind, declared)


def check_values(checks: Sequence[Check], values: Sequence[Any], width: int,
                 table: str) -> None:
    """Raise a ColumnTypeError for the first value of ``values`` (rows of ``width`` values
    one after another) that does not fit its column."""
    for j, column, kind, declared in checks:
        part = values[j::width]
        # the usual case, at the cost of one C loop: sum() refuses text and bytes (and
        # NULL), join() anything but text; what they refuse is looked at by type
        if kind == "number":
            try:
                sum(part)
                continue
            except (TypeError, OverflowError):
                pass
        elif kind == "text":
            try:
                "".join(part)
                continue
            except TypeError:
                pass
        if _FAST[kind].issuperset(map(type, part)):
            continue
        for row, value in enumerate(part):
            if not _fits(kind, value):
                raise ColumnTypeError(
                    f"table {table!r} column {column!r} ({declared}), row {row}: "
                    f"{_describe(value)} does not fit; the column needs {_WANTED[kind]}. "
                    "SQLite would keep the value as it is in an ordinary (non-STRICT) "
                    "table; batchdb refuses it, as a STRICT table does ([sqlite] "
                    "check_types = false keeps SQLite's flexible typing)")


def check_rows(checks: Sequence[Check], rows: Sequence[Sequence[Any]], width: int,
               table: str) -> None:
    """:func:`check_values` for rows given as tuples."""
    if checks and rows:
        check_values(checks, list(chain.from_iterable(rows)), width, table)


class TypeChecks:
    """The checks of a (table, columns) in the writer thread, found once per table."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tables: dict[str, tuple[TableInfo, bool, dict[tuple[str, ...], list[Check]]]] = {}

    def of(self, conn: sqlite3.Connection, table: TableInfo,
           columns: tuple[str, ...]) -> list[Check]:
        """The checks for a batch writing ``columns`` of ``table`` (empty: nothing to do)."""
        if not self.enabled:
            return []
        entry = self._tables.get(table.name)
        if entry is None or entry[0] is not table:
            entry = self._tables[table.name] = (table, _is_strict(conn, table.name), {})
        _, strict, by_columns = entry
        if strict:
            return []
        checks = by_columns.get(columns)
        if checks is None:
            checks = by_columns[columns] = [
                (j, c, kind, table.types.get(c, "")) for j, c in enumerate(columns)
                if (kind := _kind(table.types.get(c, ""))) is not None]
        return checks


def _is_strict(conn: sqlite3.Connection, name: str) -> bool:
    """Whether SQLite checks the table's types itself (STRICT, SQLite 3.37+)."""
    try:
        row = conn.execute("SELECT strict FROM pragma_table_list WHERE schema = 'main' "
                           "AND name = ?", (name,)).fetchone()
    except sqlite3.Error:
        return False  # an SQLite without table_list has no STRICT tables either
    return bool(row and row[0])
