"""A TCP proxy in front of the real server that can cut a connection at a chosen moment.

It relays bytes unchanged. Armed with :meth:`FaultProxy.arm`, it watches the client's
messages for a statement text (e.g. ``COMMIT``) and then cuts that connection:

- ``after_answer=True``: the statement reaches the server, the server executes it and
  answers; the answer is dropped and both sockets are closed. For COMMIT this is the
  "connection lost during COMMIT, but it did commit" case.
- ``after_answer=False``: the connection is cut before the statement reaches the server
  (the server then rolls the transaction back);
- ``after_answer=False, hold_server=True``: only the client's side is cut; the server's
  side stays open, without the statement, until :meth:`close`: the server's session waits
  in its transaction (it neither commits nor rolls back, and writes no record of either).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

__all__ = ["FaultProxy"]


@dataclass
class _Fault:
    marker: bytes
    after_answer: bool
    times: int
    hold_server: bool = False


class FaultProxy:
    """Listen on 127.0.0.1:<port> and forward to 127.0.0.1:``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._fault: _Fault | None = None
        self.cuts = 0
        self._handlers: set[asyncio.Task[object]] = set()
        self._cuts: set[asyncio.Event] = set()
        self._held: list[asyncio.StreamWriter] = []  # server sides kept open (hold_server)

    async def start(self, port: int = 0) -> FaultProxy:
        """Start listening on ``port`` (default: a free one) of 127.0.0.1."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def arm(self, marker: bytes, *, after_answer: bool, times: int = 1,
            hold_server: bool = False) -> None:
        """Cut the next ``times`` connections that send ``marker`` (a NUL-terminated query
        text in the wire protocol, e.g. ``b"COMMIT\\x00"``)."""
        self._fault = _Fault(marker, after_answer, times, hold_server)

    def dsn(self, server_dsn: str) -> str:
        """``server_dsn`` pointed at the proxy instead of the server."""
        return server_dsn.replace(f":{self.upstream_port}/", f":{self.port}/")

    async def close(self) -> None:
        """Stop listening and close every relayed connection."""
        if self._server is not None:
            self._server.close()
        for cut in list(self._cuts):
            cut.set()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for writer in self._held:
            writer.close()
        self._held.clear()
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        cut = asyncio.Event()
        answer_pending = asyncio.Event()
        hold = False
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        self._cuts.add(cut)

        async def upstream() -> None:  # client -> server, watching for the marker
            while not cut.is_set():
                data = await client_r.read(65536)
                if not data:
                    break
                fault = self._fault
                if fault is not None and fault.times > 0 and fault.marker in data:
                    fault.times -= 1
                    self.cuts += 1
                    if fault.after_answer:
                        server_w.write(data)
                        await server_w.drain()
                        answer_pending.set()  # the next answer is swallowed, then cut
                        return
                    nonlocal hold
                    hold = fault.hold_server
                    cut.set()
                    break
                server_w.write(data)
                await server_w.drain()
            cut.set()

        async def downstream() -> None:  # server -> client
            while not cut.is_set():
                data = await server_r.read(65536)
                if not data:
                    break
                if answer_pending.is_set():
                    break  # the server answered the marked statement: drop it and cut
                client_w.write(data)
                await client_w.drain()
            cut.set()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await cut.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if hold:
                self._held.append(server_w)
            for writer in (client_w,) if hold else (client_w, server_w):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            self._cuts.discard(cut)
            if me is not None:
                self._handlers.discard(me)
