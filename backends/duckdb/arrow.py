"""Batches → Arrow tables for DuckDB: one typed column at a time, keys deduplicated.

pyarrow is imported by the caller (the backend imports it lazily) and handed in, so this
module imports without the ``duckdb`` extra installed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from batchdb.models import BatchOperation
from batchdb.schema import TableInfo

__all__ = ["ArrowConverter", "ConversionError", "arrow_type"]


class ConversionError(ValueError):
    """A value cannot be stored in its column; the message names the table and column."""


_INTEGERS = {
    "TINYINT": "int8", "INT1": "int8",
    "SMALLINT": "int16", "INT2": "int16", "SHORT": "int16",
    "INTEGER": "int32", "INT4": "int32", "INT": "int32", "SIGNED": "int32",
    "BIGINT": "int64", "INT8": "int64", "LONG": "int64",
    "UTINYINT": "uint8", "USMALLINT": "uint16", "UINTEGER": "uint32", "UBIGINT": "uint64",
}
_SIMPLE = {
    "DOUBLE": "float64", "FLOAT8": "float64", "DOUBLE PRECISION": "float64",
    "FLOAT": "float32", "FLOAT4": "float32", "REAL": "float32",
    "VARCHAR": "string", "TEXT": "string", "STRING": "string", "CHAR": "string",
    "BPCHAR": "string", "UUID": "string",
    "BOOLEAN": "bool_", "BOOL": "bool_", "LOGICAL": "bool_",
    "BLOB": "binary", "BYTEA": "binary", "BINARY": "binary", "VARBINARY": "binary",
    "DATE": "date32",
}
_TIMESTAMPS = {
    "TIMESTAMP": ("us", None), "DATETIME": ("us", None), "TIMESTAMP_US": ("us", None),
    "TIMESTAMP_MS": ("ms", None), "TIMESTAMP_S": ("s", None), "TIMESTAMP_NS": ("ns", None),
    "TIMESTAMP WITH TIME ZONE": ("us", "UTC"), "TIMESTAMPTZ": ("us", "UTC"),
}
_DECIMAL = re.compile(r"(?:DECIMAL|NUMERIC)\((\d+),\s*(\d+)\)")


def arrow_type(pa: Any, duck_type: str) -> Any:
    """The Arrow type that DuckDB reads as ``duck_type`` without a cast, or None if there is
    no exact one (nested, interval, enum, …: the values' own Arrow type is used then and
    DuckDB casts it while inserting)."""
    name = duck_type.strip().upper()
    if name in _INTEGERS:
        return getattr(pa, _INTEGERS[name])()
    if name in _SIMPLE:
        return getattr(pa, _SIMPLE[name])()
    if name in _TIMESTAMPS:
        unit, tz = _TIMESTAMPS[name]
        return pa.timestamp(unit, tz=tz)
    if name in ("TIME", "TIME WITHOUT TIME ZONE"):
        return pa.time64("us")
    match = _DECIMAL.fullmatch(name)
    if match:
        precision, scale = int(match.group(1)), int(match.group(2))
        return pa.decimal128(precision, scale) if precision <= 38 else None
    if name in ("HUGEINT", "INT128"):
        return pa.decimal128(38, 0)
    return None


class ArrowConverter:
    """Builds the Arrow table of one batch for one (table, columns) shape.

    Columns are named ``c0``, ``c1``… by position, so no user-given name needs to be a
    valid Arrow or SQL name here: the statement refers to them positionally.
    """

    def __init__(self, pa: Any, table: TableInfo, columns: tuple[str, ...],
                 key: tuple[str, ...]) -> None:
        self.pa = pa
        self.table = table
        self.columns = columns
        self.names = [f"c{i}" for i in range(len(columns))]
        self.types = [arrow_type(pa, table.types.get(c, "")) for c in columns]
        self.key_names = [self.names[columns.index(k)] for k in key]

    def column(self, values: Sequence[Any], index: int) -> Any:
        """One Arrow array for column ``index``: exact type when the values allow it,
        otherwise their own type for DuckDB to cast; a lossy conversion is an error."""
        pa = self.pa
        target = self.types[index]
        if target is not None and not pa.types.is_integer(target) and \
                not pa.types.is_decimal(target):
            try:
                return pa.array(values, type=target)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                pass  # not that type as given (e.g. UUID objects, numbers as text)
        try:
            arr = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            exact = self._exact(values, target)
            arr = exact if exact is not None else self._stringified(values, exc, index)
        if pa.types.is_floating(arr.type) and target is not None and arr.type != target:
            self._check_not_null([arr if i == index else None
                                  for i in range(len(self.columns))], nan_only=True,
                                 only=index)  # before a cast turns NaN into 'nan' text
        if target is None or arr.type == target:
            return arr
        if pa.types.is_null(arr.type):
            return pa.nulls(len(arr), type=target)
        if pa.types.is_floating(arr.type) and pa.types.is_integer(target):
            try:
                return arr.cast(target)  # safe cast: a fraction is an error, never truncated
            except pa.ArrowException:
                raise self._error(index, f"{_first_fraction(values)!r} is not an "
                                         "integer") from None
        try:
            return arr.cast(target)  # safe cast: overflow raises instead of wrapping
        except (pa.ArrowException, NotImplementedError):
            return arr  # DuckDB casts it while inserting (and names the value if it cannot)

    def _exact(self, values: Sequence[Any], target: Any) -> Any:
        """Integers past int64 (UBIGINT, HUGEINT) convert only with their exact type."""
        pa = self.pa
        if target is None or not (pa.types.is_integer(target) or pa.types.is_decimal(target)):
            return None
        if any(isinstance(v, float) for v in values):
            return None  # never let Arrow truncate a fraction
        try:
            return pa.array(values, type=target)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return None

    def _stringified(self, values: Sequence[Any], exc: BaseException, index: int) -> Any:
        if all(v is None or isinstance(v, str | uuid.UUID) for v in values):
            return self.pa.array([None if v is None else str(v) for v in values],
                                 type=self.pa.string())
        target = self.types[index]
        pa = self.pa
        if (target is not None and (pa.types.is_integer(target) or pa.types.is_floating(target)
                                    or pa.types.is_string(target)
                                    or pa.types.is_large_string(target))
                and all(v is None or isinstance(v, str | int | float) for v in values)):
            # numbers and text in one column (as SQLite and PostgreSQL take them): all as
            # text, for DuckDB to cast to a number column (repr keeps a float exact)
            as_text = pa.types.is_string(target) or pa.types.is_large_string(target)
            return pa.array([_number_text(v, as_text) for v in values], type=pa.string())
        raise self._error(index, _short(exc)) from None

    def _error(self, index: int, detail: str) -> ConversionError:
        column = self.columns[index]
        kind = self.table.types.get(column, "?")
        return ConversionError(
            f"table {self.table.name!r} column {column!r} ({kind}): {detail}")

    def columns_of(self, operations: Sequence[BatchOperation]) -> list[list[Any]]:
        """The values of all rows of ``operations``, one list per column, in order.

        Producers' dict rows are read column by column straight into these lists, never
        as one tuple per row: per-row tuples would cost as much again in allocation and in
        the garbage collector's passes over them as building the Arrow arrays does.
        Consecutive operations whose rows have the same keys (many one-row writes
        coalesced) are read in one pass.
        """
        width = len(self.columns)
        columns: list[list[Any]] = [[] for _ in range(width)]
        i, n = 0, len(operations)
        while i < n:
            op = operations[i]
            if op.values is not None:
                self._extend_tuples(columns, op.values)
                i += 1
                continue
            j = i + 1
            while (j < n and operations[j].values is None
                   and operations[j].row_columns == op.row_columns):
                j += 1
            run = operations[i:j]
            rows = op.data_rows if j == i + 1 else [r for o in run for r in o.data_rows]
            keys = len(op.row_columns) or len(op.columns)
            try:
                if all(map(keys.__eq__, map(len, rows))):
                    for column, name in zip(columns, op.columns, strict=True):
                        column.extend(map(itemgetter(name), rows))
                    i = j
                    continue
            except (KeyError, TypeError, IndexError):
                pass
            for o in run:
                o.tuples()  # raises the SchemaError naming the malformed operation and row
            raise ConversionError(f"rows for table {self.table.name!r} are malformed")
        return columns

    def _extend_tuples(self, columns: list[list[Any]], values: Sequence[Sequence[Any]]) -> None:
        if values and len(values[0]) != len(columns):
            raise self._width_error()
        try:
            for column, part in zip(columns, zip(*values, strict=True), strict=False):
                column.extend(part)
        except ValueError:
            raise self._width_error() from None

    def _width_error(self) -> ConversionError:
        return ConversionError(f"rows for table {self.table.name!r} must have "
                               f"{len(self.columns)} values each ({', '.join(self.columns)})")

    def table_of(self, operations: Sequence[BatchOperation]) -> Any:
        """The Arrow table of all rows of ``operations``, in submission order."""
        columns = self.columns_of(operations)
        arrays = [self.column(values, i) for i, values in enumerate(columns)]
        self._check_not_null(arrays, nan_only=True)
        return self.pa.Table.from_arrays(arrays, names=self.names)

    def _check_not_null(self, arrays: Sequence[Any], *, nan_only: bool,
                        only: int | None = None) -> None:
        """Refuse NULL (with ``nan_only``: NaN) in a NOT NULL column, naming it.

        NaN: SQLite stores NaN as NULL, so the same write must fail on every backend, not
        commit here and fail there. NULL: checked before rows are dropped by the last-wins
        key dedup, which would otherwise hide a bad row behind a later one with its key.
        """
        import pyarrow.compute as pc

        for i, column in enumerate(self.columns):
            if column not in self.table.not_null or (only is not None and i != only):
                continue
            arr = arrays[i]
            if nan_only:
                bad = (self.pa.types.is_floating(arr.type)
                       and bool(pc.any(pc.is_nan(arr)).as_py()))
                what = "NaN (batchdb treats NaN as NULL on every backend, as SQLite does)"
            else:
                bad = arr.null_count > 0
                what = "NULL"
            if bad:
                raise ConversionError(f"NOT NULL constraint failed: {self.table.name}."
                                      f"{column}: {what}")

    def keep_last(self, data: Any) -> Any:
        """``data`` with one row per key: the last one in submission order."""
        n = data.num_rows
        if n < 2 or not self.key_names:
            return data
        import pyarrow.compute as pc

        pa = self.pa
        for name in self.key_names:  # one unique key column makes the whole key unique
            if pc.count_distinct(data.column(name), mode="all").as_py() == n:
                return data
        index = pa.array(np.arange(n, dtype=np.int64))
        keys = pa.Table.from_arrays([data.column(k) for k in self.key_names] + [index],
                                    names=[*self.key_names, "__row"])
        last = keys.group_by(self.key_names, use_threads=False).aggregate([("__row", "max")])
        if last.num_rows == n:
            return data
        # rows are about to be dropped: a bad one must still fail its operation
        self._check_not_null(data.columns, nan_only=False)
        rows = last.column("__row_max").combine_chunks()
        return data.take(rows.take(pc.sort_indices(rows)))

def _number_text(value: Any, as_text: bool) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):  # as DuckDB takes a lone bool in a text / number column
        return str(value).lower() if as_text else str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _first_fraction(values: Sequence[Any]) -> Any:
    for v in values:
        if isinstance(v, float) and not v.is_integer():
            return v
    return next((v for v in values if isinstance(v, float)), None)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
