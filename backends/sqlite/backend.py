"""SQLite in WAL mode: one writer thread, a pool of aiosqlite readers, upsert by ON CONFLICT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from batchdb.backend import (
    Backend,
    BackendContext,
    Batch,
    BatchResult,
    Capabilities,
    ErrorKind,
    note_retries,
    with_location,
)
from batchdb.models import BatchDBError, BatchOperation, OperationType, Priority, SchemaError
from batchdb.reads import ReadChunk, not_a_read
from batchdb.schema import TableInfo, create_statements, on_conflict_sql, quote_ident

from .connections import (
    check_factory_connection,
    check_file_database,
    make_read_only,
    refused_as_write,
)
from .coordination import PriorityClaims, describe, open_claims
from .settings import SQLiteSettings
from .types import TypeChecks, check_rows, check_values
from .writer import WriterThread

__all__ = ["SQLiteBackend"]

T = TypeVar("T")

_TRANSIENT = ("database is locked", "database table is locked", "database schema is locked",
              "busy")
_RESOURCE = ("disk is full", "database or disk is full", "readonly", "read-only",
             "unable to open", "disk i/o error", "malformed", "not a database",
             "out of memory", "no such table")
# INSERT and UPSERT bind many rows per statement: one multi-row VALUES statement runs ~1.5-2x
# faster than executemany of the one-row statement, and releases the GIL once per chunk
# instead of once per row (which stalled the event loop behind the writer thread)
_MULTI_ROW = frozenset({OperationType.INSERT, OperationType.UPSERT})
_CHUNK_ROWS = 1024  # most rows per multi-row statement (fewer if the table is wide)
# Waiting for the write lock: SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25,
# 25, 50, 50, then 100 ms at a time, so a writer often slept long after the lock was free
# and another process's writer took it again. The writer's connection has busy_timeout 0
# and retries on its own after these sleeps (then every _LOCK_RETRY_MAX s), up to
# busy_timeout_ms in all.
_LOCK_RETRY_SLEEPS = (0.0001, 0.0002, 0.0005)
_LOCK_RETRY_MAX = 0.001
_LOCK_RETRY_SLOW = 0.005  # after a second of waiting (another program holds the lock long)
# A batch yields to a higher-priority writer of another process (or of another manager of
# this process) waiting for the write lock for at most this long, then goes anyway: a stuck
# or never-ending higher-priority writer slows a lower one, never stops it.
_YIELD_SECONDS = 0.025
# Restarting the WAL (see _after_commit): a batch below CRITICAL waits at most this long for
# the checkpoint that lets the next transaction restart it.
_RESET_WAIT_SECONDS = 0.25


class SQLiteBackend(Backend):
    """The reference backend: an SQLite file in WAL mode, tuned by its PRAGMA settings."""

    name = "sqlite"
    settings_model = SQLiteSettings
    takes_connection_factory = True
    maintenance_tasks = ("checkpoint", "analyze", "vacuum", "integrity_check")

    def __init__(
        self,
        settings: SQLiteSettings,
        *,
        connection_factory: Callable[[], sqlite3.Connection] | None = None,
    ) -> None:
        super().__init__(settings, connection_factory=connection_factory)
        self.settings: SQLiteSettings = settings
        self._writer: WriterThread | None = None
        self._conn: sqlite3.Connection | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] | None = None
        self._reader_count = 0
        self._all_readers: list[aiosqlite.Connection] = []
        self._reader_conns: list[sqlite3.Connection] = []  # what the readers were given
        self._types = TypeChecks(settings.check_types)  # values vs. declared column types
        self._sql_cache: dict[tuple[str, OperationType, tuple[str, ...], int], str] = {}
        self._max_variables = 32766  # SQLITE_LIMIT_VARIABLE_NUMBER, read at open()
        self._checkpointer: _Checkpointer | None = None
        self._claims: PriorityClaims | None = None
        self._reset_pass: int | None = None  # checkpoint pass the WAL restart waits for
        self._written_beside = 0  # batches committed since that pass was asked for
        self._reset_version = 0  # PRAGMA data_version when it was asked for
        self.path: str | None = None

    @property
    def capabilities(self) -> Capabilities:
        # one writer connection; two batches in flight so that the next batch already
        # waits in the writer thread when the current one commits (the thread runs the
        # batches of a table in order and isolates failures itself, so pipelining keeps
        # submission order; a higher-priority batch may pass waiting ones of other tables)
        return Capabilities(max_writers=2, ordered=True, recovers_itself=True,
                            spool_marks=True)

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        if self.connection_factory is not None:
            conn = self.connection_factory()
            if not isinstance(conn, sqlite3.Connection):
                raise BatchDBError("the connection factory must return a sqlite3.Connection, "
                                   f"got {type(conn).__name__}")
            check_factory_connection(conn, ())
            check_file_database(conn, "the database the connection factory opened")
        else:
            path = Path(self.settings.path)
            if not path.parent.exists():
                raise BatchDBError(f"SQLite database {path}: directory {path.parent} does "
                                   "not exist")
            _check_writable(path, self.settings.journal_mode)
            try:
                conn = sqlite3.connect(path, check_same_thread=False)
            except sqlite3.Error as exc:
                raise BatchDBError(f"SQLite database {path}: cannot open: {exc}") from exc
            try:
                check_file_database(conn, f"{str(path)!r}")
            except BatchDBError:
                conn.close()
                raise
        conn.isolation_level = None  # explicit BEGIN IMMEDIATE / COMMIT
        self._tune(conn)
        self._max_variables = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        conn.execute("PRAGMA busy_timeout = 0")  # batches wait for the lock on their own
        return conn

    def _tune(self, conn: sqlite3.Connection) -> None:
        s = self.settings
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(s.busy_timeout_ms)}")
            mode = conn.execute(f"PRAGMA journal_mode = {s.journal_mode}").fetchone()[0]
            conn.execute(f"PRAGMA synchronous = {s.synchronous}")
            conn.execute(f"PRAGMA cache_size = {int(s.cache_size)}")
            conn.execute(f"PRAGMA mmap_size = {int(s.mmap_size)}")
            conn.execute(f"PRAGMA foreign_keys = {'ON' if s.foreign_keys else 'OFF'}")
            conn.execute("PRAGMA temp_store = MEMORY")
        except sqlite3.DatabaseError as exc:
            where = self.path or s.path
            raise BatchDBError(f"SQLite database {where}: cannot be used: {exc}") from exc
        if str(mode).upper() != s.journal_mode and self.path not in (":memory:", ""):
            raise BatchDBError(f"SQLite database {self.path}: journal_mode {s.journal_mode} "
                               f"was refused (the file reports {mode})")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the writer thread, in order with the batches, with SQLite's busy
        handler waiting up to ``busy_timeout_ms`` for locks (batches wait on their own)."""
        if self._writer is None:
            raise self.not_open()
        return await asyncio.wrap_future(self._writer.submit(self._patiently, fn, *args))

    def _patiently(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        if conn is None:
            return fn(*args)
        conn.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout_ms)}")
        try:
            return fn(*args)
        finally:
            with contextlib.suppress(sqlite3.ProgrammingError):  # fn closed it
                conn.execute("PRAGMA busy_timeout = 0")

    async def open(self, context: BackendContext) -> None:
        self.context = context
        if self._writer is not None:
            return
        self._writer = WriterThread("batchdb-sqlite-writer", self._gate)
        try:
            self._conn = await self._call(self._connect)
            self.path = await self._call(self._main_file)
            if self._checkpoint_in_background():
                await self._call(self._conn.execute, "PRAGMA wal_autocheckpoint = 0")
                self._checkpointer = _Checkpointer(
                    self.path or "", self.settings.background_checkpoint_seconds,
                    self.settings.busy_timeout_ms)
            if self.path and os.path.exists(self.path):
                self._claims = open_claims(self.path)
        except BaseException:
            self._writer.shutdown()
            self._writer = None
            raise
        self._readers = asyncio.Queue()
        if self.connection_factory is not None:
            # a factory handing out one connection for all fails now, not at the first read
            try:
                async with self._reader():
                    pass
            except BaseException:
                await self.close()
                raise

    def _checkpoint_in_background(self) -> bool:
        return bool(self.settings.background_checkpoint_seconds > 0
                    and self.settings.journal_mode == "WAL"
                    and self.path and os.path.exists(self.path))

    def _main_file(self) -> str:
        assert self._conn is not None
        for _, name, file in self._conn.execute("PRAGMA database_list"):
            if name == "main":
                if file and self.connection_factory is not None:
                    _check_writable(Path(file), self.settings.journal_mode)
                return str(file)
        return ""

    async def close(self) -> None:
        if self._checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.stop)
            self._checkpointer = None
        for reader in self._all_readers:
            with contextlib.suppress(Exception):
                await reader.close()
        self._all_readers.clear()
        self._reader_conns.clear()
        self._readers = None
        self._reader_count = 0
        if self._writer is not None:
            if self._conn is not None:
                await self._call(self._conn.close)
                self._conn = None
            await asyncio.get_running_loop().run_in_executor(None, self._writer.shutdown)
            self._writer = None
        if self._claims is not None:
            self._claims.close()
            self._claims = None

    @contextlib.asynccontextmanager
    async def _reader(self) -> Any:
        if self._readers is None:
            raise self.not_open()
        if self._readers.empty() and self._reader_count < self.settings.readers:
            self._reader_count += 1
            try:
                path = self.path or self.settings.path
                factory = self.connection_factory or (
                    lambda: sqlite3.connect(path, check_same_thread=False)
                )
                conn = await aiosqlite.Connection(self._reader_factory(factory), 64)
            except BaseException:
                self._reader_count -= 1
                raise
            self._all_readers.append(conn)
            self._readers.put_nowait(conn)
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            if self._readers is not None:
                self._readers.put_nowait(conn)

    def _reader_factory(
        self, factory: Callable[[], sqlite3.Connection]
    ) -> Callable[[], sqlite3.Connection]:
        def connect() -> sqlite3.Connection:
            conn = factory()
            if self.connection_factory is not None:
                check_factory_connection(conn, (self._conn, *self._reader_conns))
            self._reader_conns.append(conn)
            conn.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout_ms)}")
            conn.execute(f"PRAGMA mmap_size = {int(self.settings.mmap_size)}")
            make_read_only(conn)
            return conn

        return connect

    async def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        async with self._reader() as conn:
            try:
                async with conn.execute(sql, params) as cursor:
                    return [tuple(r) for r in await cursor.fetchall()]
            except sqlite3.DatabaseError as exc:
                if refused_as_write(exc):
                    raise not_a_read(sql, str(exc)) from None
                raise

    async def read_chunks(self, sql: str, params: tuple[Any, ...] = (),
                          chunk_rows: int = 10_000) -> AsyncGenerator[ReadChunk, None]:
        """The rows of ``sql`` ``chunk_rows`` at a time, from one reader connection held
        until the iteration ends (its WAL snapshot too: the rows are those of one moment,
        and the WAL cannot restart past that snapshot meanwhile)."""
        async with self._reader() as conn:
            try:
                async with conn.execute(sql, params) as cursor:
                    columns = tuple(d[0] for d in cursor.description or ())
                    first = True
                    while True:
                        rows = await cursor.fetchmany(chunk_rows)
                        if not rows and not first:
                            return
                        first = False
                        yield ReadChunk(columns, rows if type(rows) is list else list(rows))
                        if len(rows) < chunk_rows:
                            return
            except sqlite3.DatabaseError as exc:
                if refused_as_write(exc):
                    raise not_a_read(sql, str(exc)) from None
                raise

    async def list_tables(self) -> list[str]:
        """Tables of the main database, without SQLite's own (``sqlite_%``)."""
        rows = await self.fetch("SELECT name FROM sqlite_master WHERE type = 'table' "
                                "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")
        return sorted(str(r[0]) for r in rows)

    # ------------------------------------------------------------------ schema
    def _describe(self, name: str) -> TableInfo | None:
        assert self._conn is not None
        found = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        if found is None:
            return None
        cols = self._conn.execute(
            'SELECT name, type, "notnull", pk FROM pragma_table_info(?)', (name,)
        ).fetchall()
        pk = tuple(c[0] for c in sorted((c for c in cols if c[3]), key=lambda c: c[3]))
        return TableInfo(
            name=found[0],
            columns=tuple(c[0] for c in cols),
            primary_key=pk,
            types={c[0]: c[1] for c in cols},
            not_null=frozenset(c[0] for c in cols if c[2] or c[3]),
        )

    async def describe_table(self, name: str) -> TableInfo | None:
        return await self._call(self._describe, name)

    def _create(self, table: sa.Table) -> TableInfo:
        conn = self._conn
        assert conn is not None
        statements = create_statements(table, sqlite_dialect.dialect())

        def create() -> None:
            with self._transaction():
                for stmt in statements:
                    conn.execute(stmt)

        # like a batch: wait out another process's write lock, with backoff
        self.context.retry_policy.call(
            create, lambda exc: isinstance(exc, sqlite3.OperationalError)
            and self.classify_error(exc) is ErrorKind.TRANSIENT)
        info = self._describe(table.name)
        assert info is not None
        return info

    async def create_table(self, table: sa.Table) -> TableInfo:
        try:
            return await self._call(self._create, table)
        except sqlite3.Error as exc:
            raise BatchDBError(f"SQLite database {self.path or self.settings.path}: cannot "
                               f"create table {table.name!r}: {exc}") from exc

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _sql(self, table: TableInfo, op: OperationType, columns: tuple[str, ...],
             rows: int = 1) -> str:
        key = (table.name, op, columns, rows)
        sql = self._sql_cache.get(key)
        if sql is None:
            sql = self._sql_cache[key] = build_sql(table, op, columns, rows)
        return sql

    def _statement_sizes(self, batch: Batch) -> list[int] | None:
        """Rows per statement: one for a single row (any operation), multi-row statements
        for an INSERT or UPSERT batch; None for other batches (executemany).

        A full batch is one statement; a larger one goes in statements of a full batch's
        rows (fewer for wide tables), the rest as :func:`statement_rows` sizes it, so a
        table needs a few dozen statement texts at most. Fewer statements matter beyond
        SQLite: at every one the writer thread hands the GIL to the event loop and waits
        to get it back.
        """
        n = batch.row_count
        if n == 1:  # a live order: one statement, its own transaction
            return [1]
        if batch.operation_type not in _MULTI_ROW:
            return None
        chunk = min(self.context.batch_rows, _CHUNK_ROWS)
        while chunk > 1 and chunk * len(batch.columns) > self._max_variables:
            chunk //= 2
        sizes = []
        while n:
            sizes.append(statement_rows(n, chunk))
            n -= sizes[-1]
        return sizes

    def _commit_batch(self, batch: Batch) -> BatchResult:
        """The batch in one transaction, rows in order (as by executemany); a single
        statement is a transaction by itself (autocommit spares BEGIN and COMMIT, two
        more hand-overs of the GIL). UPDATE/DELETE report the rows their keys matched."""
        conn = self._conn
        assert conn is not None
        table, op, columns = batch.table, batch.operation_type, batch.columns
        sizes = self._statement_sizes(batch)
        # values of the wrong type for an ordinary table's columns (see types.py)
        checks = self._types.of(conn, table, columns) if op is not OperationType.DELETE else ()
        if sizes is None:
            if checks:
                check_rows(checks, batch.rows, len(columns), table.name)
            with self._transaction():
                matched = conn.executemany(self._sql(table, op, columns), batch.rows).rowcount
                if len(batch.operations) > 1 and matched != batch.row_count:
                    raise _Recount  # some key matched nothing: which operation's?
            return BatchResult(batch.row_count, changed=matched)
        values = batch.flat_values()
        if checks:
            check_values(checks, values, len(columns), table.name)
        if len(sizes) == 1:
            matched = conn.execute(self._sql(table, op, columns, sizes[0]), values).rowcount
            return BatchResult(batch.row_count, changed=matched)
        width = len(columns)
        with self._transaction():
            i = 0
            for size in sizes:
                conn.execute(self._sql(table, op, columns, size),
                             values[i * width:(i + size) * width])
                i += size
        return BatchResult(batch.row_count)

    def _write(self, batch: Batch) -> BatchResult:
        """Runs in the writer thread: the batch in one transaction, retried while the
        database is locked; on bad data, again with one savepoint per operation so that
        only the failing operations are left out."""
        policy = self.context.retry_policy
        attempt = 0
        # bad data: again operation by operation, one row per statement, so that the error
        # is the database's own message for that row (a multi-row statement numbers its
        # parameters across rows)
        isolate_on_bad_data = len(batch.operations) > 1 or (
            batch.operation_type in _MULTI_ROW and batch.operations[0].n_rows > 1)
        # replayed from the spool: operation by operation, each noting its spool mark in
        # the transaction (see _write_isolated)
        isolate = bool(batch.operations[0].spool_seq)
        if self._reset_pass is not None and batch.priority < Priority.CRITICAL:
            self._restart_wal()
        while True:
            try:
                result = self._locked(self._write_isolated if isolate else self._commit_batch,
                                      batch)
                result.retries = attempt
                if self._checkpointer is not None:
                    self._after_commit(self._checkpointer)
                return result
            except _Recount:
                isolate = True  # again operation by operation, each counting its own rows
                continue
            except Exception as exc:
                kind = self.classify_error(exc)
                if kind is ErrorKind.TRANSIENT and attempt < policy.max_retries:
                    attempt += 1
                    time.sleep(policy.delay(attempt))
                    continue
                if kind is ErrorKind.DATA and not isolate and isolate_on_bad_data:
                    isolate = True
                    continue
                if kind is ErrorKind.DATA:
                    raise note_retries(_name_value(exc, batch.table, batch.columns,
                                                   batch.operations[0]), attempt) from exc
                note_retries(exc, attempt)  # the scheduler counts them
                raise

    def _locked(self, write: Callable[[Batch], T], batch: Batch) -> T:
        """``write(batch)``, again after short sleeps while another connection holds the
        write lock, up to ``busy_timeout_ms`` (the connection's own busy handler is off:
        see _LOCK_RETRY_SLEEPS). Before each new attempt the batch yields to writers of a
        higher priority waiting for the same lock (bounded), so that it does not take the
        lock from under them when it is released."""
        started: float | None = None
        tries = 0
        while True:
            try:
                return write(batch)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 5) & 0xFF != 5:  # not SQLITE_BUSY
                    raise
                now = time.monotonic()
                if started is None:
                    started = now
                left = self.settings.busy_timeout_ms / 1000 - (now - started)
                if left <= 0:
                    raise
                if tries < len(_LOCK_RETRY_SLEEPS):
                    pause = _LOCK_RETRY_SLEEPS[tries]
                else:
                    pause = _LOCK_RETRY_MAX if now - started < 1.0 else _LOCK_RETRY_SLOW
                tries += 1
                time.sleep(min(pause, left))
                claims = self._claims
                if claims is not None and batch.priority < Priority.CRITICAL:
                    until = time.monotonic() + _YIELD_SECONDS
                    while claims.higher_waiting(batch.priority) and time.monotonic() < until:
                        time.sleep(_LOCK_RETRY_MAX)

    def _gate(self, priority: int, held: float) -> bool:
        """The writer thread asks before it starts a batch: True holds it back a little
        longer (see writer.py). A batch below CRITICAL waits for the checkpoint that lets
        the WAL restart (_after_commit), and any batch waits while a writer of a higher
        priority waits for the write lock elsewhere; each wait is bounded."""
        checkpointer = self._checkpointer
        if (self._reset_pass is not None and priority < Priority.CRITICAL
                and held < _RESET_WAIT_SECONDS and checkpointer is not None):
            if not checkpointer.finished(self._reset_pass):
                return True
            if self._written_beside:
                # CRITICAL batches went in beside the pass: their frames are not copied
                # back yet, so one more (short) pass, still in the checkpointer's thread
                # (its fsync would hold this one)
                self._written_beside = 0
                self._reset_pass = checkpointer.hurry()
                return True
        claims = self._claims
        return bool(claims is not None and held < _YIELD_SECONDS
                    and claims.higher_waiting(priority))

    def _after_commit(self, checkpointer: _Checkpointer) -> None:
        """The background checkpointer copies the WAL beside the writer. Once it reports a
        long WAL, the WAL should restart from the top, which the next transaction does only
        if every frame has been copied back when it begins: the writer asks the
        checkpointer for a pass at once, and batches below CRITICAL wait for it (the
        writer's gate); a CRITICAL batch still goes, beside the checkpoint. (The writer used
        to copy the rest itself, holding its thread for 10-20 ms in a bulk load: the tail of
        CRITICAL writes queued behind the backlog; copying only the last few frames there
        still cost an fsync of the database, up to 12 ms.)"""
        if self._reset_pass is not None:
            self._written_beside += 1
            checkpointer.wake()
        elif checkpointer.wal_frames >= _WAL_RESET_FRAMES:
            checkpointer.wal_frames = 0  # at most one restart per checkpoint pass
            self._written_beside = 0
            assert self._conn is not None
            self._reset_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            self._reset_pass = checkpointer.hurry()
        else:
            checkpointer.wake()

    def _restart_wal(self) -> None:
        """Before the batch the gate let go after the WAL-restart checkpoint (or after the
        wait's bound): if another process committed beside the checkpoint, its frames are
        not copied back and the WAL would not restart: copy them here (a few frames, but an
        fsync of the database: not while a CRITICAL write of this process waits; another
        process's writes go on meanwhile, this holds no lock they need)."""
        self._reset_pass = None
        assert self._conn is not None and self._checkpointer is not None
        self._checkpointer.wal_frames = 0  # it counted the WAL this batch restarts
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._reset_version and not self.context.urgent():
            with contextlib.suppress(sqlite3.OperationalError):  # busy: next time
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _write_isolated(self, batch: Batch) -> BatchResult:
        conn = self._conn
        assert conn is not None
        sql = self._sql(batch.table, batch.operation_type, batch.columns)
        errors: dict[int, BaseException] = {}
        affected = [0] * len(batch.operations)
        rows = 0
        checks = (self._types.of(conn, batch.table, batch.columns)
                  if batch.operation_type is not OperationType.DELETE else ())
        spool_id = self.context.spool_id
        with self._transaction():
            if spool_id and any(op.spool_seq for op in batch.operations):
                conn.execute(_MARKS_TABLE)
            for i, op in enumerate(batch.operations):
                conn.execute("SAVEPOINT batchdb_op")
                try:
                    op_rows = op.tuples()
                    if checks:
                        check_rows(checks, op_rows, len(batch.columns), batch.table.name)
                    affected[i] = conn.executemany(sql, op_rows).rowcount
                    if op.spool_seq and spool_id:  # replayed: committed with its mark
                        conn.execute(_MARK, (spool_id, op.spool_seq))
                except Exception as exc:
                    if self.classify_error(exc) is not ErrorKind.DATA:
                        raise
                    conn.execute("ROLLBACK TO batchdb_op")
                    errors[i] = _name_value(exc, batch.table, batch.columns, op)
                else:
                    rows += op.n_rows
                conn.execute("RELEASE batchdb_op")
        keyed = batch.operation_type in (OperationType.UPDATE, OperationType.DELETE)
        return BatchResult(rows, errors, affected=affected if keyed else None)

    def write_batch(self, batch: Batch) -> asyncio.Future[BatchResult]:
        if self._writer is None:
            raise self.not_open()
        claims = self._claims
        if claims is None:
            return asyncio.wrap_future(self._writer.submit(self._write, batch,
                                                           table=batch.table.name,
                                                           priority=batch.priority))
        # the other processes writing the file see this batch from now until it is done
        # (committed, failed or cancelled)
        priority = int(batch.priority)
        claims.claim(priority)
        try:
            future = self._writer.submit(self._write, batch, table=batch.table.name,
                                         priority=batch.priority)
        except BaseException:
            claims.release(priority)
            raise
        future.add_done_callback(lambda _: claims.release(priority))
        return asyncio.wrap_future(future)

    async def spool_applied(self, seqs: Sequence[int]) -> set[int]:
        """The replayed operations of this spool among ``seqs`` that are committed."""
        try:
            rows = await self.fetch(
                "SELECT seq FROM batchdb_spool_applied WHERE spool = ? "
                "AND seq IN (SELECT value FROM json_each(?))",
                (self.context.spool_id, json.dumps(list(seqs))))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return set()  # nothing was ever replayed into this file
            raise
        return {int(r[0]) for r in rows}

    async def spool_forget(self) -> None:
        """Delete this spool's marks (it is empty: none will be asked for again)."""
        def forget() -> None:
            with self._transaction():
                self._conn_or_fail().execute(_MARKS_TABLE)
                self._conn_or_fail().execute(
                    "DELETE FROM batchdb_spool_applied WHERE spool = ?",
                    (self.context.spool_id,))
        await self._call(forget)

    def _conn_or_fail(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BatchDBError("the SQLite backend is not open")
        return self._conn

    def classify_error(self, exc: BaseException) -> ErrorKind:
        message = str(exc).lower()
        if isinstance(exc, sqlite3.OperationalError):
            if any(t in message for t in _TRANSIENT):
                return ErrorKind.TRANSIENT
            if any(t in message for t in _RESOURCE):
                return ErrorKind.RESOURCE
            return ErrorKind.DATA
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.ProgrammingError
            | sqlite3.InterfaceError
        ) and any(t in message for t in _RESOURCE):
            return ErrorKind.RESOURCE
        if isinstance(exc, SchemaError):
            return ErrorKind.DATA  # a malformed row: its operation fails alone
        if isinstance(exc, BatchDBError):
            return ErrorKind.RESOURCE
        return ErrorKind.DATA

    # ------------------------------------------------------------------ maintenance
    def _maintain(self, task: str) -> dict[str, Any]:
        conn = self._conn
        assert conn is not None
        if task == "checkpoint":
            busy, log_pages, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return {"busy": bool(busy), "wal_pages": log_pages, "checkpointed_pages": done}
        if task == "analyze":
            conn.execute("ANALYZE")
            conn.execute("PRAGMA optimize")
            return {"analyzed": True}
        if task == "vacuum":
            before = self._file_size()
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return {"bytes_before": before, "bytes_after": self._file_size()}
        if task == "integrity_check":
            result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            return {"ok": result == ["ok"], "messages": result[:20]}
        raise ValueError(f"unknown SQLite maintenance task {task!r}; "
                         f"known: {', '.join(self.maintenance_tasks)}")

    async def run_maintenance(self, task: str) -> dict[str, Any]:
        """Run the task in the writer thread."""
        return await self._call(self._maintain, task)

    def _file_size(self) -> int:
        if not self.path:
            return 0
        return sum(os.path.getsize(p) for p in (self.path, self.path + "-wal")
                   if os.path.exists(p))

    def _status(self) -> dict[str, Any]:
        assert self._conn is not None
        conn = self._conn
        wal = (self.path or "") + "-wal"
        return {
            "backend": self.name,
            "path": self.path,
            "sqlite_version": sqlite3.sqlite_version,
            "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "page_count": conn.execute("PRAGMA page_count").fetchone()[0],
            "freelist_count": conn.execute("PRAGMA freelist_count").fetchone()[0],
            "file_bytes": os.path.getsize(self.path) if self.path and os.path.exists(self.path)
            else 0,
            "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
            "background_checkpoints": (self._checkpointer.checkpoints
                                       if self._checkpointer else None),
            "background_checkpoint_error": (self._checkpointer.last_error
                                            if self._checkpointer else None),
            "other_writers": self._other_writers(),
        }

    def _other_writers(self) -> list[str] | None:
        """The other processes writing this file, with the priorities they write at (None:
        no coordination, see coordination.py)."""
        if self._claims is None:
            return None
        return [describe(info, lambda p: Priority(p).name) for info in self._claims.others()]

    async def status(self) -> dict[str, Any]:
        return await self._call(self._status)


class _Recount(Exception):  # a signal inside the writer, never raised to a caller
    """An UPDATE/DELETE batch of several operations matched fewer rows than it has: it is
    rolled back and written again operation by operation, so each gets its own count."""


#: replayed spool operations, noted in the transaction that commits them (spool marks)
_MARKS_TABLE = ("CREATE TABLE IF NOT EXISTS batchdb_spool_applied (spool TEXT NOT NULL, "
                "seq INTEGER NOT NULL, PRIMARY KEY (spool, seq)) WITHOUT ROWID")
_MARK = "INSERT INTO batchdb_spool_applied (spool, seq) VALUES (?, ?)"


def _check_writable(path: Path, journal_mode: str) -> None:
    """SQLite opens a file it cannot write read-only without a word, and every batch would
    then fail at COMMIT: say so at start, naming the file and the reason."""
    where = f"SQLite database {path}"
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise BatchDBError(f"{where}: the file is read-only for this user "
                               "(permission denied); batchdb needs to write it")
        sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")] if journal_mode == "WAL" else []
        if (any(not p.exists() for p in sidecars)
                and not os.access(path.parent, os.W_OK | os.X_OK)):
            raise BatchDBError(f"{where}: directory {path.parent} is not writable, and WAL "
                               "mode needs to create the -wal and -shm files beside the "
                               "database (permission denied)")
        for p in sidecars:
            if p.exists() and not os.access(p, os.R_OK | os.W_OK):
                raise BatchDBError(f"{where}: {p.name} is read-only for this user "
                                   "(permission denied)")
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise BatchDBError(f"{where}: directory {path.parent} is not writable, so the "
                           "database cannot be created there (permission denied)")


_WAL_RESET_FRAMES = 1000  # SQLite's own auto-checkpoint threshold


def statement_rows(left: int, chunk: int) -> int:
    """Rows for the next multi-row statement when ``left`` rows remain: whole chunks, then
    the rest in at most five statements whose sizes come from a small set (multiples of
    64, of 8, then powers of two), so that a table needs a few dozen statement texts."""
    if left >= chunk:
        return chunk
    for step in (64, 8):
        if left >= step:
            return left - left % step
    return 1 << (left.bit_length() - 1)


class _Checkpointer:
    """Checkpoints the WAL from its own connection and thread while writes go on.

    SQLite's auto-checkpoint runs inside the COMMIT that crosses its threshold, so one
    batch in a thousand pays for copying the WAL into the database and syncing it: that
    batch sets the tail latency of everything queued behind it (a CRITICAL write, say).
    A PASSIVE checkpoint from another connection runs beside the writer instead.
    """

    def __init__(self, path: str, interval: float, busy_timeout_ms: int) -> None:
        self.path = path
        self.interval = interval
        self.busy_timeout_ms = busy_timeout_ms
        self.checkpoints = 0
        self.wal_frames = 0
        self.last_error: str | None = None
        self._started = 0  # passes begun
        self._finished = 0  # passes over (a pass is over before the next one begins)
        self._event = threading.Event()
        self._hurry = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchdb-sqlite-checkpoint",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Writes were committed: a checkpoint is due within ``interval``."""
        self._event.set()

    def hurry(self) -> int:
        """A checkpoint is due now: return the number of the pass that will begin after
        this call (see :meth:`finished`)."""
        target = self._started + 1
        self._hurry.set()
        self._event.set()
        return target

    def finished(self, target: int) -> bool:
        """True once pass number ``target`` is over."""
        return self._finished >= target

    def stop(self) -> None:
        """Run a last checkpoint (at once: the wait between checkpoints ends) and end the
        thread."""
        self._stopping.set()
        self._hurry.set()
        self._event.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            while True:
                self._event.wait()
                # let writes accumulate (one copy for many), unless hurried or stopping
                self._hurry.wait(self.interval)
                self._hurry.clear()
                self._event.clear()
                self._started += 1
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.wal_frames = frames
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # reported in status; the writer goes on
                    self.last_error = str(exc)
                self._finished = self._started
                if self._stopping.is_set():
                    return
        finally:
            conn.close()


_PARAMETER = re.compile(r"parameter (\d+)")


def _name_value(exc: Exception, table: TableInfo, columns: tuple[str, ...],
                op: BatchOperation) -> Exception:
    """Add the column (and row) of the value a bad-value error is about.

    sqlite3 names a parameter by number ("Error binding parameter 2"); other errors name
    nothing ("Python int too large to convert to SQLite INTEGER", a surrogate in a str,
    "datatype mismatch" for an INTEGER PRIMARY KEY): the operation's rows are searched for
    the first value that would raise it. Only on the error path.
    """
    where = ""
    match = _PARAMETER.search(str(exc))
    if match is not None and 1 <= int(match.group(1)) <= len(columns):
        where = f"column {columns[int(match.group(1)) - 1]!r}"
    else:
        found = _find_bad_value(exc, table, columns, op)
        if found is not None:
            row, column = found
            where = f"column {column!r}, row {row}"
    return with_location(exc, where) if where else exc


def _find_bad_value(exc: Exception, table: TableInfo, columns: tuple[str, ...],
                    op: BatchOperation) -> tuple[int, str] | None:
    def bad_int(v: Any) -> bool:
        return type(v) is int and not -(2**63) <= v < 2**63

    def bad_text(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    def not_integer(v: Any) -> bool:
        # what SQLite can store in an INTEGER PRIMARY KEY: a 64-bit integer, or a real or
        # a text whose value is one ('12.0', '1e3')
        if isinstance(v, bool) or v is None:
            return False
        if isinstance(v, int):
            return not -(2**63) <= v < 2**63
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                return True
        if isinstance(v, float):
            return not (v.is_integer() and -(2.0**63) <= v < 2.0**63)
        return True

    checks: list[tuple[int, Callable[[Any], bool]]]
    if isinstance(exc, OverflowError):
        checks = [(i, bad_int) for i in range(len(columns))]
    elif isinstance(exc, UnicodeError):
        checks = [(i, bad_text) for i in range(len(columns))]
    elif "datatype mismatch" in str(exc):
        checks = [(i, not_integer) for i, c in enumerate(columns)
                  if c in table.primary_key and table.types.get(c, "").upper() == "INTEGER"]
    else:
        return None
    try:
        rows = op.tuples()
    except Exception:
        return None
    for r, row in enumerate(rows):
        for i, bad in checks:
            if bad(row[i]):
                return r, columns[i]
    return None


def build_sql(table: TableInfo, op: OperationType, columns: tuple[str, ...],
              rows: int = 1) -> str:
    """The statement for one (table, operation, columns); parameters are ``?N`` by position.
    With ``rows`` > 1 (INSERT and UPSERT only), a multi-row VALUES statement taking the
    rows' values one after another.

    Every identifier comes from ``table`` (names the database reported, or a declared
    table), never from a caller's string, and is quoted by ``quote_ident``.
    """
    q = quote_ident
    name = q(table.name)
    pos = {c: i + 1 for i, c in enumerate(columns)}
    keys = table.primary_key
    if op in (OperationType.DELETE, OperationType.UPDATE):
        where = " AND ".join(f"{q(k)} = ?{pos[k]}" for k in keys)
    if op is OperationType.DELETE:
        return f"DELETE FROM {name} WHERE {where}"  # noqa: S608 - quoted known identifiers
    values = [c for c in columns if c not in keys]
    if op is OperationType.UPDATE:
        sets = ", ".join(f"{q(c)} = ?{pos[c]}" for c in values)
        return f"UPDATE {name} SET {sets} WHERE {where}"  # noqa: S608 - quoted known identifiers
    if rows == 1:
        params = "(" + ", ".join(f"?{i}" for i in range(1, len(columns) + 1)) + ")"
    else:
        params = ",".join(["(" + ",".join("?" * len(columns)) + ")"] * rows)
    insert = f"INSERT INTO {name} ({', '.join(map(q, columns))}) VALUES {params}"  # noqa: S608
    if op is OperationType.INSERT:
        return insert
    # rows that would not change are left alone: re-sent candles write nothing
    return insert + on_conflict_sql(table, values, differs="IS NOT")
