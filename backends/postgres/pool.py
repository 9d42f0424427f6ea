"""A small asyncio pool of psycopg connections that discards broken ones.

Connections are opened lazily up to ``size``. A connection that comes back broken, closed or
still inside a transaction is closed and forgotten; when one was lost (server restarted,
network cut) the idle ones are dropped too, since they most likely died with it, and
fresh connections replace them on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection, pq

from batchdb.models import BatchDBError

__all__ = ["Pool", "PooledConnection"]


@dataclass(eq=False)
class PooledConnection:
    """One server connection and what this backend created on it (its staging tables)."""

    raw: AsyncConnection[Any]
    created_at: float = field(default_factory=time.monotonic)
    staging: dict[Any, tuple[str, bool]] = field(default_factory=dict)
    number: int = 0

    @property
    def usable(self) -> bool:
        """Open, not broken, and outside any transaction."""
        raw = self.raw
        return (not raw.closed and not raw.broken
                and raw.info.transaction_status == pq.TransactionStatus.IDLE)


class Pool:
    """Up to ``size`` connections made by ``connect``; waiters are served in order."""

    def __init__(self, connect: Callable[[], Awaitable[AsyncConnection[Any]]],
                 size: int) -> None:
        """A pool of at most ``size`` connections, each made by ``connect``."""
        self._connect = connect
        self.size = size
        self._idle: deque[PooledConnection] = deque()
        self._open = 0
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.created = 0
        self.discarded = 0

    # ------------------------------------------------------------------ acquire / release
    async def _acquire(self) -> PooledConnection:
        while True:
            if self._closed:
                raise BatchDBError("the PostgreSQL connection pool is closed")
            if self._idle:
                conn = self._idle.pop()  # most recently used: warm caches, fresh socket
                self._in_use += 1
                return conn
            if self._open < self.size:
                self._open += 1
                try:
                    raw = await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
                self.created += 1
                self._in_use += 1
                return PooledConnection(raw, number=self.created)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()  # we were woken but leave: pass the turn on
                raise

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _release(self, conn: PooledConnection) -> None:
        self._in_use -= 1
        if not self._closed and conn.usable:
            self._idle.append(conn)
            self._wake()
            return
        lost = conn.raw.broken or conn.raw.closed
        await self._discard(conn)
        if lost:
            await self.drop_idle()
        self._wake()

    async def _discard(self, conn: PooledConnection) -> None:
        self._open -= 1
        self.discarded += 1
        with contextlib.suppress(Exception):
            await conn.raw.close()

    async def drop_idle(self) -> None:
        """Close every idle connection (after a lost one: they probably died as well)."""
        while self._idle:
            await self._discard(self._idle.popleft())

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[PooledConnection]:
        """A connection for the duration of the block; returned, or discarded if unusable."""
        conn = await self._acquire()
        try:
            yield conn
        finally:
            await self._release(conn)

    # ------------------------------------------------------------------ life cycle
    async def close(self) -> None:
        """Close the idle connections now; those in use are closed when they come back."""
        self._closed = True
        await self.drop_idle()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # wakes into "pool is closed"

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._closed

    def stats(self) -> dict[str, int]:
        """Open, idle, in-use and waiting counts, and connections made and dropped so far."""
        return {
            "size": self.size,
            "open": self._open,
            "idle": len(self._idle),
            "in_use": self._in_use,
            "waiting": sum(1 for w in self._waiters if not w.done()),
            "connections_made": self.created,
            "connections_discarded": self.discarded,
        }
