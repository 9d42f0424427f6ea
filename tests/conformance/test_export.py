"""Export round trips on every backend (issue #15): rows written through the manager,
exported to Parquet and CSV (library and ``batchdb export``), read back with pyarrow and
compared exactly with what the database holds (read through its own driver)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchdb import BatchDBManager, OperationType, Priority
from batchdb.cli import app
from batchdb.workloads.export import ExportArgumentError, export_table

from .conftest import BackendEnv

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
MINUTE = 60_000
# floats whose shortest text is long, tiny, huge, negative zero: exact or not at all
AWKWARD = (0.1 + 0.2, 1e-300, 1.7976931348623157e308, -0.0, 123456789.12345679, 5e-324)
CANDLE_SCHEMA = pa.schema([
    ("symbol", pa.string()), ("timeframe", pa.string()), ("ts", pa.int64()),
    ("open_price", pa.float64()), ("high_price", pa.float64()), ("low_price", pa.float64()),
    ("close_price", pa.float64()), ("volume", pa.float64()), ("quote_volume", pa.float64()),
    ("source", pa.string()), ("ingested_at", pa.int64())])
CANDLES_IN_ORDER = ("SELECT symbol, timeframe, ts, open_price, high_price, low_price, "
                    "close_price, volume, quote_volume, source, ingested_at FROM candles "
                    "ORDER BY symbol, timeframe, ts")


def candles(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        price = AWKWARD[i % len(AWKWARD)] + i
        rows.append({
            "symbol": ("KRW-BTC", "KRW-ETH", "KRW-느낌표!")[i % 3],
            "timeframe": "1m" if i % 5 else "5m", "ts": T0 + i * MINUTE,
            "open_price": price, "high_price": AWKWARD[i % len(AWKWARD)],
            "low_price": -price, "close_price": price / 3, "volume": i * 0.001,
            "quote_volume": None if i % 4 == 0 else price * 7,
            "source": None if i % 7 == 0 else f"src,\"{i}\"\n", "ingested_at": T0 + i})
    return rows


async def written(env: BackendEnv, table: str, rows: list[dict[str, Any]]) -> BatchDBManager:
    manager = env.manager()
    await manager.start()
    await manager.queue_operation(table, OperationType.UPSERT, rows, Priority.NORMAL)
    await manager.flush()
    return manager


def sorted_table(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])


def as_table(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows],
                                schema=schema)


async def test_candles_round_trip_parquet_and_csv(env: BackendEnv, tmp_path: Path) -> None:
    m = await written(env, "candles", candles(2500))
    expected = as_table(env.query(CANDLES_IN_ORDER), CANDLE_SCHEMA)
    assert expected.num_rows == 2500
    keys = ["symbol", "timeframe", "ts"]

    parquet = tmp_path / "candles.parquet"
    report = await export_table(m, "candles", parquet, chunk_rows=1000)
    assert (report.rows, report.format, report.table) == (2500, "parquet", "candles")
    got = pq.read_table(parquet)
    assert got.schema.remove_metadata() == CANDLE_SCHEMA
    assert pq.ParquetFile(parquet).metadata.num_row_groups == 3  # one per chunk
    assert sorted_table(got, keys).equals(expected)
    assert not list(tmp_path.glob(".*partial"))

    csv_path = tmp_path / "candles.csv"
    assert (await export_table(m, "candles", csv_path, chunk_rows=700)).rows == 2500
    from_csv = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(
        column_types=CANDLE_SCHEMA, strings_can_be_null=True, null_values=[""]))
    # CSV has no NULL: an empty field is read as NULL (this data has no empty text)
    assert sorted_table(from_csv, keys).equals(expected)


async def test_filters_export_what_read_candles_reads(env: BackendEnv, tmp_path: Path) -> None:
    m = await written(env, "candles", candles(600))
    since = datetime(2024, 1, 1, 1, 0, tzinfo=UTC)  # T0 + 60 minutes
    until = "2024-01-01T06:00:00Z"
    report = await export_table(m, "candles", tmp_path / "f.parquet", market="KRW-ETH",
                                timeframe="1m", since=since, until=until, chunk_rows=32)
    got = pq.read_table(tmp_path / "f.parquet").sort_by("ts")
    want = await m.read_candles("KRW-ETH", "1m", since, until, as_="arrow")
    assert report.rows == want.num_rows == got.num_rows > 50
    assert got.equals(want.cast(got.schema))
    assert min(got.column("ts").to_pylist()) >= T0 + 60 * MINUTE
    assert max(got.column("ts").to_pylist()) < T0 + 360 * MINUTE
    # nothing matches: a file with the columns and no row
    empty = await export_table(m, "candles", tmp_path / "e.parquet", market="KRW-XRP")
    assert empty.rows == 0
    assert pq.read_table(tmp_path / "e.parquet").schema.remove_metadata() == CANDLE_SCHEMA


async def test_timestamps_round_trip(env: BackendEnv, tmp_path: Path) -> None:
    """Time columns keep their type: TIMESTAMP WITH TIME ZONE as UTC timestamps, TIMESTAMP
    as timestamps without a zone (SQLite has no time type: ISO text stays text)."""
    base = datetime(2024, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
    if env.name == "sqlite":
        env.execute("CREATE TABLE ticks (id INTEGER PRIMARY KEY, seen_at TEXT, price REAL, "
                    "note TEXT)")
        rows = [{"id": i, "seen_at": (base + timedelta(seconds=i)).isoformat(),
                 "price": i / 7, "note": f"n{i}"} for i in range(300)]
        schema = pa.schema([("id", pa.int64()), ("seen_at", pa.string()), ("price", pa.float64()),
                            ("note", pa.string())])
    else:
        env.execute("CREATE TABLE ticks (id BIGINT PRIMARY KEY, seen_at TIMESTAMP WITH TIME ZONE, "
                    "local_at TIMESTAMP, price DOUBLE PRECISION, note TEXT)")
        rows = [{"id": i, "seen_at": base + timedelta(seconds=i),
                 "local_at": (base + timedelta(seconds=i)).replace(tzinfo=None),
                 "price": i / 7, "note": None if i % 3 == 0 else f"n{i}"} for i in range(300)]
        schema = pa.schema([("id", pa.int64()), ("seen_at", pa.timestamp("us", tz="UTC")),
                            ("local_at", pa.timestamp("us")), ("price", pa.float64()),
                            ("note", pa.string())])
    m = await written(env, "ticks", rows)
    await export_table(m, "ticks", tmp_path / "t.parquet", chunk_rows=128)
    got = pq.read_table(tmp_path / "t.parquet").sort_by("id")
    assert got.schema.remove_metadata() == schema
    assert got.to_pylist() == pa.Table.from_pylist(rows, schema=schema).to_pylist()


async def test_bad_table_and_filters_are_refused_before_writing(env: BackendEnv,
                                                                tmp_path: Path) -> None:
    env.execute("CREATE TABLE orders (order_id TEXT PRIMARY KEY, market TEXT, price REAL)")
    m = await written(env, "candles", candles(10))
    target = tmp_path / "x.parquet"
    with pytest.raises(ExportArgumentError, match=r"no table 'candle' .*did you mean "
                                                  r"'candles'\?.*its tables: candles, orders"):
        await export_table(m, "candle", target)
    with pytest.raises(ExportArgumentError, match="no table 'candles; DROP TABLE candles'"):
        await export_table(m, "candles; DROP TABLE candles", target)
    with pytest.raises(ExportArgumentError, match=r"--timeframe filters on a 'timeframe' "
                                                  r"column, and table 'orders' has none"):
        await export_table(m, "orders", target, timeframe="1m")
    with pytest.raises(ExportArgumentError, match=r"--since filters on a 'ts' column"):
        await export_table(m, "orders", target, since=0)
    with pytest.raises(ExportArgumentError, match=r"must end in \.parquet or \.csv"):
        await export_table(m, "candles", tmp_path / "x.xlsx")
    assert not target.exists() and not list(tmp_path.glob("*.xlsx"))
    assert not list(tmp_path.glob(".*.partial"))
    # --market on a table with a market column (not symbol) filters on it
    await m.queue_operation("orders", OperationType.INSERT, [
        {"order_id": "a", "market": "KRW-BTC", "price": 1.0},
        {"order_id": "b", "market": "KRW-ETH", "price": 2.0}])
    await m.flush()
    await export_table(m, "orders", tmp_path / "o.csv", market="KRW-ETH")
    assert (tmp_path / "o.csv").read_text() == "order_id,market,price\nb,KRW-ETH,2.0\n"
    assert env.query("SELECT COUNT(*) FROM candles") == [(10,)]


def _settings(env: BackendEnv, tmp_path: Path) -> Path:
    path = tmp_path / "settings.toml"
    if env.name == "postgres":
        path.write_text(f'backend = "postgres"\n[postgres]\ndsn = "{env.dsn}"\n')
    else:
        path.write_text(f'backend = "{env.name}"\n[{env.name}]\npath = "{env.path}"\n')
    return path


async def test_cli_export_and_query(env: BackendEnv, tmp_path: Path) -> None:
    m = await written(env, "candles", candles(300))
    await m.stop()  # the command opens the database itself (DuckDB: one process at a time)
    settings = _settings(env, tmp_path)
    runner = CliRunner()

    def invoke(*args: str) -> Any:  # the command runs its own event loop: in a thread
        return asyncio.to_thread(runner.invoke, app, [*args, "-s", str(settings)],
                                 env={"COLUMNS": "200"})

    out = tmp_path / "out.parquet"
    result = await invoke("export", "candles", "--to", str(out), "--market", "KRW-BTC",
                          "--chunk-rows", "17")
    assert result.exit_code == 0, result.output
    assert "Exported 100 rows of candles to" in result.stdout
    want = env.query("SELECT ts FROM candles WHERE symbol = 'KRW-BTC' ORDER BY ts")
    assert sorted(pq.read_table(out).column("ts").to_pylist()) == [r[0] for r in want]

    sql = "SELECT symbol, COUNT(*) AS n, MIN(ts) AS first FROM candles GROUP BY symbol ORDER BY 1"
    result = await invoke("query", sql, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"symbol": "KRW-BTC", "n": 100, "first": T0},
        {"symbol": "KRW-ETH", "n": 100, "first": T0 + MINUTE},
        {"symbol": "KRW-느낌표!", "n": 100, "first": T0 + 2 * MINUTE}]
    result = await invoke("query", "DELETE FROM candles")
    assert result.exit_code == 1
    assert "fetch() is for reads" in result.output and "nothing was changed" in result.output
    result = await invoke("export", "nope", "--to", str(out))
    assert result.exit_code == 2
    assert "no table 'nope'" in result.output
    assert env.query("SELECT COUNT(*) FROM candles") == [(300,)]
