"""BatchDBManager: the public API (queue, wait, flush, status, maintenance) over the
scheduler and a backend plugin."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self, overload

import sqlalchemy as sa

from . import reads
from .backend import BOOKKEEPING_TABLES, Backend, Batch, ErrorKind
from .candles import candles_table
from .models import (
    BatchOperation,
    NotRunningError,
    OperationCallback,
    OperationType,
    Priority,
    SchemaError,
    UnknownOperation,
)
from .pluginmanager import (
    BackendRegistry,
    PluginManager,
    UnknownBackend,
    await_me_maybe,
    create_plugin_manager,
)
from .reads import ReadChunk, ReadShape
from .scheduler import Scheduler
from .schema import TableInfo, check_identifier, filled_columns
from .settings import (
    BatchConfig,
    Settings,
    SettingsError,
    load_settings,
)
from .spooler import Spooler

__all__ = ["BatchDBManager"]

log = logging.getLogger("batchdb")

_MB = 1024 * 1024
_MAINTENANCE_SCHEDULE = (
    ("checkpoint", "wal_checkpoint_interval_seconds"),
    ("analyze", "analyze_interval_seconds"),
    ("vacuum", "vacuum_interval_seconds"),
)


_TUPLE_BYTES = sys.getsizeof(())
_getsizeof = sys.getsizeof


def _row_bytes(row: Any, values: Collection[Any]) -> int:
    """A cheap per-row size estimate from one sample row (no JSON dump): the row as given,
    its values, and the tuple the writer builds from it."""
    size = _TUPLE_BYTES + 8 * len(values) + sum(map(_getsizeof, values))
    if isinstance(row, dict):
        size += _getsizeof(row)
    return size


_MAX_SHAPES = 4096


class _Shape:
    """A validated (table, operation type, row-0 columns): what its operations write."""

    __slots__ = ("columns", "count", "fill", "op_type", "row_bytes", "row_columns", "table")

    def __init__(self, table: TableInfo, op_type: OperationType, columns: tuple[str, ...],
                 row_columns: tuple[str, ...], row_bytes: int,
                 fill: tuple[str, ...] = ()) -> None:
        self.table = table
        self.op_type = op_type
        self.columns = columns + fill  # the columns the writer reads from each row
        self.row_columns = row_columns + fill  # the keys every row must have (row 0's)
        self.row_bytes = row_bytes
        self.count = 0
        self.fill = fill  # columns batchdb adds to the rows (see _FilledRows)


class _FilledRows(Sequence[Mapping[str, Any]]):
    """A producer's rows with the columns batchdb fills in (a declared column whose
    default is ``epoch_ms_now()``, such as ``candles.ingested_at``) set to the time of
    the write: the database's default would do it, but a table created by an earlier
    version has none. The rows are copied with the value when first read (in the writer
    thread, when their batch is written); a row that carries the column keeps its value.
    """

    __slots__ = ("_copy", "_fill", "_rows")

    def __init__(self, rows: Sequence[Mapping[str, Any]], fill: tuple[str, ...]) -> None:
        self._rows = rows
        self._fill = fill
        self._copy: list[Mapping[str, Any]] | None = None

    def _filled(self) -> list[Mapping[str, Any]]:
        copy = self._copy
        if copy is None or len(copy) != len(self._rows):
            extra = dict.fromkeys(self._fill, int(time.time() * 1000))
            # a row that is not a mapping stays as it is: the writer names it
            copy = self._copy = [{**extra, **row} if isinstance(row, Mapping) else row
                                 for row in self._rows]
        return copy

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Mapping[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Mapping[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> Mapping[str, Any] | Sequence[Mapping[str, Any]]:
        return self._filled()[index]

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self._filled())


class BatchDBManager:
    """Takes writes from many producers and commits them in batches through a backend.

    ``BatchDBManager(lambda: sqlite3.connect("market.sqlite3"))`` is the shortest form;
    :meth:`from_settings` reads ``settings.toml`` and ``BATCHDB_*`` variables.
    """

    def __init__(
        self,
        db_connection_factory: Callable[[], sqlite3.Connection] | None = None,
        *,
        settings: Settings | None = None,
        backend: str | None = None,
        plugins: Iterable[object] = (),
        tables: Iterable[sa.Table] = (),
    ) -> None:
        # the same sources whatever the constructor: ./settings.toml (or $BATCHDB_SETTINGS),
        # then BATCHDB_* variables, then arguments
        self.settings = settings if settings is not None else load_settings()
        self.pm: PluginManager = create_plugin_manager(
            self.settings.plugins.disabled, plugins
        )
        self.registry = BackendRegistry(self.pm)
        if db_connection_factory is not None:
            backend = self._factory_backend(backend)
        self.backend_name = backend or self.settings.backend
        self.db_factory = db_connection_factory
        self.config: BatchConfig = self.settings.batch.model_copy()
        try:
            backend_cls = self.registry.get(self.backend_name)
        except UnknownBackend as exc:
            where = "argument backend" if backend else self.settings.where("backend")
            raise SettingsError(f"{where}: {exc}") from None
        section = self.settings.section(self.backend_name, backend_cls.settings_model)
        self.backend: Backend = backend_cls(section, connection_factory=db_connection_factory)
        self._declared: dict[str, sa.Table] = {candles_table.name: candles_table}
        self._tables: dict[str, TableInfo] = {}
        # validated (table, operation type, row-0 columns) -> what the operation writes
        self._shapes: dict[tuple[str, OperationType | str, tuple[str, ...]], _Shape] = {}
        for table in tables:
            self.declare_table(table)
        self._table_locks: dict[str, asyncio.Lock] = {}
        self._scheduler: Scheduler | None = None
        self._last_scheduler: Scheduler | None = None
        self._spooler: Spooler | None = None  # with [spool] enabled, while running
        self._last_spooler: Spooler | None = None
        self._backend_open = False
        self._maintenance_task: asyncio.Task[None] | None = None
        self.last_maintenance: dict[str, float | None] = {t: None for t, _ in _MAINTENANCE_SCHEDULE}
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._id_prefix = secrets.token_hex(3)
        self._op_counter = 0
        self._state_lock = asyncio.Lock()
        self._hook_tasks: set[asyncio.Future[Any]] = set()

    def _factory_backend(self, backend: str | None) -> str:
        """The backend a connection factory goes to: the one named, else the configured one
        (the embedded default for ``BatchDBManager(lambda: sqlite3.connect(p))``);
        it must take a factory."""
        name = backend or self.settings.backend
        if name not in self.registry.names() or self.registry.get(name).takes_connection_factory:
            return name  # (an unknown backend is reported below, naming where it came from)
        where = "argument backend" if backend else self.settings.where("backend")
        takers = [n for n in self.registry.names()
                  if self.registry.get(n).takes_connection_factory]
        raise ValueError(f"{where}: the {name!r} backend takes no connection factory (the "
                         f"backends that do: {', '.join(takers) or 'none'})")

    @classmethod
    def from_settings(
        cls, path: str | os.PathLike[str] | None = None, **overrides: Any
    ) -> BatchDBManager:
        """A manager configured from ``path`` (or ``$BATCHDB_SETTINGS``, or ./settings.toml),
        ``BATCHDB_*`` variables and ``overrides`` (the file's structure), in that order."""
        plugins = overrides.pop("plugins_extra", ())
        tables = overrides.pop("tables", ())
        return cls(settings=load_settings(path, **overrides), plugins=plugins, tables=tables)

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Open the backend (applying its tuning) and start the background processing."""
        async with self._state_lock:
            if self._scheduler is not None:
                return
            scheduler = Scheduler(self.config, self.backend, self._tables.__getitem__)
            spooler = self._open_spool(scheduler) if self.settings.spool.enabled else None
            database_up = True
            try:
                await self.backend.open(scheduler.backend_context)
            except Exception as exc:
                # with a spool, a database that is down now is no reason not to start
                if spooler is None or (self.backend.classify_error(exc)
                                       is not ErrorKind.TRANSIENT):
                    if spooler is not None:
                        await spooler.close()
                    raise
                log.warning("the database does not answer (%s): starting with the spool at "
                            "%s", exc, spooler.spool.path)
                database_up = False
            self._backend_open = database_up
            try:  # plugins may register observers on self.pm here (see hookspecs)
                for result in self.pm.hook.batchdb_manager_started(manager=self):
                    await await_me_maybe(result)
            except BaseException:
                if spooler is not None:
                    await spooler.close()
                await self.backend.close()
                await self._hook_stopped()
                raise
            hook = self.pm.hook
            scheduler.observe(
                self._hook_committed if hook.batchdb_batch_committed.get_hookimpls() else None,
                self._hook_failed if hook.batchdb_batch_failed.get_hookimpls() else None)
            self._queued_hook = bool(hook.batchdb_operation_queued.get_hookimpls())
            self._scheduler = scheduler
            self._scheduler.start()
            if spooler is not None:
                self._spooler = spooler
                spooler.start(database_up)
            self._started_at = time.monotonic()
            self._stopped_at = None
            self._maintenance_due = dict.fromkeys(self.last_maintenance, time.monotonic())
            if self.settings.maintenance.enabled:
                self._maintenance_task = asyncio.get_running_loop().create_task(
                    self._maintenance_loop(), name="batchdb-maintenance")

    async def stop(self) -> None:
        """Commit everything queued, run pending callbacks, then close the backend."""
        async with self._state_lock:
            if self._scheduler is None:
                return
            if self._maintenance_task is not None:
                self._maintenance_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._maintenance_task
                self._maintenance_task = None
            scheduler = self._scheduler
            try:
                await scheduler.stop()
            finally:
                if self._spooler is not None:  # what is still in it stays for the next start
                    await self._spooler.close()
                    self._last_spooler, self._spooler = self._spooler, None
                if scheduler.queued_ops:  # stop() was interrupted before it drained
                    scheduler.abort("the manager was stopped before this operation was "
                                    "written (stop() did not finish)")
                self._last_scheduler = scheduler  # wait() still answers for its operations
                self._scheduler = None
                self._stopped_at = time.monotonic()
                await self.backend.close()
                await self._hook_stopped()

    def _open_spool(self, scheduler: Scheduler) -> Spooler:
        """The spool of ``[spool]``, wired to ``scheduler`` (its directory is opened and
        locked now: a spool that cannot be used fails ``start()`` with a clear error)."""
        cfg = self.settings.spool
        hook = self.pm.hook
        if hook.batchdb_spooled.get_hookimpls():
            scheduler.on_spooled = self._hook_spooled
        spooler = Spooler(
            cfg.path, max_mb=cfg.max_mb, after_seconds=cfg.after_seconds,
            backend=self.backend, batch_rows=scheduler.batch_limit, table_of=self._tables.get,
            replay_write=scheduler.replay_write, spooled=scheduler.spooled,
            replayed=self._hook_replayed, already_committed=scheduler.already_committed,
            redispatch=scheduler.wake, probe=self._probe,
            replay_tables=max(1, scheduler.max_inflight - 1))
        scheduler.spooler = spooler
        scheduler.backend_context = dataclasses.replace(
            scheduler.backend_context, spool_id=spooler.spool.spool_id)
        return spooler

    async def _probe(self) -> None:
        """Raise unless the database answers (opening the backend if it never could)."""
        if not self._backend_open:
            await self.backend.open(self.scheduler.backend_context)
            self._backend_open = True
        await self.backend.fetch("SELECT 1")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def scheduler(self) -> Scheduler:
        """The running scheduler; a clear error before start()."""
        if self._scheduler is None:
            raise NotRunningError("the manager is not running: call start() or use 'async with'")
        return self._scheduler

    # ------------------------------------------------------------------ tables
    def declare_table(self, table: sa.Table) -> None:
        """Declare a table (SQLAlchemy Core): it is created on first use if missing."""
        check_identifier(table.name, "table name")
        self._declared[table.name] = table
        self._tables.pop(table.name, None)
        self._shapes.clear()

    async def table_info(self, name: str) -> TableInfo:
        """Columns and key of ``name``: declared (created if missing) or read from the database."""
        info = self._tables.get(name)
        if info is not None:
            return info
        check_identifier(name, "table name")
        lock = self._table_locks.setdefault(name, asyncio.Lock())
        async with lock:
            info = self._tables.get(name)
            if info is None:
                if self._scheduler is None:
                    raise NotRunningError("the manager is not running: call start() first")
                try:
                    info = await self._describe(name)
                except Exception as exc:
                    info = self._spooled_table(name, exc)
                if info is None and name in self._declared:
                    info = await self.backend.create_table(self._declared[name])
                elif info is None:
                    raise SchemaError(
                        f"unknown table {name!r}: it is neither in the database nor "
                        "declared; create it, or declare it (a SQLAlchemy Table, created on "
                        "first use) with BatchDBManager(..., tables=[table]) or "
                        "manager.declare_table(table)")
                if self._spooler is not None:  # known while the database is down, later
                    self._spooler.spool.remember_table(info)
                self._tables[name] = info
        return info

    async def _describe(self, name: str) -> TableInfo | None:
        spooler = self._spooler
        if spooler is not None and spooler.down and spooler.spool.table_info(name):
            return spooler.spool.table_info(name)  # the database is down: the spool knows it
        return await self.backend.describe_table(name)

    def _spooled_table(self, name: str, exc: Exception) -> TableInfo:
        """The spool's description of a table the database cannot describe now; else the
        database's error."""
        spooler = self._spooler
        if spooler is None or (self._backend_open and self.backend.classify_error(exc)
                               is not ErrorKind.TRANSIENT):
            raise exc
        info = spooler.spool.table_info(name)
        if info is None:
            raise SchemaError(
                f"table {name!r} cannot be described: the database does not answer ({exc}) "
                "and the spool holds no description of it (the spool keeps the description of "
                "every table a manager on it has written to)") from exc
        return info

    # ------------------------------------------------------------------ writing
    async def queue_operation(
        self,
        table_name: str,
        operation_type: OperationType | str,
        data_rows: Sequence[Mapping[str, Any]],
        priority: Priority | str | int = Priority.NORMAL,
        callback: OperationCallback | None = None,
    ) -> str:
        """Queue rows for ``table_name``; return the operation id.

        Bad input (unknown table or column, missing key column, empty or malformed rows,
        wrong operation type or priority) raises here and queues nothing.
        """
        # The hot path of one-row writes: a list of dicts whose (table, operation, columns)
        # was validated before is one lookup. Everything else takes the checking path.
        shape = None
        if type(data_rows) is list and data_rows and type(first := data_rows[0]) is dict:
            # an OperationType is equal to (and hashes as) its name: either finds the shape
            try:  # noqa: SIM105 - contextlib.suppress costs a context manager per call
                shape = self._shapes.get((table_name, operation_type, tuple(first)))
            except TypeError:  # unhashable input: the checking path names it
                pass
        if shape is None:
            shape = await self._checked_shape(table_name, operation_type, data_rows)
        if type(priority) is not Priority:
            priority = Priority.parse(priority)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        if self._scheduler is None:
            raise NotRunningError("the manager is not running: call start() or use 'async with'")
        # Rows are read into tuples in the writer thread, where they are also checked (reading
        # them here costs ~5% of bulk throughput; snapshotting one-row operations here cost
        # ~25% of one-row throughput, copying the list ~10%): the list and its rows belong
        # to batchdb until the operation completes. A list that changed length by then fails
        # its operation with a message saying so (BatchOperation.tuples).
        n_rows = len(data_rows)
        shape.count += 1
        if shape.count >= 64:  # the size of a row is sampled once every 64 operations
            shape.count = 0
            shape.row_bytes = _row_bytes(data_rows[0], data_rows[0].values())
        nbytes = shape.row_bytes * n_rows
        if shape.fill:
            data_rows = _FilledRows(data_rows, shape.fill)
        self._op_counter += 1
        op = BatchOperation.queued(
            f"{self._id_prefix}-{self._op_counter}", shape.table.name, shape.op_type,
            data_rows, priority, callback, columns=shape.columns, values=None,
            row_columns=shape.row_columns, n_rows=n_rows, nbytes=nbytes)
        waiting = self._place(op)
        if waiting is not None:
            await waiting
        return op.operation_id

    async def _checked_shape(self, table_name: str, operation_type: OperationType | str,
                             data_rows: Sequence[Mapping[str, Any]]) -> _Shape:
        """Validate a call's table, operation type and row 0; the shape it writes (cached
        for lists of dicts)."""
        op_type = OperationType.parse(operation_type)
        if self._scheduler is None:
            raise NotRunningError("the manager is not running: call start() or use 'async with'")
        if type(data_rows) is not list and (isinstance(data_rows, Mapping | str | bytes)
                                            or not isinstance(data_rows, Sequence)):
            raise ValueError("data_rows must be a list of row mappings (column -> value), "
                             f"got {type(data_rows).__name__}")
        if not data_rows:
            raise ValueError(f"data_rows for table {table_name!r} is empty")
        if type(table_name) is not str:
            check_identifier(table_name, "table name")  # a clear SchemaError
        table = self._tables.get(table_name) or await self.table_info(table_name)
        first = data_rows[0]
        columns = tuple(first) if type(first) is dict else self._row0_columns(table, first)
        key = (table.name, op_type, columns)
        shape = self._shapes.get(key)
        if shape is None:
            shape = _Shape(table, op_type, self._check_shape(table, op_type, columns), columns,
                           _row_bytes(first, first.values()),
                           self._fill(table, op_type, columns))
            if len(self._shapes) >= _MAX_SHAPES:
                self._shapes.clear()
            self._shapes[key] = shape
        return shape

    def _check_shape(self, table: TableInfo, op_type: OperationType,
                     columns: tuple[str, ...]) -> tuple[str, ...]:
        """Validate a column set for an operation; return the columns the writer reads."""
        if not columns:
            raise ValueError(f"row 0 for table {table.name!r} has no columns")
        for c in columns:
            if not isinstance(c, str):
                raise SchemaError(f"column names must be strings, got {c!r}")
        if op_type is OperationType.DELETE:
            table.check_columns(columns, need_key=True, need_value=False)
            return table.primary_key  # only the key is read from each row
        table.check_columns(columns, need_key=op_type is not OperationType.INSERT,
                            need_value=op_type is OperationType.UPDATE)
        return columns

    def _fill(self, table: TableInfo, op_type: OperationType,
              columns: tuple[str, ...]) -> tuple[str, ...]:
        """The columns batchdb adds to rows that lack them (declared ``epoch_ms_now()``
        defaults, e.g. ``candles.ingested_at``), for writes that store values."""
        declared = self._declared.get(table.name)
        if declared is None or op_type is OperationType.DELETE:
            return ()
        return tuple(c for c in filled_columns(declared)
                     if c not in columns and c in table.column_set)

    @staticmethod
    def _row0_columns(table: TableInfo, first: Any) -> tuple[str, ...]:
        """Row 0's columns when it is not a plain dict (a mapping, or an error)."""
        if not isinstance(first, Mapping):
            raise ValueError(f"row 0 for table {table.name!r} is not a mapping: "
                             f"{type(first).__name__}")
        return tuple(first)

    def _new_operation(
        self,
        table: TableInfo,
        op_type: OperationType,
        columns: tuple[str, ...],
        values: list[tuple[Any, ...]],
        data_rows: Sequence[Any],
        priority: Priority,
        callback: OperationCallback | None,
    ) -> BatchOperation:
        """An operation whose rows are already tuples (normalised candles)."""
        self._op_counter += 1
        nbytes = _row_bytes(data_rows[0], values[0]) * len(values)
        return BatchOperation.queued(
            f"{self._id_prefix}-{self._op_counter}", table.name, op_type, data_rows, priority,
            callback, columns=columns, values=values, row_columns=(), n_rows=len(values),
            nbytes=nbytes)

    def _place(self, op: BatchOperation) -> Awaitable[None] | None:
        """Queue ``op`` now when there is room and return None (no coroutine on the hot path
        of one-row writes); else what to await: the wait for room (or its QueueFull), or
        the once-a-millisecond yield to the event loop."""
        scheduler = self._scheduler or self.scheduler  # (the property raises NotRunning)
        if not scheduler.try_submit(op):
            return self._place_when_room(op)
        if self._queued_hook:
            self._call_hook(self.pm.hook.batchdb_operation_queued, operation=op)
        if scheduler.yield_due():
            return asyncio.sleep(0)
        return None

    async def _place_when_room(self, op: BatchOperation) -> None:
        await self.scheduler.submit(op)  # waits for room, or raises QueueFull
        if self._queued_hook:
            self._call_hook(self.pm.hook.batchdb_operation_queued, operation=op)

    async def insert_candles_batch(
        self,
        symbol: str,
        timeframe: str,
        candles: Sequence[Mapping[str, Any]],
        priority: Priority | str | int = Priority.NORMAL,
        callback: OperationCallback | None = None,
        source: str = "upbit",
    ) -> str:
        """Upsert exchange candles (Upbit's API JSON by default) into the ``candles`` table."""
        prio = Priority.parse(priority)
        if not candles:
            raise ValueError(f"no candles given for {symbol!r} {timeframe!r}")
        result = self.pm.hook.batchdb_normalize_candles(
            symbol=symbol, timeframe=timeframe, candles=candles, source=source)
        if result is None:
            raise ValueError(f"no plugin normalises candles from source {source!r}")
        columns, values = result
        table = await self.table_info(candles_table.name)
        table.check_columns(tuple(columns), need_key=True, need_value=False)
        op = self._new_operation(table, OperationType.UPSERT, tuple(columns), values, candles,
                                 prio, callback)
        waiting = self._place(op)
        if waiting is not None:
            await waiting
        return op.operation_id

    async def wait(self, operation_id: str, until: str = "committed") -> BatchOperation:
        """The operation once committed; raises ``OperationFailed`` if it failed.

        ``until="durable"`` returns as soon as the operation is committed *or* safely in
        the spool (``state == "spooled"``, with ``[spool] enabled``). Works after
        ``stop()`` too, for the operations that manager run handled."""
        if until not in ("committed", "durable"):
            raise ValueError(f"until must be 'committed' or 'durable', got {until!r}")
        scheduler = self._scheduler or self._last_scheduler
        if scheduler is None:
            raise NotRunningError("the manager is not running: call start() or use 'async with'")
        if scheduler.get(operation_id) is None:
            raise UnknownOperation(
                f"unknown operation id {operation_id!r} (never queued by this manager, or "
                f"finished longer ago than the last {self.config.completed_history} operations)")
        return await scheduler.wait(operation_id, until)

    async def flush(self) -> None:
        """Return when everything queued before this call has been committed (or failed)."""
        await self.scheduler.flush()

    # ------------------------------------------------------------------ reading & status
    @overload
    async def fetch(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None,
                    *, as_: Literal["tuples"] = "tuples") -> list[tuple[Any, ...]]: ...

    @overload
    async def fetch(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None,
                    *, as_: Literal["dicts"]) -> list[dict[str, Any]]: ...

    @overload
    async def fetch(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None,
                    *, as_: Literal["arrow"]) -> Any: ...

    async def fetch(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None,
                    *, as_: ReadShape = "tuples") -> Any:
        """Run a read-only query on a reader connection of the backend.

        ``params`` as a mapping binds named parameters (``:name``, SQLAlchemy ``text()``
        style), the same SQL on every backend; as a tuple, the positional ``?`` form.
        ``as_``: "tuples" (rows as tuples), "dicts" (one dict per row, keyed by column
        name) or "arrow" (a pyarrow Table; needs pyarrow). A statement that would write is
        refused with ``ReadOnlyFetchError``."""
        return await reads.fetch(self.backend, sql, params, as_)

    def fetch_chunks(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None,
                     *, chunk_rows: int = 10_000) -> AsyncGenerator[ReadChunk, None]:
        """Like ``fetch``, but the rows come ``chunk_rows`` at a time as the database
        produces them (each chunk with the column names), in constant memory."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows!r}")
        query, values = reads.positional(sql, params, self.backend.paramstyle)
        return self.backend.read_chunks(query, values, chunk_rows)

    async def list_tables(self) -> list[str]:
        """The database's tables (user tables of the default schema), sorted by name;
        batchdb's own bookkeeping (the spool's replay marks) left out."""
        return [t for t in await self.backend.list_tables() if t not in BOOKKEEPING_TABLES]

    async def read_candles(self, symbol: str, timeframe: str,
                           start: int | datetime | str | None = None,
                           end: int | datetime | str | None = None,
                           *, as_: ReadShape = "tuples") -> Any:
        """Candles of one market and timeframe with ``start <= ts < end`` (epoch ms,
        datetimes, naive ones as UTC, or ISO 8601 strings; None: unbounded), in time
        order, read along the primary key's index."""
        sql, params = reads.candles_query(symbol, timeframe, start, end)
        return await reads.fetch(self.backend, sql, params, as_)

    async def get_queue_status(self) -> dict[str, Any]:
        """Queue sizes, memory estimate, statistics and maintenance times (every key is in
        the README)."""
        # The same keys in every state: while running the scheduler's figures; after stop()
        # the last run's totals; before start() those of a scheduler that never ran.
        scheduler = self._scheduler or self._last_scheduler
        if scheduler is None:
            scheduler = Scheduler(self.config, self.backend, self._tables.__getitem__)
        status = scheduler.queue_status()
        status["running"] = self._scheduler is not None
        if self._started_at is None:
            uptime = 0.0
        else:
            uptime = (self._stopped_at or time.monotonic()) - self._started_at
        status["uptime_seconds"] = round(uptime, 3)
        status["backend"] = self.backend_name
        spooler = self._spooler or self._last_spooler
        if spooler is not None:
            status["spool"] = {"enabled": True, **spooler.status()}
        else:
            status["spool"] = {"enabled": self.settings.spool.enabled,
                               "path": self.settings.spool.path}
        status["last_maintenance"] = {
            task: None if t is None else datetime.fromtimestamp(t, UTC).isoformat()
            for task, t in self.last_maintenance.items()
        }
        return status

    # ------------------------------------------------------------------ maintenance
    async def maintain(self, task: str) -> dict[str, Any]:
        """Run one maintenance task now, holding the writer alone while it runs."""
        if task not in self.backend.maintenance_tasks:
            raise ValueError(f"backend {self.backend_name!r} has no maintenance task {task!r}; "
                             f"it has: {', '.join(self.backend.maintenance_tasks)}")
        start = time.perf_counter()
        async with self.scheduler.exclusive():
            result = await self.backend.maintenance(task)
        self.last_maintenance[task] = time.time()
        seconds = time.perf_counter() - start
        for hook_result in self.pm.hook.batchdb_maintenance_done(
                task=task, seconds=seconds, result=result):
            await await_me_maybe(hook_result)
        log.info("maintenance %s done in %.3fs: %s", task, seconds, result)
        return result

    async def _maintenance_loop(self) -> None:
        cfg = self.settings.maintenance
        schedule = [(task, getattr(cfg, attr)) for task, attr in _MAINTENANCE_SCHEDULE
                    if getattr(cfg, attr) > 0 and task in self.backend.maintenance_tasks]
        if not schedule:
            return
        tick = max(0.05, min(min(i for _, i in schedule) / 4, 30.0))
        while True:
            await asyncio.sleep(tick)
            for task, interval in schedule:
                if time.monotonic() - self._maintenance_due[task] < interval:
                    continue
                if self.scheduler.critical_waiting():
                    break  # never while a CRITICAL write waits: try again next tick
                try:
                    await self.maintain(task)
                except Exception:
                    log.exception("maintenance %s failed", task)
                self._maintenance_due[task] = time.monotonic()

    # ------------------------------------------------------------------ hooks
    def _hook_committed(self, batch: Batch, seconds: float) -> None:
        self._call_hook(self.pm.hook.batchdb_batch_committed, batch=batch, seconds=seconds,
                        backend=self.backend)

    def _hook_spooled(self, batch: Batch) -> None:
        self._call_hook(self.pm.hook.batchdb_spooled, batch=batch)

    def _hook_replayed(self, batch: Batch) -> None:
        if self.pm.hook.batchdb_spool_replayed.get_hookimpls():
            self._call_hook(self.pm.hook.batchdb_spool_replayed, batch=batch)

    def _hook_failed(self, batch: Batch, error: BaseException) -> None:
        self._call_hook(self.pm.hook.batchdb_batch_failed, batch=batch, error=error,
                        backend=self.backend)

    async def _hook_stopped(self) -> None:
        try:
            for result in self.pm.hook.batchdb_manager_stopped(manager=self):
                await await_me_maybe(result)
        except Exception:
            log.exception("plugin hook batchdb_manager_stopped raised")

    def _call_hook(self, hook: Any, **kwargs: Any) -> None:
        try:
            results = hook(**kwargs)
        except Exception:
            log.exception("plugin hook %s raised", hook.name)
            return
        for result in results:
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._hook_tasks.add(task)
                task.add_done_callback(self._hook_tasks.discard)
