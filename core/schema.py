"""Table descriptions, identifier safety and the built-in ``candles`` table (SQLAlchemy Core)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa

from .models import SchemaError

__all__ = [
    "CANDLE_COLUMNS",
    "TableInfo",
    "candles_table",
    "check_identifier",
    "metadata",
    "on_conflict_sql",
    "quote_ident",
]

metadata = sa.MetaData()

_REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
_BIGINT: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.INTEGER(), "sqlite")

candles_table = sa.Table(
    "candles",
    metadata,
    sa.Column("symbol", sa.Text, nullable=False, comment="market code, e.g. KRW-BTC"),
    sa.Column("timeframe", sa.Text, nullable=False, comment="candle unit, e.g. 1m, 1d"),
    sa.Column("ts", _BIGINT, nullable=False, comment="candle start, epoch milliseconds UTC"),
    sa.Column("open_price", _REAL, nullable=False),
    sa.Column("high_price", _REAL, nullable=False),
    sa.Column("low_price", _REAL, nullable=False),
    sa.Column("close_price", _REAL, nullable=False),
    sa.Column("volume", _REAL, nullable=False, comment="base-currency volume"),
    sa.Column("quote_volume", _REAL, nullable=True, comment="quote-currency volume"),
    sa.Column("source", sa.Text, nullable=True, comment="where the candle came from"),
    sa.Column("ingested_at", _BIGINT, nullable=False, comment="epoch ms of the write"),
    sa.PrimaryKeyConstraint("symbol", "timeframe", "ts", name="candles_pk"),
    sqlite_with_rowid=False,
    sqlite_strict=True,
)

CANDLE_COLUMNS: tuple[str, ...] = tuple(c.name for c in candles_table.columns)


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
