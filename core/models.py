"""The data model: operation types, priorities, errors and the batch operation record."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

__all__ = [
    "BatchDBError",
    "BatchOperation",
    "NotRunningError",
    "OperationCallback",
    "OperationFailed",
    "OperationType",
    "Priority",
    "QueueFull",
    "SchemaError",
    "UnknownOperation",
]


class BatchDBError(Exception):
    """Base class of every error batchdb raises on purpose."""


class SchemaError(BatchDBError, ValueError):
    """An unknown table or column, a missing key column, or an identifier batchdb refuses."""


class NotRunningError(BatchDBError, RuntimeError):
    """The manager is not started (or is stopping): nothing can be queued."""


class QueueFull(BatchDBError):
    """The queue is over its memory or length budget and the backpressure mode is ``raise``."""


class UnknownOperation(BatchDBError, KeyError):
    """``wait()`` was given an operation id the manager does not know (never queued, or
    finished too long ago to be remembered). A ``KeyError`` too, as it was."""

    def __str__(self) -> str:  # KeyError shows its argument quoted, as a repr
        return str(self.args[0]) if self.args else ""


class OperationFailed(BatchDBError):
    """An operation could not be committed; ``__cause__`` holds the database's own error."""

    def __init__(self, message: str, operation_id: str) -> None:
        super().__init__(message)
        self.operation_id = operation_id


class OperationType(enum.StrEnum):
    """What an operation does to its rows."""

    INSERT = "INSERT"
    UPDATE = "UPDATE"
    UPSERT = "UPSERT"
    DELETE = "DELETE"

    @classmethod
    def parse(cls, value: OperationType | str) -> OperationType:
        """Accept an ``OperationType`` or its name in any case; anything else is a ValueError."""
        if type(value) is cls:
            return value
        if isinstance(value, str):
            found = _OPERATION_TYPES.get(value) or _OPERATION_TYPES.get(value.strip().upper())
            if found is not None:
                return found
        names = ", ".join(m.name for m in cls)
        raise ValueError(f"operation_type must be one of {names}, got {value!r}")


_OPERATION_TYPES: dict[str, OperationType] = {m.value: m for m in OperationType}


class Priority(enum.IntEnum):
    """Dispatch order: CRITICAL (live trading) > HIGH > NORMAL > LOW (backtests)."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: Priority | str | int) -> Priority:
        """Accept a ``Priority``, its name in any case or its number; else a ValueError."""
        if type(value) is cls:
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        names = ", ".join(m.name for m in cls)
        raise ValueError(f"priority must be one of {names}, got {value!r}")


_time = time.time
_monotonic = time.monotonic


def _single(column: str) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    def get(row: Mapping[str, Any]) -> tuple[Any, ...]:
        return (row[column],)

    return get


_MB = 1024 * 1024

OperationCallback = Callable[["BatchOperation"], Awaitable[Any] | Any]


@dataclass(eq=False, slots=True, weakref_slot=True, init=False)
class BatchOperation:
    """One producer's request, kept whole: it commits or fails as a unit.

    The record a producer sees: what was asked (``operation_id`` … ``callback``) and how it
    ended (``created_at``, ``processed_at``, ``processing_time``, ``state`` — ``queued``,
    ``spooled`` (durable in the spool, waiting for the database), ``committed`` or
    ``failed`` —, ``is_processed``, ``error``, ``rows_affected``).
    ``data_rows`` holds the rows as given, until the callback has run.

    The engine's fields, read by the scheduler and the backends and set once by
    :meth:`queued`: ``columns`` (what the rows write, in order), ``values`` (rows already as
    tuples, when they came so), ``row_columns`` (row 0's keys), ``n_rows``, ``nbytes``
    (the memory estimate), ``keys`` (primary-key values, for the order across priorities),
    ``seq`` (submission order), ``enqueued_at``, ``lane`` (the priority whose queue it
    joined) and ``future`` (for ``wait()``).
    """

    operation_id: str
    table_name: str
    operation_type: OperationType
    data_rows: Sequence[Mapping[str, Any]]
    priority: Priority = Priority.NORMAL
    estimated_size_mb: float = 0.0
    callback: OperationCallback | None = None
    created_at: float = field(default_factory=time.time)
    processed_at: float | None = None
    processing_time: float = 0.0
    is_processed: bool = False
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    rows_affected: int = 0
    #: "queued" until the operation ends "committed" or "failed"; "spooled" meanwhile
    #: while it waits in the spool for the database (durable, not committed yet)
    state: str = "queued"
    # the engine's fields
    columns: tuple[str, ...] = field(default=(), repr=False)
    values: list[tuple[Any, ...]] | None = field(default=None, repr=False)
    row_columns: tuple[str, ...] = field(default=(), repr=False)
    n_rows: int = field(default=0, repr=False)
    nbytes: int = field(default=0, repr=False)
    keys: list[Any] | None = field(default=None, repr=False)
    seq: int = 0
    enqueued_at: float = field(default_factory=time.monotonic, repr=False)
    future: asyncio.Future[BatchOperation] | None = field(default=None, repr=False)
    lane: int = field(default=-1, repr=False)
    #: its sequence number in the spool once spooled (0: never spooled); a backend with
    #: ``Capabilities.spool_marks`` records it when it commits the operation
    spool_seq: int = field(default=0, repr=False)

    def __init__(
        self,
        operation_id: str,
        table_name: str,
        operation_type: OperationType,
        data_rows: Sequence[Mapping[str, Any]],
        priority: Priority = Priority.NORMAL,
        estimated_size_mb: float = 0.0,
        callback: OperationCallback | None = None,
    ) -> None:
        """A request, rows given as mappings (row 0's keys are the
        columns). An operation the manager queues is built by :meth:`queued`."""
        first = data_rows[0] if data_rows else None
        columns = tuple(first) if isinstance(first, Mapping) else ()
        self._set(operation_id, table_name, operation_type, data_rows, priority,
                  estimated_size_mb, callback, columns, None, columns, len(data_rows), 0)

    @classmethod
    def queued(
        cls,
        operation_id: str,
        table_name: str,
        operation_type: OperationType,
        data_rows: Sequence[Mapping[str, Any]],
        priority: Priority,
        callback: OperationCallback | None,
        *,
        columns: tuple[str, ...],
        values: list[tuple[Any, ...]] | None,
        row_columns: tuple[str, ...],
        n_rows: int,
        nbytes: int,
    ) -> BatchOperation:
        """An operation the manager checked and is about to queue, with the engine's
        fields (see the class docstring)."""
        op = object.__new__(cls)
        op._set(operation_id, table_name, operation_type, data_rows, priority, nbytes / _MB,
                callback, columns, values, row_columns, n_rows, nbytes)
        return op

    def _set(self, operation_id: str, table_name: str, operation_type: OperationType,
             data_rows: Sequence[Mapping[str, Any]], priority: Priority,
             estimated_size_mb: float, callback: OperationCallback | None,
             columns: tuple[str, ...], values: list[tuple[Any, ...]] | None,
             row_columns: tuple[str, ...], n_rows: int, nbytes: int) -> None:
        # every field, assigned once (a generated __init__ with keyword arguments and two
        # default factories cost a tenth of a one-row operation)
        self.operation_id = operation_id
        self.table_name = table_name
        self.operation_type = operation_type
        self.data_rows = data_rows
        self.priority = priority
        self.estimated_size_mb = estimated_size_mb
        self.callback = callback
        self.created_at = _time()
        self.processed_at = None
        self.processing_time = 0.0
        self.is_processed = False
        self.error = None
        self.exception = None
        self.rows_affected = 0
        self.state = "queued"
        self.spool_seq = 0
        self.columns = columns
        self.values = values
        self.row_columns = row_columns
        self.n_rows = n_rows
        self.nbytes = nbytes
        self.keys = None
        self.seq = 0
        self.enqueued_at = _monotonic()
        self.future = None
        self.lane = -1

    @property
    def row_count(self) -> int:
        """Number of rows this operation writes."""
        return self.n_rows

    def tuples(self) -> list[tuple[Any, ...]]:
        """The rows as tuples in ``columns`` order.

        Rows given as mappings are converted here, in the backend's writer thread, not in
        the producer's call: that keeps the event loop free while batches are written.
        """
        if self.values is not None:
            return self.values
        columns = self.columns
        rows = self.data_rows
        if len(rows) != self.n_rows:
            raise SchemaError(
                f"the row list of operation {self.operation_id} on {self.table_name!r} "
                f"changed after it was queued ({self.n_rows} rows queued, {len(rows)} now): "
                "batchdb reads rows when it writes them, so pass a list you no longer change "
                "(e.g. a copy) to queue_operation")
        getter = itemgetter(*columns) if len(columns) > 1 else _single(columns[0])
        width = len(self.row_columns) or len(columns)
        try:
            values = list(map(getter, rows))
            if not [row for row in rows if len(row) != width]:
                return values
        except (KeyError, TypeError):
            pass
        raise self._row_error()

    def _row_error(self) -> SchemaError:
        """Name the first row that is not a mapping with exactly row 0's keys."""
        expected = self.row_columns or self.columns
        for i, row in enumerate(self.data_rows):
            where = f"row {i} for table {self.table_name!r}"
            if not isinstance(row, Mapping):
                return SchemaError(f"{where} is not a mapping: {type(row).__name__}")
            missing = [c for c in expected if c not in row]
            extra = [c for c in row if c not in expected]
            if missing or extra:
                return SchemaError(
                    f"{where} has other columns than row 0:"
                    + (f" missing {missing}" if missing else "")
                    + (f" extra {extra}" if extra else "")
                )
        return SchemaError(f"rows for table {self.table_name!r} are malformed")

    @property
    def succeeded(self) -> bool:
        """True once committed (``is_processed``); False while queued and for a
        failed operation, whose ``error`` says why."""
        return self.state == "committed"
