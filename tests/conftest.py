"""Shared fixtures: managers on real SQLite files under tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBManager


@pytest.fixture
def db_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SQLite path; the working directory is tmp_path (no stray settings.toml)."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in __import__("os").environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)
    return tmp_path / "test.sqlite3"


def make_table(path: Path, ddl: str) -> None:
    """Create a table directly in the file, as a user's existing table."""
    conn = sqlite3.connect(path)
    conn.executescript(ddl)
    conn.commit()
    conn.close()


def rows_of(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a separate plain sqlite3 connection (what another process would see)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


ManagerFactory = Callable[..., BatchDBManager]


@pytest.fixture
async def make_manager(db_path: Path) -> AsyncIterator[ManagerFactory]:
    """Build started managers on ``db_path``; every one is stopped at the end."""
    made: list[BatchDBManager] = []

    def factory(**overrides: Any) -> BatchDBManager:
        overrides.setdefault("maintenance", {"enabled": False})
        sqlite = {"path": str(db_path), **overrides.pop("sqlite", {})}
        manager = BatchDBManager.from_settings(None, sqlite=sqlite, **overrides)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        await manager.stop()


def upbit_candles(n: int, market: str = "KRW-BTC", start_minute: int = 0,
                  price: float = 50_000_000.0) -> list[dict[str, Any]]:
    """Candles as Upbit's /v1/candles/minutes/1 returns them (newest first)."""
    out = []
    for i in range(start_minute, start_minute + n):
        day, minute = divmod(i, 1440)
        hh, mm = divmod(minute, 60)
        utc = f"2024-01-{1 + day:02d}T{hh:02d}:{mm:02d}:00"
        out.append({
            "market": market,
            "candle_date_time_utc": utc,
            "candle_date_time_kst": utc,
            "opening_price": price + i,
            "high_price": price + i + 10,
            "low_price": price + i - 10,
            "trade_price": price + i + 5,
            "timestamp": 1704067200000 + i * 60000 + 59000,
            "candle_acc_trade_price": 123456.5 + i,
            "candle_acc_trade_volume": 0.25 + i / 1000,
            "unit": 1,
        })
    out.reverse()
    return out
