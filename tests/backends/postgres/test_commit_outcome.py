"""A COMMIT whose answer is lost in a server crash, on a real server of this module's own
(``pg_ctl stop -m immediate``): the batch must be written exactly once, whatever the
transaction ids do across the crash.

The case: the client's connection is cut before COMMIT reaches the server (the server's
session waits in its transaction), the server is killed before its WAL writer has written
the transaction's records, and after the restart other transactions are handed the ids
that never reached the WAL, the batch's among them. Asked about that id, ``txid_status()``
then answers "committed" (for another transaction): a backend that trusted it
acknowledged a batch that is not in the database (the spool's outage test lost an
operation so, about one run in twenty).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator

import pytest

from batchdb import BatchDBManager
from tests.pgserver import PostgresServer, sql_exec, sql_rows

from .faultproxy import FaultProxy
from .outage import outage_server, start_again, stop_immediate

pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    yield from outage_server(tmp_path_factory.mktemp("commit-outcome"))


async def test_a_commit_lost_in_a_crash_is_written_again_though_its_id_is_reused(
        server: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="batchdb")
    name = server.create_database("outcome")
    dsn = server.dsn_for(server.user, dbname=name)
    sql_exec(dsn, "CREATE TABLE nk (id bigint NOT NULL, v text)")  # no key: no dedup
    # the WAL writer waits 10 s between rounds: what the cut transaction wrote is still
    # in the server's memory when it is killed
    sql_exec(server.dsn, "ALTER SYSTEM SET wal_writer_delay = '10s'",
             "SELECT pg_reload_conf()")
    proxy = await FaultProxy(server.port).start()
    manager = BatchDBManager.from_settings(
        None, backend="postgres", maintenance={"enabled": False},
        postgres={"dsn": proxy.dsn(dsn), "connect_timeout_seconds": 1.0},
        batch={"max_retries": 200, "retry_base_delay_seconds": 0.05,
               "retry_max_delay_seconds": 0.2})
    try:
        async with manager:
            await manager.wait(await manager.queue_operation("nk", "INSERT",
                                                             [{"id": 0, "v": "warm"}]))
            proxy.arm(b"COMMIT\x00", after_answer=False, hold_server=True)
            op = await manager.queue_operation("nk", "INSERT",
                                               [{"id": i, "v": "x"} for i in range(1, 101)])
            while proxy.cuts == 0:
                await asyncio.sleep(0.001)
            port = proxy.port
            await asyncio.to_thread(stop_immediate, server)
            await proxy.close()  # the retries find nobody until the ids are handed out again
            await asyncio.to_thread(start_again, server)
            before = sql_rows(dsn, "SELECT pg_catalog.txid_current()")[0][0]
            for _ in range(50):  # hand out the ids again, each to a committed transaction
                sql_rows(dsn, "SELECT pg_catalog.txid_current()")
            proxy = await FaultProxy(server.port).start(port)
            done = await manager.wait(op)
            assert done.rows_affected == 100
            resolved = dict(manager.backend.outcomes_resolved)  # type: ignore[attr-defined]
    finally:
        await proxy.close()
        sql_exec(server.dsn, "ALTER SYSTEM RESET wal_writer_delay", "SELECT pg_reload_conf()")
    # every row exactly once: not acknowledged without being written, not written twice
    assert sql_rows(dsn, "SELECT count(*), count(DISTINCT id) FROM nk") == [(101, 101)]
    assert resolved == {"committed": 0, "aborted": 1}
    # the case happened: the id of the cut transaction was handed out again after the crash
    lost = re.search(r"connection lost during COMMIT of transaction (\d+)", caplog.text)
    assert lost is not None and before <= int(lost.group(1)) < before + 50
    server.drop_database(name)
