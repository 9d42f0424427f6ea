"""The storage backend contract every backend plugin implements."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel

from .batch import Batch, BatchResult
from .models import BatchDBError
from .reads import ReadChunk
from .schema import TableInfo

__all__ = ["Backend", "BackendContext", "Batch", "BatchResult", "Capabilities", "ErrorKind",
           "RetryPolicy",
           "note_retries", "retries_of"]


class ErrorKind(enum.Enum):
    """How the scheduler treats a failed batch."""

    TRANSIENT = "transient"  # locked, busy, connection lost: retry the same batch with backoff
    DATA = "data"  # constraint, type, bad value: split the batch to isolate the operation(s)
    RESOURCE = "resource"  # disk full, read-only, corrupt: fail the batch's operations as they are


#: tables a backend creates for batchdb's own bookkeeping (the spool's replay marks, see
#: ``Backend.spool_applied``): not the user's, so ``manager.list_tables()`` leaves them out
BOOKKEEPING_TABLES = frozenset({"batchdb_spool_applied"})

_E = TypeVar("_E", bound=BaseException)
_T = TypeVar("_T")


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

    def call(self, fn: Callable[[], _T], transient: Callable[[Exception], bool]) -> _T:
        """``fn()``, called again after :meth:`delay` while it raises an error that
        ``transient`` accepts, at most ``max_retries`` times (in a backend's own thread)."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if not transient(exc) or attempt >= self.max_retries:
                    note_retries(exc, attempt)
                    raise
                attempt += 1
                time.sleep(self.delay(attempt))

    async def call_async(self, fn: Callable[[], Awaitable[_T]],
                         transient: Callable[[Exception], bool],
                         before_retry: Callable[[], Awaitable[object]] | None = None) -> _T:
        """:meth:`call` for a coroutine function, sleeping without blocking the loop;
        ``before_retry`` runs before each new attempt (e.g. to drop dead connections)."""
        attempt = 0
        while True:
            try:
                return await fn()
            except Exception as exc:
                if not transient(exc) or attempt >= self.max_retries:
                    note_retries(exc, attempt)
                    raise
                attempt += 1
                if before_retry is not None:
                    await before_retry()
                await asyncio.sleep(self.delay(attempt))


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares about itself; the scheduler sizes its work from it.

    ``max_writers``: batches the scheduler may have in flight (CRITICAL gets one more, so a
    live order is never queued behind a backlog batch already handed over).
    ``ordered``: the backend commits the batches of one table in the order it was handed
    them (a batch may pass waiting batches of *other* tables, e.g. by priority), so the
    scheduler may hand it a table's next batch before the previous one finished.
    ``recovers_itself``: the backend retries transient errors and isolates failing
    operations itself (reporting them in ``BatchResult.errors``); the scheduler then fails
    whatever it still raises as it is instead of retrying or splitting the batch.
    ``insert_batch_size``/``update_batch_size``: a backend-preferred batch size, if any.
    ``spool_marks``: the backend records the ``spool_seq`` of every operation that has one
    (replayed from the spool) in the transaction that commits it, and answers
    :meth:`Backend.spool_applied`: replay is then exactly once across crashes. Without
    it, an operation replayed when the process crashed between the commit and the spool's
    own note may be written twice.
    """

    max_writers: int = 1
    ordered: bool = False
    recovers_itself: bool = False
    insert_batch_size: int | None = None
    update_batch_size: int | None = None
    spool_marks: bool = False


def _never() -> bool:
    return False


@dataclass(frozen=True)
class BackendContext:
    """What the scheduler hands a backend at :meth:`Backend.open`.

    ``retry_policy``: the backoff for transient errors a backend retries itself.
    ``urgent``: True while a CRITICAL operation waits (housekeeping such as a checkpoint
    should wait then); cheap, and safe to call from the backend's threads.
    ``batch_rows``: the most rows the scheduler puts in an INSERT/UPSERT batch (a backend
    may size its statements by it).
    ``spool_id``: see :attr:`Capabilities.spool_marks`.
    """

    retry_policy: RetryPolicy = RetryPolicy()
    urgent: Callable[[], bool] = _never
    batch_rows: int = 1000
    #: the id of the manager's spool ("" without one): with ``spool_seq``, what a backend
    #: with ``Capabilities.spool_marks`` records for a replayed operation
    spool_id: str = ""




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
    #: whether ``connection_factory`` (a callable opening a new driver connection) is taken
    takes_connection_factory: ClassVar[bool] = False
    #: the DB-API paramstyle of the positional parameters ``fetch`` and ``read_chunks``
    #: take: "qmark" (``?``) or "format" (``%s``). The manager compiles named parameters
    #: (``:name``) to it, so one SQL text works on every backend.
    paramstyle: ClassVar[str] = "qmark"

    def __init__(
        self, settings: BaseModel, *, connection_factory: Callable[[], Any] | None = None
    ) -> None:
        self.settings = settings
        self.connection_factory = connection_factory
        #: what the scheduler handed over at :meth:`open` (defaults until then)
        self.context = BackendContext()

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can do and how many writers it takes."""

    @abstractmethod
    async def open(self, context: BackendContext) -> None:
        """Keep ``context`` (``self.context = context``), connect, tune the connection(s),
        create the writer."""

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

    async def maintenance(self, task: str) -> dict[str, Any]:
        """Run one of ``maintenance_tasks``: the task is checked, :meth:`run_maintenance`
        does it, and what it returns gets the task's ``seconds`` (unless it set them)."""
        if task not in self.maintenance_tasks:
            raise ValueError(f"unknown {self.name} maintenance task {task!r}; known: "
                             f"{', '.join(self.maintenance_tasks) or 'none'}")
        start = time.perf_counter()
        result = await self.run_maintenance(task)
        result.setdefault("seconds", round(time.perf_counter() - start, 4))
        return result

    @abstractmethod
    async def run_maintenance(self, task: str) -> dict[str, Any]:
        """Do one of ``maintenance_tasks`` (already checked); return what it did."""

    def not_open(self) -> BatchDBError:
        """The error for a call that needs an open backend: ``raise self.not_open()``."""
        return BatchDBError(f"the {self.name} backend is not open")

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

    async def spool_applied(self, seqs: Sequence[int]) -> set[int]:
        """Which of ``seqs`` (spool sequence numbers of ``context.spool_id``) are recorded
        as committed. Only called when ``capabilities.spool_marks`` is True."""
        raise NotImplementedError(f"backend {self.name!r} does not record spool marks")

    async def spool_forget(self) -> None:
        """Drop the marks of ``context.spool_id``: the spool is empty (its records are
        replayed and deleted), none of them will be asked for again. Only called when
        ``capabilities.spool_marks`` is True."""
        raise NotImplementedError(f"backend {self.name!r} does not record spool marks")
