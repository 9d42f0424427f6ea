"""Writing through an outage: the scheduler's side of the spool.

The :class:`Spooler` sits between the scheduler and a :class:`~batchdb.spool.Spool`:

- **Into the spool.** A batch that keeps failing with a transient error (connection refused
  or lost, server shutting down, …) for longer than ``spool.after_seconds`` is appended to
  the spool and fsynced (:meth:`Spooler.spool_batch`); its operations become ``"spooled"``
  (durable: ``wait(op_id, until="durable")`` returns) and their rows leave memory. From then
  on the database is *down*: every batch the scheduler takes goes to the spool at once
  (:meth:`routes`), without waiting out retries. While a table has records in the spool,
  its newer batches go to the spool too, behind them, so per-table order and "the later
  submission wins" hold across the spool. The scheduler hands a table one batch at a time
  while spooling is on, so a later batch of a table never passes an earlier one that is
  on its way to the spool.
- **The probe.** While down, a probe asks the database (``probe``: the manager opens the
  backend if it never could, then runs ``SELECT 1``) with exponential backoff, 0.2 s to
  5 s.
- **Replay.** Once the database answers, the spool drains table by table, oldest record
  first and the table holding the highest priority first, a few tables at a time, while
  other tables' new writes go straight to the database. Records are read one at a time
  and consecutive records of one shape are written as one batch of up to the batch size,
  so memory holds a batch, never the spool. A table leaves the spool once its last record
  is committed and no batch of it is being appended: its next batch goes to the database.
- **Exactly once.** A backend that declares ``Capabilities.spool_marks`` writes the spool's
  sequence number of every replayed operation into its own table
  (``batchdb_spool_applied``), in the transaction of the batch. Before a record that may
  have been written already is replayed (one found when the spool was opened, or one whose
  replay was interrupted), :meth:`~batchdb.backend.Backend.spool_applied` says which of its
  operations are committed: those are not written again. The spool's own ``done.log`` is
  noted after the commit; a crash in between is what the marks are for.

Operations spooled by this process keep their :class:`BatchOperation` (without rows) so
that ``wait()`` and callbacks see their final outcome; operations found in a spool written
by an earlier process get a new record with their original ``operation_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .backend import Backend, Batch
from .models import BatchDBError, BatchOperation, OperationType, Priority
from .schema import TableInfo
from .spool import (
    Spool,
    SpoolEntry,
    SpoolError,
    SpoolFull,
    SpoolRecord,
    UnspoolableValue,
)

__all__ = ["SpoolClosed", "Spooler"]

log = logging.getLogger("batchdb.spool")

_MB = 1024 * 1024
PROBE_MIN_SECONDS = 0.2
PROBE_MAX_SECONDS = 5.0
FULL_RETRY_SECONDS = 0.25


class SpoolClosed(BatchDBError):
    """The manager stopped while the operation was in the spool: it is committed when a
    manager is started on the same spool directory."""


class Spooler:
    """The spool of one manager: routing, appends, the probe and the replay.

    ``replay_write(batch)`` writes a replayed batch through the scheduler's machinery
    (splitting on bad data, finishing operations, hooks) and returns False if the
    database went away again (nothing of the batch is finished then, or only operations
    that committed); ``spooled(batch)`` and ``replayed(batch)`` tell the scheduler and
    the hooks; ``already_committed(batch)`` finishes operations the database's marks
    show committed (by a process that crashed before it noted it in the spool);
    ``redispatch()`` wakes the scheduler when routing changed; ``probe()`` raises while
    the database does not answer.
    """

    def __init__(self, path: str | Path, *, max_mb: float, after_seconds: float,
                 backend: Backend, batch_rows: Callable[[OperationType], int],
                 table_of: Callable[[str], TableInfo | None],
                 replay_write: Callable[[Batch], Awaitable[bool]],
                 spooled: Callable[[Batch], None],
                 replayed: Callable[[Batch], None],
                 already_committed: Callable[[Batch], None],
                 redispatch: Callable[[], None],
                 probe: Callable[[], Awaitable[None]],
                 replay_tables: int = 2) -> None:
        self.spool = Spool(path, max_bytes=int(max_mb * _MB))
        self.after_seconds = after_seconds
        self.backend = backend
        self._batch_rows = batch_rows
        self._table_of = table_of
        self._replay_write = replay_write
        self._spooled_cb = spooled
        self._replayed_cb = replayed
        self._already_committed = already_committed
        self._redispatch = redispatch
        self._probe = probe
        self._replay_tables = max(1, replay_tables)
        # appends in order, one at a time; reads in their own thread
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="batchdb-spool")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="batchdb-spool-read")
        self._appending: dict[str, int] = {}  # table -> batches being appended
        self._appended = asyncio.Event()
        # operations this process spooled, by sequence number (no rows)
        self._ops: dict[int, BatchOperation] = {}
        # records that may have been written already: their marks are looked up first
        self._uncertain: set[int] = {e.first_seq for t in self.spool.tables()
                                     for e in self.spool.pending(t)}
        self.down_since: float | None = None  # wall-clock time the database went away
        self._probe_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._closing = False
        #: set when the manager stops: what is still queued goes to the spool even past
        #: ``max_mb`` (kept on disk rather than lost with the process)
        self.stopping = False
        self.error: str | None = None  # the last append error (disk full, …), until one works
        self.spooled_operations = 0
        self.replayed_operations = 0
        self.skipped_operations = 0  # found committed already (marks) when replayed

    # ------------------------------------------------------------------ state
    @property
    def down(self) -> bool:
        """True between a batch's transient failure going to the spool and the probe's
        answer."""
        return self.down_since is not None

    def start(self, database_up: bool) -> None:
        """Begin: replay what an earlier process left (if the database answers), else probe."""
        if database_up:
            self._note_database()
            self._start_replay()
        else:
            self.mark_down()

    def routes(self, table: str) -> bool:
        """True when a batch of ``table`` must go to the spool, not to the database."""
        return (self.down_since is not None or table in self._appending
                or self.spool.has_pending(table))

    def pending(self) -> bool:
        """True while the spool holds records or a batch is being appended."""
        return bool(self._appending) or self.spool.pending_ops > 0

    def mark_down(self) -> None:
        """The database does not answer: route every batch to the spool and probe."""
        if self.down_since is None:
            self.down_since = time.time()
            self._note_database()
            log.warning("database %s is down: writes go to the spool at %s",
                        self.backend.name, self.spool.path)
        if self._probe_task is None and not self._closing:
            self._probe_task = asyncio.get_running_loop().create_task(
                self._probe_loop(), name="batchdb-spool-probe")

    def status(self) -> dict[str, Any]:
        """Operations, bytes and age of the oldest in the spool, and the database's state."""
        out = self.spool.status()
        out["database"] = ("up" if self.down_since is None else "down since "
                           + datetime.fromtimestamp(self.down_since, UTC).isoformat(
                               timespec="seconds"))
        out["spooled_operations"] = self.spooled_operations
        out["replayed_operations"] = self.replayed_operations
        out["skipped_as_committed"] = self.skipped_operations
        out["error"] = self.error
        out["replaying"] = self._replay_task is not None and not self._replay_task.done()
        return out

    # ------------------------------------------------------------------ into the spool
    async def spool_batch(self, batch: Batch
                          ) -> tuple[list[tuple[BatchOperation, BaseException]],
                                     list[BatchOperation]]:
        """Append ``batch`` to the spool (fsynced), waiting while the disk is full or the
        spool over ``max_mb``; its operations are then ``"spooled"``. Returns operations
        that cannot be kept in the spool (a value of a type it does not keep, a malformed
        row), with their error, for the scheduler to fail alone; and the operations to
        write to the database after all: those still waiting for room when the database
        answers again and their table has nothing in the spool (they are the table's
        oldest, so writing them keeps its order)."""
        table = batch.table.name
        self._appending[table] = self._appending.get(table, 0) + 1
        try:
            return await self._append(batch)
        finally:
            left = self._appending[table] - 1
            if left:
                self._appending[table] = left
            else:
                del self._appending[table]
            self._appended.set()

    async def _append(self, batch: Batch
                      ) -> tuple[list[tuple[BatchOperation, BaseException]],
                                 list[BatchOperation]]:
        loop = asyncio.get_running_loop()
        table = batch.table.name
        # appended in order, a record each; a chunk that does not fit on the disk is
        # appended in halves
        chunks = deque([[op for op in batch.operations if op.state == "queued"]])
        refused: list[tuple[BatchOperation, BaseException]] = []
        while chunks:
            ops = chunks[0]
            if not ops:
                chunks.popleft()
                continue
            try:
                entry = await loop.run_in_executor(self._writer, self._append_sync, batch, ops)
            except UnspoolableValue as exc:
                bad = ops.pop(exc.index) if 0 <= exc.index < len(ops) else ops.pop()
                refused.append((bad, exc))
                continue
            except Exception as exc:
                if not isinstance(exc, SpoolError | OSError):
                    found = self._row_error(ops)  # a row that cannot be read fails alone
                    if found is None:
                        raise
                    ops.remove(found[0])
                    refused.append(found)
                    continue
                if self._closing:
                    raise
                if isinstance(exc, SpoolFull) and exc.disk and len(ops) > 1:
                    half = len(ops) // 2
                    chunks[0] = ops[half:]
                    chunks.appendleft(ops[:half])
                    continue
                if self.down_since is None and not self.spool.has_pending(table):
                    # the database takes them: no append is waiting on the disk any more,
                    # so the status no longer reports one
                    self.error = None
                    return refused, [op for chunk in chunks for op in chunk]
                if self.error != str(exc):
                    log.error("%s", exc)
                self.error = str(exc)
                await asyncio.sleep(FULL_RETRY_SECONDS)
                continue
            self.error = None
            self._spooled(batch, ops, entry)
            chunks.popleft()
            self._appended.set()  # the replay may go on with it (and free room)
        return refused, []

    @staticmethod
    def _row_error(ops: list[BatchOperation]) -> tuple[BatchOperation, BaseException] | None:
        for op in ops:
            try:
                op.tuples()
            except Exception as exc:
                return op, exc
        return None

    def _append_sync(self, batch: Batch, ops: list[BatchOperation]) -> SpoolEntry:
        """In the spool's writer thread: rows to tuples, encode, append, fsync."""
        encoded = [(op.operation_id, int(op.priority), op.created_at, op.tuples())
                   for op in ops]
        body = Spool.encode(encoded)
        rows = sum(len(e[3]) for e in encoded)
        return self.spool.append(batch.table, batch.operation_type.value, batch.columns,
                                 body, len(ops), rows, int(batch.priority),
                                 over_limit=self.stopping)

    def _spooled(self, batch: Batch, ops: list[BatchOperation], entry: SpoolEntry) -> None:
        for seq, op in zip(entry.seqs, ops, strict=True):
            op.state = "spooled"
            op.spool_seq = seq
            op.values = None
            op.data_rows = ()  # the rows are in the spool now, not in memory
            self._ops[seq] = op
        self.spooled_operations += len(ops)
        self._spooled_cb(Batch(batch.table, batch.operation_type, batch.columns, ops,
                               priority=batch.priority))

    # ------------------------------------------------------------------ the probe
    async def _probe_loop(self) -> None:
        delay = PROBE_MIN_SECONDS
        try:
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._probe()
                except Exception as exc:
                    log.debug("probe: database still down: %s", exc)
                    delay = min(PROBE_MAX_SECONDS, delay * 2)
                    continue
                self._probe_task = None
                self._up()
                return
        finally:
            if self._probe_task is asyncio.current_task():
                self._probe_task = None

    def _note_database(self) -> None:
        try:
            self.spool.note_database(self.down_since)
        except (OSError, SpoolError) as exc:  # a full disk: the status file is a nicety
            log.debug("cannot note the database's state in the spool: %s", exc)

    def _up(self) -> None:
        log.warning("database %s answers again (down for %.1fs): replaying the spool",
                    self.backend.name, time.time() - (self.down_since or time.time()))
        self.down_since = None
        self._note_database()
        self._start_replay()
        self._redispatch()

    # ------------------------------------------------------------------ replay
    def _start_replay(self) -> None:
        if self._closing or (self._replay_task is not None and not self._replay_task.done()):
            return
        if self.spool.pending_ops or self._appending:
            self._replay_task = asyncio.get_running_loop().create_task(
                self._replay(), name="batchdb-spool-replay")

    async def _replay(self) -> None:
        """Drain the spool: the tables in order (highest priority, then oldest), a few at a
        time; until it is empty or the database is away again."""
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while not self._closing and self.down_since is None:
                for table in self.spool.tables() + [t for t in self._appending
                                                    if not self.spool.has_pending(t)]:
                    if table in running or len(running) >= self._replay_tables:
                        continue
                    running[table] = asyncio.get_running_loop().create_task(
                        self._replay_table(table))
                if not running:
                    if not self.pending():
                        await self._forget_marks()
                        return
                    self._appended.clear()
                    await self._appended.wait()
                    continue
                done, _ = await asyncio.wait(running.values(),
                                             return_when=asyncio.FIRST_COMPLETED)
                for table, task in list(running.items()):
                    if task in done:
                        del running[table]
                        task.result()  # an unexpected error ends the replay, reported
        finally:
            for task in running.values():
                task.cancel()
            for task in running.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._redispatch()

    async def _forget_marks(self) -> None:
        """The spool is empty: the database's marks of it are not needed any more."""
        if self.replayed_operations and self.backend.capabilities.spool_marks:
            try:
                await self.backend.spool_forget()
            except Exception as exc:  # kept marks cost a little room, nothing else
                log.warning("cannot delete the spool's replay marks: %s", exc)

    async def _replay_table(self, table: str) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing and self.down_since is None:
            entries = self.spool.pending(table)
            if not entries:
                if self._appending.get(table):
                    self._appended.clear()
                    await self._appended.wait()
                    continue
                self._redispatch()  # the table leaves the spool: its batches go direct
                return
            records = await loop.run_in_executor(self._reader, self._read_group, entries)
            batch, skipped = await self._batch_of(table, records)
            written = [r.entry for r in records]
            if batch is not None:
                self._uncertain.update(e.first_seq for e in written)
                if not await self._replay_write(batch):
                    self.mark_down()
                    return
            await loop.run_in_executor(self._writer, self.spool.mark_done, written)
            self._uncertain.difference_update(e.first_seq for e in written)
            for entry in written:  # finished: no longer this process's spooled operations
                for seq in entry.seqs:
                    self._ops.pop(seq, None)
            if batch is not None:
                self.replayed_operations += len(batch.operations)
                self._replayed_cb(batch)
            self.skipped_operations += skipped

    def _read_group(self, entries: list[SpoolEntry]) -> list[SpoolRecord]:
        """The oldest record and the ones after it of the same shape, up to a batch."""
        first = self.spool.read(entries[0])
        group = [first]
        rows = first.entry.rows
        limit = self._batch_rows(OperationType(first.operation_type))
        for entry in entries[1:]:
            if rows + entry.rows > limit:
                break
            record = self.spool.read(entry)
            if (record.operation_type != first.operation_type
                    or record.columns != first.columns):
                break
            group.append(record)
            rows += entry.rows
        return group

    async def _batch_of(self, table: str, records: list[SpoolRecord]
                        ) -> tuple[Batch | None, int]:
        """The operations of ``records`` still to write, as one batch; and how many were
        found committed already (by the database's marks)."""
        first = records[0]
        info = self._table_of(table) or self.spool.table_info(table)
        if info is None:
            raise SpoolError(f"the spool holds operations for table {table!r} but no "
                             "description of it")
        op_type = OperationType(first.operation_type)
        ops: list[BatchOperation] = []
        seqs: list[int] = []
        for record in records:
            for seq, (op_id, prio, created_at, rows) in zip(record.entry.seqs, record.ops,
                                                            strict=True):
                op = self._ops.get(seq)
                if op is None:  # spooled by an earlier process
                    op = BatchOperation.queued(
                        op_id, table, op_type, (), Priority(prio), None,
                        columns=record.columns, values=rows, row_columns=(),
                        n_rows=len(rows), nbytes=0)
                    op.created_at = created_at
                    op.state = "spooled"
                    op.spool_seq = seq
                elif op.state != "spooled":
                    continue  # finished by an interrupted replay (committed or failed)
                op.columns = record.columns
                op.values = rows
                op.n_rows = len(rows)
                ops.append(op)
                seqs.append(seq)
        skipped = 0
        if (ops and self.backend.capabilities.spool_marks
                and any(r.entry.first_seq in self._uncertain for r in records)):
            applied = await self.backend.spool_applied(seqs)
            if applied:
                done = [op for op in ops if op.spool_seq in applied]
                ops = [op for op in ops if op.spool_seq not in applied]
                skipped = len(done)
                self._finish_applied(info, op_type, first.columns, done)
        if not ops:
            return None, skipped
        priority = Priority(max(r.entry.priority for r in records))
        return Batch(info, op_type, first.columns, ops, priority=priority), skipped

    def _finish_applied(self, info: TableInfo, op_type: OperationType,
                        columns: tuple[str, ...], ops: list[BatchOperation]) -> None:
        """Operations a crashed process committed before it could note it in the spool:
        acknowledged as committed, not written again."""
        if not ops:
            return
        log.warning("%d spooled operation(s) on %r were committed before: not written again",
                 len(ops), info.name)
        for op in ops:
            op.values = None
        self._already_committed(Batch(info, op_type, columns, ops))

    # ------------------------------------------------------------------ stop
    async def drain(self) -> None:
        """Wait for the replay while the database answers (``stop()``): if it is down, ask
        it once more now (the probe may be sleeping), else leave the spool for the next
        start."""
        if self.down_since is not None and self.pending() and not self._closing:
            try:
                await self._probe()
            except Exception as exc:
                log.warning("stopping while the database is down (%s): %d operation(s) stay "
                            "in the spool at %s for the next start", exc,
                            self.spool.pending_ops, self.spool.path)
                return
            if self._probe_task is not None:
                self._probe_task.cancel()
                self._probe_task = None
            self._up()
        while self.down_since is None and self.pending() and not self._closing:
            self._start_replay()
            task = self._replay_task
            if task is None:
                break
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop probing and replaying, tell the waiters of spooled operations that they
        stay in the spool, close the spool (releasing its lock)."""
        self._closing = True
        for task in (self._probe_task, self._replay_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for op in self._ops.values():
            future = op.future
            if future is not None and not future.done():
                future.set_exception(SpoolClosed(
                    f"operation {op.operation_id} on {op.table_name!r} is in the spool at "
                    f"{self.spool.path}: it is committed when a manager is started on that "
                    "spool (the manager stopped while the database was down)"))
        self._ops.clear()
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self.spool.close()
