"""A PostgreSQL server of its own for outage tests: stopped the hard way
(``pg_ctl stop -m immediate``: every backend process is killed, no checkpoint, the next start
runs crash recovery) and started again on the same port and data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import PostgresServer, sql_rows

__all__ = ["outage_server", "start_again", "stop_immediate"]


def stop_immediate(server: PostgresServer) -> float:
    """``pg_ctl stop -m immediate``; returns the wall-clock time it was down."""
    server._run([server._bin("pg_ctl"), "-D", str(server.data_dir), "-m", "immediate", "-w",
                 "-t", "60", "stop"])
    server._running = False
    server.pid = None
    return time.time()


def start_again(server: PostgresServer) -> None:
    """Start the server on its port and data (crash recovery runs first) and wait until it
    answers."""
    server._start_server()
    deadline = time.monotonic() + 60
    while True:
        try:
            sql_rows(server.dsn, "SELECT 1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def outage_server(base: Path) -> Iterator[PostgresServer]:
    """A server for one module (stopping the session's server would disturb other tests);
    the module is skipped where no server can be started."""
    reason = PostgresServer.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL server can be started here: {reason}")
    server = PostgresServer.start(base)
    try:
        yield server
    finally:
        server.stop()
