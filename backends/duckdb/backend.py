"""DuckDB: one writer thread, one Arrow table and one statement per batch, a reader cursor.

duckdb and pyarrow are imported when the backend is built, not when this module is
imported, so the plugin loads (and reports a clear error) without the ``duckdb`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import secrets
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from batchdb.backend import (
    Backend,
    BackendContext,
    Batch,
    BatchResult,
    Capabilities,
    ErrorKind,
    with_location,
)
from batchdb.models import BatchDBError, OperationType, SchemaError
from batchdb.reads import ReadChunk, not_a_read
from batchdb.schema import TableInfo
from batchdb.worker import Worker

from .arrow import ArrowConverter, ConversionError
from .settings import DuckDBSettings
from .sql import build_sql, create_statements

if TYPE_CHECKING:
    import duckdb

__all__ = ["DuckDBBackend", "load_drivers"]

T = TypeVar("T")

_INSTALL_HINT = "install it with: pip install 'batchdb[duckdb]'"
_TRANSIENT_IO = ("could not set lock", "conflicting lock", "resource temporarily unavailable")
_RESOURCE_HINTS = ("no space left", "disk is full", "disk full", "out of memory",
                   "could not write file",
                   "read-only", "read only", "permission denied")


_EXPLAIN_ANALYZE = re.compile(r"\s*EXPLAIN\s+ANALY[SZ]E\b", re.IGNORECASE)
_PRAGMA_NAME = re.compile(r"\s*PRAGMA\s+(\w+)", re.IGNORECASE)
# the pragmas that only report (others set options or checkpoint)
_QUERY_PRAGMAS = frozenset({"table_info", "show", "show_tables", "show_tables_expanded",
                            "show_databases", "database_list", "database_size",
                            "storage_info", "functions", "collations", "version",
                            "platform", "metadata_info", "user_agent"})


_SOURCE_COLUMN = re.compile(r"source column c(\d+)\b")


def _name_source_column(exc: Exception, columns: tuple[str, ...]) -> Exception:
    """DuckDB names a value it cannot cast by the Arrow column (``c1``): add the table's
    column name."""
    match = _SOURCE_COLUMN.search(str(exc))
    if match is None or int(match.group(1)) >= len(columns):
        return exc
    return with_location(exc, f"column {columns[int(match.group(1))]!r}")


def load_drivers() -> tuple[Any, Any]:
    """``(duckdb, pyarrow)``, or one BatchDBError naming the extra to install."""
    missing = []
    modules = []
    for name in ("duckdb", "pyarrow", "pyarrow.compute"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name.split(".")[0])
    if missing:
        raise BatchDBError(f"the duckdb backend needs {' and '.join(dict.fromkeys(missing))}, "
                           f"which {'is' if len(missing) == 1 else 'are'} not installed; "
                           f"{_INSTALL_HINT}")
    return modules[0], modules[1]


class _Plan:
    """What a (table, operation, columns) needs: its statement and its Arrow converter."""

    __slots__ = ("converter", "dedup", "sql")

    def __init__(self, sql: str, converter: ArrowConverter, dedup: bool) -> None:
        self.sql = sql
        self.converter = converter
        self.dedup = dedup


class DuckDBBackend(Backend):
    """One DuckDB file: batches become Arrow tables written by one statement each."""

    name = "duckdb"
    settings_model = DuckDBSettings
    takes_connection_factory = True
    maintenance_tasks = ("checkpoint", "analyze", "vacuum")

    def __init__(
        self,
        settings: DuckDBSettings,
        *,
        connection_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(settings, connection_factory=connection_factory)
        self.settings: DuckDBSettings = settings
        self._duckdb, self._pa = load_drivers()
        self._writer: Worker | None = None
        self._reader: Worker | None = None
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._source = f"batchdb_batch_{secrets.token_hex(6)}"
        self.path: str | None = None

    @property
    def capabilities(self) -> Capabilities:
        """One writer, batches of ``batch_size`` rows, failures handed to the scheduler."""
        # one writer; a failed batch raises and the scheduler retries or splits it
        # (pipelining a second batch was measured: no gain, the conversion and the
        # statement compete for the same two cores)
        size = self.settings.batch_size
        return Capabilities(max_writers=1, insert_batch_size=size, update_batch_size=size)

    # ------------------------------------------------------------------ connections
    def _connect(self) -> duckdb.DuckDBPyConnection:
        ddb = self._duckdb
        if self.connection_factory is not None:
            made = self.connection_factory()
            if not isinstance(made, ddb.DuckDBPyConnection):
                raise BatchDBError("the connection factory must return a duckdb connection, "
                                   f"got {type(made).__name__}")
            factory_conn: duckdb.DuckDBPyConnection = made
            return factory_conn
        path = self.settings.path
        if not path.startswith(":memory:"):
            parent = Path(path).parent
            if not parent.exists():
                raise BatchDBError(f"DuckDB database {path}: directory {parent} does not exist")
        config: dict[str, Any] = {}
        if self.settings.threads is not None:
            config["threads"] = self.settings.threads
        if self.settings.memory_limit is not None:
            config["memory_limit"] = self.settings.memory_limit
        try:
            conn: duckdb.DuckDBPyConnection = ddb.connect(path, config=config)
        except ddb.Error as exc:
            raise BatchDBError(f"DuckDB database {path}: cannot open: {exc}") from exc
        return conn

    def _open(self) -> None:
        self._conn = self._connect()
        self._cursor = self._conn.cursor()
        # every result is read to its end: DuckDB 2.0 keeps a connection busy until then
        rows = self._conn.execute(
            "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
        ).fetchall()
        self.path = str(rows[0][0]) if rows and rows[0][0] else ""

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._writer is None:
            raise self.not_open()
        return await asyncio.wrap_future(self._writer.submit(fn, *args))

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._reader is None:
            raise self.not_open()
        return await asyncio.wrap_future(self._reader.submit(fn, *args))

    async def open(self, context: BackendContext) -> None:
        """Open the file (and its reader cursor) in the writer thread."""
        self.context = context
        if self._writer is not None:
            return
        self._writer = Worker("batchdb-duckdb-writer")
        try:
            await self._call(self._open)
        except BaseException:
            self._writer.shutdown()
            self._writer = None
            raise
        self._reader = Worker("batchdb-duckdb-reader")

    def _close(self) -> None:
        for conn in (self._cursor, self._conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._cursor = self._conn = None

    async def close(self) -> None:
        """Close the reader cursor and the connection (DuckDB checkpoints on close)."""
        if self._reader is not None:
            self._reader.shutdown()
            self._reader = None
        if self._writer is not None:
            await self._call(self._close)
            self._writer.shutdown()
            self._writer = None
        self._plans.clear()

    # ------------------------------------------------------------------ reading
    def _check_read(self, sql: str) -> None:
        """Refuse ``sql`` unless each of its statements is a read: the reader cursor is a
        cursor of the writer's connection, so DuckDB itself would run a write there."""
        ddb = self._duckdb
        try:
            statements = ddb.extract_statements(sql)
        except ddb.Error:
            return  # not SQL DuckDB can parse: running it reports the syntax error
        for stmt in statements:
            kind = stmt.type
            if kind == ddb.StatementType.SELECT:
                continue
            if kind == ddb.StatementType.EXPLAIN:
                analyzed = _EXPLAIN_ANALYZE.match(stmt.query)
                if analyzed is None:
                    continue  # a plan, not run
                inner = ddb.extract_statements(stmt.query[analyzed.end():])
                if all(s.type == ddb.StatementType.SELECT for s in inner):
                    continue
            if kind == ddb.StatementType.PRAGMA:
                name = _PRAGMA_NAME.match(stmt.query)
                if name is not None and name.group(1).lower() in _QUERY_PRAGMAS:
                    continue
            raise not_a_read(sql, f"DuckDB reads it as a {kind.name} statement")

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self._cursor is not None
        self._check_read(sql)
        return self._cursor.execute(sql, list(params)).fetchall()

    async def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a query on the reader cursor, in its own thread (writes go on meanwhile)."""
        return await self._read(self._fetch, sql, tuple(params))

    def _start_read(self, sql: str, params: tuple[Any, ...]
                    ) -> tuple[duckdb.DuckDBPyConnection, tuple[str, ...]]:
        """A cursor of its own running ``sql`` (the shared reader cursor would lose the
        pending result at the next ``fetch``), and the result's column names."""
        assert self._conn is not None
        self._check_read(sql)
        cursor = self._conn.cursor()
        try:
            cursor.execute(sql, list(params))
        except BaseException:
            cursor.close()
            raise
        return cursor, tuple(str(d[0]) for d in cursor.description or ())

    async def read_chunks(self, sql: str, params: tuple[Any, ...] = (),
                          chunk_rows: int = 10_000) -> AsyncGenerator[ReadChunk, None]:
        """The rows of ``sql`` ``chunk_rows`` at a time, fetched in the reader thread from a
        cursor of its own (DuckDB produces the result as it is fetched)."""
        cursor, columns = await self._read(self._start_read, sql, tuple(params))
        try:
            first = True
            while True:
                rows = await self._read(cursor.fetchmany, chunk_rows)
                if not rows and not first:
                    return
                first = False
                yield ReadChunk(columns, rows)
                if len(rows) < chunk_rows:
                    return
        finally:
            if self._reader is not None:
                await self._read(cursor.close)
            else:
                cursor.close()

    async def list_tables(self) -> list[str]:
        """Tables of the current database and schema, DuckDB's internal ones left out."""
        rows = await self.fetch(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND NOT internal AND NOT temporary")
        return sorted(str(r[0]) for r in rows)

    # ------------------------------------------------------------------ schema
    def _describe(self, name: str) -> TableInfo | None:
        conn = self._conn
        assert conn is not None
        found = conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = ?", [name]).fetchall()
        if not found:  # DuckDB names are case-insensitive: "Candles" is the table "candles"
            found = conn.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = "
                "current_database() AND schema_name = current_schema() "
                "AND lower(table_name) = lower(?)", [name]).fetchall()
            if len(found) != 1:
                return None
        table = str(found[0][0])
        cols = conn.execute(
            "SELECT column_name, data_type, is_nullable FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = current_schema() "
            "AND table_name = ? ORDER BY column_index", [table]).fetchall()
        keys = conn.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() "
            "WHERE database_name = current_database() AND schema_name = current_schema() "
            "AND table_name = ? AND constraint_type = 'PRIMARY KEY'", [table]).fetchall()
        return TableInfo(
            name=table,
            columns=tuple(str(c[0]) for c in cols),
            primary_key=tuple(str(k) for k in keys[0][0]) if keys else (),
            types={str(c[0]): str(c[1]) for c in cols},
            not_null=frozenset(str(c[0]) for c in cols if not c[2]),
        )

    async def describe_table(self, name: str) -> TableInfo | None:
        """Columns, types and primary key of ``name`` as DuckDB reports them."""
        return await self._call(self._describe, name)

    def _create(self, table: sa.Table) -> TableInfo:
        conn = self._conn
        assert conn is not None
        statements = create_statements(table)
        conn.execute("BEGIN TRANSACTION")
        try:
            for stmt in statements:
                conn.execute(stmt)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        info = self._describe(table.name)
        if info is None:
            raise SchemaError(f"table {table.name!r} was created but DuckDB does not report it")
        return info

    async def create_table(self, table: sa.Table) -> TableInfo:
        """Create a declared table (PostgreSQL type names, which DuckDB reads) if missing."""
        return await self._call(self._create, table)

    # ------------------------------------------------------------------ writing
    def _plan(self, batch: Batch) -> _Plan:
        table = batch.table
        key = (table.name, table.columns, table.primary_key, batch.operation_type,
               batch.columns)
        plan = self._plans.get(key)
        if plan is None:
            op = batch.operation_type
            converter = ArrowConverter(self._pa, table, batch.columns, table.primary_key
                                       if op is not OperationType.INSERT else ())
            plan = self._plans[key] = _Plan(
                build_sql(table, op, batch.columns, self._source), converter,
                dedup=op in (OperationType.UPSERT, OperationType.UPDATE))
        return plan

    def _write(self, batch: Batch) -> BatchResult:
        """Runs in the writer thread: the batch as one Arrow table (its rows are read from
        the producers' data here, off the event loop), one statement (one transaction in
        DuckDB's auto-commit mode)."""
        conn = self._conn
        if conn is None:
            raise self.not_open()
        plan = self._plan(batch)
        data = plan.converter.table_of(batch.operations)
        if plan.dedup:
            # DuckDB does not apply two rows of one statement to the same key in order:
            # keep the last one, as the batch's operations would have left it
            data = plan.converter.keep_last(data)
        conn.register(self._source, data)
        try:
            out = conn.execute(plan.sql).fetchall()  # [(rows changed,)]
        except self._duckdb.ConversionException as exc:
            raise _name_source_column(exc, batch.columns) from exc
        finally:
            with contextlib.suppress(Exception):
                conn.unregister(self._source)
        return BatchResult(batch.row_count, changed=int(out[0][0]) if out else None)

    def write_batch(self, batch: Batch) -> asyncio.Future[BatchResult]:
        """Start ``batch`` in the writer thread at once; the future holds its result."""
        if self._writer is None:
            raise self.not_open()
        return asyncio.wrap_future(self._writer.submit(self._write, batch))

    def classify_error(self, exc: BaseException) -> ErrorKind:
        """Bad values and constraints split the batch; conflicts and locks are retried;
        memory, disk, permissions and a broken database fail the batch as it is."""
        duckdb = self._duckdb
        message = str(exc).lower()
        if isinstance(exc, SchemaError | ConversionError):
            return ErrorKind.DATA
        if isinstance(exc, BatchDBError):
            return ErrorKind.RESOURCE
        if isinstance(exc, duckdb.Error):
            if isinstance(exc, duckdb.OutOfMemoryException | duckdb.FatalException
                          | duckdb.InternalException | duckdb.PermissionException
                          | duckdb.ConnectionException | duckdb.InterruptException
                          | duckdb.SerializationException | duckdb.CatalogException
                          | duckdb.ParserException):
                return ErrorKind.RESOURCE
            if isinstance(exc, duckdb.TransactionException):
                if any(t in message for t in _RESOURCE_HINTS) or "could not write" in message:
                    return ErrorKind.RESOURCE  # "Failed to commit: … No space left on device"
                return ErrorKind.TRANSIENT  # write-write conflict: retry the batch
            if isinstance(exc, duckdb.IOException):
                if any(t in message for t in _TRANSIENT_IO):
                    return ErrorKind.TRANSIENT
                return ErrorKind.RESOURCE
            if any(t in message for t in _RESOURCE_HINTS):
                return ErrorKind.RESOURCE
            return ErrorKind.DATA  # constraint, conversion, invalid input, out of range, …
        if isinstance(exc, MemoryError | OSError):
            return ErrorKind.RESOURCE
        return ErrorKind.DATA  # a value Arrow cannot take (type, overflow)

    # ------------------------------------------------------------------ maintenance
    def _sizes(self) -> tuple[int, int]:
        if not self.path:
            return 0, 0
        wal = self.path + ".wal"
        return (os.path.getsize(self.path) if os.path.exists(self.path) else 0,
                os.path.getsize(wal) if os.path.exists(wal) else 0)

    def _blocks(self) -> dict[str, int]:
        assert self._conn is not None
        cur = self._conn.execute(
            "SELECT total_blocks, used_blocks, free_blocks FROM pragma_database_size() "
            "WHERE database_name = current_database()")
        rows = cur.fetchall()
        if not rows:
            return {}
        row = rows[0]
        return {"total_blocks": int(row[0]), "used_blocks": int(row[1]),
                "free_blocks": int(row[2])}

    def _checkpoint(self) -> None:
        assert self._conn is not None
        try:
            self._conn.execute("CHECKPOINT").fetchall()
        except self._duckdb.TransactionException:
            # a reader's transaction is open: wait for the checkpoint lock instead
            self._conn.execute("FORCE CHECKPOINT").fetchall()

    def _maintain(self, task: str) -> dict[str, Any]:
        conn = self._conn
        assert conn is not None
        if task == "checkpoint":
            _, wal_before = self._sizes()
            self._checkpoint()
            return {"wal_bytes_before": wal_before, "wal_bytes_after": self._sizes()[1]}
        if task == "analyze":
            conn.execute("ANALYZE").fetchall()
            return {"analyzed": True}
        if task == "vacuum":
            # DuckDB's VACUUM reclaims nothing; a checkpoint vacuums deleted rows and
            # compacts row groups (with their ART indexes since DuckDB 2.0)
            before, wal = self._sizes()
            blocks = self._blocks()
            self._checkpoint()
            after = self._blocks()
            return {"method": "checkpoint", "bytes_before": before + wal,
                    "bytes_after": sum(self._sizes()),
                    "used_blocks_before": blocks.get("used_blocks"),
                    "used_blocks_after": after.get("used_blocks"),
                    "free_blocks_after": after.get("free_blocks")}
        raise ValueError(f"unknown DuckDB maintenance task {task!r}; "
                         f"known: {', '.join(self.maintenance_tasks)}")

    async def run_maintenance(self, task: str) -> dict[str, Any]:
        """Run ``checkpoint``, ``analyze`` or ``vacuum`` in the writer thread."""
        return await self._call(self._maintain, task)

    # ------------------------------------------------------------------ status
    def _status(self) -> dict[str, Any]:
        cur = self._cursor
        assert cur is not None
        tables = cur.execute(
            "SELECT table_name, estimated_size FROM duckdb_tables() "
            "WHERE database_name = current_database() AND schema_name = current_schema() "
            "ORDER BY table_name").fetchall()
        sizes = cur.execute(
            "SELECT memory_usage, memory_limit FROM pragma_database_size() "
            "WHERE database_name = current_database()").fetchall()
        size = sizes[0] if sizes else None
        file_bytes, wal_bytes = self._sizes()
        return {
            "backend": self.name,
            "path": self.path,
            "duckdb_version": self._duckdb.__version__,
            "file_bytes": file_bytes,
            "wal_bytes": wal_bytes,
            "tables": {str(t): int(n) for t, n in tables},
            "memory_usage": size[0] if size else None,
            "memory_limit": size[1] if size else None,
        }

    async def status(self) -> dict[str, Any]:
        """Path, file and WAL size, DuckDB version and the tables with estimated rows."""
        return await self._read(self._status)
