"""PostgreSQL: binary COPY into a temporary staging table, then one set-based statement.

Per batch, on one pooled connection::

    BEGIN
    INSERT INTO batchdb_spool_applied …           -- this transaction's commit mark (and the
      RETURNING txid_current()                    -- deletion of marks no longer needed)
    COPY pg_temp._batchdb_<table>_<n> (…) FROM STDIN (FORMAT BINARY)
    INSERT INTO t … SELECT … FROM staging [ON CONFLICT (pk) DO UPDATE … WHERE changed]
      | UPDATE t … FROM staging WHERE key = key | DELETE FROM t USING staging WHERE key = key
    COMMIT

The staging table (``ON COMMIT DELETE ROWS``, the batch's columns with the table's exact
types) is created once per connection and column set. Several batches (of different
tables) run at once, one per pooled connection.

Failures are reported to the scheduler: connection loss, restart, deadlock and serialization
failures are TRANSIENT (the broken connection is discarded and the batch retried on a fresh
one); bad values and constraint violations are DATA (the scheduler splits the batch to
isolate the bad operation); missing privileges, disk full and the like are RESOURCE.

A COMMIT whose answer never arrived (the connection dropped during it) leaves the outcome
unknown. Retrying such a batch blindly would duplicate a plain INSERT into a table without
a primary key, or fail it on its own primary key. So every batch's transaction writes a
mark, a row of its own in ``batchdb_spool_applied`` (this backend's key and a sequence
number), and before the retry the mark is looked for on a fresh connection: there, the
batch committed (it is acknowledged without writing it again); not there, it did not (it is
written again). ``txid_status()`` of the transaction's id, read in the transaction, is
asked first, only to wait while the transaction is still committing (``in progress``). The
id alone cannot tell committed from not: after a crash (``pg_ctl stop -m immediate``) the
ids that never reached the WAL are handed out again, and ``txid_status()`` then answers
"committed" for another transaction, which acknowledged a lost batch. The marks of
acknowledged batches are deleted by the next batch's transaction. Where the marks table
cannot be created (no CREATE privilege), the backend says so once and falls back on
``txid_status()`` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import itertools
import logging
import math
import re
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from decimal import Decimal
from operator import itemgetter
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit
from uuid import UUID, uuid4

import sqlalchemy as sa

from batchdb.backend import (
    BOOKKEEPING_TABLES,
    Backend,
    BackendContext,
    Batch,
    BatchResult,
    Capabilities,
    ErrorKind,
    with_location,
)
from batchdb.models import BatchDBError, BatchOperation, OperationType, SchemaError
from batchdb.reads import ReadChunk, not_a_read
from batchdb.schema import TableInfo, create_statements
from batchdb.settings import redact_dsn

from .settings import PostgresSettings

if TYPE_CHECKING:
    from psycopg import AsyncConnection, sql

    from .pool import Pool, PooledConnection
    from .statements import Target

__all__ = ["BadValueError", "CommitOutcomePending", "PostgresBackend", "PostgresConnectError"]

log = logging.getLogger("batchdb.postgres")

INSTALL_HINT = "pip install 'batchdb[postgres]'"

#: batches in a row that binary COPY refused before a (table, columns) is sent as text
TEXT_COPY_AFTER = 3

#: SQLSTATE classes and codes, see https://www.postgresql.org/docs/current/errcodes-appendix.html
_TRANSIENT_STATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57014",  # query_canceled (statement_timeout, usually waiting for a lock)
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up, shutting down)
    "53300",  # too_many_connections
    "58000",  # system_error: raised while the server goes down
}
_TRANSIENT_CLASSES = ("08",)  # connection exceptions
#: cardinality, data exception, integrity, triggered data change, WITH CHECK OPTION, and an
#: exception raised by a user's trigger (PL/pgSQL RAISE): a fault of the rows, not the server
_DATA_CLASSES = ("21", "22", "23", "27", "44", "P0")

#: base types (oids) whose binary COPY dumper takes any Python value and converts it
#: silently: boolean by truthiness (the text 'false' would be true), bytea through
#: ``bytes()`` (the int 5 would be five NUL bytes)
_BOOL_OID = 16
_BYTEA_OID = 17
_BYTES = (bytes, bytearray, memoryview)


def _require_driver() -> Any:
    """The psycopg module, or one clear error saying how to install it."""
    try:
        return importlib.import_module("psycopg")
    except ImportError as exc:
        raise BatchDBError(
            "the postgres backend needs the psycopg driver, which is not installed: "
            f"{INSTALL_HINT} ({exc})"
        ) from None


class PostgresConnectError(BatchDBError):
    """The server cannot be reached or refused the login; the message carries no password."""


class CommitOutcomePending(BatchDBError):
    """A batch's earlier COMMIT is still in progress on the server: retry later."""


class BadValueError(BatchDBError, ValueError):
    """A value the column cannot take, found before it was sent; fails its operation."""


def _secrets_of(dsn: str) -> list[str]:
    """Password strings in a DSN (URL and key=value forms), raw and URL-decoded."""
    found: list[str] = []
    try:
        parts = urlsplit(dsn)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
    except ValueError:
        pass
    for token in dsn.replace(" =", "=").replace("= ", "=").split():
        key, sep, value = token.partition("=")
        if sep and key.strip().lower() == "password" and value:
            found += [value, value.strip("'")]
    for part in dsn.split("?", 1)[1:]:
        for item in part.split("&"):
            key, _, value = item.partition("=")
            if key.lower() == "password" and value:
                found += [value, unquote(value)]
    return [s for s in sorted(set(found), key=len, reverse=True) if len(s) >= 1]


#: integer types: '7', ' 7 ' and 7 are one key there (the text is parsed by the column)
_INTEGER_OIDS = frozenset({20, 21, 23})
_INTEGER_TEXT = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+[ \t\n\r\f\v]*")
_FLOAT_OIDS = frozenset({700, 701})
#: number types (and numeric): a bool is written into them as 1 or 0 (Python's bool is an
#: int)
_NUMBER_OIDS = _INTEGER_OIDS | _FLOAT_OIDS | {1700}
_TEXT_OIDS = frozenset({19, 25, 1043})  # name, text, varchar (not bpchar: it ignores padding)


def _key_part(value: Any, base_oid: int | None) -> Any:
    """A stand-in for a key value: equal stand-ins are one key in the column. Numbers and
    text in the integer input format are compared as numbers in an integer column,
    numbers as floats in a float column, str as str in a text column; anything else only
    equals a value of its own type with the same repr (Python's ``1 == 1.0 == True`` is
    not the column's: as text they are '1', '1.0' and 't')."""
    kind = type(value)
    try:
        if base_oid in _INTEGER_OIDS:
            if kind is int or kind is bool:
                return int(value)
            if kind is str or kind is Decimal:
                text = str(value)
                if _INTEGER_TEXT.fullmatch(text):
                    return int(text)
        elif base_oid in _FLOAT_OIDS:
            if kind is float or kind is int or kind is bool:
                return float(value)
        elif base_oid in _TEXT_OIDS and kind is str:
            return value
    except (OverflowError, ValueError):
        pass
    return kind, repr(value)


def _plain_keys(types: set[type], base_oid: int | None) -> bool:
    """True when Python's equality of values of ``types`` is the column's."""
    if base_oid in _INTEGER_OIDS:
        return types <= {int, bool}
    if base_oid in _FLOAT_OIDS:
        return types <= {int, float, bool}
    if base_oid in _TEXT_OIDS:
        return types <= {str}
    return len(types) <= 1 and types <= {str, int, bytes, dt.datetime, dt.date, dt.time, UUID}


def _dedupe(rows: list[tuple[Any, ...]], key_positions: Sequence[int], target: Target,
            columns: Sequence[str]) -> tuple[list[int] | None, list[int]]:
    """Positions of the rows to keep, one per key, the last occurrence winning as if they
    were applied in order (None: all of them); and of the rows that lose to a later one
    with their key.

    Keys are compared as the columns compare them, where Python can tell (see
    :func:`_key_part`); otherwise two rows are kept and the statement decides.
    """
    oids = [target.base_oids.get(columns[i]) for i in key_positions]
    if all(_plain_keys(set(map(type, map(itemgetter(i), rows))), oid)
           for i, oid in zip(key_positions, oids, strict=True)):
        keys: Any = map(itemgetter(*key_positions), rows)
    else:
        keys = (tuple(map(_key_part, [row[i] for i in key_positions], oids)) for row in rows)
    last = dict(zip(keys, range(len(rows)), strict=False))
    if len(last) == len(rows):
        return None, []
    kept = sorted(last.values())
    winners = set(kept)
    return kept, [r for r in range(len(rows)) if r not in winners]


Suspect = tuple[int, str, tuple[Any, ...]]  # (row, NOT NULL column holding NULL, row)


def _suspects(rows: list[tuple[Any, ...]], dropped: Sequence[int], target: Target,
              columns: Sequence[str]) -> list[Suspect]:
    """Dropped rows holding NULL in a NOT NULL column: applied in order, such a row fails
    its operation (an UPDATE's only if its key exists), which a later row with its key
    must not hide."""
    checked = [(i, c) for i, c in enumerate(columns) if c in target.info.not_null]
    return [(r, c, rows[r]) for r in dropped for i, c in checked if rows[r][i] is None]


def _not_null_violation(target: Target, suspect: Suspect) -> Exception:
    """The server's error for a NULL in a NOT NULL column, raised for a dropped row."""
    from psycopg import errors

    r, column, _row = suspect
    return errors.NotNullViolation(
        f'null value in column "{column}" of relation "{target.relname}" violates '
        f"not-null constraint (row {r}, before a later row with its key)")


def _screen(rows: list[tuple[Any, ...]], columns: Sequence[str], target: Target) -> bool:
    """Refuse what binary COPY would convert silently; True if the rows must go as text.

    A bytea column takes bytes, or a str in bytea's input format (sent as text); any other
    value fails its operation (``bytes(5)`` would be five NUL bytes, and 1.5 as text the
    bytes ``b'1.5'``). A boolean column takes a bool in binary; anything else goes as text
    for the server to parse ('false' is false, 'abc' an error) instead of being judged by
    Python's truthiness. Scans only the rows of tables with such columns.
    """
    base = target.base_oids
    loose = [(i, base.get(c)) for i, c in enumerate(columns)
             if base.get(c) in (_BOOL_OID, _BYTEA_OID)]
    if not loose:
        return False
    text = False
    for r, row in enumerate(rows):
        for i, oid in loose:
            value = row[i]
            if value is None:
                continue
            if oid == _BYTEA_OID:
                if isinstance(value, _BYTES):
                    continue
                if not isinstance(value, str):
                    raise BadValueError(
                        f"a bytea column takes bytes (or text in bytea's input format), not "
                        f"{type(value).__name__} {_short(value)} "
                        f"(column {columns[i]!r}, row {r})")
                text = True
            elif type(value) is not bool:
                text = True
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bools_as_ints(rows: list[tuple[Any, ...]], columns: Sequence[str],
                   target: Target) -> list[tuple[Any, ...]]:
    """Rows for text COPY with each bool in a number column as 1 or 0, as binary COPY
    writes it (as text a bool would be 't', which no number column parses)."""
    where = [i for i, c in enumerate(columns) if target.base_oids.get(c) in _NUMBER_OIDS]
    if not where:
        return rows
    out = rows
    for r, row in enumerate(rows):
        if any(type(row[i]) is bool for i in where):
            if out is rows:
                out = list(rows)
            out[r] = tuple(int(v) if i in where and type(v) is bool else v
                           for i, v in enumerate(row))
    return out


def _locate(raw: Any, exc: BaseException, row: tuple[Any, ...], columns: Sequence[str],
            oids: Sequence[int] | None) -> str | None:
    """The column of ``row`` whose value alone raises what ``exc`` is (dumped in binary
    for the column's type when ``oids`` is given, else as text by the value's type)."""
    from psycopg import pq
    from psycopg.adapt import PyFormat, Transformer

    tx = Transformer(raw)
    for i, value in enumerate(row):
        if value is None:
            continue
        try:
            if oids is not None:
                raw.adapters.get_dumper_by_oid(oids[i], pq.Format.BINARY)(
                    type(value), raw).dump(value)
            else:
                tx.get_dumper(value, PyFormat.TEXT).dump(value)
        except Exception as err:
            if type(err) is type(exc):
                return columns[i]
    return None


class PostgresBackend(Backend):
    """A PostgreSQL server through psycopg 3: pooled connections, COPY + set-based writes."""

    name = "postgres"
    paramstyle = "format"
    settings_model = PostgresSettings
    maintenance_tasks = ("analyze", "vacuum")

    def __init__(self, settings: PostgresSettings, *, connection_factory: Any = None) -> None:
        """Check that the driver is installed; connections are made by ``open()``."""
        if connection_factory is not None:
            raise BatchDBError("the postgres backend takes no connection factory: set "
                               "postgres.dsn instead")
        super().__init__(settings)
        self.settings: PostgresSettings = settings
        self._pg = _require_driver()
        self._secrets = _secrets_of(settings.dsn)
        self._pool: Pool | None = None
        self._targets: dict[str, Target] = {}
        self._sql: dict[tuple[Any, ...], bytes] = {}
        # (table, columns) -> batches in a row whose values binary COPY refused
        self._text_fallbacks: dict[tuple[str, tuple[str, ...]], int] = {}
        self._written: dict[str, Target] = {}
        # operations whose COMMIT got no answer -> their transaction's id and commit mark
        self._uncertain: weakref.WeakKeyDictionary[BatchOperation, tuple[int, int | None]] = (
            weakref.WeakKeyDictionary())
        self.server_version: str | None = None
        self.outcomes_resolved = {"committed": 0, "aborted": 0}
        self._marks_ready = False
        # commit marks (see the module docstring): this backend's key, the next number,
        # and the marks of acknowledged commits that the next transaction deletes
        self._commit_marks = True  # False once the marks table cannot be created
        self._commit_key = f"commit:{uuid4().hex}"
        self._commit_seqs = itertools.count(1)
        self._forget: list[int] = []

    @property
    def capabilities(self) -> Capabilities:
        """One batch per pooled connection in flight; batch sizes from ``batch_size``."""
        size = self.settings.batch_size
        return Capabilities(max_writers=self.settings.pool_size, insert_batch_size=size,
                            update_batch_size=size, spool_marks=True)

    # ------------------------------------------------------------------ messages
    def _scrub(self, text: str) -> str:
        """``text`` without the password (in any form) and with DSNs redacted."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact_dsn(text)

    @property
    def where(self) -> str:
        """The server, for messages: the DSN without its password."""
        return redact_dsn(self.settings.dsn)

    # ------------------------------------------------------------------ connections
    async def _connect(self) -> AsyncConnection[Any]:
        pg = self._pg
        s = self.settings
        try:
            async with asyncio.timeout(s.connect_timeout_seconds + 1.0):
                conn: AsyncConnection[Any] = await pg.AsyncConnection.connect(
                    s.dsn, autocommit=True,
                    connect_timeout=max(2, math.ceil(s.connect_timeout_seconds)),
                    fallback_application_name="batchdb")
        except TimeoutError:
            raise PostgresConnectError(
                f"cannot connect to PostgreSQL at {self.where}: no answer within "
                f"{s.connect_timeout_seconds}s (postgres.connect_timeout_seconds)") from None
        except pg.Error as exc:
            raise PostgresConnectError(
                f"cannot connect to PostgreSQL at {self.where}: {self._scrub(str(exc))}"
            ) from None
        try:
            await conn.execute("SELECT pg_catalog.set_config('statement_timeout', %s, false)",
                               (str(s.statement_timeout_ms),))
        except BaseException:
            await conn.close()
            raise
        return conn

    def _require_pool(self) -> Pool:
        if self._pool is None or self._pool.closed:
            raise self.not_open()
        return self._pool

    async def open(self, context: BackendContext) -> None:
        """Create the pool and open one connection now, so a wrong DSN, password or
        database fails ``start()`` with a clear error instead of the first batch."""
        self.context = context
        if self._pool is not None and not self._pool.closed:
            return
        from .pool import Pool

        pool = Pool(self._connect, self.settings.pool_size)
        # one connection now: a wrong DSN, password or database fails start(), not a batch
        async with pool.connection() as conn:
            cur = await conn.raw.execute("SHOW server_version")
            row = await cur.fetchone()
            self.server_version = None if row is None else str(row[0])
        self._pool = pool
        log.info("postgres backend open: %s (server %s, pool of %d)", self.where,
                 self.server_version, self.settings.pool_size)

    async def close(self) -> None:
        """Delete the marks of the last acknowledged commits (best effort, on a connection
        already open and within a second: a row each is all that stays otherwise) and
        close the pool's connections; idempotent."""
        if self._pool is not None:
            if self._forget and not self._pool.closed and self._pool.stats()["idle"]:
                forget, self._forget = self._forget, []
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0), self._pool.connection() as conn:
                        await conn.raw.execute(_FORGET_SQL, (self._commit_key, forget))
            await self._pool.close()

    # ------------------------------------------------------------------ reading
    async def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read query on a pooled connection, in a read-only transaction (a write is
        refused by the server and changes nothing). Placeholders are psycopg's ``%s``; a
        query without any ``%s`` may use ``?`` (the SQLite/DuckDB form) instead."""
        query = _portable_placeholders(sql, len(params)) if params else sql
        async with self._read_only(sql, "BEGIN READ ONLY") as raw:
            cur = await raw.execute(query, params or None)
            rows = await cur.fetchall() if cur.description is not None else []
        return [tuple(r) for r in rows]

    @contextlib.asynccontextmanager
    async def _read_only(self, sql: str, begin: str) -> AsyncIterator[Any]:
        """A pooled connection in a read-only transaction (``begin``), committed at the end;
        rolled back on any error, a write the server refused reported as not a read."""
        async with self._require_pool().connection() as conn:
            raw = conn.raw
            try:
                await raw.execute(begin, prepare=False)
                yield raw
                await raw.execute("COMMIT", prepare=False)
            except self._pg.errors.ReadOnlySqlTransaction as exc:
                await _rollback(conn)
                raise not_a_read(sql, self._scrub(str(exc).strip())) from None
            except BaseException:
                await _rollback(conn)
                raise

    async def read_chunks(self, sql: str, params: tuple[Any, ...] = (),
                          chunk_rows: int = 10_000) -> AsyncGenerator[ReadChunk, None]:
        """The rows of ``sql`` ``chunk_rows`` at a time, in a read-only transaction on one
        pooled connection held until the iteration ends (REPEATABLE READ: the rows of one
        snapshot, as a SQLite reader and DuckDB give them). psycopg's ``stream()`` has libpq
        send the result in chunks of that size (libpq 17+; row by row before), so the
        client never holds more than a chunk, whatever the statement (a server-side
        cursor would take only SELECT, not EXPLAIN or SHOW)."""
        query = _portable_placeholders(sql, len(params)) if params else sql
        size = chunk_rows if self._pg.pq.version() >= 170000 else 1
        async with self._read_only(sql, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
                                   ) as raw:
            cur = raw.cursor()
            rows: list[tuple[Any, ...]] = []
            yielded = False
            # aclosing: left early, psycopg's stream cancels the rest of the result
            stream = cast(AsyncGenerator[Any, None], cur.stream(query, params or None, size=size))
            async with contextlib.aclosing(stream):
                async for row in stream:
                    rows.append(tuple(row))
                    if len(rows) >= chunk_rows:
                        yield ReadChunk(_column_names(cur), rows)
                        yielded, rows = True, []
            if rows:
                yield ReadChunk(_column_names(cur), rows)
            elif not yielded:
                # an empty result: the stream leaves no description behind, so the statement
                # runs once more, on the same snapshot (REPEATABLE READ), for its column
                # names (it returns no row again)
                await cur.execute(query, params or None)
                yield ReadChunk(_column_names(cur), [])

    async def list_tables(self) -> list[str]:
        """Tables (plain and partitioned, not the partitions) of the current schema."""
        rows = await self.fetch(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = pg_catalog.current_schema() "
            "AND c.relkind IN ('r', 'p') AND NOT c.relispartition")
        return sorted(str(r[0]) for r in rows)

    # ------------------------------------------------------------------ schema
    async def _describe(self, name: str) -> Target | None:
        """Read ``name`` from the catalog; retried like a batch while the server is
        unreachable (a producer's first write to a table during a restart still works)."""
        from .statements import describe

        async def read() -> Target | None:
            async with self._require_pool().connection() as conn:
                return await describe(conn.raw, name)

        target = await self.context.retry_policy.call_async(
            read, lambda exc: self.classify_error(exc) is ErrorKind.TRANSIENT,
            before_retry=self._require_pool().drop_idle)
        if target is not None:
            self._targets[name] = target
        return target

    async def describe_table(self, name: str) -> TableInfo | None:
        """Columns, key and types of ``name`` as the connection's search_path resolves it
        (or ``schema.table``), read from pg_catalog with bound parameters."""
        target = await self._describe(name)
        return None if target is None else target.info

    async def create_table(self, table: sa.Table) -> TableInfo:
        """Create a declared table (PostgreSQL dialect DDL, indexes, column comments) if
        it does not exist, under an advisory lock so concurrent writers do not race."""
        dialect = sa.engine.make_url("postgresql+psycopg://").get_dialect()()
        statements = create_statements(table, dialect, comments=True)
        async with self._require_pool().connection() as conn:
            try:
                await conn.raw.execute("BEGIN")
                # two processes creating the same table at once would race in the catalog
                await conn.raw.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s)",
                                       (0x6261746368,))
                from .statements import describe

                if await describe(conn.raw, table.name) is None:
                    for stmt in statements:
                        await conn.raw.execute(stmt)
                await conn.raw.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
        target = await self._describe(table.name)
        if target is None:
            raise BatchDBError(f"table {table.name!r} was created but is not visible in the "
                               "search_path of the connection")
        return target.info

    async def _target(self, table: TableInfo) -> Target:
        target = self._targets.get(table.name)
        if target is None:
            target = await self._describe(table.name)
            if target is None:
                raise SchemaError(f"table {table.name!r} no longer exists in {self.where}")
        return target

    # ------------------------------------------------------------------ writing
    def _statement(self, conn: PooledConnection, key: tuple[Any, ...],
                   build: Callable[[], sql.Composable]) -> bytes:
        text = self._sql.get(key)
        if text is None:
            text = self._sql[key] = build().as_bytes(conn.raw)
        return text

    async def _staging(self, conn: PooledConnection, target: Target,
                       columns: tuple[str, ...]) -> tuple[str, bool]:
        """The staging table for (table, columns) on this connection, created on first use;
        and whether psycopg can COPY every column in binary."""
        key = (target.qualified, columns)
        found = conn.staging.get(key)
        if found is not None:
            return found
        from .statements import binary_ready, staging_name, staging_statement

        name = staging_name(target, len(conn.staging) + 1)
        await conn.raw.execute(staging_statement(target, name, columns))
        binary = binary_ready(conn.raw, [target.oids[c] for c in columns])
        conn.staging[key] = (name, binary)
        return name, binary

    async def _copy(self, raw: AsyncConnection[Any], copy_sql: bytes, target: Target,
                    columns: Sequence[str], rows: list[tuple[Any, ...]],
                    positions: Sequence[int] | None, binary: bool) -> None:
        """COPY ``rows`` into the staging table; a value the driver cannot send is named by
        its column and its row (``positions`` maps rows to the batch's row numbers)."""
        from .copy_writer import ReadingCopyWriter

        oids = [target.oids[c] for c in columns] if binary else None
        if not binary:
            rows = _bools_as_ints(rows, columns, target)
        cursor = raw.cursor()
        try:
            async with cursor.copy(copy_sql, writer=ReadingCopyWriter(cursor)) as copy:
                if oids is not None:
                    copy.set_types(oids)
                write_row = copy.write_row
                for r, row in enumerate(rows):
                    try:
                        await write_row(row)
                    except (TypeError, ValueError, OverflowError, self._pg.DataError,
                            self._pg.ProgrammingError) as exc:
                        if isinstance(exc, self._pg.Error) and exc.pgresult is not None:
                            raise  # the server's answer, which names what it refused
                        # a value the driver could not convert: name its column and row
                        column = _locate(raw, exc, row, columns, oids)
                        n = r if positions is None else positions[r]
                        where = (f"row {n}" if column is None
                                 else f"column {column!r}, row {n}")
                        raise with_location(exc, where, BadValueError) from exc
        except self._pg.DataError as exc:
            # the server names the value it refused by the COPY's line (from 1) and the
            # column: say it as the other backends do, by the row of the batch
            found = _COPY_CONTEXT.search(exc.diag.context or "") if exc.pgresult else None
            if found is None or not 1 <= int(found.group(1)) <= len(rows):
                raise
            r = int(found.group(1)) - 1
            n = r if positions is None else positions[r]
            raise with_location(exc, f"column {found.group(2)!r}, row {n}",
                                BadValueError) from exc

    async def _commit_rows(self, conn: PooledConnection, batch: Batch, target: Target,
                           rows: list[tuple[Any, ...]], text_copy: bool,
                           kept: Sequence[int] | None = None,
                           dropped: Sequence[int] = ()) -> int:
        """One transaction: COPY ``rows`` into staging, apply them, COMMIT; the rows the
        statement changed.

        With ``kept``, only those rows are applied; the ``dropped`` ones (which lose to a
        later row with their key) are COPYed first and cleared again, so that a value the
        column cannot take fails its operation even so.
        """
        from psycopg import sql

        from .statements import copy_statement, write_statement

        columns = batch.columns
        staging, binary = await self._staging(conn, target, columns)
        binary = binary and not text_copy
        raw = conn.raw
        copy_sql = self._statement(conn, ("copy", staging, columns, binary),
                                   lambda: copy_statement(staging, columns, binary))
        write_sql = self._statement(
            conn, ("write", target.qualified, batch.operation_type, staging, columns),
            lambda: write_statement(target, batch.operation_type, staging, columns))
        await raw.execute("BEGIN", prepare=False)
        seq: int | None = None
        forget: list[int] = []
        try:
            if self._commit_marks:
                seq = next(self._commit_seqs)
                forget, self._forget = self._forget, []
                cur = await raw.execute(_COMMIT_MARK_SQL, {"key": self._commit_key,
                                                           "forget": forget, "seq": seq})
            else:
                cur = await raw.execute("SELECT txid_current()")
            xid_row = await cur.fetchone()
            assert xid_row is not None
            xid = int(xid_row[0])
            if dropped:
                await self._copy(raw, copy_sql, target, columns, [rows[r] for r in dropped],
                                 dropped, binary)
                await raw.execute(self._statement(
                    conn, ("clear", staging), lambda: sql.SQL("DELETE FROM {}").format(
                        sql.Identifier("pg_temp", staging))))
            if kept is None:
                await self._copy(raw, copy_sql, target, columns, rows, None, binary)
            else:
                await self._copy(raw, copy_sql, target, columns, [rows[r] for r in kept],
                                 kept, binary)
            changed = (await raw.execute(write_sql)).rowcount
            marks = [op.spool_seq for op in batch.operations if op.spool_seq]
            if marks:  # replayed from the spool: noted in the same transaction
                await raw.execute(_MARK_SQL, (self.context.spool_id, marks))
        except BaseException:
            self._forget.extend(forget)  # not deleted: by a later transaction
            await _rollback(conn)
            raise
        try:
            await raw.execute("COMMIT", prepare=False)
        except BaseException as exc:
            self._forget.extend(forget)  # maybe not deleted (deleting again is harmless)
            answered = (isinstance(exc, self._pg.Error) and exc.sqlstate is not None
                        and not raw.broken and not raw.closed)
            if not answered:  # the server may have committed: remember how to find out
                for op in batch.operations:
                    self._uncertain[op] = (xid, seq)
                log.warning("batch on %r: connection lost during COMMIT of transaction %d; "
                            "its outcome is checked before the batch is retried",
                            batch.table.name, xid)
            raise
        if seq is not None:
            self._forget.append(seq)  # acknowledged: its mark is not needed any more
        return changed

    async def _resolve_uncertain(self, ops: Sequence[BatchOperation]) -> set[int]:
        """Ids of ``ops`` whose earlier, unanswered COMMIT did commit (see the module
        docstring). Operations whose transaction did not commit are forgotten (they are
        written again)."""
        questions = {self._uncertain[op] for op in ops if op in self._uncertain}
        status: dict[int, str | None] = {}
        marked: set[int] = set()
        async with self._require_pool().connection() as conn:
            for xid, _ in questions:  # first: a transaction still committing is waited for
                try:
                    cur = await conn.raw.execute("SELECT txid_status(%s)", (xid,))
                except self._pg.errors.InvalidParameterValue as exc:
                    if "in the future" not in str(exc):
                        raise
                    # the server restarted (a crash, an immediate shutdown) and its next
                    # transaction id is not past ours: nothing of our transaction reached
                    # its durable WAL, so it did not commit
                    status[xid] = "aborted"
                    continue
                row = await cur.fetchone()
                status[xid] = None if row is None else row[0]
            seqs = [seq for _, seq in questions if seq is not None]
            if seqs:  # then: a transaction that is over committed if its mark is there
                cur = await conn.raw.execute(_MARKED_SQL, (self._commit_key, seqs))
                marked = {int(r[0]) for r in await cur.fetchall()}
        outcome: dict[tuple[int, int | None], str | None] = {}
        for xid, seq in questions:
            state = status.get(xid)
            if seq is not None and state != "in progress":
                state = "committed" if seq in marked else "aborted"
            outcome[xid, seq] = state
        committed: set[int] = set()
        for op in ops:
            question = self._uncertain.get(op)
            if question is None:
                continue
            state = outcome[question]
            if state == "committed":
                committed.add(id(op))
            elif state == "aborted":
                del self._uncertain[op]
            elif state == "in progress":
                raise CommitOutcomePending(
                    f"transaction {question[0]} of an earlier attempt at this batch is still "
                    "committing on the server")
            else:
                raise BatchDBError(
                    f"the outcome of transaction {question[0]} (a COMMIT whose answer was "
                    f"lost) cannot be determined any more: txid_status returned {state!r}; "
                    "the operation is not retried so that it is never applied twice")
        for (xid, seq), state in outcome.items():
            if state in self.outcomes_resolved:
                self.outcomes_resolved[state] += 1
                log.info("transaction %d of a retried batch: %s", xid, state)
                if state == "committed" and seq is not None:
                    self._forget.append(seq)
        return committed

    async def write_batch(self, batch: Batch) -> BatchResult:
        """Commit ``batch`` in one transaction on a pooled connection, or raise.

        Operations whose earlier COMMIT got no answer are looked up first (see the module
        docstring) so that none is applied twice.
        """
        pool = self._require_pool()
        ops = batch.operations
        if self._uncertain and any(op in self._uncertain for op in ops):
            committed = await self._resolve_uncertain(ops)
            if committed:
                rest = [op for op in ops if id(op) not in committed]
                done_rows = sum(op.n_rows for op in ops if id(op) in committed)
                if rest:
                    result = await self.write_batch(
                        Batch(batch.table, batch.operation_type, batch.columns, rest))
                    result.rows += done_rows
                else:
                    result = BatchResult(done_rows)
                for op in ops:
                    self._uncertain.pop(op, None)
                return result
        target = await self._target(batch.table)
        rows = batch.rows  # a row lacking a column raises here: a DATA error of its operation
        op_type = batch.operation_type
        key_pos = [batch.columns.index(k) for k in target.info.primary_key
                   if k in batch.columns]
        deduped = op_type is not OperationType.UPSERT or not key_pos
        kept: list[int] | None = None
        dropped: list[int] = []
        if op_type is OperationType.UPDATE and key_pos:
            # UPDATE … FROM would pick an arbitrary one of two rows with one key
            kept, dropped = _dedupe(rows, key_pos, target, batch.columns)
            for suspect in _suspects(rows, dropped, target, batch.columns):
                # that row would have failed if its key exists
                if await self._key_exists(target, batch.columns, key_pos, suspect[2]):
                    raise _not_null_violation(target, suspect)
        if not self._marks_ready and (self._commit_marks or any(op.spool_seq for op in ops)):
            await self._create_marks_table(needed=any(op.spool_seq for op in ops))
        copy_key = (batch.table.name, batch.columns)
        text_copy = (_screen(rows, batch.columns, target)
                     or self._text_fallbacks.get(copy_key, 0) >= TEXT_COPY_AFTER)
        while True:
            try:
                async with pool.connection() as conn:
                    changed = await self._commit_rows(conn, batch, target, rows, text_copy,
                                                      kept, dropped)
                break
            except self._pg.errors.CardinalityViolation:
                # ON CONFLICT cannot touch a row twice: keep each key's last row, once
                if deduped:
                    raise
                # every row was COPYed (its values parsed) before the conflict was found
                kept, dropped = _dedupe(rows, key_pos, target, batch.columns)
                deduped = True
                suspects = _suspects(rows, dropped, target, batch.columns)
                if suspects:  # inserted or updated, that row would have failed
                    raise _not_null_violation(target, suspects[0]) from None
                dropped = []
            except self._pg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name != _MARKS_PKEY:
                    raise
                # a replayed operation's mark is there: an earlier process (killed after it
                # sent the COMMIT) committed it meanwhile. Leave those out, write the rest.
                return await self._without_applied(batch)
            except (TypeError, ValueError, OverflowError) as exc:
                if text_copy or isinstance(exc, BatchDBError):
                    raise
                # a value psycopg cannot send in the column's binary form (a str for a
                # timestamp, an int for a text column…): let the server parse it as text.
                # Text COPY costs more, so only a table whose batches keep needing it is
                # switched to text for good.
                count = self._text_fallbacks[copy_key] = self._text_fallbacks.get(
                    copy_key, 0) + 1
                log.log(logging.WARNING if count == TEXT_COPY_AFTER else logging.DEBUG,
                        "table %r: binary COPY refused a value (%s); sending this batch as "
                        "text%s", batch.table.name, exc,
                        " and the following ones too" if count == TEXT_COPY_AFTER else "")
                text_copy = True
            except self._pg.Error as exc:
                if self.classify_error(exc) is ErrorKind.TRANSIENT:
                    await pool.drop_idle()
                raise
        if not text_copy:
            self._text_fallbacks.pop(copy_key, None)  # binary worked: count again from 0
        self._written.setdefault(target.qualified, target)
        return BatchResult(batch.row_count, changed=changed)

    # ------------------------------------------------------------------ spool marks
    async def _create_marks_table(self, needed: bool) -> None:
        """``batchdb_spool_applied`` (spool id or commit key, sequence number) in the first
        schema of the search_path, created once, under the advisory lock ``create_table``
        takes. Without the privilege to create it, the commit marks are left out (said
        once), unless ``needed`` (a replayed batch's marks): then the error is raised."""
        async with self._require_pool().connection() as conn:
            try:
                await conn.raw.execute("BEGIN")
                await conn.raw.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s)",
                                       (0x6261746368,))
                await conn.raw.execute(
                    "CREATE TABLE IF NOT EXISTS batchdb_spool_applied (spool text NOT NULL, "
                    "seq bigint NOT NULL, PRIMARY KEY (spool, seq))")
                await conn.raw.execute("COMMIT")
            except self._pg.errors.InsufficientPrivilege as exc:
                await _rollback(conn)
                if needed:
                    raise
                self._commit_marks = False
                log.warning("postgres: cannot create batchdb_spool_applied (%s): a COMMIT "
                            "whose answer is lost is resolved by txid_status() alone, which "
                            "can take a batch lost in a server crash for committed", exc)
                return
            except BaseException:
                await _rollback(conn)
                raise
        self._marks_ready = True

    async def _marks_exist(self, conn: PooledConnection) -> bool:
        cur = await conn.raw.execute("SELECT pg_catalog.to_regclass('batchdb_spool_applied')")
        row = await cur.fetchone()
        return row is not None and row[0] is not None

    async def spool_applied(self, seqs: Sequence[int]) -> set[int]:
        """The replayed operations of this spool among ``seqs`` that are committed."""
        async with self._require_pool().connection() as conn:
            if not await self._marks_exist(conn):
                return set()
            cur = await conn.raw.execute(
                "SELECT seq FROM batchdb_spool_applied WHERE spool = %s AND seq = ANY(%s)",
                (self.context.spool_id, list(seqs)))
            return {int(r[0]) for r in await cur.fetchall()}

    async def _without_applied(self, batch: Batch) -> BatchResult:
        """``batch`` without the operations whose spool mark is committed."""
        ops = batch.operations
        applied = await self.spool_applied([op.spool_seq for op in ops if op.spool_seq])
        if not applied:  # the other transaction has not finished: ask again later
            raise CommitOutcomePending("a replayed operation's mark is being committed by "
                                       "another session")
        log.warning("batch on %r: %d replayed operation(s) were committed by an earlier "
                 "process: not written again", batch.table.name,
                 sum(op.spool_seq in applied for op in ops))
        rest = [op for op in ops if op.spool_seq not in applied]
        done_rows = sum(op.n_rows for op in ops if op.spool_seq in applied)
        if not rest:
            return BatchResult(done_rows)
        result = await self.write_batch(Batch(batch.table, batch.operation_type,
                                              batch.columns, rest, priority=batch.priority))
        result.rows += done_rows
        result.changed = None  # the skipped operations' share is not known
        return result

    async def spool_forget(self) -> None:
        """Delete this spool's marks (it is empty: none will be asked for again)."""
        async with self._require_pool().connection() as conn:
            if await self._marks_exist(conn):
                await conn.raw.execute("DELETE FROM batchdb_spool_applied WHERE spool = %s",
                                       (self.context.spool_id,))

    async def _key_exists(self, target: Target, columns: Sequence[str],
                          key_pos: Sequence[int], row: tuple[Any, ...]) -> bool:
        """True if ``row``'s key is in the table now (False if its value cannot even be
        looked up: then the row's COPY fails and names it). A lost connection raises, so
        the batch is retried."""
        from psycopg import sql

        query = sql.SQL("SELECT 1 FROM {} WHERE {} LIMIT 1").format(
            target.ident, sql.SQL(" AND ").join(
                sql.SQL("{} = %s").format(sql.Identifier(columns[i])) for i in key_pos))
        async with self._require_pool().connection() as conn:
            try:
                cur = await conn.raw.execute(query, [row[i] for i in key_pos])
                return await cur.fetchone() is not None
            except (self._pg.DataError, self._pg.ProgrammingError, TypeError, ValueError,
                    OverflowError):
                await _rollback(conn)
                return False

    def classify_error(self, exc: BaseException) -> ErrorKind:
        """By SQLSTATE: connection loss, shutdown, deadlock, serialization failure and
        statement timeout are TRANSIENT; data, integrity and trigger errors, and values
        the driver cannot send, are DATA; the rest (privileges, missing objects, disk
        full, …) is RESOURCE."""
        pg = self._pg
        if isinstance(exc, PostgresConnectError | CommitOutcomePending):
            return ErrorKind.TRANSIENT
        if isinstance(exc, SchemaError | BadValueError):
            return ErrorKind.DATA
        if isinstance(exc, BatchDBError):
            return ErrorKind.RESOURCE
        if isinstance(exc, pg.Error):
            state = exc.sqlstate
            if state is None:
                # no answer from the server: the connection is gone (or was never there)
                if isinstance(exc, pg.OperationalError | pg.InterfaceError):
                    return ErrorKind.TRANSIENT
                # raised by the driver itself: a value it cannot send ("cannot adapt type")
                return ErrorKind.DATA
            if state in _TRANSIENT_STATES or state.startswith(_TRANSIENT_CLASSES):
                return ErrorKind.TRANSIENT
            if state.startswith(_DATA_CLASSES):
                return ErrorKind.DATA
            return ErrorKind.RESOURCE
        if isinstance(exc, OSError | ConnectionError | TimeoutError):
            return ErrorKind.TRANSIENT
        return ErrorKind.DATA  # a value the driver could not convert, a malformed row

    # ------------------------------------------------------------------ maintenance
    async def maintenance_tables(self) -> list[tuple[str, str]]:
        """(schema, table) of the tables maintenance works on: every table of the schemas
        on the search_path (a fresh process has written nothing, and ``batchdb maintain``
        is such a process), then those written elsewhere in this run. batchdb's own marks
        table is left to autovacuum, as it is left out of ``list_tables()``."""
        async with self._require_pool().connection() as conn:
            cur = await conn.raw.execute(_SEARCH_PATH_TABLES)
            found = [(str(schema), str(relname)) for schema, relname in await cur.fetchall()
                     if relname not in BOOKKEEPING_TABLES]
        for target in self._written.values():
            if (target.schema, target.relname) not in found:
                found.append((target.schema, target.relname))
        return found

    async def run_maintenance(self, task: str) -> dict[str, Any]:
        """``vacuum``: VACUUM (ANALYZE) of the database's tables (those of the schemas on
        the search_path, where batchdb finds tables by name, and any other this backend
        wrote to), with their size before and after; ``analyze``: ANALYZE of them. Without
        statement timeout."""
        from psycopg import sql

        tables = await self.maintenance_tables()
        result: dict[str, Any] = {"tables": [f"{s}.{r}" for s, r in tables]}
        if not tables:
            result["seconds"] = 0.0
            return result
        start = time.perf_counter()
        idents = [sql.Identifier(schema, relname) for schema, relname in tables]
        names = sql.SQL(", ").join(idents)
        size_sql = sql.SQL("SELECT COALESCE(sum(pg_catalog.pg_total_relation_size(c.oid)), 0)"
                           " FROM pg_catalog.pg_class c WHERE c.oid = ANY(%s::regclass[])")
        regclasses = [ident.as_string() for ident in idents]
        async with self._require_pool().connection() as conn:
            raw = conn.raw
            # VACUUM cannot run in a transaction block (the connection is in autocommit) and
            # may take longer than the per-statement limit meant for batches
            await raw.execute("SELECT pg_catalog.set_config('statement_timeout', '0', false)")
            try:
                if task == "vacuum":
                    cur = await raw.execute(size_sql, (regclasses,))
                    before = (await cur.fetchone() or (0,))[0]
                    await raw.execute(sql.SQL("VACUUM (ANALYZE) {}").format(names))
                    cur = await raw.execute(size_sql, (regclasses,))
                    after = (await cur.fetchone() or (0,))[0]
                    result.update(bytes_before=int(before), bytes_after=int(after))
                else:
                    await raw.execute(sql.SQL("ANALYZE {}").format(names))
                    result["analyzed"] = True
            finally:
                if raw.info.transaction_status == self._pg.pq.TransactionStatus.IDLE:
                    await raw.execute(
                        "SELECT pg_catalog.set_config('statement_timeout', %s, false)",
                        (str(self.settings.statement_timeout_ms),))
        result["seconds"] = round(time.perf_counter() - start, 4)
        return result

    async def status(self) -> dict[str, Any]:
        """Server version, database size, the redacted DSN and the pool's figures."""
        pool = self._require_pool()
        async with pool.connection() as conn:
            cur = await conn.raw.execute(
                "SELECT current_setting('server_version'), current_database(), current_user, "
                "pg_catalog.pg_database_size(current_database())")
            row = await cur.fetchone()
        assert row is not None
        return {
            "backend": self.name,
            "dsn": self.where,
            "server_version": row[0],
            "database": row[1],
            "user": row[2],
            "database_bytes": int(row[3]),
            "pool": pool.stats(),
            "tables_written": sorted(self._written),
            "commit_outcomes_resolved": dict(self.outcomes_resolved),
        }


_MARKS_PKEY = "batchdb_spool_applied_pkey"
#: a batch's commit mark, and the deletion of marks of commits since acknowledged: one
#: statement, in the round trip that reads the transaction's id
_COMMIT_MARK_SQL = (
    "WITH forgotten AS (DELETE FROM batchdb_spool_applied WHERE spool = %(key)s "
    "AND seq = ANY(%(forget)s::bigint[])) "
    "INSERT INTO batchdb_spool_applied (spool, seq) VALUES (%(key)s, %(seq)s) "
    "RETURNING pg_catalog.txid_current()")
#: which of a backend's commit marks are there
_MARKED_SQL = ("SELECT seq FROM batchdb_spool_applied WHERE spool = %s "
               "AND seq = ANY(%s::bigint[])")
_FORGET_SQL = "DELETE FROM batchdb_spool_applied WHERE spool = %s AND seq = ANY(%s::bigint[])"
#: the spool sequence numbers of a replayed batch, noted in its own transaction
_MARK_SQL = ("INSERT INTO batchdb_spool_applied (spool, seq) "
             "SELECT %s, pg_catalog.unnest(%s::bigint[])")

_SEARCH_PATH_TABLES = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname = ANY (pg_catalog.current_schemas(false))
ORDER BY array_position(pg_catalog.current_schemas(false), n.nspname), c.relname
"""


def _column_names(cursor: Any) -> tuple[str, ...]:
    return tuple(c.name for c in cursor.description or ())


async def _rollback(conn: PooledConnection) -> None:
    """End a failed transaction; a connection that cannot even do that is left broken (the
    pool then discards it)."""
    raw = conn.raw
    if raw.closed or raw.broken or raw.info.transaction_status == raw.info.transaction_status.IDLE:
        return
    try:
        await raw.execute("ROLLBACK", prepare=False)
    except Exception:
        with contextlib.suppress(Exception):
            await raw.close()


_COPY_CONTEXT = re.compile(r"COPY [^,]+, line (\d+), column ([^:]+):")


def _portable_placeholders(query: str, n_params: int) -> str:
    """``?`` placeholders (outside quotes) turned into ``%s`` when the query has no ``%s``
    and as many ``?`` as parameters; anything else is returned as it is."""
    if "%s" in query or "%(" in query or "?" not in query:
        return query
    out: list[str] = []
    quote: str | None = None
    count = 0
    for ch in query:
        if quote is not None:
            if ch == quote:
                quote = None
            out.append("%%" if ch == "%" else ch)
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            count += 1
            out.append("%s")
        else:
            out.append("%%" if ch == "%" else ch)
    return "".join(out) if count == n_params else query
