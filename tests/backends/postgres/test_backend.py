"""The PostgreSQL backend on a real server: operations, isolation, schema, candles,
maintenance, settings and secrets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBError, OperationFailed, OperationType, Priority, SchemaError
from batchdb.backends.postgres import PostgresBackend
from batchdb.backends.postgres.backend import PostgresConnectError
from batchdb.backends.postgres.settings import PostgresSettings
from tests.pgserver import PostgresServer

from .conftest import ManagerFactory, sql_exec, sql_rows, with_search_path


async def test_every_operation_type(make_pg_manager: ManagerFactory, pg_dsn: str) -> None:
    sql_exec(pg_dsn, "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, "
                     "price double precision)")
    async with make_pg_manager() as m:
        ins = await m.queue_operation("items", OperationType.INSERT,
                                      [{"id": i, "name": f"n{i}", "price": i * 1.5}
                                       for i in range(1, 11)])
        await m.wait(ins)
        assert sql_rows(pg_dsn, "SELECT count(*), sum(price) FROM items") == [(10, 82.5)]

        # upsert: an existing key, a new key, and a key given twice (the last row wins)
        up = await m.queue_operation("items", "upsert", [
            {"id": 2, "name": "two", "price": 20.0},
            {"id": 11, "name": "eleven", "price": 11.0},
            {"id": 12, "name": "first", "price": 1.0},
            {"id": 12, "name": "last", "price": 2.0},
        ])
        # update by key of a subset of columns (a key given twice: the last wins; an
        # absent key changes nothing)
        upd = await m.queue_operation("items", "UPDATE", [
            {"id": 3, "price": 30.0}, {"id": 3, "price": 33.0}, {"id": 999, "price": 1.0}])
        dele = await m.queue_operation("items", "DELETE", [{"id": 4, "name": "x"},
                                                            {"id": 5, "name": "y"}])
        await m.flush()
        for op_id in (up, upd, dele):
            assert (await m.wait(op_id)).succeeded
        rows = dict((r[0], r[1:]) for r in sql_rows(pg_dsn, "SELECT * FROM items"))
        assert rows[2] == ("two", 20.0)
        assert rows[11] == ("eleven", 11.0)
        assert rows[12] == ("last", 2.0)
        assert rows[3] == ("n3", 33.0)
        assert 4 not in rows and 5 not in rows and 999 not in rows
        assert len(rows) == 10
        # the rows the statement changed: key 3 (given twice, applied once), not 999
        assert (await m.wait(upd)).rows_affected == 1


async def test_upsert_skips_rows_that_did_not_change(make_pg_manager: ManagerFactory,
                                                     pg_dsn: str) -> None:
    """Re-sending identical rows writes no new row versions (xmin stays)."""
    sql_exec(pg_dsn, "CREATE TABLE q (k text PRIMARY KEY, v double precision, note text)")
    async with make_pg_manager() as m:
        rows = [{"k": f"k{i}", "v": float(i), "note": None} for i in range(5)]
        await m.wait(await m.queue_operation("q", "UPSERT", rows))
        before = dict(sql_rows(pg_dsn, "SELECT k, xmin::text FROM q"))
        rows[1] = {"k": "k1", "v": 100.0, "note": None}
        rows[2] = {"k": "k2", "v": 2.0, "note": "now set"}
        await m.wait(await m.queue_operation("q", "UPSERT", rows))
        after = dict(sql_rows(pg_dsn, "SELECT k, xmin::text FROM q"))
    assert {k for k in before if before[k] != after[k]} == {"k1", "k2"}
    assert sql_rows(pg_dsn, "SELECT v, note FROM q WHERE k IN ('k1', 'k2') ORDER BY k") == [
        (100.0, None), (2.0, "now set")]


async def test_failing_operation_fails_alone(make_pg_manager: ManagerFactory,
                                             pg_dsn: str) -> None:
    sql_exec(pg_dsn, "CREATE TABLE t (id bigint PRIMARY KEY, label text NOT NULL, n integer)",
             "INSERT INTO t VALUES (1, 'exists', 0)",
             # a user's trigger that rejects some rows
             "CREATE FUNCTION no_negative() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
             "IF NEW.n < 0 THEN RAISE EXCEPTION 'n must not be negative (id %)', NEW.id; "
             "END IF; RETURN NEW; END $$",
             "CREATE TRIGGER t_no_negative BEFORE INSERT ON t FOR EACH ROW "
             "EXECUTE FUNCTION no_negative()")
    async with make_pg_manager(batch={"linger_seconds": {"NORMAL": 5.0}}) as m:
        good = [await m.queue_operation("t", "INSERT", [{"id": 100 + i, "label": "ok", "n": i}])
                for i in range(6)]
        dup = await m.queue_operation("t", "INSERT", [{"id": 1, "label": "dup", "n": 0}])
        more = [await m.queue_operation("t", "INSERT", [{"id": 200 + i, "label": "ok", "n": i}])
                for i in range(6)]
        null = await m.queue_operation("t", "INSERT", [{"id": 300, "label": None, "n": 0}])
        bad = await m.queue_operation("t", "INSERT", [{"id": 301, "label": "x", "n": "many"}])
        neg = await m.queue_operation("t", "INSERT", [{"id": 302, "label": "x", "n": -1}])
        last = await m.queue_operation("t", "INSERT", [{"id": 400, "label": "ok", "n": 1}])
        await m.flush()
        for op_id in [*good, *more, last]:
            assert (await m.wait(op_id)).succeeded
        with pytest.raises(OperationFailed, match=r"n must not be negative \(id 302\)"):
            await m.wait(neg)
        with pytest.raises(OperationFailed, match=r"(?s)UniqueViolation.*\(id\)=\(1\)"):
            await m.wait(dup)
        with pytest.raises(OperationFailed, match=r'null value in column "label"'):
            await m.wait(null)
        with pytest.raises(OperationFailed, match=r'invalid input syntax for type integer: '
                                                  r'"many"'):
            await m.wait(bad)
        status = await m.get_queue_status()
        assert status["stats"]["splits"] >= 1  # they were one batch, split to isolate
    ids = [r[0] for r in sql_rows(pg_dsn, "SELECT id FROM t ORDER BY id")]
    assert ids == [1, *range(100, 106), *range(200, 206), 400]
    assert sql_rows(pg_dsn, "SELECT label FROM t WHERE id = 1") == [("exists",)]


async def test_values_the_binary_copy_refuses_go_as_text(make_pg_manager: ManagerFactory,
                                                         pg_dsn: str) -> None:
    """ISO strings for a timestamp, numbers for text: the server converts them."""
    sql_exec(pg_dsn, "CREATE TABLE ev (id bigint PRIMARY KEY, at timestamptz, tag text)")
    async with make_pg_manager() as m:
        await m.wait(await m.queue_operation("ev", "UPSERT", [
            {"id": 1, "at": "2024-03-01T12:00:00Z", "tag": 7}]))
    assert sql_rows(pg_dsn, "SELECT id, extract(epoch FROM at)::bigint, tag FROM ev") == [
        (1, 1709294400, "7")]


async def test_existing_user_table_with_awkward_names(make_pg_manager: ManagerFactory,
                                                      pg_dsn: str, pg_schema: str) -> None:
    sql_exec(pg_dsn,
             'CREATE TABLE "Trades ""2024""" ("Id" bigint, "select" text, '
             '"Mixed Case" numeric(12,2), payload jsonb, flags boolean[], '
             'total numeric GENERATED ALWAYS AS ("Mixed Case" * 2) STORED, '
             'PRIMARY KEY ("Id"))',
             "CREATE SCHEMA IF NOT EXISTS other_schema_x",
             "CREATE TABLE other_schema_x.elsewhere (a int PRIMARY KEY, b text)")
    try:
        async with make_pg_manager() as m:
            info = await m.table_info('Trades "2024"')
            assert info.columns == ("Id", "select", "Mixed Case", "payload", "flags")
            assert info.primary_key == ("Id",)
            assert info.types["Mixed Case"] == "numeric(12,2)"
            rows = [{"Id": i, "select": f"s'{i};--", "Mixed Case": i + 0.25,
                     "payload": '{"a": 1}', "flags": [True, False]} for i in range(3)]
            await m.wait(await m.queue_operation('Trades "2024"', "UPSERT", rows))
            await m.wait(await m.queue_operation(
                'Trades "2024"', "UPDATE", [{"Id": 1, "Mixed Case": 9.5}]))
            # a schema-qualified name not on the search_path
            await m.wait(await m.queue_operation("other_schema_x.elsewhere", "INSERT",
                                                 [{"a": 1, "b": "x"}]))
            # names that carry SQL are unknown tables/columns, never SQL
            with pytest.raises(SchemaError, match="unknown table"):
                await m.queue_operation('items; DROP TABLE "Trades ""2024"""', "INSERT",
                                        [{"a": 1}])
            with pytest.raises(SchemaError, match="has no column"):
                await m.queue_operation('Trades "2024"', "INSERT",
                                        [{"Id": 5, 'x") VALUES (1); --': 1}])
            assert await m.fetch('SELECT "Id", "select" FROM "Trades ""2024""" WHERE "Id" = ?',
                                 (2,)) == [(2, "s'2;--")]
        got = sql_rows(pg_dsn, 'SELECT "Id", "Mixed Case"::text, payload->>\'a\', flags, '
                               'total::text FROM "Trades ""2024""" ORDER BY "Id"')
        assert got == [(0, "0.25", "1", [True, False], "0.50"),
                       (1, "9.50", "1", [True, False], "19.00"),
                       (2, "2.25", "1", [True, False], "4.50")]
        assert sql_rows(pg_dsn, "SELECT * FROM other_schema_x.elsewhere") == [(1, "x")]
    finally:
        sql_exec(pg_dsn, "DROP SCHEMA other_schema_x CASCADE")


async def test_candles_via_insert_candles_batch(make_pg_manager: ManagerFactory,
                                                pg_dsn: str, pg_schema: str) -> None:
    def candle(minute: int, price: float) -> dict[str, Any]:
        return {"market": "KRW-BTC", "candle_date_time_utc": f"2024-01-01T00:{minute:02d}:00",
                "opening_price": price, "high_price": price + 2, "low_price": price - 2,
                "trade_price": price + 1, "candle_acc_trade_volume": 1.5,
                "candle_acc_trade_price": price * 1.5, "unit": 1}

    async with make_pg_manager() as m:
        await m.wait(await m.insert_candles_batch("KRW-BTC", "1m",
                                                  [candle(i, 100.0 + i) for i in range(30)]))
        # the exchange corrects the last candles: an upsert of existing keys
        await m.wait(await m.insert_candles_batch("KRW-BTC", "1m",
                                                  [candle(i, 500.0) for i in range(28, 32)],
                                                  Priority.HIGH))
    types = dict(sql_rows(pg_dsn, "SELECT column_name, data_type FROM information_schema.columns"
                                  " WHERE table_schema = %s AND table_name = 'candles'",
                          (pg_schema,)))
    assert types["ts"] == "bigint"
    assert types["open_price"] == "double precision"
    assert types["symbol"] == "text"
    assert sql_rows(pg_dsn, "SELECT count(*), min(ts), max(ts) FROM candles") == [
        (32, 1704067200000, 1704067200000 + 31 * 60_000)]
    assert sql_rows(pg_dsn, "SELECT open_price FROM candles WHERE ts = %s",
                    (1704067200000 + 29 * 60_000,)) == [(500.0,)]
    assert sql_rows(pg_dsn, "SELECT open_price FROM candles WHERE ts = %s",
                    (1704067200000 + 27 * 60_000,)) == [(127.0,)]
    pk = sql_rows(pg_dsn, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON "
                          "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE "
                          "i.indrelid = 'candles'::regclass AND i.indisprimary")
    assert {r[0] for r in pk} == {"symbol", "timeframe", "ts"}


async def test_maintenance_vacuum_and_analyze(make_pg_manager: ManagerFactory,
                                              pg_dsn: str, pg_schema: str) -> None:
    sql_exec(pg_dsn, "CREATE TABLE m (id int PRIMARY KEY, v int)")
    async with make_pg_manager() as m:
        # the database's tables, even before this process wrote anything
        assert (await m.maintain("vacuum"))["tables"] == [f"{pg_schema}.m"]
        await m.wait(await m.queue_operation("m", "UPSERT",
                                             [{"id": i, "v": i} for i in range(500)]))
        await m.wait(await m.queue_operation("m", "DELETE", [{"id": i} for i in range(250)]))
        vac = await m.maintain("vacuum")
        ana = await m.maintain("analyze")
        with pytest.raises(ValueError, match="no maintenance task 'checkpoint'"):
            await m.maintain("checkpoint")
    assert vac["tables"] == [f"{pg_schema}.m"]
    assert vac["bytes_before"] > 0 and vac["bytes_after"] > 0
    assert ana["analyzed"] is True
    stats = sql_rows(pg_dsn, "SELECT vacuum_count, analyze_count FROM pg_stat_user_tables "
                             "WHERE relid = 'm'::regclass")
    assert stats == [(2, 3)]  # VACUUM (ANALYZE) twice, then ANALYZE
    # VACUUM set the visibility map, (VACUUM) ANALYZE counted the 250 rows left
    assert sql_rows(pg_dsn, "SELECT relallvisible > 0, reltuples FROM pg_class "
                            "WHERE oid = 'm'::regclass") == [(True, 250.0)]


async def test_status_settings_and_pool(make_pg_manager: ManagerFactory, pg_dsn: str) -> None:
    for name in ("a", "b", "c"):
        sql_exec(pg_dsn, f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    async with make_pg_manager(postgres={"pool_size": 3, "statement_timeout_ms": 1500,
                                         "batch_size": 777}) as m:
        caps = m.backend.capabilities
        assert (caps.max_writers, caps.ordered, caps.insert_batch_size) == (3, False, 777)
        assert m.scheduler.max_inflight == 3
        # three tables at once: several batches in flight on several connections
        await asyncio.gather(*(
            m.queue_operation(name, "INSERT", [{"id": i, "v": "x"} for i in range(j, j + 700)])
            for j in range(0, 2100, 700) for name in ("a", "b", "c")))
        await m.flush()
        assert await m.fetch("SHOW statement_timeout") == [("1500ms",)]
        status = await m.backend.status()
        assert status["server_version"].startswith(tuple("123456789"))
        assert status["database_bytes"] > 0
        assert status["pool"]["connections_made"] >= 2
        assert status["pool"]["open"] <= 3
        assert sorted(status["tables_written"])[0].endswith(".a")
    for name in ("a", "b", "c"):
        assert sql_rows(pg_dsn, f"SELECT count(DISTINCT id) FROM {name}") == [(2100,)]


async def test_the_password_never_shows(pg_server: PostgresServer, make_pg_manager: ManagerFactory,
                                        pg_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    password = "Sup3r-s3cret.pw"
    user = f"writer_{pg_schema}"
    dsn = pg_server.add_user(user, password)
    pg_server.psql(f"GRANT ALL ON SCHEMA {pg_schema} TO {user}")
    dsn = with_search_path(dsn, pg_schema)
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []
    async with make_pg_manager(postgres={"dsn": dsn}) as m:
        sql_exec(dsn, "CREATE TABLE s (id int PRIMARY KEY, v int NOT NULL)")
        ok = await m.queue_operation("s", "INSERT", [{"id": 1, "v": 1}])
        bad = await m.queue_operation("s", "INSERT", [{"id": 2, "v": None}])
        await m.flush()
        assert (await m.wait(ok)).succeeded
        with pytest.raises(OperationFailed) as failed:
            await m.wait(bad)
        shown += [str(failed.value), repr(failed.value.__cause__)]
        status = await m.backend.status()
        assert status["user"] == user and status["dsn"].startswith(f"postgresql://{user}:***@")
        shown += [repr(status), repr(await m.get_queue_status())]
    # the key=value form of a DSN works the same and is redacted the same
    kv_dsn = (f"host=127.0.0.1 port={pg_server.port} dbname={pg_server.dbname} user={user} "
              f"password={password} options='-c search_path={pg_schema}'")
    async with make_pg_manager(postgres={"dsn": kv_dsn}) as m:
        await m.wait(await m.queue_operation("s", "UPSERT", [{"id": 3, "v": 3}]))
        status = await m.backend.status()
        assert "password=***" in status["dsn"] and status["user"] == user
        shown.append(repr(status))
    assert sql_rows(dsn, "SELECT id FROM s ORDER BY id") == [(1,), (3,)]
    # a wrong password and an unreachable port: clear errors, without the password
    for wrong in (dsn.replace(password, "Wr0ng-pass.word"),
                  kv_dsn.replace(f"port={pg_server.port}", "port=1")):
        manager = make_pg_manager(postgres={"dsn": wrong, "connect_timeout_seconds": 2})
        with pytest.raises(PostgresConnectError) as err:
            await manager.start()
        text = str(err.value)
        assert "cannot connect to PostgreSQL at " in text
        shown.append(text)
        shown.append(repr(err.value.__cause__))
    assert "password authentication failed" in shown[-4]
    shown += [r.getMessage() for r in caplog.records]
    for text in shown:
        assert password not in text and "Wr0ng-pass.word" not in text, text


async def test_connect_timeout(make_pg_manager: ManagerFactory, pg_server: PostgresServer
                               ) -> None:
    """A server that accepts but never answers: start() gives up after the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        dsn = pg_server.dsn.replace(f":{pg_server.port}/", f":{port}/")
        manager = make_pg_manager(postgres={"dsn": dsn, "connect_timeout_seconds": 1})
        start = time.monotonic()
        with pytest.raises(PostgresConnectError, match="cannot connect"):
            await manager.start()
        assert time.monotonic() - start < 6


def test_driver_missing_is_one_clear_error() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "import batchdb.backends.postgres as p\n"  # the plugin imports without its driver
        "from batchdb import BatchDBManager, BatchDBError\n"
        "try:\n"
        "    BatchDBManager.from_settings(None, backend='postgres')\n"
        "except BatchDBError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd="/", check=True)
    assert "ERROR the postgres backend needs the psycopg driver" in out.stdout
    assert "pip install 'batchdb[postgres]'" in out.stdout


def test_connection_factory_is_refused() -> None:
    with pytest.raises(BatchDBError, match="no connection factory"):
        PostgresBackend(PostgresSettings(), connection_factory=lambda: None)


async def test_fetch_and_portable_placeholders(make_pg_manager: ManagerFactory,
                                               pg_dsn: str) -> None:
    sql_exec(pg_dsn, "CREATE TABLE f (id int PRIMARY KEY, v text)",
             "INSERT INTO f VALUES (1, 'a?'), (2, '50%'), (3, 'c')")
    async with make_pg_manager() as m:
        assert await m.fetch("SELECT id FROM f WHERE v = ? OR id = ? ORDER BY id",
                             ("a?", 3)) == [(1,), (3,)]
        assert await m.fetch("SELECT id FROM f WHERE v LIKE '%\\%' ESCAPE '\\' AND id > ?",
                             (0,)) == [(2,)]
        assert await m.fetch("SELECT id FROM f WHERE v = %s", ("c",)) == [(3,)]
        assert await m.fetch("SELECT count(*) FROM f") == [(3,)]
        with pytest.raises(Exception, match="does not exist"):
            await m.fetch("SELECT nope FROM f")
        assert await m.fetch("SELECT 1") == [(1,)]  # the pool survived the failed query


def test_cli_status_and_config_hide_the_password(pg_server: PostgresServer, pg_schema: str,
                                                 tmp_path: Path) -> None:
    password = "Cl1-secret.pw"
    user = f"cli_{pg_schema}"
    dsn = with_search_path(pg_server.add_user(user, password), pg_schema)
    pg_server.psql(f"GRANT ALL ON SCHEMA {pg_schema} TO {user}")
    sql_exec(dsn, "CREATE TABLE visible_to_cli (id int PRIMARY KEY)",
             "INSERT INTO visible_to_cli VALUES (1), (2)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHDB_")}
    env.update(BATCHDB_POSTGRES__DSN=dsn, BATCHDB_LOG_LEVEL="DEBUG", COLUMNS="300")
    for command in ("status", "config"):
        out = subprocess.run(
            [sys.executable, "-c", "from batchdb.cli import main; main()", command,
             "--backend", "postgres"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text
        assert password not in text, text
        assert user in text
        if command == "status":
            assert "visible_to_cli" in text and "server_version" in text


async def test_a_role_that_cannot_create_tables_writes_without_commit_marks(
        pg_server: PostgresServer, make_pg_manager: ManagerFactory, pg_dsn: str,
        pg_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """The commit marks' table cannot be created by a role with only INSERT on an existing
    table: the batches are written all the same, and the backend says once that a lost
    COMMIT is then resolved by the transaction id alone."""
    sql_exec(pg_dsn, "CREATE TABLE only_insert (id int PRIMARY KEY, v int NOT NULL)")
    user = f"inserter_{pg_schema}"
    dsn = with_search_path(pg_server.add_user(user, "Ins3rt-only.pw"), pg_schema)
    pg_server.psql(f"GRANT USAGE ON SCHEMA {pg_schema} TO {user}; "
                   f"GRANT SELECT, INSERT, UPDATE ON {pg_schema}.only_insert TO {user}")
    caplog.set_level(logging.WARNING, logger="batchdb")
    async with make_pg_manager(postgres={"dsn": dsn}) as m:
        for i in range(3):
            await m.wait(await m.queue_operation("only_insert", "UPSERT", [{"id": i, "v": i}]))
    assert sql_rows(pg_dsn, "SELECT count(*) FROM only_insert") == [(3,)]
    assert sql_rows(pg_dsn, "SELECT pg_catalog.to_regclass('batchdb_spool_applied')") == [(None,)]
    warnings = [r.getMessage() for r in caplog.records
                if "cannot create batchdb_spool_applied" in r.getMessage()]
    assert len(warnings) == 1 and "txid_status() alone" in warnings[0]


async def test_commit_marks_of_acknowledged_batches_are_deleted(
        make_pg_manager: ManagerFactory, pg_dsn: str) -> None:
    """Each batch's transaction writes a commit mark and deletes those of the batches
    acknowledged before it; the manager's stop deletes the last ones: none stays."""
    sql_exec(pg_dsn, "CREATE TABLE marked (id int PRIMARY KEY, v int NOT NULL)")
    async with make_pg_manager() as m:
        for i in range(5):
            await m.wait(await m.queue_operation("marked", "INSERT", [{"id": i, "v": i}]))
            # the mark of the batch just acknowledged, and no older one
            assert sql_rows(pg_dsn, "SELECT count(*) FROM batchdb_spool_applied "
                                    "WHERE spool LIKE 'commit:%'") == [(1,)]
        assert "batchdb_spool_applied" not in await m.list_tables()
    assert sql_rows(pg_dsn, "SELECT count(*) FROM batchdb_spool_applied") == [(0,)]
    assert sql_rows(pg_dsn, "SELECT count(*) FROM marked") == [(5,)]
