"""A COPY writer that reads what the server sends while it waits to write.

psycopg's own writer waits only until the socket can be written. When the server refuses a
row early in a COPY (a value its column cannot parse), it sends its error at once, and the
error quotes the value: for a value of a few MB the error does not fit in the socket
buffers, so the server blocks writing it and stops reading the rest of the COPY, while the
client blocks writing the rest, or its end of COPY — both wait for ever (psycopg 3.3,
reproduced with plain psycopg: two rows of 6 MB of text into a bigint column). libpq's
documented remedy for a non-blocking connection is to wait for the socket to be readable
*or* writable and to consume input when it is readable; this writer does that, for the
data and for the end of the COPY, so the server can finish its error, read on, and the
COPY ends with the error.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from psycopg import errors, pq
from psycopg.copy import AsyncLibpqWriter
from psycopg.generators import fetch_many
from psycopg.waiting import Ready, Wait

__all__ = ["ReadingCopyWriter"]

#: bytes per put_copy_data call, and queued bytes between flushes (psycopg's own sizes)
CHUNK = 128 * 1024
FLUSH_EVERY = 1024 * 1024


def _send(pgconn: Any, data: Any, flush: bool) -> Generator[Wait, Ready | int, None]:
    """Queue ``data`` (and with ``flush`` send everything queued), reading the server's
    messages whenever the socket is readable so that the server is never left blocked."""
    while pgconn.put_copy_data(data) == 0:
        if (yield Wait.RW) & Ready.R:
            pgconn.consume_input()
    if flush:
        yield from _flush(pgconn)


def _flush(pgconn: Any) -> Generator[Wait, Ready | int, None]:
    while pgconn.flush():
        if (yield Wait.RW) & Ready.R:
            pgconn.consume_input()


def _end(pgconn: Any, error: bytes | None) -> Generator[Wait, Ready | int, None]:
    """End the COPY (``error``: abort it with that message), reading as above."""
    yield from _flush(pgconn)
    while pgconn.put_copy_end(error) == 0:
        if (yield Wait.RW) & Ready.R:
            pgconn.consume_input()
    yield from _flush(pgconn)


class ReadingCopyWriter(AsyncLibpqWriter):
    """psycopg's libpq COPY writer, waiting for read *or* write readiness (see above)."""

    _queued = 0

    async def write(self, data: Any) -> None:
        """Send ``data`` in chunks, flushing about every megabyte."""
        pgconn = self.connection.pgconn
        for start in range(0, len(data), CHUNK):
            chunk = data[start:start + CHUNK] if len(data) > CHUNK else data
            self._queued += len(chunk)
            flush = self._queued >= FLUSH_EVERY
            if flush:
                self._queued = 0
            await self.connection.wait(_send(pgconn, chunk, flush))

    async def finish(self, exc: BaseException | None = None) -> None:
        """End the COPY as psycopg's writer does (with ``exc``: abort it, and let the
        server's "COPY from stdin failed" give way to ``exc``), but reading while it
        sends: the server may still be writing a long error about an earlier row."""
        conn = self.connection
        encoding = conn.info.encoding
        error = None
        if exc is not None:
            error = f"error from Python: {type(exc).__qualname__} - {exc}".encode(
                encoding, "replace")
        try:
            await conn.wait(_end(conn.pgconn, error))
            results = await conn.wait(fetch_many(conn.pgconn))
            if results[0].status != pq.ExecStatus.COMMAND_OK:
                raise errors.error_from_result(results[0], encoding=encoding)
        except errors.QueryCanceled:
            if error is None:
                raise
