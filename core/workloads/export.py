"""Reading a table out of the database: ``batchdb export`` (Parquet or CSV, streamed in
chunks) and the output formats of ``batchdb query``.

An export never holds more than one chunk of rows: the rows come from the backend's
``read_chunks`` (a SQLite reader's cursor, a DuckDB cursor of its own, a PostgreSQL result
sent in chunks by libpq) and each chunk is written before the next is read, to Parquet
through pyarrow's ``ParquetWriter`` (one row group per chunk) or to CSV through the csv
module. The file is written under a temporary name beside the target and renamed when it
is complete, so a failed or interrupted export leaves no half file under the name asked for.

The Arrow schema of a Parquet file is fixed before the first row is written, from the
column types the database declares (``INTEGER``/``BIGINT`` → int64, ``REAL``/``DOUBLE`` →
float64, ``TEXT``/``VARCHAR`` → string, ``BLOB``/``BYTEA`` → binary, ``BOOLEAN``, ``DATE``,
``TIMESTAMP`` [``WITH TIME ZONE``: UTC]); a column of another type, or whose values do not
fit its declared type in the first chunk (SQLite keeps any value in a non-STRICT table), gets
the type pyarrow infers from the first chunk's values. The ``ts`` column of ``candles`` is
epoch milliseconds (int64), as stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import difflib
import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from ..models import BatchDBError
from ..reads import epoch_ms, require_pyarrow, shape_rows
from ..schema import quote_ident

if TYPE_CHECKING:
    from ..manager import BatchDBManager

__all__ = ["DEFAULT_CHUNK_ROWS", "EXPORT_FORMATS", "ExportArgumentError", "ExportReport",
           "check_table", "export_format", "export_table", "run_query", "write_csv",
           "write_query"]

#: rows read and written at a time: a Parquet row group each
DEFAULT_CHUNK_ROWS = 65_536
EXPORT_FORMATS = {".parquet": "parquet", ".csv": "csv"}


class ExportArgumentError(BatchDBError, ValueError):
    """An export asked for something the table or the file name cannot give (an unknown
    table, a filter on a column the table lacks, a file type that is not supported)."""


@dataclass
class ExportReport:
    """What an export wrote."""

    table: str
    path: Path
    format: str
    rows: int
    seconds: float
    bytes: int

    @property
    def rows_per_second(self) -> float:
        """Rows written per second of the whole export (reading, converting, writing)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def export_format(path: Path) -> str:
    """``parquet`` or ``csv``, from the file's extension (a usage error otherwise)."""
    fmt = EXPORT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ExportArgumentError(
            f"{path}: the file name must end in {' or '.join(EXPORT_FORMATS)} (it chooses the "
            "format)")
    return fmt


async def check_table(manager: BatchDBManager, table: str) -> str:
    """``table`` as the database lists it; an :class:`ExportArgumentError` naming the
    tables there (and the closest one) otherwise. A name reaches SQL only after this check,
    and quoted."""
    tables = await manager.list_tables()
    if table in tables:
        return table
    close = difflib.get_close_matches(table, tables, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(tables) if tables else "none yet"
    raise ExportArgumentError(f"no table {table!r} in the database{hint}; its tables: {listed}")


def _filters(table: str, columns: Sequence[str], market: str | None, timeframe: str | None,
             since: int | datetime | str | None, until: int | datetime | str | None
             ) -> tuple[list[str], dict[str, Any]]:
    """The WHERE conditions and named parameters of the filters given. A filter applies to
    the column of that meaning (``--market``: ``symbol``, as in candles, or ``market``;
    ``--timeframe``: ``timeframe``; ``--since``/``--until``: ``ts``, epoch ms); a table
    without it cannot be filtered so, which is an error rather than a silent full export."""
    where: list[str] = []
    params: dict[str, Any] = {}
    have = ", ".join(columns)

    def column_for(option: str, candidates: tuple[str, ...]) -> str:
        for name in candidates:
            if name in columns:
                return name
        wanted = " or ".join(repr(c) for c in candidates)
        raise ExportArgumentError(f"{option} filters on a {wanted} column, and table "
                                  f"{table!r} has none (its columns: {have})")

    if market is not None:
        where.append(f"{quote_ident(column_for('--market', ('symbol', 'market')))} = :market")
        params["market"] = market
    if timeframe is not None:
        where.append(f"{quote_ident(column_for('--timeframe', ('timeframe',)))} = :timeframe")
        params["timeframe"] = timeframe
    for option, value, op, key in (("--since", since, ">=", "since"),
                                   ("--until", until, "<", "until")):
        if value is None:
            continue
        column = column_for(option, ("ts",))
        try:
            params[key] = epoch_ms(value, option)
        except ValueError as exc:
            raise ExportArgumentError(str(exc)) from None
        where.append(f"{quote_ident(column)} {op} :{key}")
    return where, params


# ---------------------------------------------------------------------- arrow types
_PARENS = re.compile(r"\([^)]*\)")


def _declared_arrow_type(pa: Any, declared: str | None) -> Any:
    """The Arrow type for a column the database declares as ``declared``; None when the
    type is not one of the plain ones (it is then inferred from the values)."""
    if not declared:
        return None
    name = " ".join(_PARENS.sub("", declared).lower().split())
    if name in ("integer", "int", "bigint", "int8", "int4", "int2", "smallint", "tinyint",
                "mediumint", "int64", "int32", "int16", "signed", "uinteger", "usmallint",
                "utinyint"):
        return pa.int64()
    if name in ("real", "double", "double precision", "float", "float8", "float4"):
        return pa.float64()
    if name in ("text", "varchar", "character varying", "char", "character", "bpchar",
                "string", "clob", "nvarchar", "nchar", "name"):
        return pa.string()
    if name in ("blob", "bytea", "binary", "varbinary"):
        return pa.binary()
    if name in ("boolean", "bool"):
        return pa.bool_()
    if name == "date":
        return pa.date32()
    if name in ("timestamp", "timestamp without time zone"):
        return pa.timestamp("us")
    if name in ("timestamp with time zone", "timestamptz"):
        return pa.timestamp("us", tz="UTC")
    return None


class _ArrowChunks:
    """Turns chunks of row tuples into Arrow record batches of one fixed schema."""

    def __init__(self, table: str, columns: Sequence[str], declared: dict[str, str]) -> None:
        self.pa = require_pyarrow("export to Parquet")
        self.table = table
        self.columns = list(columns)
        self.declared = declared
        self.schema: Any = None

    def _array(self, values: Sequence[Any], arrow_type: Any) -> Any:
        pa = self.pa
        try:
            return pa.array(values, type=arrow_type)
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            # a text column holding a UUID, a JSON value, an enum: its text (a number or
            # bytes in a text column stays an error)
            if not pa.types.is_string(arrow_type) or any(
                    isinstance(v, int | float | bytes) for v in values):
                raise
            return pa.array([v if v is None or isinstance(v, str) else str(v) for v in values],
                            type=arrow_type)

    def _first_schema(self, data: list[Sequence[Any]]) -> Any:
        pa = self.pa
        fields = []
        for i, name in enumerate(self.columns):
            wanted = _declared_arrow_type(pa, self.declared.get(name))
            arrow_type = None
            if wanted is not None:
                try:
                    self._array(data[i], wanted)
                    arrow_type = wanted
                except (TypeError, ValueError, OverflowError, pa.ArrowException):
                    arrow_type = None  # values of other types: go by the values
            if arrow_type is None:
                try:
                    inferred = pa.array(data[i]).type if data else pa.null()
                except (TypeError, ValueError, OverflowError, pa.ArrowException):
                    kinds = sorted({type(v).__name__ for v in data[i] if v is not None})
                    raise BatchDBError(
                        f"table {self.table!r}, column {name!r} holds values of several types "
                        f"({', '.join(kinds)}), which one Parquet column cannot: export to "
                        "CSV instead") from None
                arrow_type = pa.string() if pa.types.is_null(inferred) else inferred
            fields.append(pa.field(name, arrow_type))
        return pa.schema(fields)

    def batch(self, rows: list[tuple[Any, ...]]) -> Any:
        """``rows`` as a RecordBatch of the export's schema (fixed by the first chunk)."""
        pa = self.pa
        data: list[Sequence[Any]] = (list(zip(*rows, strict=True)) if rows
                                     else [() for _ in self.columns])
        if self.schema is None:
            self.schema = self._first_schema(data)
        arrays = []
        for i, field in enumerate(self.schema):
            try:
                arrays.append(self._array(data[i], field.type))
            except (TypeError, ValueError, OverflowError, pa.ArrowException) as exc:
                bad = _first_misfit(pa, data[i], field.type)
                raise BatchDBError(
                    f"table {self.table!r}, column {field.name!r}: the value {bad!r} does not "
                    f"fit the Parquet column's type {field.type} (declared "
                    f"{self.declared.get(field.name) or 'without a type'}; {exc}). SQLite "
                    "keeps values of any type in a table that is not STRICT: export to CSV, "
                    "or fix the value") from None
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _first_misfit(pa: Any, values: Sequence[Any], arrow_type: Any) -> Any:
    for value in values:
        try:
            pa.array([value], type=arrow_type)
        except Exception:
            return value
    return None


# ---------------------------------------------------------------------- writers
class _ParquetFile:
    def __init__(self, path: Path, converter: _ArrowChunks) -> None:
        self.path = path
        self.converter = converter
        self.writer: Any = None

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        batch = self.converter.batch(rows)
        if self.writer is None:
            import pyarrow.parquet as pq

            self.writer = pq.ParquetWriter(str(self.path), self.converter.schema)
        if batch.num_rows:  # an empty table: the schema alone, no empty row group
            self.writer.write_batch(batch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _CsvRows:
    """CSV to ``out``: a header row of ``columns``, then rows as they are written, values
    as an export writes them."""

    def __init__(self, out: TextIO, columns: Sequence[str]) -> None:
        self.writer = csv.writer(out, lineterminator="\n")
        self.writer.writerow(columns)

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        self.writer.writerows([[_csv_value(v) for v in row] for row in rows])

    def close(self) -> None:
        pass


class _CsvFile(_CsvRows):
    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.file = path.open("w", newline="", encoding="utf-8")
        super().__init__(self.file, columns)

    def close(self) -> None:
        self.file.close()


def _csv_value(value: Any) -> Any:
    """A value as CSV text: NULL empty, floats exact (``repr``), times in ISO 8601, bytes
    in hex; what pyarrow's and most readers' type inference read back as the same."""
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


# ---------------------------------------------------------------------- export
async def export_table(
    manager: BatchDBManager, table: str, path: Path, *,
    market: str | None = None, timeframe: str | None = None,
    since: int | datetime | str | None = None, until: int | datetime | str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    on_total: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write ``table`` (optionally filtered) to ``path``: Parquet or CSV by its extension.

    ``on_total(rows)`` is called once with the number of rows to export (a ``COUNT(*)`` of
    the same filter), ``on_rows(n)`` after each chunk written. The manager must be
    started. Rows come in the order the database reads them (for ``candles`` on SQLite,
    primary-key order).
    """
    fmt = export_format(path)
    if fmt == "parquet":
        require_pyarrow("export to Parquet")  # before anything runs
    if not path.parent.is_dir():
        raise ExportArgumentError(f"{path}: the directory {path.parent} does not exist")
    name = await check_table(manager, table)
    info = await manager.backend.describe_table(name)
    if info is None:  # dropped since it was listed
        raise ExportArgumentError(f"no table {table!r} in the database")
    where, params = _filters(name, info.columns, market, timeframe, since, until)
    source = quote_ident(name) + (" WHERE " + " AND ".join(where) if where else "")
    select = ", ".join(quote_ident(c) for c in info.columns)
    start = time.perf_counter()
    if on_total is not None:
        counted = await manager.fetch(f"SELECT COUNT(*) FROM {source}", params)  # noqa: S608
        on_total(int(counted[0][0]))
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer: _ParquetFile | _CsvFile
    if fmt == "parquet":
        writer = _ParquetFile(partial, _ArrowChunks(name, info.columns, dict(info.types)))
    else:
        writer = _CsvFile(partial, info.columns)
    rows = 0
    try:
        chunks = manager.fetch_chunks(f"SELECT {select} FROM {source}",  # noqa: S608
                                      params, chunk_rows=chunk_rows)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                # converting and writing a chunk takes milliseconds: off the event loop,
                # so a manager writing meanwhile keeps its latency
                await asyncio.to_thread(writer.write, chunk.rows)
                rows += len(chunk.rows)
                if on_rows is not None:
                    on_rows(len(chunk.rows))
        await asyncio.to_thread(writer.close)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return ExportReport(table=name, path=path, format=fmt, rows=rows,
                        seconds=time.perf_counter() - start, bytes=path.stat().st_size)


# ---------------------------------------------------------------------- query
async def run_query(manager: BatchDBManager, sql: str
                    ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """The column names and rows of a read-only ``sql`` (``batchdb query``); a statement
    that would write is refused with ``ReadOnlyFetchError`` and changes nothing."""
    columns: tuple[str, ...] = ()
    rows: list[tuple[Any, ...]] = []
    chunks = manager.fetch_chunks(sql)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            columns = chunk.columns
            rows.extend(chunk.rows)
    return columns, rows


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)  # JSON has no NaN or infinity
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def write_csv(out: TextIO, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """CSV with a header row to ``out``, values written as an export writes them."""
    _CsvRows(out, columns).write(rows)


class _JsonArray:
    """A JSON array of objects to ``out``, rows written as they come, laid out as
    ``json.dumps(rows, indent=1)`` lays out the whole list."""

    def __init__(self, out: TextIO, columns: Sequence[str]) -> None:
        self.out = out
        self.columns = columns
        self.empty = True
        out.write("[")

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        for row in shape_rows(self.columns, [tuple(r) for r in rows], "dicts"):
            text = json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False,
                              indent=1)
            self.out.write(("\n" if self.empty else ",\n") + textwrap.indent(text, " "))
            self.empty = False

    def close(self) -> None:
        self.out.write("]\n" if self.empty else "\n]\n")


async def write_query(manager: BatchDBManager, sql: str, out: TextIO,
                      fmt: Literal["csv", "json"], chunk_rows: int = DEFAULT_CHUNK_ROWS
                      ) -> int:
    """Write the rows of a read-only ``sql`` to ``out`` as CSV (a header row, values as an
    export writes them) or as a JSON array of objects keyed by column name (a repeated name
    gets ``_2``, ``_3``; times in ISO 8601, decimals as strings, bytes in hex), chunk by
    chunk as the database produces them, so memory stays flat whatever the result's size.
    Returns the number of rows. A statement that would write is refused with
    ``ReadOnlyFetchError`` before anything is written."""
    kind = _CsvRows if fmt == "csv" else _JsonArray
    chunks = manager.fetch_chunks(sql, chunk_rows=chunk_rows)
    writer: _CsvRows | _JsonArray | None = None
    n = 0
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if writer is None:  # nothing is written before the database answered
                writer = kind(out, chunk.columns)
            writer.write(chunk.rows)
            n += len(chunk.rows)
    (writer or kind(out, ())).close()
    return n
