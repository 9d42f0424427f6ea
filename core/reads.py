"""``BatchDBManager.fetch`` is for reads: the error every backend raises for a statement
that would write (or lock, or end a transaction) instead of running it; named parameters
(``:name``) turned into each backend's positional form; results as tuples, dicts or Arrow."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine.default import DefaultDialect

from .models import BatchDBError

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["READ_SHAPES", "ReadChunk", "ReadOnlyFetchError", "ReadShape", "arrow_table",
           "bind_named", "candles_query", "epoch_ms", "fetch", "not_a_read", "positional",
           "require_pyarrow", "shape_rows"]


class ReadOnlyFetchError(BatchDBError):
    """``fetch()`` was given a statement that would change the database; nothing ran."""


def not_a_read(sql: str, detail: str) -> ReadOnlyFetchError:
    """The error for ``sql`` given to ``fetch()``; ``detail`` says what the database (or the
    check) reported."""
    text = " ".join(sql.split())
    if len(text) > 80:
        text = text[:77] + "..."
    return ReadOnlyFetchError(
        f"fetch() is for reads, and {text!r} is not one ({detail}); nothing was changed. "
        "Queue writes with queue_operation() (they are batched and committed in order), "
        "or run other statements on a connection of your own")


# ---------------------------------------------------------------------- named parameters
#: what ``fetch(..., as_=...)`` returns: tuples (the default, as before), one dict per row
#: keyed by column name, or a pyarrow Table
ReadShape = Literal["tuples", "dicts", "arrow"]
READ_SHAPES: tuple[str, ...] = ("tuples", "dicts", "arrow")

#: a DB-API paramstyle a backend's positional ``fetch`` takes: ``?`` or ``%s``
_DIALECTS = {"qmark": DefaultDialect(paramstyle="qmark"),
             "format": DefaultDialect(paramstyle="format")}


@functools.lru_cache(maxsize=256)
def _compiled(sql: str, paramstyle: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with its ``:name`` parameters compiled to ``paramstyle``, and the names in
    the order the positional values must come (a name used twice comes twice).

    SQLAlchemy's ``text()`` does the parsing, so the rules are its documented ones: ``:name``
    is a parameter unless the colon follows a word character or another colon (``x::int``,
    ``'12:30'`` are left alone), ``\\:name`` is a literal colon, and for ``%s`` backends the
    literal ``%`` of the text is doubled, as psycopg expects when parameters are passed. The
    compiler only depends on the paramstyle (the SQL itself is passed through as written), so
    a default dialect with the backend's paramstyle stands for the backend's own dialect,
    which for DuckDB SQLAlchemy does not even have.
    """
    clause = sa.text(sql)
    compiled = clause.compile(dialect=_DIALECTS[paramstyle])
    if not compiled.binds:  # no parameter: nothing to escape (no %% for psycopg)
        return str(clause.compile(dialect=_DIALECTS["qmark"])), ()
    return compiled.string, tuple(compiled.positiontup or ())


def bind_named(sql: str, params: Mapping[str, Any], paramstyle: str
               ) -> tuple[str, tuple[Any, ...]]:
    """``sql`` written with ``:name`` parameters, and ``params`` by name, turned into the
    positional form (``?`` or ``%s``) a backend's ``fetch`` takes; the same SQL and the same
    parameters therefore work on every backend.

    A parameter the SQL uses but ``params`` lacks, or one given but unused (a misspelt name),
    is a ``ValueError`` naming it; nothing runs.
    """
    if paramstyle not in _DIALECTS:
        raise ValueError(f"paramstyle must be one of {', '.join(_DIALECTS)}, got {paramstyle!r}")
    text, names = _compiled(sql, paramstyle)
    missing = sorted({n for n in names if n not in params})
    unused = sorted(set(params) - set(names))
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"no value for :{', :'.join(missing)}")
        if unused:
            parts.append(f"{', '.join(map(repr, unused))} given but not in the SQL as "
                         f":{', :'.join(unused)}")
        used = f":{', :'.join(dict.fromkeys(names))}" if names else "none"
        raise ValueError(f"fetch() parameters: {'; '.join(parts)} (the SQL's parameters: "
                         f"{used}; write \\: for a literal colon before a word)")
    return text, tuple(params[n] for n in names)


# ---------------------------------------------------------------------- results
class ReadChunk(NamedTuple):
    """Rows of a result read in chunks (``Backend.read_chunks``), with its column names."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


def require_pyarrow(what: str) -> Any:
    """The ``pyarrow`` module, or a clear error naming the extra that installs it."""
    try:
        import pyarrow
    except ImportError:
        raise BatchDBError(f"{what} needs pyarrow: pip install 'batchdb[arrow]'") from None
    return pyarrow


def arrow_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A pyarrow Table of ``rows``, each column's type inferred from all its values."""
    pa = require_pyarrow("fetch(..., as_='arrow')")
    names = _unique_names(columns)
    arrays = [pa.array([row[i] for row in rows]) for i in range(len(names))]
    return pa.Table.from_arrays(arrays, names=names)


def shape_rows(columns: Sequence[str], rows: list[tuple[Any, ...]], as_: str) -> Any:
    """``rows`` as ``fetch(..., as_=...)`` returns them."""
    if as_ == "tuples":
        return rows
    if as_ == "dicts":
        names = _unique_names(columns)
        return [dict(zip(names, row, strict=True)) for row in rows]
    if as_ == "arrow":
        return arrow_table(columns, rows)
    raise ValueError(f"as_ must be one of {', '.join(READ_SHAPES)}, got {as_!r}")


def _unique_names(columns: Sequence[str]) -> list[str]:
    """Column names made unique (``SELECT a.id, b.id`` gives ``id`` and ``id_2``), so a dict
    row or an Arrow column never silently loses one of them."""
    names: list[str] = []
    taken: set[str] = set()
    for name in columns:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique)
        names.append(unique)
    return names


# ---------------------------------------------------------------------- the read path
#: rows per chunk when ``fetch(..., as_="dicts"|"arrow")`` collects a result
FETCH_CHUNK_ROWS = 10_000


def positional(sql: str, params: Mapping[str, Any] | Sequence[Any] | None,
               paramstyle: str) -> tuple[str, tuple[Any, ...]]:
    """``sql`` and ``params`` in the positional form a backend takes: a mapping is named
    parameters (:func:`bind_named`), a sequence the backend's own positional form (``?``;
    PostgreSQL turns ``?`` into ``%s`` when the SQL has no ``%s``), None no parameter."""
    if params is None:
        return sql, ()
    if isinstance(params, Mapping):
        return bind_named(sql, params, paramstyle)
    if isinstance(params, str | bytes | bytearray) or not isinstance(params, Sequence):
        raise TypeError("fetch() parameters are a mapping of :name parameters, or a tuple "
                        f"or list of positional ones; got {type(params).__name__}")
    return sql, tuple(params)


async def fetch(backend: Backend, sql: str,
                params: Mapping[str, Any] | Sequence[Any] | None, as_: str) -> Any:
    """``BatchDBManager.fetch``: tuples through the backend's ``fetch`` (the path every
    backend had before), dicts and Arrow through ``read_chunks``, which has the columns."""
    if as_ not in READ_SHAPES:
        raise ValueError(f"as_ must be one of {', '.join(READ_SHAPES)}, got {as_!r}")
    if as_ == "arrow":
        require_pyarrow("fetch(..., as_='arrow')")  # before the query runs
    query, values = positional(sql, params, backend.paramstyle)
    if as_ == "tuples":
        return await backend.fetch(query, values)
    columns: tuple[str, ...] = ()
    rows: list[tuple[Any, ...]] = []
    async with contextlib.aclosing(backend.read_chunks(query, values, FETCH_CHUNK_ROWS)) as it:
        async for chunk in it:
            columns = chunk.columns
            rows.extend(chunk.rows)
    return shape_rows(columns, rows, as_)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(value: int | datetime | str, what: str = "time") -> int:
    """A point in time as epoch milliseconds UTC, the unit of ``candles.ts``: an int is
    taken as epoch ms already; a datetime without a time zone is taken as UTC (like
    Upbit's ``candle_date_time_utc``); a string is epoch ms in digits or ISO 8601
    (``2024-01-02``, ``2024-01-02T09:00``, ``2024-01-02T09:00:00+09:00``, ``...Z``)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected epoch milliseconds, a datetime or an ISO 8601 "
                         f"string, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{what}: {value!r} is neither epoch milliseconds nor an ISO "
                             "8601 date or time (e.g. 2024-01-02 or 2024-01-02T09:00:00Z)"
                             ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return (value - _EPOCH) // timedelta(milliseconds=1)  # exact, no float
    raise ValueError(f"{what}: expected epoch milliseconds, a datetime or an ISO 8601 "
                     f"string, got {type(value).__name__}")


def candles_query(symbol: str, timeframe: str, start: int | datetime | str | None = None,
                  end: int | datetime | str | None = None) -> tuple[str, dict[str, Any]]:
    """The SQL and named parameters of ``read_candles``: one market and timeframe,
    ``start <= ts < end``, in time order. The WHERE fixes the primary key's first two
    columns and bounds the third, and ORDER BY follows it, so every backend can read the
    rows from the key's index in order with no sort (the plan tests check each one)."""
    params: dict[str, Any] = {"symbol": symbol, "timeframe": timeframe}
    sql = "SELECT * FROM candles WHERE symbol = :symbol AND timeframe = :timeframe"
    if start is not None:
        params["start"] = epoch_ms(start, "start")
        sql += " AND ts >= :start"
    if end is not None:
        params["end"] = epoch_ms(end, "end")
        sql += " AND ts < :end"
    return sql + " ORDER BY ts", params
