"""The seed specification's four usage scenarios, verbatim but for the import line."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from batchdb import BatchDBManager, BatchOperation, OperationType, Priority, SchemaError
from tests.conftest import rows_of, upbit_candles


@pytest.fixture
def seed_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    conn = sqlite3.connect("market_data.sqlite3")
    conn.executescript(
        """
        CREATE TABLE orders (order_id TEXT PRIMARY KEY, market TEXT NOT NULL, side TEXT,
                             price REAL, volume REAL, created_at INTEGER);
        CREATE TABLE backtest_results (run_id TEXT, step INTEGER, pnl REAL,
                                       PRIMARY KEY (run_id, step));
        """
    )
    conn.close()
    return tmp_path


async def test_scenario_1_bulk_candle_insert(seed_dir: Path) -> None:
    api_response_candles = upbit_candles(1000)

    manager = BatchDBManager(lambda: sqlite3.connect("market_data.sqlite3"))
    await manager.start()

    # 1000개 캔들 배치 삽입
    await manager.insert_candles_batch(
        symbol="KRW-BTC",
        timeframe="1m",
        candles=api_response_candles,
        priority=Priority.HIGH
    )

    await manager.stop()
    got = rows_of(seed_dir / "market_data.sqlite3",
                  "SELECT COUNT(*), MIN(ts), MAX(ts) FROM candles WHERE symbol = 'KRW-BTC'")
    assert got == [(1000, 1704067200000, 1704067200000 + 999 * 60000)]
    first = rows_of(seed_dir / "market_data.sqlite3",
                    "SELECT open_price, close_price, high_price, low_price, volume, quote_volume"
                    " FROM candles WHERE ts = 1704067200000")
    assert first == [(50_000_000.0, 50_000_005.0, 50_000_010.0, 49_999_990.0, 0.25, 123456.5)]
    mode = rows_of(seed_dir / "market_data.sqlite3", "PRAGMA journal_mode")
    assert mode == [("wal",)]


async def test_scenario_2_priorities(seed_dir: Path) -> None:
    order_data = [{"order_id": "o-1", "market": "KRW-BTC", "side": "bid", "price": 1.5,
                   "volume": 2.0, "created_at": 1}]
    results = [{"run_id": "bt-1", "step": i, "pnl": i * 0.5} for i in range(100)]
    manager = BatchDBManager(lambda: sqlite3.connect("market_data.sqlite3"))
    await manager.start()

    # 실거래봇: 최우선
    await manager.queue_operation(
        "orders", OperationType.INSERT, order_data, Priority.CRITICAL
    )

    # 백테스터: 낮은 우선순위
    await manager.queue_operation(
        "backtest_results", OperationType.INSERT, results, Priority.LOW
    )

    await manager.stop()
    path = seed_dir / "market_data.sqlite3"
    assert rows_of(path, "SELECT order_id, side, price FROM orders") == [("o-1", "bid", 1.5)]
    assert rows_of(path, "SELECT COUNT(*), SUM(pnl) FROM backtest_results") == [(100, 2475.0)]


async def test_scenario_2_on_a_fresh_database_says_how_to_declare_the_tables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    order_data = [{"order_id": "o-1", "market": "KRW-BTC", "side": "bid", "price": 1.5,
                   "volume": 2.0, "created_at": 1}]
    manager = BatchDBManager(lambda: sqlite3.connect("market_data.sqlite3"))
    await manager.start()

    # 실거래봇: 최우선
    with pytest.raises(SchemaError) as info:
        await manager.queue_operation(
            "orders", OperationType.INSERT, order_data, Priority.CRITICAL
        )

    await manager.stop()
    message = str(info.value)
    assert message.startswith("unknown table 'orders': it is neither in the database nor "
                              "declared")
    assert "tables=[table]" in message and "manager.declare_table(table)" in message


async def test_scenario_3_status(seed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manager = BatchDBManager(lambda: sqlite3.connect("market_data.sqlite3"))
    await manager.start()
    await manager.insert_candles_batch("KRW-ETH", "1m", upbit_candles(10, "KRW-ETH"))
    await manager.flush()

    status = await manager.get_queue_status()
    print(f"대기 중인 작업: {status['total_queued_operations']}")
    print(f"메모리 사용량: {status['estimated_memory_mb']:.1f}MB")
    print(f"처리 성공률: {status['stats']['successful_operations']/status['stats']['total_operations']:.1%}")  # noqa: E501 - the seed's line

    await manager.stop()
    out = capsys.readouterr().out
    assert "대기 중인 작업: 0" in out
    assert "메모리 사용량: 0.0MB" in out
    assert "처리 성공률: 100.0%" in out
    for key in ("queue_sizes", "last_maintenance", "commit_latency", "oldest_wait_seconds"):
        assert key in status
    assert status["stats"]["rows_committed"] == 10
    assert set(status["queue_sizes"]) == {"CRITICAL", "HIGH", "NORMAL", "LOW"}


async def test_scenario_4_callback(seed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manager = BatchDBManager(lambda: sqlite3.connect("market_data.sqlite3"))
    await manager.start()
    # the seed's candle columns, and only those: batchdb keeps source and ingested_at
    data = [{"symbol": "KRW-XRP", "timeframe": "1d", "ts": 1704067200000 + i * 86_400_000,
             "open_price": 800.0, "high_price": 810.0, "low_price": 790.0, "close_price": 805.0,
             "volume": 1e6, "quote_volume": 8e8}
            for i in range(5)]
    seen: list[BatchOperation] = []

    async def on_batch_complete(operation: BatchOperation):  # type: ignore[no-untyped-def]
        seen.append(operation)
        if operation.is_processed:
            print(f"배치 완료: {operation.operation_id}, {operation.processing_time:.2f}s")

    await manager.queue_operation(
        "candles", OperationType.UPSERT, data, Priority.NORMAL, on_batch_complete
    )

    await manager.stop()
    assert len(seen) == 1 and seen[0].is_processed and seen[0].error is None
    assert f"배치 완료: {seen[0].operation_id}, " in capsys.readouterr().out
    assert rows_of(seed_dir / "market_data.sqlite3",
                   "SELECT COUNT(*), COUNT(source), MIN(ingested_at) > 1700000000000 "
                   "FROM candles WHERE symbol = 'KRW-XRP'") == [(5, 0, 1)]
