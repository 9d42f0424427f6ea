"""Priority across the processes writing one SQLite file.

SQLite has one write lock per file and no notion of priority: whoever asks for the lock
first after it is released gets it, and its default busy handler sleeps in growing steps
(up to 100 ms) while it waits. So a trading bot's CRITICAL order in one process waited behind
a backtester's LOW backlog in another for tens of milliseconds: the backtester's writer took
the lock again at once after each batch while the bot slept.

Here the managers that write one file tell each other what they are waiting for, through a
small file beside the database (``<database>-batchdb``) and POSIX advisory byte-range locks
(``fcntl``) on it:

* bytes ``0..3``, one per priority: a process holds a *shared* lock on byte ``p`` while it has
  a batch of priority ``p`` waiting for, or holding, the write lock. A writer about to start a
  batch of a lower priority probes the bytes above its own (``F_GETLK``: nothing is locked or
  changed by a probe) and yields, for a bounded time, while another process holds one;
* bytes ``64..64+SLOTS``: a process holds an *exclusive* lock on one slot byte while it writes
  the file, and keeps its pid, program name and the priorities it has written at in the
  slot's record (``RECORD_BASE + slot * RECORD_SIZE``), for ``batchdb status``.

Why hand-written: no library offers this. ``filelock``/``portalocker`` lock whole files for
mutual exclusion; here nothing is excluded: a lock is a sign ("I am waiting at CRITICAL")
that others read without taking it (``F_GETLK``, which those libraries do not expose), and
several processes hold the same sign at once (shared locks).

Why these locks: the kernel drops every lock of a process when the process ends, however it
ends (SIGKILL included), so a dead writer never leaves a sign that blocks the others; a record
whose slot byte is not locked is stale and ignored. POSIX locks belong to the *process*
(not to a thread or a file descriptor), which shapes the design:

* locks of one process never conflict with each other, so a probe only ever sees other
  processes; managers of one process share one :class:`FileCoordinator` per file and count
  their claims in memory (the lock is taken on a priority's first claim, dropped on its last),
  and a manager compares its own claims with the process's counts to see other managers of
  the same process;
* closing *any* descriptor of the file drops all the process's locks on it: the file is
  opened once per process (a registry keyed by the database file's identity) and closed only
  when the last manager of the process using it closes;
* a forked child holds none of its parent's locks: it starts with an empty registry.

Linux and macOS (BSD) lay out ``struct flock`` differently; both are packed below. Where
``fcntl`` is missing (Windows) coordination is off and each process only orders its own
writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks, no coordination
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileCoordinator", "PriorityClaims", "WriterInfo", "coordination_path",
           "open_claims"]

log = logging.getLogger("batchdb.sqlite")

SUFFIX = "-batchdb"
PRIORITIES = 4  # LOW, NORMAL, HIGH, CRITICAL: byte p is priority p
SLOT_BASE = 64
SLOTS = 256
RECORD_BASE = 4096
RECORD_SIZE = 128
_MAGIC = b"bdb1"
# magic, pid, start time, mask of the priorities written at, program name
_RECORD = struct.Struct("<4sidB" + str(RECORD_SIZE - 4 - 4 - 8 - 1) + "s")

if sys.platform.startswith("linux"):
    # struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
    # (64-bit off_t; 4 bytes of padding after l_whence and after l_pid)
    _FLOCK = struct.Struct("@hhqqi4x")

    def _pack(kind: int, start: int, length: int) -> bytes:
        return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)

    def _unpack(raw: bytes) -> tuple[int, int, int]:
        kind, _, start, _, pid = _FLOCK.unpack(raw)
        return kind, start, pid
elif sys.platform == "darwin" or "bsd" in sys.platform:
    # struct flock { off_t l_start; off_t l_len; pid_t l_pid; short l_type; short l_whence; }
    # (FreeBSD adds int l_sysid)
    _FLOCK = struct.Struct("@qqihh" + ("i" if "freebsd" in sys.platform else ""))

    def _pack(kind: int, start: int, length: int) -> bytes:
        extra = (0,) if "freebsd" in sys.platform else ()
        return _FLOCK.pack(start, length, 0, kind, os.SEEK_SET, *extra)

    def _unpack(raw: bytes) -> tuple[int, int, int]:
        start, _, pid, kind, *_ = _FLOCK.unpack(raw)
        return kind, start, pid
else:
    _FLOCK = None  # type: ignore[assignment]


def coordination_path(database: str) -> str:
    """The coordination file of a database file."""
    return database + SUFFIX


@dataclass(frozen=True)
class WriterInfo:
    """Another process writing the same file, as its slot record tells."""

    pid: int
    program: str
    started: float
    priorities: tuple[int, ...]  # every priority it has written at
    waiting: tuple[int, ...]  # priorities it has a batch waiting or being written at now


class FileCoordinator:
    """One process's view of one coordination file (shared by the process's managers)."""

    def __init__(self, path: str, key: tuple[int, int]) -> None:
        self.path = path
        self.key = key
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        self._lock = threading.Lock()
        self.counts = [0] * PRIORITIES  # claims of this process, by priority
        self.users = 0
        self._slot: int | None = None
        self._slot_tried = False
        self._mask = 0
        self._started = 0.0

    # ------------------------------------------------------------------ claims
    def claim(self, priority: int, mine: list[int]) -> None:
        """A batch of ``priority`` waits for (or holds) the write lock in this process;
        ``mine`` counts the claims of the manager it belongs to."""
        with self._lock:
            mine[priority] += 1
            self.counts[priority] += 1
            if self.counts[priority] == 1:
                self._lockf(fcntl.LOCK_SH | fcntl.LOCK_NB, priority)
            if not self._mask & (1 << priority):
                self._mask |= 1 << priority
                self._write_record()

    def release(self, priority: int, mine: list[int]) -> None:
        """That batch committed or failed."""
        with self._lock:
            mine[priority] -= 1
            self.counts[priority] -= 1
            if self.counts[priority] == 0:
                self._lockf(fcntl.LOCK_UN, priority)

    def _lockf(self, how: int, byte: int) -> bool:
        try:
            fcntl.lockf(self._fd, how, 1, byte, os.SEEK_SET)
        except OSError:  # only a foreign exclusive lock on the byte can refuse it
            return False
        return True

    def claimed_above_elsewhere(self, priority: int) -> bool:
        """True if another *process* has a batch of a priority above ``priority`` waiting
        for or holding the write lock (the process's own locks never show)."""
        if priority >= PRIORITIES - 1:
            return False
        return self._probe(priority + 1, PRIORITIES - 1 - priority) is not None

    def _probe(self, start: int, length: int) -> tuple[int, int] | None:
        """(byte, pid) of a lock another process holds in the range, or None."""
        raw = fcntl.fcntl(self._fd, fcntl.F_GETLK, _pack(fcntl.F_WRLCK, start, length))
        kind, where, pid = _unpack(raw)
        if kind == fcntl.F_UNLCK:
            return None
        return where, pid

    # ------------------------------------------------------------------ presence
    def _write_record(self) -> None:
        """Take a slot on first use, then (re)write this process's record in it."""
        if self._slot is None and not self._slot_tried:
            self._slot_tried = True
            for slot in range(SLOTS):
                if self._lockf(fcntl.LOCK_EX | fcntl.LOCK_NB, SLOT_BASE + slot):
                    self._slot = slot
                    self._started = time.time()
                    break
        if self._slot is None:
            return  # every slot taken: priorities still work, status will not list us
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        record = _RECORD.pack(_MAGIC, os.getpid(), self._started, self._mask,
                              program.encode("utf-8", "replace")[:_RECORD.size - 17])
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, record, RECORD_BASE + self._slot * RECORD_SIZE)

    def others(self) -> list[WriterInfo]:
        """The other processes writing this file (slots locked by a live process)."""
        found: list[WriterInfo] = []
        waiting: dict[int, list[int]] = {}
        for p in range(PRIORITIES):
            holder = self._probe(p, 1)
            if holder is not None:
                waiting.setdefault(holder[1], []).append(p)
        for slot in range(SLOTS):
            holder = self._probe(SLOT_BASE + slot, 1)
            if holder is None:
                continue
            raw = os.pread(self._fd, _RECORD.size, RECORD_BASE + slot * RECORD_SIZE)
            pid, program, started, mask = holder[1], "?", 0.0, 0
            if len(raw) == _RECORD.size:
                magic, rpid, rstarted, rmask, name = _RECORD.unpack(raw)
                if magic == _MAGIC and rpid == pid:
                    program = name.rstrip(b"\0").decode("utf-8", "replace")
                    started, mask = rstarted, rmask
            found.append(WriterInfo(pid, program, started,
                                    tuple(p for p in range(PRIORITIES) if mask >> p & 1),
                                    tuple(sorted(waiting.get(pid, ())))))
        return found

    def close(self) -> None:
        """Drop every lock of this process on the file (the last manager closed)."""
        os.close(self._fd)


class PriorityClaims:
    """One manager's claims on its process's :class:`FileCoordinator`."""

    def __init__(self, shared: FileCoordinator) -> None:
        self.shared = shared
        self.mine = [0] * PRIORITIES

    def claim(self, priority: int) -> None:
        """A batch of ``priority`` is handed to this manager's writer (any thread)."""
        self.shared.claim(priority, self.mine)

    def release(self, priority: int) -> None:
        """That batch is done (any thread)."""
        self.shared.release(priority, self.mine)

    def higher_waiting(self, priority: int) -> bool:
        """True if a batch of a higher priority waits elsewhere: in another process, or in
        another manager of this process writing the same file."""
        counts, mine = self.shared.counts, self.mine
        for p in range(priority + 1, PRIORITIES):
            if counts[p] > mine[p]:
                return True
        return self.shared.claimed_above_elsewhere(priority)

    def others(self) -> list[WriterInfo]:
        """The other processes writing the file."""
        return self.shared.others()

    def close(self) -> None:
        """This manager is done with the file."""
        for p, n in enumerate(list(self.mine)):
            for _ in range(n):
                self.shared.release(p, self.mine)
        _detach(self.shared)


_registry: dict[tuple[int, int], FileCoordinator] = {}
_registry_lock = threading.Lock()


def _forget_in_child() -> None:
    # a forked child holds none of the parent's locks: it opens the file afresh (the
    # inherited descriptors stay open: closing one would be harmless here, but closing
    # descriptors behind a library's back is not)
    global _registry_lock
    _registry.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def open_claims(database: str) -> PriorityClaims | None:
    """Claims for one manager writing ``database`` (an existing file), or None where
    coordination is not possible (no fcntl, an in-memory database, a directory that
    cannot take the coordination file)."""
    if fcntl is None or _FLOCK is None or not database:
        return None
    try:
        st = os.stat(database)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino)
    with _registry_lock:
        shared = _registry.get(key)
        if shared is None:
            path = coordination_path(database)
            try:
                shared = FileCoordinator(path, key)
            except OSError as exc:
                log.warning("SQLite database %s: no coordination with other processes "
                            "(cannot open %s: %s); priorities hold within this process only",
                            database, path, exc)
                return None
            _registry[key] = shared
        shared.users += 1
    return PriorityClaims(shared)


def _detach(shared: FileCoordinator) -> None:
    with _registry_lock:
        shared.users -= 1
        if shared.users == 0 and _registry.get(shared.key) is shared:
            del _registry[shared.key]
            shared.close()


def describe(info: WriterInfo, names: Any) -> str:
    """``pid 1234 bot.py: CRITICAL (waiting: CRITICAL)`` with ``names(p)`` naming a
    priority."""
    text = f"pid {info.pid} {info.program}: " + (
        ", ".join(names(p) for p in reversed(info.priorities)) or "-")
    if info.waiting:
        text += " (writing now: " + ", ".join(names(p) for p in reversed(info.waiting)) + ")"
    return text
