"""The storage backend contract every backend plugin implements."""

from __future__ import annotations

import contextlib
import enum
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel

from .models import BatchDBError, BatchOperation, OperationType, Priority
from .reads import ReadChunk
from .schema import TableInfo

__all__ = ["Backend", "Batch", "BatchResult", "Capabilities", "ErrorKind", "RetryPolicy",
           "note_retries", "retries_of"]


class ErrorKind(enum.Enum):
    """How the scheduler treats a failed batch."""

    TRANSIENT = "transient"  # locked, busy, connection lost: retry the same batch with backoff
    DATA = "data"  # constraint, type, bad value: split the batch to isolate the operation(s)
    RESOURCE = "resource"  # disk full, read-only, corrupt: fail the batch's operations as they are


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient errors (locked, busy, connection lost)."""

    max_retries: int = 8
    base_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): the exponential delay
        with jitter (x0.5 to x1.5), never more than ``max_delay``."""
        exponential = self.base_delay * 2.0 ** min(max(attempt - 1, 0), 64)
        return float(min(self.max_delay, exponential * random.uniform(0.5, 1.5)))


@dataclass
class BatchResult:
    """What ``write_batch`` committed: rows written, and operations that failed alone.

    ``errors`` maps an index into ``batch.operations`` to that operation's error; every
    other operation of the batch is committed.
    """

    rows: int
    errors: dict[int, BaseException] = field(default_factory=dict)
    retries: int = 0  # transient failures the backend retried itself
    #: UPDATE/DELETE: rows whose key matched, per operation (index into
    #: ``batch.operations``) where the backend can tell each operation's share ...
    affected: list[int] | None = None
    #: ... or only in total for the batch (None: the backend does not report it)
    changed: int | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares about itself; the scheduler sizes its work from it.

    ``ordered``: the backend runs the batches of a table strictly in the order it was
    handed them (a batch may pass waiting batches of *other* tables, e.g. by priority) and
    isolates failing operations and retries transient errors itself, so the scheduler may
    hand it the next batch of a table before the previous one finished (pipelining).
    ``max_writers`` is then the depth of that pipeline. The scheduler hands CRITICAL
    batches over even when ``max_writers`` batches are in flight (one more at most).
    """

    max_writers: int = 1
    ordered: bool = False
    supports_upsert: bool = True
    insert_batch_size: int | None = None  # a backend-preferred batch size, if it has one
    update_batch_size: int | None = None
    dialect: str = "sqlite"


@dataclass(eq=False)
class Batch:
    """Operations of one (table, operation type, column set), committed in one transaction."""

    table: TableInfo
    operation_type: OperationType
    columns: tuple[str, ...]
    operations: list[BatchOperation]
    _rows: list[tuple[Any, ...]] | None = field(default=None, repr=False)
    #: the priority of the queue it was taken from (an operation promoted behind a
    #: higher-priority write of the same key keeps its own ``priority``)
    priority: Priority = Priority.NORMAL

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        """All rows of all operations, in submission order (built once)."""
        if self._rows is None:
            ops = self.operations
            if len(ops) == 1:
                self._rows = ops[0].tuples()
            else:
                self._rows = _coalesced_rows(ops)
        return self._rows

    def flat_values(self) -> list[Any]:
        """All values of all rows in one list, row after row in ``columns`` order: what a
        multi-row statement binds. Rows given as mappings go straight into it, without
        the tuple per row of :attr:`rows` (a thousand objects fewer for the garbage
        collector to track per batch of one-row writes)."""
        if self._rows is None:
            flat = _mapped_values(self.operations, flat=True)
            if flat is not None:
                return flat
        return list(chain.from_iterable(self.rows))  # names a malformed row

    @property
    def row_count(self) -> int:
        """Rows in the batch."""
        return sum([op.n_rows for op in self.operations])

    def split(self) -> tuple[Batch, Batch]:
        """Two halves by operation, to isolate a failing operation."""
        mid = len(self.operations) // 2
        return (
            Batch(self.table, self.operation_type, self.columns, self.operations[:mid],
                  priority=self.priority),
            Batch(self.table, self.operation_type, self.columns, self.operations[mid:],
                  priority=self.priority),
        )


def _mapped_values(ops: list[BatchOperation], flat: bool) -> list[Any] | None:
    """One conversion pass over operations whose rows all came as mappings with the same
    keys (many one-row writes coalesced): a tuple per row, or one flat list of values.
    None when they did not, or a row is malformed: the per-operation path names it.
    (List comprehensions: this runs in the writer thread, holding the GIL the producers
    need, and they beat attrgetter, generator and map passes.)"""
    keys = ops[0].row_columns
    if not keys or [op for op in ops if op.values is not None
                    or (op.row_columns is not keys and op.row_columns != keys)]:
        return None
    data = [row for op in ops for row in op.data_rows]
    if len(data) != sum([op.n_rows for op in ops]):
        return None  # a list changed length after it was queued
    columns = ops[0].columns
    getter: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    if len(columns) > 1:
        getter = itemgetter(*columns)
    else:
        column = columns[0]

        def getter(row: Mapping[str, Any]) -> tuple[Any, ...]:
            return (row[column],)

    try:
        values = list(chain.from_iterable(map(getter, data))) if flat else list(map(getter, data))
    except (KeyError, TypeError):
        return None
    width = len(keys)
    return None if [row for row in data if len(row) != width] else values


def _coalesced_rows(ops: list[BatchOperation]) -> list[tuple[Any, ...]]:
    """Rows of many operations; one conversion pass when they all came as mappings with
    the same keys, else operation by operation (which names a malformed row)."""
    values = _mapped_values(ops, flat=False)
    if values is not None:
        return values
    rows: list[tuple[Any, ...]] = []
    for op in ops:
        rows.extend(op.tuples())  # names the operation and row that is malformed
    return rows


_E = TypeVar("_E", bound=BaseException)


def with_location(exc: _E, where: str, fallback: type[BatchDBError] = BatchDBError
                  ) -> _E | BatchDBError:
    """``exc`` with ``where`` (``column 'price', row 3``) added to its message: of the same
    type when that type can be built from a message, else ``fallback``; ``exc`` is kept as
    its cause. For backends naming the value a driver's error is about."""
    try:
        named: _E | BatchDBError = type(exc)(f"{exc} ({where})")
    except Exception:  # an exception type with other constructor arguments
        named = fallback(f"{type(exc).__name__}: {exc} ({where})")
    named.__cause__ = exc
    return named


_RETRIES_ATTR = "batchdb_retries"


def note_retries(exc: _E, retries: int) -> _E:
    """Record on ``exc`` that the backend retried its batch ``retries`` times before giving
    up with it (a failed batch has no :class:`BatchResult` to carry the count); returns
    ``exc``, for ``raise note_retries(exc, attempt)``."""
    if retries:
        with contextlib.suppress(AttributeError, TypeError):  # an exception without __dict__
            setattr(exc, _RETRIES_ATTR, retries)
    return exc


def retries_of(exc: BaseException) -> int:
    """The retries a backend recorded on a batch's final error with :func:`note_retries`."""
    retries = getattr(exc, _RETRIES_ATTR, 0)
    return retries if type(retries) is int else 0


class Backend(ABC):
    """A storage backend. One instance serves one ``BatchDBManager``.

    All methods are coroutines; blocking driver calls must run off the event loop.
    ``write_batch`` commits the whole batch in one transaction or raises and leaves
    nothing of it behind.
    """

    name: ClassVar[str]
    settings_model: ClassVar[type[BaseModel]]
    maintenance_tasks: ClassVar[tuple[str, ...]] = ()
    #: the DB-API paramstyle of the positional parameters ``fetch`` and ``read_chunks``
    #: take: "qmark" (``?``) or "format" (``%s``). The manager compiles named parameters
    #: (``:name``) to it, so one SQL text works on every backend.
    paramstyle: ClassVar[str] = "qmark"

    def __init__(
        self, settings: BaseModel, *, connection_factory: Callable[[], Any] | None = None
    ) -> None:
        self.settings = settings
        self.connection_factory = connection_factory
        self.retry_policy = RetryPolicy()
        #: set by the scheduler: True while a CRITICAL operation waits (housekeeping such
        #: as a checkpoint should wait then); may be called from the backend's threads
        self.urgent: Callable[[], bool] = lambda: False
        #: set by the scheduler: the most rows it puts in an INSERT/UPSERT batch (a backend
        #: may size its statements by it)
        self.batch_rows = 1000

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can do and how many writers it takes."""

    @abstractmethod
    async def open(self) -> None:
        """Connect, tune the connection(s), create the writer."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection; idempotent."""

    @abstractmethod
    async def describe_table(self, name: str) -> TableInfo | None:
        """Columns and primary key of ``name`` as the database has it, or None if absent."""

    @abstractmethod
    async def create_table(self, table: sa.Table) -> TableInfo:
        """Create a declared table if it does not exist, then describe it."""

    @abstractmethod
    def write_batch(self, batch: Batch) -> Awaitable[BatchResult]:
        """Commit ``batch``: all of it in one transaction, or raise and leave nothing behind.

        A backend may instead isolate failing operations itself (savepoints) and report
        them in ``BatchResult.errors``. Implement it as ``async def``, or as a plain method
        returning a future that is already running (the SQLite writer thread does that,
        so a batch starts without waiting for the event loop).
        """

    @abstractmethod
    def classify_error(self, exc: BaseException) -> ErrorKind:
        """Tell the scheduler whether to retry, split, or fail a batch that raised ``exc``."""

    @abstractmethod
    async def maintenance(self, task: str) -> dict[str, Any]:
        """Run one of ``maintenance_tasks``; return what it did."""

    @abstractmethod
    async def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on a reader connection (never the writer)."""

    @abstractmethod
    def read_chunks(self, sql: str, params: tuple[Any, ...] = (),
                    chunk_rows: int = 10_000) -> AsyncGenerator[ReadChunk, None]:
        """Run a read-only query like ``fetch`` and yield its rows ``chunk_rows`` at a time,
        each chunk with the result's column names; at least one chunk (with no rows for an
        empty result). Rows are read from the database as the chunks are taken, so a
        result of any size goes through in constant memory; the reader it holds is given
        back when the iteration ends or is closed (``aclose``)."""

    @abstractmethod
    async def list_tables(self) -> list[str]:
        """The user's tables in the default schema, sorted by name: never the database's
        catalog or its internal tables (``sqlite_%``, ``pg_catalog``, DuckDB's internal
        ones), nor temporary ones."""

    async def status(self) -> dict[str, Any]:
        """Health and size figures for ``get_queue_status``/``batchdb status``."""
        return {"backend": self.name}
