"""Table descriptions and identifier safety (SQLAlchemy Core): what a backend knows of a
table (:class:`TableInfo`), the shared :data:`metadata` declared tables live in, and the
``epoch_ms_now`` server default. The built-in ``candles`` table is in :mod:`batchdb.candles`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable, SetColumnComment
from sqlalchemy.sql.compiler import SQLCompiler

from .models import SchemaError

__all__ = [
    "TableInfo",
    "check_identifier",
    "create_statements",
    "epoch_ms_now",
    "filled_columns",
    "metadata",
    "on_conflict_sql",
    "quote_ident",
]

metadata = sa.MetaData()


class epoch_ms_now(sa.sql.functions.FunctionElement[int]):
    """The current time in epoch milliseconds, as a column's server default.

    A declared table's column with ``server_default=epoch_ms_now()`` gets the time of the
    write from the database when a row does not carry it, and batchdb fills it in itself
    when the rows it writes lack it (so a table created without the default, by an earlier
    version, still gets it): see :func:`filled_columns`.
    """

    type = sa.BigInteger()
    inherit_cache = True
    name = "epoch_ms_now"


@compiles(epoch_ms_now)
def _epoch_ms_now(element: epoch_ms_now, compiler: SQLCompiler, **kw: object) -> str:
    # PostgreSQL and DuckDB (which compiles DDL with PostgreSQL's dialect) alike
    return "CAST(EXTRACT(EPOCH FROM CURRENT_TIMESTAMP) * 1000 AS BIGINT)"


@compiles(epoch_ms_now, "sqlite")
def _epoch_ms_now_sqlite(element: epoch_ms_now, compiler: SQLCompiler, **kw: object) -> str:
    # julianday() works on every SQLite version (unixepoch('subsec') needs 3.42)
    return "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"


def filled_columns(table: sa.Table) -> tuple[str, ...]:
    """The columns of a declared table that batchdb fills in when rows lack them: those
    whose server default is :class:`epoch_ms_now` (``candles.ingested_at``)."""
    return tuple(c.name for c in table.columns
                 if isinstance(c.server_default, sa.DefaultClause)
                 and isinstance(c.server_default.arg, epoch_ms_now))


def check_identifier(name: object, what: str = "identifier") -> str:
    """A table or column name as given by a user: a non-empty string without NUL.

    Names are never pasted into SQL: they are looked up among the names the database
    reports (or the declared tables), and only those, quoted, reach SQL text.
    """
    if not isinstance(name, str):
        raise SchemaError(f"{what} must be a string, got {type(name).__name__}: {name!r}")
    if not name or "\x00" in name or len(name) > 128:
        raise SchemaError(f"{what} {name!r} is not a valid name")
    return name


def quote_ident(name: str) -> str:
    """Double-quote an identifier the way SQLite, DuckDB and PostgreSQL all accept."""
    if "\x00" in name:
        raise SchemaError(f"identifier {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableInfo:
    """What a backend knows of a table: its columns, in order, and its primary key."""

    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    types: Mapping[str, str] = field(default_factory=dict)
    not_null: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_colset", frozenset(self.columns))

    @property
    def column_set(self) -> frozenset[str]:
        """The column names as a set, for fast membership tests."""
        return self._colset  # type: ignore[attr-defined,no-any-return]

    def check_columns(self, columns: tuple[str, ...], *, need_key: bool, need_value: bool) -> None:
        """Raise a SchemaError unless ``columns`` fit this table for the operation."""
        unknown = [c for c in columns if c not in self.column_set]
        if unknown:
            raise SchemaError(
                f"table {self.name!r} has no column(s) {', '.join(map(repr, unknown))}; "
                f"its columns are {', '.join(self.columns)}"
            )
        if need_key:
            if not self.primary_key:
                raise SchemaError(f"table {self.name!r} has no primary key, so it cannot be "
                                  "updated, upserted or deleted from by key")
            missing = [c for c in self.primary_key if c not in columns]
            if missing:
                raise SchemaError(
                    f"rows for table {self.name!r} lack primary-key column(s) "
                    f"{', '.join(map(repr, missing))}"
                )
        if need_value and not [c for c in columns if c not in self.primary_key]:
            raise SchemaError(f"rows for table {self.name!r} carry only key columns: "
                              "nothing to update")


def on_conflict_sql(table: TableInfo, values: list[str], differs: str | None = None) -> str:
    """The ``ON CONFLICT (pk) DO UPDATE SET …`` tail of an upsert (SQLite, DuckDB).

    ``differs`` ("IS NOT", "IS DISTINCT FROM") adds a ``WHERE`` that leaves rows alone when
    no value column would change. Identifiers come from ``table`` and are quoted.
    """
    q = quote_ident
    conflict = ", ".join(map(q, table.primary_key))
    if not values:
        return f" ON CONFLICT ({conflict}) DO NOTHING"
    sets = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in values)
    clause = f" ON CONFLICT ({conflict}) DO UPDATE SET {sets}"
    if differs:
        name = q(table.name)
        clause += " WHERE " + " OR ".join(f"{name}.{q(c)} {differs} excluded.{q(c)}"
                                          for c in values)
    return clause


def create_statements(table: sa.Table, dialect: Dialect, comments: bool = False) -> list[str]:
    """``CREATE TABLE IF NOT EXISTS`` for a declared table and ``CREATE INDEX IF NOT
    EXISTS`` for each of its indexes (by name, so the order is stable), compiled for
    ``dialect``; with ``comments``, a ``COMMENT ON COLUMN`` per commented column."""
    statements = [str(CreateTable(table, if_not_exists=True).compile(dialect=dialect))]
    statements += [str(CreateIndex(ix, if_not_exists=True).compile(dialect=dialect))
                   for ix in sorted(table.indexes, key=lambda ix: str(ix.name))]
    if comments:
        statements += [str(SetColumnComment(c).compile(dialect=dialect))
                       for c in table.columns if c.comment]
    return statements
