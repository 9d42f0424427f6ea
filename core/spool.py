"""The spool store: a durable, append-only log of operations the database could not take.

A spool is a directory on local disk, private to the user that runs batchdb::

    lock                  flock()ed by the process that has the spool open (holds its pid)
    meta.json             format name and version, the spool's id
    database.json         since when the database has been down, as the spooler saw it
    tables.json           descriptions of the tables the spool holds operations for
    seg-0000000001.log    segments of records, appended in order
    done.log              which records have been replayed (committed, or failed for good)

Every file is created ``0600`` and the directory ``0700``: the records hold the rows. A
directory (or file in it) owned by another user is refused.

Segment format (version 1), all integers little-endian::

    header   b"BDBSPOOL" | u16 version | u16 0 | u32 0 | u64 first sequence number (24 bytes)
    record   u32 payload length | u32 CRC-32 of the payload | payload

    payload  u8 kind (1) | f64 appended_at | u64 first_seq | u32 ops | u32 rows
             | u8 highest priority | u16 len + table name (UTF-8)
             | u16 len + operation type (UTF-8) | u16 columns | (u16 len + name) per column
             | pickle of [(operation_id, priority, created_at, rows), ...]

A record is the operations of one spooled batch (one table, operation type and column set);
each operation gets its own sequence number (``first_seq + i``), unique in the spool for
its whole life (a segment's header carries the first number it hands out, so the floor
survives when every record is replayed), so that ``(spool id, seq)`` names an operation
for the database's replay marks. Rows are tuples in
column order, pickled (protocol 5) with a pickler that accepts only the value types a
database column takes (numbers, text, bytes, date/time, Decimal, UUID, containers of them)
and an unpickler that loads nothing else.

A crash in the middle of an append leaves a torn tail: the last record of the last segment
is shorter than its length field says, or its checksum does not match. Opening the spool
truncates the segment at the end of the last good record; every earlier record survives. A
bad record anywhere else is not a torn tail but damage, reported as :class:`SpoolCorrupt`.

``done.log`` uses the same framing (kind 2: a list of u64 ``first_seq``), and is appended
(and fsynced) when a record has been replayed. A segment whose records are all done is
deleted; when nothing is pending any more, the older segments are deleted and the active
one and ``done.log`` are truncated in place (freeing room without allocating any: this
works on a full disk).
The store keeps only an index in memory (about 100 bytes per record, one record per
spooled batch) and reads a record when it is replayed, so replay is streamed.

This module knows nothing of the scheduler: see :mod:`batchdb.spooler` for how batches get
here and back to the database.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import decimal
import errno
import fcntl
import io
import json
import logging
import os
import pickle
import pwd
import stat
import struct
import threading
import time
import uuid
import zlib
import zoneinfo
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import BatchDBError
from .schema import TableInfo

__all__ = [
    "FORMAT_VERSION",
    "Spool",
    "SpoolCorrupt",
    "SpoolEntry",
    "SpoolError",
    "SpoolFull",
    "SpoolLocked",
    "SpoolRecord",
    "SpooledOp",
    "inspect_spool",
]

FORMAT_NAME = "batchdb-spool"
FORMAT_VERSION = 1
MAGIC = b"BDBSPOOL"
_SEG_HEADER = struct.Struct("<8sHHIQ")
_FRAME = struct.Struct("<II")
_RECORD_HEAD = struct.Struct("<BdQIIBH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_KIND_OPS = 1
_KIND_DONE = 2
log = logging.getLogger("batchdb.spool")
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024


class SpoolError(BatchDBError):
    """The spool directory cannot be used (permissions, owner, not writable, bad format)."""


class SpoolLocked(SpoolError):
    """Another process has the spool directory open."""


class SpoolCorrupt(SpoolError):
    """A record before the tail does not match its checksum: the spool is damaged."""


class SpoolFull(SpoolError):
    """The disk under the spool is full (``disk`` True), or the spool is over its size
    limit: nothing was appended; the batch stays in memory and is appended again later."""

    disk = False


class UnspoolableValue(BatchDBError, TypeError):
    """A row value of a type the spool does not keep (not a database value); ``index``
    is the operation's position in what was being encoded."""

    index: int = -1


# ---------------------------------------------------------------------- values
_ALLOWED_GLOBALS = {
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"),
    ("datetime", "timedelta"), ("datetime", "timezone"), ("decimal", "Decimal"),
    ("uuid", "UUID"), ("builtins", "bytearray"), ("builtins", "complex"),
    ("builtins", "set"), ("builtins", "frozenset"), ("zoneinfo", "ZoneInfo"),
}
_ALLOWED_TYPES = frozenset({
    int, float, str, bytes, bool, type(None), tuple, list, dict, set, frozenset,
    bytearray, complex, _dt.datetime, _dt.date, _dt.time, _dt.timedelta, _dt.timezone,
    decimal.Decimal, uuid.UUID,
})


class _RowPickler(pickle.Pickler):
    """Refuses values that are not database values (they could not be loaded again)."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _ALLOWED_TYPES:
            return NotImplemented
        if isinstance(obj, type) and (obj.__module__, obj.__qualname__) in _ALLOWED_GLOBALS:
            return NotImplemented  # a class of an allowed value, pickled by its name
        if isinstance(obj, zoneinfo.ZoneInfo) and obj.key is not None:
            return zoneinfo.ZoneInfo, (obj.key,)  # by its key (its own reduction needs getattr)
        raise UnspoolableValue(
            f"a value of type {kind.__module__}.{kind.__qualname__} cannot be kept in the "
            "spool (it holds numbers, text, bytes, date/time, Decimal and UUID values)")


class _RowUnpickler(pickle.Unpickler):
    """Loads only what :class:`_RowPickler` writes: a spool file is data, never code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise SpoolCorrupt(f"the spool holds an object of type {module}.{name}, which it "
                           "never writes: refusing to load it")


def _dump(value: Any) -> bytes:
    buffer = io.BytesIO()
    _RowPickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()


def _load(data: bytes | memoryview) -> Any:
    return _RowUnpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------- records
#: one operation as the spool keeps it: (operation_id, priority, created_at, rows), its
#: sequence number being its record's ``first_seq`` plus its position in the record
SpooledOp = tuple[str, int, float, list[tuple[Any, ...]]]


@dataclass(slots=True, eq=False)
class SpoolEntry:
    """Where a record is, and what it holds (the in-memory index; no rows)."""

    segment: int
    offset: int  # of the frame
    length: int  # of the frame (8 bytes + payload)
    table: str
    first_seq: int
    count: int  # operations
    rows: int
    appended_at: float
    priority: int  # the highest of its operations

    @property
    def seqs(self) -> range:
        """The sequence numbers of its operations."""
        return range(self.first_seq, self.first_seq + self.count)


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """A record read back: a batch's shape and its operations (in ``entry.seqs`` order)."""

    entry: SpoolEntry
    operation_type: str
    columns: tuple[str, ...]
    ops: list[SpooledOp]


def _encode(appended_at: float, first_seq: int, table: str, operation_type: str,
            columns: Sequence[str], body: bytes, count: int, rows: int,
            priority: int) -> bytes:
    parts = [_RECORD_HEAD.pack(_KIND_OPS, appended_at, first_seq, count, rows, priority,
                               len(table.encode()))]
    parts.append(table.encode())
    kind = operation_type.encode()
    parts += [_U16.pack(len(kind)), kind, _U16.pack(len(columns))]
    for column in columns:
        name = column.encode()
        parts += [_U16.pack(len(name)), name]
    parts.append(body)
    return b"".join(parts)


def _decode_head(payload: bytes) -> tuple[int, float, int, int, int, int, str, int]:
    kind, appended_at, first_seq, count, rows, priority, tlen = _RECORD_HEAD.unpack_from(
        payload, 0)
    pos = _RECORD_HEAD.size
    table = payload[pos:pos + tlen].decode()
    return kind, appended_at, first_seq, count, rows, priority, table, pos + tlen


def _decode_body(payload: bytes, pos: int, count: int
                 ) -> tuple[str, tuple[str, ...], list[SpooledOp]]:
    (klen,) = _U16.unpack_from(payload, pos)
    pos += 2
    operation_type = payload[pos:pos + klen].decode()
    pos += klen
    (ncols,) = _U16.unpack_from(payload, pos)
    pos += 2
    columns = []
    for _ in range(ncols):
        (n,) = _U16.unpack_from(payload, pos)
        pos += 2
        columns.append(payload[pos:pos + n].decode())
        pos += n
    loaded = _load(memoryview(payload)[pos:])
    if len(loaded) != count:
        raise SpoolCorrupt(f"a spool record says {count} operations but holds {len(loaded)}")
    return operation_type, tuple(columns), loaded


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _frames(data: bytes, pos: int) -> Iterator[tuple[int, int, bytes]]:
    """``(start, end, payload)`` of the whole frames of ``data`` from ``pos`` whose checksum
    holds, in order, up to the first that does not (or does not fit): a torn tail or damage,
    which the caller tells apart by where the last frame ended."""
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if end > len(data):
            return
        payload = data[pos + _FRAME.size:end]
        if zlib.crc32(payload) != crc:
            return
        yield pos, end, payload
        pos = end


def _done_seqs(data: bytes) -> set[int]:
    """``first_seq`` of the records done.log's frames list; a torn tail ends the list
    (those records are replayed again, and the database's marks skip them)."""
    done: set[int] = set()
    for _, _, payload in _frames(data, 0):
        if not payload:
            break
        if payload[0] == _KIND_DONE:
            done.update(struct.unpack_from(f"<{(len(payload) - 1) // 8}Q", payload, 1))
    return done


# ---------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_owner(path: Path, st: os.stat_result) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise SpoolError(
            f"spool {path} belongs to {_user(st.st_uid)}, not to {_user(me)} who runs "
            "batchdb: refusing to use it (the spool holds every spooled row; another "
            "user's spool is theirs to replay). Set spool.path to a directory of your own")


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: written to a temporary file, fsynced, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _is_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _table_to_json(info: TableInfo) -> dict[str, Any]:
    return {"name": info.name, "columns": list(info.columns),
            "primary_key": list(info.primary_key), "types": dict(info.types),
            "not_null": sorted(info.not_null)}


def _table_from_json(data: dict[str, Any]) -> TableInfo:
    return TableInfo(data["name"], tuple(data["columns"]), tuple(data["primary_key"]),
                     dict(data.get("types", {})), frozenset(data.get("not_null", ())))


def _segment_name(number: int) -> str:
    return f"seg-{number:010d}.log"


def _segment_number(name: str) -> int | None:
    if name.startswith("seg-") and name.endswith(".log"):
        digits = name[4:-4]
        if digits.isdigit():
            return int(digits)
    return None


# ---------------------------------------------------------------------- the store
class Spool:
    """An open spool directory (one process at a time: see the lock file).

    Thread-safe: appends, reads and bookkeeping may come from different threads (the
    spooler appends in one worker thread and reads in others). Every method that writes
    fsyncs before it returns.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, max_bytes: int | None = None,
                 fsync: bool = True) -> None:
        self.path = Path(path).absolute()
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._fsync = fsync
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the active segment, for appends
        self._readers: dict[int, int] = {}  # segment -> fd for reads
        self._done_backlog: list[int] = []  # replayed records not noted in done.log yet
        self._done_fd = -1
        self._floor = 1  # the highest first sequence number in a segment header
        self._last_seqs: list[int] = []  # the next sequence number after each record seen
        self._closed = False
        self._prepare_directory()
        self._take_lock()
        try:
            self._open_state()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening
    def _prepare_directory(self) -> None:
        path = self.path
        try:
            if not path.exists():
                path.mkdir(mode=0o700, parents=True)
                os.chmod(path, 0o700)  # mkdir's mode is reduced by the umask, never widened
            st = path.stat()
        except OSError as exc:
            raise SpoolError(f"spool {path}: cannot create the directory: "
                             f"{exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise SpoolError(f"spool {path} is not a directory")
        _check_owner(path, st)
        if stat.S_IMODE(st.st_mode) & 0o077:
            try:
                os.chmod(path, 0o700)  # ours, but readable by others: make it private
            except OSError as exc:
                raise SpoolError(f"spool {path}: cannot make it private (chmod 0700): "
                                 f"{exc.strerror or exc}") from None
        probe = path / ".write-test"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise SpoolError(f"spool {path} is not writable: {exc.strerror or exc} "
                             "(spool.path must be a writable directory on local disk)"
                             ) from None
        for child in path.iterdir():
            _check_owner(child, child.lstat())

    def _take_lock(self) -> None:
        lock_path = self.path / "lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise SpoolError(f"spool {self.path}: cannot lock {lock_path}: {exc}") from None
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise SpoolLocked(
                f"spool {self.path} is in use by another process (pid {holder}, lock file "
                f"{lock_path}): two managers cannot share a spool directory; give each its "
                "own spool.path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _open_state(self) -> None:
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT_NAME:
                raise SpoolError(f"{meta_path} is not a batchdb spool")
            if meta.get("version") != FORMAT_VERSION:
                raise SpoolError(
                    f"spool {self.path} has format version {meta.get('version')}; this "
                    f"batchdb reads version {FORMAT_VERSION}: replay it with the batchdb "
                    "that wrote it")
        else:
            meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "spool_id": uuid.uuid4().hex}
            _write_atomic(meta_path, json.dumps(meta).encode())
        self.spool_id: str = meta["spool_id"]
        self._meta = meta
        tables_path = self.path / "tables.json"
        self._tables: dict[str, TableInfo] = {}
        if tables_path.exists():
            for data in json.loads(tables_path.read_text()).values():
                info = _table_from_json(data)
                self._tables[info.name] = info
        numbers = sorted(n for p in self.path.iterdir()
                         if (n := _segment_number(p.name)) is not None)
        done = self._read_done()
        # the index of pending records, per table in append order
        self._pending: dict[str, deque[SpoolEntry]] = {}
        self._pending_count: dict[int, int] = {}  # segment -> pending records
        self.pending_ops = 0
        self.pending_bytes = 0
        self.torn_bytes = 0  # dropped from a torn tail when opened
        self._floor = 1
        done_live: dict[int, list[int]] = {}
        for i, number in enumerate(numbers):
            last = i == len(numbers) - 1
            for entry in self._scan(number, last):
                if entry.first_seq in done:
                    done_live.setdefault(number, []).append(entry.first_seq)
                else:
                    self._index(entry)
        next_seq = max([self._floor, *[e.first_seq + e.count for q in self._pending.values()
                                        for e in q], *self._last_seqs])
        self._next_seq = next_seq
        if self.torn_bytes:
            log.warning("spool %s: dropped a torn tail of %d bytes (an append cut short by a "
                        "crash; every record before it is kept)", self.path, self.torn_bytes)
        self._segment = max([1, *numbers])
        for number in numbers:
            if not self._pending_count.get(number) and number != numbers[-1]:
                self._delete_segment(number)
                done_live.pop(number, None)
        self._rewrite_done([seq for n in sorted(done_live) for seq in done_live[n]])
        self._fd = self._open_segment(self._segment)
        self._size = os.fstat(self._fd).st_size
        if not self.pending_ops:
            self._empty()

    def _scan(self, number: int, last: bool) -> Iterator[SpoolEntry]:
        """The records of a segment; a torn tail of the last segment is truncated."""
        path = self.path / _segment_name(number)
        with open(path, "rb") as fh:
            data = fh.read()
        size = len(data)
        if size < _SEG_HEADER.size:
            if last:  # created, header not written yet: a torn tail too
                self.torn_bytes += size
                self._truncate(path, 0, write_header=True)
                return
            raise SpoolCorrupt(f"spool segment {path} is shorter than its header")
        magic, version, _, _, floor = _SEG_HEADER.unpack_from(data, 0)
        self._floor = max(self._floor, floor)
        if magic != MAGIC:
            raise SpoolCorrupt(f"{path} is not a spool segment (bad magic)")
        if version != FORMAT_VERSION:
            raise SpoolError(f"spool segment {path} has format version {version}; this "
                             f"batchdb reads version {FORMAT_VERSION}")
        pos = _SEG_HEADER.size
        for start, end, payload in _frames(data, pos):
            kind, appended_at, first_seq, count, rows, priority, table, _ = _decode_head(
                payload)
            if kind != _KIND_OPS:
                raise SpoolCorrupt(f"spool segment {path}: unknown record kind {kind}")
            self._last_seqs.append(first_seq + count)
            yield SpoolEntry(number, start, end - start, table, first_seq, count, rows,
                             appended_at, priority)
            pos = end
        if pos < size:  # a record that does not fit or does not match its checksum
            if not last:
                raise SpoolCorrupt(
                    f"spool segment {path}: the record at byte {pos} does not match its "
                    "checksum, and it is not the tail of the spool: the file is damaged")
            self.torn_bytes += size - pos
            self._truncate(path, pos)

    def _truncate(self, path: Path, size: int, write_header: bool = False) -> None:
        with open(path, "r+b") as fh:
            fh.truncate(size)
            if write_header:
                fh.write(_SEG_HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0, self._floor))
            fh.flush()
            if self._fsync:
                os.fsync(fh.fileno())

    def _read_done(self) -> set[int]:
        """``first_seq`` of the records replayed (see :func:`_done_seqs`)."""
        path = self.path / "done.log"
        return _done_seqs(path.read_bytes()) if path.exists() else set()

    def _rewrite_done(self, done: list[int]) -> None:
        """done.log with only the records still in a segment (``done``)."""
        data = _frame(bytes([_KIND_DONE]) + struct.pack(f"<{len(done)}Q", *done)) if done else b""
        _write_atomic(self.path / "done.log", data)
        self._done_fd = os.open(self.path / "done.log", os.O_WRONLY | os.O_APPEND, 0o600)

    def _live_segments(self) -> list[int]:
        return sorted(n for p in self.path.iterdir() if (n := _segment_number(p.name)) is not None)

    def _empty(self) -> None:
        """Nothing pending: delete the older segments, truncate the active one to a header
        carrying the next sequence number, and done.log to nothing. Truncating in place
        allocates nothing, so this frees room even on a full disk."""
        for number in self._live_segments():
            if number != self._segment:
                self._delete_segment(number)
        assert self._fd is not None
        header = _SEG_HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0, self._next_seq)
        os.ftruncate(self._fd, _SEG_HEADER.size)
        os.pwrite(self._fd, header, 0)  # over the existing header: no new block
        self._size = _SEG_HEADER.size
        self._pending_count.pop(self._segment, None)
        if self._fsync:
            os.fsync(self._fd)
        os.ftruncate(self._done_fd, 0)  # records before the floor cannot come back
        if self._fsync:
            os.fsync(self._done_fd)
        self._done_backlog.clear()

    def _open_segment(self, number: int) -> int:
        """Open (creating it with its header, fsynced) segment ``number`` for appends."""
        path = self.path / _segment_name(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size == 0:
                header = _SEG_HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0, self._next_seq)
                os.pwrite(fd, header, 0)
                if self._fsync:
                    os.fsync(fd)
                    _fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return fd

    def _delete_segment(self, number: int) -> None:
        fd = self._readers.pop(number, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / _segment_name(number))
        self._pending_count.pop(number, None)

    def _index(self, entry: SpoolEntry) -> None:
        queue = self._pending.get(entry.table)
        if queue is None:
            queue = self._pending[entry.table] = deque()
        queue.append(entry)
        self._pending_count[entry.segment] = self._pending_count.get(entry.segment, 0) + 1
        self.pending_ops += entry.count
        self.pending_bytes += entry.length

    # ------------------------------------------------------------------ writing
    @staticmethod
    def encode(ops: Sequence[SpooledOp]) -> bytes:
        """The operations of a record, ``(operation_id, priority, created_at, rows)`` each,
        as :meth:`append` takes them. A value the spool does not keep raises
        :class:`UnspoolableValue` whose ``index`` names the operation (it fails alone)."""
        try:
            return _dump(list(ops))
        except UnspoolableValue as exc:
            for i, op in enumerate(ops):
                try:
                    _dump(op)
                except UnspoolableValue:
                    exc.index = i
                    break
            raise

    def remember_table(self, table: TableInfo) -> None:
        """Keep ``table``'s description in tables.json (fsynced) if it is new or changed:
        a manager started while the database is down takes writes for it."""
        with self._lock:
            if self._tables.get(table.name) != table:
                self._tables[table.name] = table
                _write_atomic(self.path / "tables.json", json.dumps(
                    {name: _table_to_json(info) for name, info in self._tables.items()}
                ).encode())

    def append(self, table: TableInfo, operation_type: str, columns: Sequence[str],
               body: bytes, count: int, rows: int, priority: int, *,
               over_limit: bool = False) -> SpoolEntry:
        """Append one record (``count`` operations of a batch, ``body`` from
        :meth:`encode`) and fsync it; returns its entry, whose ``seqs`` number the
        operations in order.

        Raises :class:`SpoolFull` when the disk is full or the spool would grow past
        ``max_bytes`` (unless ``over_limit``): nothing of the record is left behind then.
        """
        with self._lock:
            self._check_open()
            self.remember_table(table)
            first_seq = self._next_seq
            frame = _frame(_encode(time.time(), first_seq, table.name, operation_type,
                                   columns, body, count, rows, priority))
            if self.max_bytes is not None and self.pending_ops and not over_limit and (
                    self.pending_bytes + len(frame) > self.max_bytes):
                raise SpoolFull(
                    f"spool {self.path} holds {self.pending_bytes / 1e6:.1f} MB; this batch "
                    f"({len(frame) / 1e6:.1f} MB) would take it over spool.max_mb")
            if self._size > _SEG_HEADER.size and self._size + len(frame) > self.segment_bytes:
                self._rotate()
            assert self._fd is not None
            start = self._size
            try:
                written = os.pwrite(self._fd, frame, start)
                while written < len(frame):  # a short write: the rest, or ENOSPC
                    written += os.pwrite(self._fd, frame[written:], start + written)
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)  # leave no part of the record behind
                if _is_full(exc):
                    full = SpoolFull(f"spool {self.path}: the disk is full ({exc.strerror}); "
                                     "the batch stays in memory and is appended again later")
                    full.disk = True
                    raise full from exc
                raise SpoolError(f"spool {self.path}: cannot append: {exc}") from exc
            self._size = start + len(frame)
            self._next_seq = first_seq + count
            entry = SpoolEntry(self._segment, start, len(frame), table.name, first_seq,
                               count, rows, time.time(), priority)
            self._index(entry)
            return entry

    def _rotate(self) -> None:
        """Start the next segment (the current one stays until its records are done)."""
        old = self._segment
        fd = self._open_segment(old + 1)  # on a full disk this raises, and nothing changed
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._segment, self._size = fd, old + 1, _SEG_HEADER.size
        if not self._pending_count.get(old):
            self._delete_segment(old)

    # ------------------------------------------------------------------ reading
    def tables(self) -> list[str]:
        """Tables with pending records: the one holding the highest priority first, then
        by the age of their oldest record."""
        with self._lock:
            return sorted(self._pending, key=lambda t: (
                -max(e.priority for e in self._pending[t]), self._pending[t][0].first_seq))

    def table_info(self, name: str) -> TableInfo | None:
        """The description of a table the spool has held operations for."""
        return self._tables.get(name)

    def known_tables(self) -> dict[str, TableInfo]:
        """Every table description kept in the spool."""
        return dict(self._tables)

    def pending(self, table: str) -> list[SpoolEntry]:
        """The pending records of ``table``, oldest first (a snapshot)."""
        with self._lock:
            return list(self._pending.get(table, ()))

    def has_pending(self, table: str) -> bool:
        """True while ``table`` has records not replayed yet."""
        return table in self._pending

    def oldest(self) -> float | None:
        """``appended_at`` of the oldest pending record."""
        with self._lock:
            heads = [q[0].appended_at for q in self._pending.values()]
        return min(heads) if heads else None

    def read(self, entry: SpoolEntry) -> SpoolRecord:
        """Read one record back (its checksum checked again)."""
        with self._lock:
            self._check_open()
            fd = self._readers.get(entry.segment)
            if fd is None:
                fd = self._readers[entry.segment] = os.open(
                    self.path / _segment_name(entry.segment), os.O_RDONLY)
        data = os.pread(fd, entry.length, entry.offset)
        length, crc = _FRAME.unpack_from(data, 0)
        payload = data[_FRAME.size:]
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise SpoolCorrupt(f"spool segment {_segment_name(entry.segment)}: the record at "
                               f"byte {entry.offset} changed on disk since it was written")
        _, _, _, count, _, _, _, pos = _decode_head(payload)
        operation_type, columns, ops = _decode_body(payload, pos, count)
        return SpoolRecord(entry, operation_type, columns, ops)

    def records(self, table: str) -> Iterator[SpoolRecord]:
        """Stream the pending records of ``table``, oldest first, one read at a time
        (records appended meanwhile are included)."""
        seen = 0
        while True:
            with self._lock:
                # the first not handed out yet (those before it may not be marked done)
                entry = next((e for e in self._pending.get(table, ()) if e.first_seq > seen),
                             None)
            if entry is None:
                return
            seen = entry.first_seq
            yield self.read(entry)

    # ------------------------------------------------------------------ bookkeeping
    def mark_done(self, entries: Sequence[SpoolEntry]) -> None:
        """Record that ``entries`` were replayed (fsynced); delete segments left with
        nothing pending, and everything once the spool is empty.

        On a full disk the note in done.log waits for the next call (a segment whose
        records are all replayed is deleted even so, which frees room): after a crash
        meanwhile those records would be replayed again, and the database's replay marks
        skip what was committed.
        """
        if not entries:
            return
        with self._lock:
            self._check_open()
            backlog = self._done_backlog
            backlog.extend(e.first_seq for e in entries)
            self._write_done()
            emptied = []
            for entry in entries:
                queue = self._pending.get(entry.table)
                if queue and queue[0] is entry:
                    queue.popleft()
                elif queue and any(e is entry for e in queue):
                    queue.remove(entry)
                else:
                    continue  # marked done before
                if not queue:
                    del self._pending[entry.table]
                self.pending_ops -= entry.count
                self.pending_bytes -= entry.length
                left = self._pending_count[entry.segment] - 1
                self._pending_count[entry.segment] = left
                if not left:
                    emptied.append(entry.segment)
            if not self._pending:
                self._clear()
                return
            for number in emptied:
                if number != self._segment:
                    self._delete_segment(number)
            if backlog:
                self._write_done()

    def _write_done(self) -> None:
        """Append the backlog of done records to done.log; on a full disk keep it (and
        leave no part of the frame in the file)."""
        backlog = self._done_backlog
        if not backlog:
            return
        frame = _frame(bytes([_KIND_DONE]) + struct.pack(f"<{len(backlog)}Q", *backlog))
        fd = self._done_fd
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, frame)
            while written < len(frame):
                written += os.write(fd, frame[written:])
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            if not _is_full(exc):
                raise SpoolError(f"spool {self.path}: cannot write done.log: {exc}") from exc
            return
        backlog.clear()

    def _clear(self) -> None:
        """Everything was replayed: the spool starts over, empty."""
        self._empty()

    # ------------------------------------------------------------------ status
    def note_database(self, down_since: float | None) -> None:
        """Keep the database's state beside the records (for ``batchdb status`` in another
        process): down since ``down_since`` (wall-clock), or up (None)."""
        with self._lock:
            self._check_open()
            _write_atomic(self.path / "database.json",
                          json.dumps({"down_since": down_since}).encode())

    def status(self) -> dict[str, Any]:
        """Operations and bytes pending, the age of the oldest, the spool's files."""
        oldest = self.oldest()
        return {
            "path": str(self.path),
            "operations": self.pending_ops,
            "bytes": self.pending_bytes,
            "oldest_age_seconds": None if oldest is None else round(time.time() - oldest, 3),
            "tables": sorted(self._pending),
            "segments": len(self._live_segments()),
        }

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.path} is closed")

    def close(self) -> None:
        """Close the files and release the lock; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in [self._fd, self._done_fd, *self._readers.values()]:
                if fd is not None and fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._readers.clear()
            self._fd = None
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect_spool(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a spool directory holds, read without taking its lock (for ``batchdb status``
    while a manager has it open): operations, bytes and the oldest record's age, counted
    from the segments and done.log as they are on disk, and since when the database was
    down as its spooler last noted (None: up). None if there is no spool there."""
    root = Path(path).absolute()
    if not (root / "meta.json").exists():
        return None
    done: set[int] = set()
    with contextlib.suppress(OSError):
        done = _done_seqs((root / "done.log").read_bytes())
    ops = size = 0
    oldest: float | None = None
    tables: set[str] = set()
    down_since = None
    with contextlib.suppress(OSError, ValueError):
        down_since = json.loads((root / "database.json").read_text()).get("down_since")
    for seg in sorted(root.glob("seg-*.log")):
        try:
            data = seg.read_bytes()
        except FileNotFoundError:  # replayed and deleted meanwhile
            continue
        for start, end, payload in _frames(data, _SEG_HEADER.size):
            _, appended_at, first_seq, count, _, _, table, _ = _decode_head(payload)
            if first_seq not in done:
                ops += count
                size += end - start
                tables.add(table)
                oldest = appended_at if oldest is None else min(oldest, appended_at)
    return {"path": str(root), "operations": ops, "bytes": size,
            "oldest_age_seconds": None if oldest is None else round(time.time() - oldest, 3),
            "tables": sorted(tables), "down_since": down_since}
