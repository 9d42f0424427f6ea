"""SQL text of the PostgreSQL backend, composed with ``psycopg.sql``.

Every identifier here comes from the database's catalog (a :class:`Target` built by
:func:`describe`) and is quoted by ``psycopg.sql.Identifier``; every value travels as a bound
parameter or as COPY data. Nothing a caller typed is pasted into SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection, pq, sql

from batchdb.models import OperationType
from batchdb.schema import TableInfo

__all__ = [
    "EQUALITY_TYPES",
    "Target",
    "copy_statement",
    "describe",
    "staging_statement",
    "write_statement",
]

#: Built-in types (by oid) with an equality operator, so ``IS DISTINCT FROM`` can skip
#: rewriting rows that did not change. A column of any other type (json, point, xml, a
#: user type …) turns the guard off for its table: every row is then written.
EQUALITY_TYPES = frozenset({
    16, 17, 18, 19, 20, 21, 23, 25, 26, 650, 700, 701, 790, 869, 1042, 1043, 1082, 1083,
    1114, 1184, 1186, 1266, 1560, 1562, 1700, 2950, 3802,
})

_FIND_VISIBLE = """
SELECT c.oid, n.nspname, c.relname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %s AND c.relkind IN ('r', 'p') AND pg_catalog.pg_table_is_visible(c.oid)
"""

_FIND_QUALIFIED = """
SELECT c.oid, n.nspname, c.relname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
"""

_COLUMNS = """
SELECT a.attname, a.atttypid, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       COALESCE(NULLIF(t.typbasetype, 0), a.atttypid)
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum
"""

_PRIMARY_KEY = """
SELECT a.attname
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisprimary
ORDER BY k.ord
"""


@dataclass(frozen=True)
class Target:
    """A table as the catalog has it: where it lives and the type of each column."""

    info: TableInfo
    schema: str
    relname: str
    oids: dict[str, int] = field(default_factory=dict)  # column -> type oid (for binary COPY)
    comparable: frozenset[str] = frozenset()  # columns whose base type has equality
    base_oids: dict[str, int] = field(default_factory=dict)  # column -> oid, domains resolved

    @property
    def ident(self) -> sql.Identifier:
        """The schema-qualified, quoted name of the table."""
        return sql.Identifier(self.schema, self.relname)

    @property
    def qualified(self) -> str:
        """``schema.table`` for messages (not for SQL)."""
        return f"{self.schema}.{self.relname}"


async def describe(conn: AsyncConnection[Any], name: str) -> Target | None:
    """Find ``name`` as the session's search_path resolves it (or as ``schema.table``)."""
    cur = await conn.execute(_FIND_VISIBLE, (name,))
    found = await cur.fetchone()
    if found is None and "." in name:
        schema, _, relname = name.partition(".")
        cur = await conn.execute(_FIND_QUALIFIED, (schema, relname))
        found = await cur.fetchone()
    if found is None:
        return None
    oid, schema, relname = found
    cur = await conn.execute(_COLUMNS, (oid,))
    cols = await cur.fetchall()
    cur = await conn.execute(_PRIMARY_KEY, (oid,))
    pk = tuple(r[0] for r in await cur.fetchall())
    info = TableInfo(
        name=name,
        columns=tuple(c[0] for c in cols),
        primary_key=pk,
        types={c[0]: c[2] for c in cols},
        not_null=frozenset(c[0] for c in cols if c[3]) | frozenset(pk),
    )
    return Target(
        info=info,
        schema=schema,
        relname=relname,
        oids={c[0]: int(c[1]) for c in cols},
        comparable=frozenset(c[0] for c in cols if int(c[4]) in EQUALITY_TYPES),
        base_oids={c[0]: int(c[4]) for c in cols},
    )


def staging_name(target: Target, number: int) -> str:
    """A temporary table's name that says which table it stages (shown in COPY errors)."""
    return f"_batchdb_{target.relname[:40]}_{number}"


def staging_statement(target: Target, staging: str, columns: Sequence[str]) -> sql.Composed:
    """``CREATE TEMP TABLE`` with the batch's columns and their exact types, no constraints.

    ``ON COMMIT DELETE ROWS``: the staging table is empty at the start of every transaction,
    so a batch never sees another batch's rows. Created once per connection and column set.
    """
    return sql.SQL(
        "CREATE TEMP TABLE {staging} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {target} "
        "WITH NO DATA"
    ).format(
        staging=sql.Identifier(staging),
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        target=target.ident,
    )


def copy_statement(staging: str, columns: Sequence[str], binary: bool) -> sql.Composed:
    """``COPY pg_temp.staging (columns) FROM STDIN``, binary or text."""
    return sql.SQL("COPY {staging} ({cols}) FROM STDIN{fmt}").format(
        staging=sql.Identifier("pg_temp", staging),
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        fmt=sql.SQL(" (FORMAT BINARY)" if binary else ""),
    )


def _changed(target: Target, values: Sequence[str], old: str,
             new: str) -> sql.Composable | None:
    """``(old.c, …) IS DISTINCT FROM (new.c, …)``, or None when some value column has no
    equality operator (then every row is written)."""
    if not values or any(c not in target.comparable for c in values):
        return None
    return sql.SQL("({old}) IS DISTINCT FROM ({new})").format(
        old=sql.SQL(", ").join(sql.Identifier(old, c) for c in values),
        new=sql.SQL(", ").join(sql.Identifier(new, c) for c in values),
    )


def write_statement(target: Target, op: OperationType, staging: str,
                    columns: Sequence[str]) -> sql.Composed:
    """The statement that moves the staged rows into the table for one operation type.

    INSERT: ``INSERT … SELECT``; UPSERT: the same ``ON CONFLICT (pk) DO UPDATE`` (skipping
    rows that would not change); UPDATE: ``UPDATE … FROM staging`` by key; DELETE:
    ``DELETE … USING staging`` by key.
    """
    keys = target.info.primary_key
    values = [c for c in columns if c not in keys]
    stg = sql.Identifier("pg_temp", staging)
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    by_key = sql.SQL(" AND ").join(
        sql.SQL("{t} = {s}").format(t=sql.Identifier("t", k), s=sql.Identifier("s", k))
        for k in keys
    )
    if op is OperationType.DELETE:
        return sql.SQL("DELETE FROM {target} AS t USING {stg} AS s WHERE {by_key}").format(
            target=target.ident, stg=stg, by_key=by_key)
    if op is OperationType.UPDATE:
        changed = _changed(target, values, "t", "s")
        return sql.SQL("UPDATE {target} AS t SET {sets} FROM {stg} AS s WHERE {by_key}{guard}"
                       ).format(
            target=target.ident,
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = {v}").format(c=sql.Identifier(c), v=sql.Identifier("s", c))
                for c in values),
            stg=stg,
            by_key=by_key,
            guard=sql.SQL("") if changed is None else sql.SQL(" AND ") + changed,
        )
    insert = sql.SQL("INSERT INTO {target} AS t ({cols}) SELECT {cols} FROM {stg}").format(
        target=target.ident, cols=cols, stg=stg)
    if op is OperationType.INSERT:
        return insert
    conflict = sql.SQL(", ").join(map(sql.Identifier, keys))
    if not values:
        return insert + sql.SQL(" ON CONFLICT ({conflict}) DO NOTHING").format(
            conflict=conflict)
    changed = _changed(target, values, "t", "excluded")
    return insert + sql.SQL(" ON CONFLICT ({conflict}) DO UPDATE SET {sets}{guard}").format(
        conflict=conflict,
        sets=sql.SQL(", ").join(
            sql.SQL("{c} = {v}").format(c=sql.Identifier(c), v=sql.Identifier("excluded", c))
            for c in values),
        guard=sql.SQL("") if changed is None else sql.SQL(" WHERE ") + changed,
    )


def binary_ready(conn: AsyncConnection[Any], oids: Sequence[int]) -> bool:
    """True when psycopg has a binary dumper for every column type (else COPY as text)."""
    for oid in oids:
        try:
            conn.adapters.get_dumper_by_oid(oid, pq.Format.BINARY)
        except Exception:
            return False
    return True
