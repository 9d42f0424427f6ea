"""The DuckDB backend on real DuckDB files: writes, conversion, schema, errors, maintenance."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa

from batchdb import BatchDBManager, OperationType
from batchdb.backend import Batch, ErrorKind
from batchdb.backends.duckdb import DuckDBBackend
from batchdb.backends.duckdb.arrow import ConversionError
from batchdb.backends.duckdb.settings import DuckDBSettings
from batchdb.models import BatchDBError, BatchOperation, OperationFailed, SchemaError
from batchdb.pluginmanager import BackendRegistry, create_plugin_manager
from batchdb.schema import TableInfo
from tests.conftest import ManagerFactory, managers

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def duck_path(tmp_path: Path, clean_env: None) -> Path:
    """A fresh DuckDB path in a clean environment (tests/conftest.py ``clean_env``)."""
    return tmp_path / "test.duckdb"


def run_sql(path: Path, *statements: str) -> None:
    """Run statements through a plain duckdb connection (a user's own session)."""
    conn = duckdb.connect(str(path))
    try:
        for stmt in statements:
            conn.execute(stmt)
    finally:
        conn.close()


def rows_of(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read through a plain duckdb connection, once the manager has closed the file."""
    conn = duckdb.connect(str(path), read_only=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
async def make_manager(duck_path: Path) -> AsyncIterator[ManagerFactory]:
    """Managers on ``duck_path``; every one is stopped at the end."""
    async with managers("duckdb", {"path": str(duck_path)}) as factory:
        yield factory


KV_DDL = "CREATE TABLE kv (k BIGINT PRIMARY KEY, v DOUBLE, s VARCHAR NOT NULL)"
# LOW operations wait 10 s for company: everything queued before flush() shares one window
ONE_WINDOW = {"linger_seconds": {"LOW": 10.0}, "flush_interval_seconds": 10.0}


# ---------------------------------------------------------------------- plugin & settings
def test_registered_through_the_entry_point() -> None:
    registry = BackendRegistry(create_plugin_manager())
    assert registry.get("duckdb") is DuckDBBackend


def test_plugin_imports_without_duckdb_and_selecting_it_names_the_extra(
        tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['duckdb'] = None\n"
        "sys.modules['pyarrow'] = None\n"
        "import batchdb.backends.duckdb as plugin\n"
        "from batchdb import BatchDBManager\n"
        "from batchdb.models import BatchDBError\n"
        "try:\n"
        "    BatchDBManager.from_settings(None, backend='duckdb')\n"
        "except BatchDBError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True)
    assert "ERROR" in out.stdout, out.stderr
    assert "pip install 'batchdb[duckdb]'" in out.stdout
    assert "duckdb and pyarrow" in out.stdout


async def test_capabilities_follow_the_batch_size_setting(make_manager: ManagerFactory) -> None:
    manager = make_manager(duckdb={"batch_size": 1234})
    caps = manager.backend.capabilities
    assert (caps.insert_batch_size, caps.update_batch_size) == (1234, 1234)
    assert caps.max_writers == 1 and not caps.ordered and not caps.recovers_itself
    async with manager:
        assert manager.scheduler.batch_limit(OperationType.UPSERT) == 1234


async def test_threads_and_memory_limit_are_applied(make_manager: ManagerFactory) -> None:
    manager = make_manager(duckdb={"threads": 1, "memory_limit": "256MB"})
    async with manager:
        rows = await manager.fetch(
            "SELECT current_setting('threads'), current_setting('memory_limit')")
    assert rows[0][0] == 1
    assert "MiB" in rows[0][1] or "MB" in rows[0][1]


async def test_missing_directory_is_a_clear_error(duck_path: Path) -> None:
    manager = BatchDBManager.from_settings(
        None, backend="duckdb", duckdb={"path": str(duck_path.parent / "no" / "x.duckdb")},
        maintenance={"enabled": False})
    with pytest.raises(BatchDBError, match="does not exist"):
        await manager.start()


async def test_a_file_that_is_not_duckdb_is_a_clear_error(duck_path: Path) -> None:
    duck_path.write_bytes(b"this is not a database file at all" * 200)
    manager = BatchDBManager.from_settings(None, backend="duckdb",
                                           duckdb={"path": str(duck_path)},
                                           maintenance={"enabled": False})
    with pytest.raises(BatchDBError, match="cannot open"):
        await manager.start()


async def test_a_bad_memory_limit_is_a_clear_error(duck_path: Path) -> None:
    manager = BatchDBManager.from_settings(
        None, backend="duckdb", duckdb={"path": str(duck_path), "memory_limit": "lots"},
        maintenance={"enabled": False})
    with pytest.raises(BatchDBError, match="cannot open"):
        await manager.start()


# ---------------------------------------------------------------------- writing
async def test_each_operation_type(make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL)
    async with make_manager() as m:
        a = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": 1.0, "s": "a"},
                                                     {"k": 2, "v": 2.0, "s": "b"},
                                                     {"k": 3, "v": 3.0, "s": "c"}])
        b = await m.queue_operation("kv", "UPSERT", [{"k": 1, "v": 10.0, "s": "A"},
                                                     {"k": 4, "v": 4.0, "s": "d"}])
        c = await m.queue_operation("kv", "UPDATE", [{"k": 2, "v": 20.0}, {"k": 99, "v": 9.0}])
        d = await m.queue_operation("kv", "DELETE", [{"k": 3}, {"k": 98}])
        # UPDATE/DELETE count the keys that matched (99 and 98 do not exist)
        for op_id, rows in ((a, 3), (b, 2), (c, 1), (d, 1)):
            assert (await m.wait(op_id)).rows_affected == rows
    assert rows_of(duck_path, "SELECT * FROM kv ORDER BY k") == [
        (1, 10.0, "A"), (2, 20.0, "b"), (4, 4.0, "d")]


@pytest.mark.parametrize("op", ["UPSERT", "UPDATE"])
async def test_last_row_of_a_key_wins_within_one_operation(
        make_manager: ManagerFactory, duck_path: Path, op: str) -> None:
    run_sql(duck_path, KV_DDL, "INSERT INTO kv VALUES (1, 0, 'old'), (2, 0, 'old')")
    rows = [{"k": 1, "v": 1.0, "s": "first"}, {"k": 2, "v": 2.0, "s": "x"},
            {"k": 1, "v": 3.0, "s": "middle"}, {"k": 1, "v": 4.0, "s": "last"}]
    async with make_manager() as m:
        await m.wait(await m.queue_operation("kv", op, rows))
    assert rows_of(duck_path, "SELECT * FROM kv ORDER BY k") == [(1, 4.0, "last"),
                                                                 (2, 2.0, "x")]


async def test_last_operation_wins_across_a_coalesced_batch(
        make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL)
    async with make_manager(batch=ONE_WINDOW) as m:
        ids = [await m.queue_operation("kv", "UPSERT", [{"k": 7, "v": float(i), "s": f"v{i}"}],
                                       "LOW") for i in range(50)]
        await m.flush()
        status = await m.get_queue_status()
        for op_id in ids:
            await m.wait(op_id)
    assert status["stats"]["batches_committed"] == 1
    assert rows_of(duck_path, "SELECT * FROM kv") == [(7, 49.0, "v49")]


async def test_operations_coalesce_up_to_the_batch_size(
        make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL)
    async with make_manager(duckdb={"batch_size": 1000}, batch=ONE_WINDOW) as m:
        ids = [await m.queue_operation("kv", "UPSERT", [
            {"k": j * 400 + i, "v": i * 0.5, "s": str(i)} for i in range(400)], "LOW")
            for j in range(3)]
        await m.flush()
        for op_id in ids:
            assert (await m.wait(op_id)).rows_affected == 400
        status = await m.get_queue_status()
    assert status["stats"]["batches_committed"] == 2  # 400 + 400, then 400
    assert rows_of(duck_path, "SELECT count(*), sum(k) FROM kv") == [(1200, sum(range(1200)))]


async def test_bad_operation_fails_alone_and_names_the_problem(
        make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL, "INSERT INTO kv VALUES (1, 1, 'one')")
    async with make_manager(batch=ONE_WINDOW) as m:
        good1 = await m.queue_operation("kv", "INSERT", [{"k": 10, "v": 1.0, "s": "a"}], "LOW")
        dup = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": 1.0, "s": "again"}], "LOW")
        null = await m.queue_operation("kv", "INSERT", [{"k": 11, "v": 1.0, "s": None}], "LOW")
        frac = await m.queue_operation("kv", "INSERT", [{"k": 1.5, "v": 1.0, "s": "x"}], "LOW")
        text = await m.queue_operation("kv", "INSERT", [{"k": "abc", "v": 1.0, "s": "x"}], "LOW")
        good2 = await m.queue_operation("kv", "INSERT", [{"k": 12, "v": 2.0, "s": "b"}], "LOW")
        await m.flush()
        await m.wait(good1)
        await m.wait(good2)
        with pytest.raises(OperationFailed, match="Duplicate key"):
            await m.wait(dup)
        with pytest.raises(OperationFailed, match="NOT NULL"):
            await m.wait(null)
        with pytest.raises(OperationFailed, match=r"column 'k' \(BIGINT\): 1.5 is not an integer"):
            await m.wait(frac)
        with pytest.raises(OperationFailed, match="abc"):
            await m.wait(text)
    assert rows_of(duck_path, "SELECT k, s FROM kv ORDER BY k") == [(1, "one"), (10, "a"),
                                                                    (12, "b")]


async def test_a_malformed_later_row_fails_its_operation_by_name(
        make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL)
    async with make_manager(batch=ONE_WINDOW) as m:
        # one-row writes around the bad ones: the batch reads runs of same-keyed operations
        # in one pass, and a bad row inside such a run must still fail only its operation
        before = [await m.queue_operation("kv", "INSERT", [{"k": 100 + i, "v": 1.0,
                                                            "s": "x"}], "LOW")
                  for i in range(5)]
        bad = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": 1.0, "s": "a"},
                                                       {"k": 2, "v": 1.0, "t": "b"}], "LOW")
        after = [await m.queue_operation("kv", "INSERT", [{"k": 200 + i, "v": 1.0,
                                                           "s": "y"}], "LOW")
                 for i in range(5)]
        extra = await m.queue_operation("kv", "UPSERT", [{"k": 3, "v": 1.0},
                                                         {"k": 4, "v": 1.0, "s": "b"}], "LOW")
        good = await m.queue_operation("kv", "INSERT", [{"k": 5, "v": 5.0, "s": "e"}], "LOW")
        await m.flush()
        with pytest.raises(OperationFailed, match="row 1 .* missing"):
            await m.wait(bad)
        with pytest.raises(OperationFailed, match="row 1 .* extra"):
            await m.wait(extra)
        for op_id in (*before, *after, good):
            await m.wait(op_id)
    assert rows_of(duck_path, "SELECT k FROM kv ORDER BY k") == [
        (5,), *((100 + i,) for i in range(5)), *((200 + i,) for i in range(5))]


async def test_values_of_many_types_convert_exactly(
        make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, """CREATE TABLE typed (
        id INTEGER PRIMARY KEY, small SMALLINT, big UBIGINT, huge HUGEINT, f REAL,
        dec DECIMAL(18, 4), flag BOOLEAN, day DATE, "at" TIMESTAMP, atz TIMESTAMPTZ,
        t TIME, raw BLOB, u UUID, tags VARCHAR[], note VARCHAR)""")
    u = uuid.uuid4()
    row = {"id": 1, "small": 7, "big": 2**64 - 1, "huge": 2**100,
           "f": 0.5, "dec": decimal.Decimal("12345.6789"), "flag": True,
           "day": dt.date(2024, 2, 29), "at": dt.datetime(2024, 1, 1, 12, 30, 15, 123456),
           "atz": dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC), "t": dt.time(23, 59, 58),
           "raw": b"\x00\x01\xff", "u": u, "tags": ["a", "b"], "note": "한국어 ✓"}
    async with make_manager() as m:
        await m.wait(await m.queue_operation("typed", "INSERT", [row]))
        # numbers given as text are cast by DuckDB, as SQLite's affinity would
        await m.wait(await m.queue_operation("typed", "UPSERT", [
            {**row, "id": 2, "small": "8", "u": str(u), "flag": False}]))
    got = rows_of(duck_path, "SELECT id, small, big, huge, f, dec, flag, day, \"at\", t, raw, u, "
                             "tags, note, epoch(atz) FROM typed ORDER BY id")
    assert got[0] == (1, 7, 2**64 - 1, 2**100, 0.5, decimal.Decimal("12345.6789"), True,
                      dt.date(2024, 2, 29), dt.datetime(2024, 1, 1, 12, 30, 15, 123456),
                      dt.time(23, 59, 58), b"\x00\x01\xff", u, ["a", "b"], "한국어 ✓",
                      1704110400.0)
    assert got[1][:2] == (2, 8) and got[1][6] is False and got[1][11] == u


async def test_values_out_of_range_fail_their_operation(
        make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, "CREATE TABLE small (id INTEGER PRIMARY KEY, n SMALLINT)")
    async with make_manager() as m:
        big = await m.queue_operation("small", "INSERT", [{"id": 1, "n": 40000}])
        huge = await m.queue_operation("small", "INSERT", [{"id": 2, "n": 2**70}])
        mixed = await m.queue_operation("small", "INSERT", [{"id": 3, "n": {"no": 1}}])
        ok = await m.queue_operation("small", "INSERT", [{"id": 4, "n": -32768}])
        await m.flush()
        for op_id in (big, huge, mixed):
            with pytest.raises(OperationFailed):
                await m.wait(op_id)
        await m.wait(ok)
    assert rows_of(duck_path, "SELECT * FROM small") == [(4, -32768)]


async def test_identifiers_are_quoted_not_trusted(make_manager: ManagerFactory,
                                                  duck_path: Path) -> None:
    run_sql(duck_path, 'CREATE TABLE "we""ird tab" ("the key" BIGINT PRIMARY KEY, '
                       '"val; DROP TABLE x" VARCHAR)', "CREATE TABLE x (a INTEGER)")
    async with make_manager() as m:
        await m.wait(await m.queue_operation(
            'we"ird tab', "UPSERT", [{"the key": 1, "val; DROP TABLE x": "ok"}]))
        await m.wait(await m.queue_operation(
            'we"ird tab', "UPDATE", [{"the key": 1, "val; DROP TABLE x": "still"}]))
        with pytest.raises(SchemaError, match="no column"):
            await m.queue_operation('we"ird tab', "INSERT", [{"the key": 2, "nope": 1}])
    assert rows_of(duck_path, 'SELECT * FROM "we""ird tab"') == [(1, "still")]
    assert rows_of(duck_path, "SELECT count(*) FROM x") == [(0,)]


# ---------------------------------------------------------------------- schema
async def test_describe_reads_columns_types_key_and_not_null(make_manager: ManagerFactory,
                                                             duck_path: Path) -> None:
    run_sql(duck_path, "CREATE TABLE Quotes (venue VARCHAR, sym VARCHAR, ts BIGINT NOT NULL, "
                       "px DOUBLE, PRIMARY KEY (sym, venue))",
            "CREATE VIEW quote_view AS SELECT * FROM Quotes")
    async with make_manager() as m:
        info = await m.backend.describe_table("quotes")  # DuckDB names are case-insensitive
        assert await m.backend.describe_table("quote_view") is None
        assert await m.backend.describe_table("absent") is None
        await m.wait(await m.queue_operation("Quotes", "UPSERT", [
            {"venue": "upbit", "sym": "BTC", "ts": 1, "px": 2.5}]))
    assert info == TableInfo(name="Quotes", columns=("venue", "sym", "ts", "px"),
                             primary_key=("sym", "venue"),
                             types={"venue": "VARCHAR", "sym": "VARCHAR", "ts": "BIGINT",
                                    "px": "DOUBLE"},
                             not_null=frozenset({"venue", "sym", "ts"}))
    assert rows_of(duck_path, "SELECT * FROM quotes") == [("upbit", "BTC", 1, 2.5)]


async def test_declared_tables_are_created_with_duckdb_types(make_manager: ManagerFactory,
                                                             duck_path: Path) -> None:
    md = sa.MetaData()
    trades = sa.Table(
        "trades", md,
        sa.Column("id", sa.Integer, primary_key=True),  # SERIAL in PostgreSQL: not here
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("price", sa.Numeric(18, 8)),
        sa.Column("side", sa.String(4)),
        sa.Column("meta", sa.LargeBinary),
        sa.Index("ix_trades_at", "at"),
    )
    manager = make_manager()
    manager.declare_table(trades)
    async with manager as m:
        await m.wait(await m.queue_operation("trades", "INSERT", [
            {"id": 1, "at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
             "price": decimal.Decimal("1.5"), "side": "buy", "meta": b"x"}]))
        candles = await m.table_info("candles")
        info = await m.table_info("trades")
    assert info.primary_key == ("id",) and info.types["id"] == "INTEGER"
    assert info.types["price"] == "DECIMAL(18,8)" and info.types["meta"] == "BLOB"
    assert candles.types["ts"] == "BIGINT" and candles.types["open_price"] == "DOUBLE"
    assert candles.types["symbol"] == "VARCHAR"
    assert candles.primary_key == ("symbol", "timeframe", "ts")
    assert rows_of(duck_path, "SELECT index_name FROM duckdb_indexes() "
                              "WHERE table_name = 'trades'") == [("ix_trades_at",)]


async def test_identity_columns_are_refused_with_a_reason(make_manager: ManagerFactory) -> None:
    md = sa.MetaData()
    table = sa.Table("ids", md, sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True))
    manager = make_manager()
    manager.declare_table(table)
    async with manager as m:
        with pytest.raises(SchemaError, match="identity"):
            await m.table_info("ids")


# ---------------------------------------------------------------------- errors
async def test_classify_real_duckdb_errors(make_manager: ManagerFactory,
                                           duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL, "INSERT INTO kv VALUES (1, 1, 'a')")
    backend = make_manager().backend
    conn = duckdb.connect(str(duck_path))
    other = conn.cursor()

    def error_of(cursor: duckdb.DuckDBPyConnection, sql: str) -> BaseException:
        with pytest.raises(duckdb.Error) as info:
            cursor.execute(sql)
        return info.value

    try:
        assert backend.classify_error(error_of(conn, "INSERT INTO kv VALUES (1, 1, 'b')")) \
            is ErrorKind.DATA
        assert backend.classify_error(error_of(conn, "INSERT INTO kv VALUES (2, 1, NULL)")) \
            is ErrorKind.DATA
        assert backend.classify_error(error_of(conn, "SELECT 'x'::BIGINT")) is ErrorKind.DATA
        assert backend.classify_error(error_of(conn, "SELECT * FROM gone")) \
            is ErrorKind.RESOURCE
        conn.execute("BEGIN")
        other.execute("BEGIN")
        conn.execute("UPDATE kv SET v = 2 WHERE k = 1")
        conflict = error_of(other, "UPDATE kv SET v = 3 WHERE k = 1")
        assert isinstance(conflict, duckdb.TransactionException)
        assert backend.classify_error(conflict) is ErrorKind.TRANSIENT
        conn.execute("ROLLBACK")
        other.execute("ROLLBACK")
    finally:
        other.close()
        conn.close()
    assert backend.classify_error(ConversionError("x")) is ErrorKind.DATA
    assert backend.classify_error(SchemaError("row 3 lacks 'x'")) is ErrorKind.DATA
    assert backend.classify_error(BatchDBError("not open")) is ErrorKind.RESOURCE
    assert backend.classify_error(duckdb.IOException("Could not set lock on file")) \
        is ErrorKind.TRANSIENT
    assert backend.classify_error(duckdb.IOException("No space left on device")) \
        is ErrorKind.RESOURCE
    assert backend.classify_error(duckdb.OutOfMemoryException("oom")) is ErrorKind.RESOURCE


async def test_write_before_open_is_a_clear_error(duck_path: Path) -> None:
    backend = DuckDBBackend(DuckDBSettings(path=str(duck_path)))
    info = TableInfo("kv", ("k",), ("k",))
    op = BatchOperation("x", "kv", OperationType.INSERT, [{"k": 1}])
    with pytest.raises(BatchDBError, match="not open"):
        backend.write_batch(Batch(info, OperationType.INSERT, ("k",), [op]))
    with pytest.raises(BatchDBError, match="not open"):
        await backend.fetch("SELECT 1")


# ---------------------------------------------------------------------- reads, status, upkeep
async def test_reads_do_not_wait_for_the_writer(make_manager: ManagerFactory,
                                                duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL, "INSERT INTO kv VALUES (1, 1, 'a')")
    async with make_manager() as m:
        backend = m.backend
        assert isinstance(backend, DuckDBBackend)
        release = threading.Event()
        busy = backend._call(release.wait, 10)  # the writer thread is held
        try:
            rows = await asyncio.wait_for(m.fetch("SELECT s FROM kv WHERE k = ?", (1,)), 5)
        finally:
            release.set()
            await busy
    assert rows == [("a",)]


async def test_status_reports_path_version_size_and_tables(make_manager: ManagerFactory,
                                                           duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL)
    async with make_manager() as m:
        await m.wait(await m.queue_operation("kv", "INSERT", [{"k": i, "v": 0.0, "s": "x"}
                                                              for i in range(10)]))
        status = await m.backend.status()
    assert status["backend"] == "duckdb"
    assert Path(status["path"]) == duck_path
    assert status["duckdb_version"] == duckdb.__version__
    assert status["file_bytes"] > 0
    assert status["tables"] == {"kv": 10}


async def test_maintenance_tasks(make_manager: ManagerFactory, duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL)
    async with make_manager() as m:
        await m.wait(await m.queue_operation("kv", "INSERT", [
            {"k": i, "v": float(i), "s": "x" * 20} for i in range(60_000)]))
        checkpoint = await m.maintain("checkpoint")
        assert checkpoint["wal_bytes_before"] > 0 and checkpoint["wal_bytes_after"] == 0
        await m.wait(await m.queue_operation("kv", "DELETE", [{"k": i} for i in range(60_000)]))
        vacuum = await m.maintain("vacuum")
        analyze = await m.maintain("analyze")
        with pytest.raises(ValueError, match="no maintenance task 'optimize'"):
            await m.maintain("optimize")
        with pytest.raises(ValueError, match="unknown duckdb maintenance task"):
            await m.backend.maintenance("optimize")
        assert m.last_maintenance["vacuum"] is not None
    assert vacuum["method"] == "checkpoint"
    assert vacuum["used_blocks_after"] < vacuum["used_blocks_before"]
    assert analyze["analyzed"] is True
    assert rows_of(duck_path, "SELECT count(*) FROM kv") == [(0,)]


async def test_stop_commits_everything_queued(make_manager: ManagerFactory,
                                              duck_path: Path) -> None:
    run_sql(duck_path, KV_DDL)
    m = make_manager(batch={"linger_seconds": {"LOW": 5.0}})
    await m.start()
    for i in range(200):  # LOW lingers 5 s: nothing is written before stop()
        await m.queue_operation("kv", "UPSERT", [{"k": i % 150, "v": float(i), "s": str(i)}],
                                priority="LOW")
    await m.stop()
    got = dict(rows_of(duck_path, "SELECT k, v FROM kv"))
    assert got == {k: float(k + 150 if k < 50 else k) for k in range(150)}
