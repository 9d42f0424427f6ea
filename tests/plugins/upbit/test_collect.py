"""The Upbit collector against the fake Upbit (tests/plugins/upbit/fakeupbit.py) on
127.0.0.1, writing to real SQLite (and DuckDB) files in tmp_path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchdb import BatchDBManager
from batchdb.cli import app
from batchdb.plugins.upbit import Collector, UpbitSettings
from batchdb.plugins.upbit.ratelimit import RateLimiter, parse_remaining
from batchdb.plugins.upbit.timeframes import TIMEFRAMES, format_to, parse_when, timeframe
from tests.plugins.upbit.fakeupbit import FakeUpbit, minute_series, ms_of

DATA = Path(__file__).resolve().parents[2] / "data"
BATCHDB = Path(sys.executable).with_name("batchdb")
M1 = "/v1/candles/minutes/1"
COLUMNS = ("opening_price", "high_price", "low_price", "trade_price",
           "candle_acc_trade_volume", "candle_acc_trade_price")
START = ms_of("2024-03-01T00:00:00")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BATCHDB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def manager(path: Path, server: FakeUpbit, backend: str = "sqlite",
            **upbit: Any) -> BatchDBManager:
    return BatchDBManager.from_settings(None, backend=backend, **{backend: {"path": str(path)}},
                                        upbit=server.settings(**upbit),
                                        maintenance={"enabled": False})


def stored(path: Path, market: str, tf: str = "1m") -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT ts, open_price, high_price, low_price, close_price, volume, quote_volume, "
            "source FROM candles WHERE symbol = ? AND timeframe = ? ORDER BY ts",
            (market, tf)).fetchall()


def expected(candles: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((ms_of(c["candle_date_time_utc"]), *(c[k] for k in COLUMNS), "upbit")
                  for c in candles)


def in_range(candles: list[dict[str, Any]], lo: int, hi: int) -> list[dict[str, Any]]:
    return [c for c in candles if lo <= ms_of(c["candle_date_time_utc"]) < hi]


async def collect(path: Path, server: FakeUpbit, markets: list[str], tf: str = "1m",
                  **kwargs: Any) -> Any:
    upbit = kwargs.pop("upbit", {})
    async with manager(path, server, **upbit) as mgr:
        return await Collector(mgr, tf, backoff_base=0.02).collect(markets, **kwargs)


# ---------------------------------------------------------------------- backfill and resume
async def test_backfill_stores_every_candle_once_with_its_values(tmp_path: Path) -> None:
    server = FakeUpbit()
    markets = ["KRW-BTC", "KRW-ETH", "BTC-XRP"]
    for i, m in enumerate(markets):  # minutes without trades: gaps the paging must cross
        server.add(M1, minute_series(m, START, 1500, gaps=120, seed=i))
    db = tmp_path / "c.sqlite3"
    since, until = START + 60_000 * 7, START + 60_000 * 1400
    with server.serve():
        report = await collect(db, server, markets, since=since, until=until)
    assert report.ok and not report.interrupted
    for m in markets:
        want = expected(in_range(server.served(M1, m), since, until))
        assert stored(db, m) == want
        assert report.markets[m].candles == report.markets[m].committed == len(want)
    assert {r.count for r in server.requests} == {200}
    for m in markets:  # newest first, each `to` older than the one before
        tos = [ms_of(r.to) for r in server.requests if r.market == m and r.to]
        assert tos == sorted(tos, reverse=True) and len(set(tos)) == len(tos)
        assert tos[0] == until
    assert server.max_per_second <= 10 and server.rejected == 0
    assert report.counters.requests == len(server.requests)


async def test_a_second_run_requests_only_the_missing_ranges(tmp_path: Path) -> None:
    server = FakeUpbit()
    candles = minute_series("KRW-BTC", START, 3000, gaps=200, seed=3)
    server.add(M1, candles)
    db = tmp_path / "c.sqlite3"
    first_lo, first_hi = START + 60_000 * 1000, START + 60_000 * 2000
    with server.serve():
        await collect(db, server, ["KRW-BTC"], since=first_lo, until=first_hi)
        (oldest, newest), = sqlite3.connect(db).execute(
            "SELECT MIN(ts), MAX(ts) FROM candles").fetchall()
        first_requests = len(server.requests)
        report = await collect(db, server, ["KRW-BTC"], since=START, until=START + 60_000 * 2800)
    second = server.requests[first_requests:]
    assert stored(db, "KRW-BTC") == expected(in_range(candles, START, START + 60_000 * 2800))
    # no request inside what the store held: only newer than its newest, older than its oldest
    for r in second:
        to = ms_of(r.to or "")
        assert to > newest or to <= oldest, r
    stored_before = report.markets["KRW-BTC"].stored_before
    assert report.markets["KRW-BTC"].candles <= len(stored(db, "KRW-BTC")) - stored_before + 1
    assert len(second) <= 2 + 2 * (1800 // 200)  # the two missing ranges, and no more
    # a third run over the same window asks for the newest candle again and nothing else
    with server.serve():
        third = await collect(db, server, ["KRW-BTC"], since=START,
                              until=START + 60_000 * 2800)
    assert third.markets["KRW-BTC"].requests <= 2


async def test_recorded_upbit_responses_round_trip_exactly(tmp_path: Path) -> None:
    recorded = json.loads((DATA / "upbit_krw-btc_1m.json").read_text())
    days = json.loads((DATA / "upbit_days_no_unit.json").read_text())
    hours = [json.loads(line) for line in (DATA / "upbit_mixed.ndjson").read_text().splitlines()
             if line.strip()]
    server = FakeUpbit()
    server.add(M1, recorded)
    server.add("/v1/candles/days", days)
    server.add("/v1/candles/minutes/60", [c for c in hours if c.get("unit") == 60])
    db = tmp_path / "c.sqlite3"
    with server.serve():
        for tf, rows in (("1m", recorded), ("1d", days),
                         ("60m", [c for c in hours if c.get("unit") == 60])):
            markets = sorted({c["market"] for c in rows})
            report = await collect(db, server, markets, tf, until="2024-02-01")
            assert report.ok
            for m in markets:
                assert stored(db, m, tf) == expected([c for c in rows if c["market"] == m])


async def test_faults_are_retried_and_nothing_is_lost_or_doubled(tmp_path: Path) -> None:
    # every kind of fault on chosen requests, and 20% random ones on top
    server = FakeUpbit(faults={1: "500", 2: "drop", 3: "slow", 4: "503", 6: "429"},
                       fault_rate=0.2, slow_seconds=0.8, retry_after="0.3", seed=7)
    markets = ["KRW-BTC", "KRW-ETH"]
    for i, m in enumerate(markets):
        server.add(M1, minute_series(m, START, 1200, gaps=50, seed=i))
    db = tmp_path / "c.sqlite3"
    with server.serve():
        report = await collect(db, server, markets, since=START, until=START + 60_000 * 1200,
                               upbit={"max_retries": 20})
    assert report.ok, [m.error for m in report.markets.values()]
    for m in markets:
        assert stored(db, m) == expected(server.served(M1, m))
    c = report.counters
    assert c.server_errors >= 2 and c.network_errors >= 2 and c.rate_limited >= 1
    assert c.retries == c.requests - sum(m.requests for m in report.markets.values())


async def test_many_markets_share_one_limit_and_the_server_never_sees_more(
        tmp_path: Path) -> None:
    server = FakeUpbit(limit=10)
    markets = [f"KRW-C{i}" for i in range(6)]
    for i, m in enumerate(markets):
        server.add(M1, minute_series(m, START, 1000, seed=i))
    db = tmp_path / "c.sqlite3"
    start = time.monotonic()
    with server.serve():
        report = await collect(db, server, markets, since=START, until=START + 60_000 * 1000)
    elapsed = time.monotonic() - start
    assert report.ok and report.candles == 6000
    assert server.max_per_second <= 10 and server.rejected == 0
    assert len(server.requests) == 30 and elapsed >= 1.9  # 30 requests at 10/s: 3 windows


async def test_the_servers_remaining_req_count_is_obeyed(tmp_path: Path) -> None:
    # the server allows 5 a second, fewer than our own ceiling of 10: Remaining-Req says so
    server = FakeUpbit(limit=5)
    markets = [f"KRW-C{i}" for i in range(4)]
    for i, m in enumerate(markets):
        server.add(M1, minute_series(m, START, 1200, seed=i))
    db = tmp_path / "c.sqlite3"
    with server.serve():
        report = await collect(db, server, markets, since=START, until=START + 60_000 * 1200)
    assert report.ok and report.candles == 4800
    assert server.max_per_second <= 5 and server.rejected == 0


async def test_a_418_stops_everything_with_upbits_block_time(tmp_path: Path) -> None:
    server = FakeUpbit(faults={4: "418"}, block_seconds=900)
    markets = ["KRW-BTC", "KRW-ETH"]
    for i, m in enumerate(markets):
        server.add(M1, minute_series(m, START, 3000, seed=i))
    db = tmp_path / "c.sqlite3"
    with server.serve():
        report = await collect(db, server, markets, since=START, until=START + 60_000 * 3000)
    assert not report.ok and report.blocked is not None
    assert "HTTP 418" in report.blocked and "900 seconds" in report.blocked
    assert "IP blocked for 900 seconds" in report.blocked  # Upbit's own words
    assert len(server.requests) <= 4 + len(markets)  # nothing asked after the block
    fetched = sum(len(stored(db, m)) for m in markets)
    assert fetched == report.candles and fetched % 200 == 0  # what came before is kept


async def test_a_market_upbit_does_not_know_fails_alone(tmp_path: Path) -> None:
    server = FakeUpbit()
    server.add(M1, minute_series("KRW-BTC", START, 300))
    db = tmp_path / "c.sqlite3"
    with server.serve():
        report = await collect(db, server, ["KRW-BTC", "KRW-NOPE"], since=START,
                               until=START + 60_000 * 300)
    assert report.markets["KRW-BTC"].error is None and len(stored(db, "KRW-BTC")) == 300
    error = report.markets["KRW-NOPE"].error
    assert error is not None and "HTTP 404" in error and "Code not found" in error


async def test_a_write_the_database_refuses_fails_its_market_and_says_why(
        tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    with sqlite3.connect(db) as conn:  # batchdb's candles table, plus a rule of the user's
        conn.execute(
            "CREATE TABLE candles (symbol TEXT NOT NULL, timeframe TEXT NOT NULL, "
            "ts INTEGER NOT NULL, open_price REAL NOT NULL, high_price REAL NOT NULL, "
            "low_price REAL NOT NULL, close_price REAL NOT NULL, volume REAL NOT NULL, "
            "quote_volume REAL, source TEXT, ingested_at INTEGER NOT NULL, "
            "CHECK (symbol <> 'KRW-BAD'), PRIMARY KEY (symbol, timeframe, ts))")
    server = FakeUpbit()
    for m in ("KRW-BTC", "KRW-BAD"):
        server.add(M1, minute_series(m, START, 300))
    with server.serve():
        report = await collect(db, server, ["KRW-BTC", "KRW-BAD"], since=START,
                               until=START + 60_000 * 300)
    bad, good = report.markets["KRW-BAD"], report.markets["KRW-BTC"]
    assert good.error is None and good.committed == 300 == len(stored(db, "KRW-BTC"))
    assert bad.committed == 0 and bad.error is not None
    assert bad.error.startswith("writing 200 candles failed") and "CHECK" in bad.error
    assert not report.ok


async def test_duckdb_backfill_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    import duckdb

    server = FakeUpbit()
    candles = minute_series("KRW-BTC", START, 900, gaps=40)
    server.add(M1, candles)
    db = tmp_path / "c.duckdb"
    with server.serve():
        async with manager(db, server, "duckdb") as mgr:
            await Collector(mgr, "1m").collect(["KRW-BTC"], since=START + 60_000 * 400,
                                               until=START + 60_000 * 900)
        async with manager(db, server, "duckdb") as mgr:
            report = await Collector(mgr, "1m").collect(["KRW-BTC"], since=START,
                                                        until=START + 60_000 * 900)
    assert report.markets["KRW-BTC"].stored_before > 0
    with duckdb.connect(str(db)) as conn:
        rows = conn.execute("SELECT ts, open_price, high_price, low_price, close_price, volume, "
                            "quote_volume, source FROM candles ORDER BY ts").fetchall()
    assert [tuple(r) for r in rows] == expected(candles)


async def test_postgres_backfill_and_resume(make_pg_manager: Any) -> None:
    server = FakeUpbit()
    candles = minute_series("KRW-BTC", START, 700, gaps=30)
    server.add(M1, candles)
    with server.serve():
        async with make_pg_manager(upbit=server.settings()) as mgr:
            await Collector(mgr, "1m").collect(["KRW-BTC"], since=START + 60_000 * 300,
                                               until=START + 60_000 * 600)
        async with make_pg_manager(upbit=server.settings()) as mgr:
            report = await Collector(mgr, "1m").collect(["KRW-BTC"], since=START,
                                                        until=START + 60_000 * 700)
            rows = await mgr.fetch(
                "SELECT ts, open_price, high_price, low_price, close_price, volume, "
                "quote_volume, source FROM candles ORDER BY ts")
    assert report.markets["KRW-BTC"].stored_before > 0
    assert [tuple(r) for r in rows] == expected(candles)


# ---------------------------------------------------------------------- live
async def _until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_live_candles_follow_reconnect_and_fill_gaps(tmp_path: Path) -> None:
    server = FakeUpbit(ws_interval=0.05, ws_close_rate=0.08, seed=11)
    markets = ["KRW-BTC", "KRW-ETH"]
    db = tmp_path / "c.sqlite3"
    now = int(time.time() * 1000)
    for i, m in enumerate(markets):  # some history just before now, in one-second candles
        server.add("/v1/candles/seconds", minute_series(m, now - now % 1000 - 30_000, 25,
                                                        seed=i, step_ms=1000))
    with server.serve():
        async with manager(db, server) as mgr:
            collector = Collector(mgr, "1s", backoff_base=0.02, backoff_cap=0.2)
            task = asyncio.ensure_future(collector.collect(markets, since=now - 60_000,
                                                           live=True))
            await _until(lambda: server.ws_connections >= 3
                         and collector.report.live_updates > 40)
            server.ws_interval = 3600  # no more updates: what was served is final
            await asyncio.sleep(0.3)
            await _until(lambda: collector.report.live_connections >= server.ws_connections)
            await asyncio.sleep(0.5)  # the last gap backfill
            collector.stop("test")
            report = await task
    assert report.live_updates > 40 and report.live_connections >= 3
    sub = server.subscriptions[0]
    assert sub[1] == {"type": "candle.1s", "codes": markets} and sub[2] == {"format": "DEFAULT"}
    for m in markets:
        assert stored(db, m, "1s") == expected(server.served("/v1/candles/seconds", m))


async def test_live_days_are_built_from_trades(tmp_path: Path) -> None:
    server = FakeUpbit(ws_interval=0.03, ws_close_rate=0.05, seed=5)
    now = int(time.time() * 1000)
    if now % 86_400_000 > 86_400_000 - 120_000:
        pytest.skip("too close to midnight UTC: the day candle would end mid-test")
    today = now - now % 86_400_000
    history = minute_series("KRW-BTC", today - 20 * 86_400_000, 21, step_ms=86_400_000)
    history[-1]["timestamp"] = now - 1000
    server.add("/v1/candles/days", history)
    db = tmp_path / "c.sqlite3"
    with server.serve():
        async with manager(db, server) as mgr:
            collector = Collector(mgr, "1d", backoff_base=0.02, backoff_cap=0.2)
            task = asyncio.ensure_future(collector.collect(["KRW-BTC"], live=True))
            await _until(lambda: server.ws_connections >= 2
                         and collector.report.live_updates > 3)
            server.ws_interval = 3600
            await asyncio.sleep(0.3)
            await _until(lambda: collector.report.live_connections >= server.ws_connections)
            await asyncio.sleep(1.5)  # the trade-built candle is written once a second
            collector.stop("test")
            report = await task
    assert server.subscriptions[0][1]["type"] == "trade"
    assert report.live_updates > 0
    assert stored(db, "KRW-BTC", "1d") == expected(server.served("/v1/candles/days", "KRW-BTC"))


# ---------------------------------------------------------------------- pieces
def test_timeframes_map_onto_upbits_endpoints() -> None:
    assert TIMEFRAMES["1s"].path == "/v1/candles/seconds"
    assert TIMEFRAMES["240m"].path == "/v1/candles/minutes/240"
    assert [TIMEFRAMES[t].path for t in ("1d", "1w", "1M", "1y")] == [
        "/v1/candles/days", "/v1/candles/weeks", "/v1/candles/months", "/v1/candles/years"]
    assert TIMEFRAMES["5m"].ws_type == "candle.5m" and TIMEFRAMES["1d"].ws_type is None
    with pytest.raises(ValueError, match="unknown timeframe '2m'; one of: 1s, 1m"):
        timeframe("2m")
    t = ms_of("2024-03-06T13:45:10")  # a Wednesday
    assert TIMEFRAMES["1w"].floor(t) == ms_of("2024-03-04T00:00:00")
    assert TIMEFRAMES["1M"].floor(t) == ms_of("2024-03-01T00:00:00")
    assert TIMEFRAMES["1y"].floor(t) == ms_of("2024-01-01T00:00:00")
    assert TIMEFRAMES["15m"].floor(t) == ms_of("2024-03-06T13:45:00")


def test_when_is_iso_8601_in_utc_unless_a_zone_is_given() -> None:
    assert parse_when("2024-03-01") == ms_of("2024-03-01T00:00:00")
    assert parse_when("2024-03-01T12:30:00") == ms_of("2024-03-01T12:30:00")
    assert parse_when("2024-03-01T12:30:00Z") == ms_of("2024-03-01T12:30:00")
    assert parse_when("2024-03-01T21:30:00+09:00") == ms_of("2024-03-01T12:30:00")
    with pytest.raises(ValueError, match="not an ISO 8601 date"):
        parse_when("yesterday")
    assert format_to(ms_of("2024-03-01T12:30:00") + 1) == "2024-03-01T12:30:01Z"


async def test_the_limiter_obeys_remaining_req_and_pauses() -> None:
    assert parse_remaining("group=candles; min=600; sec=7") == 7
    assert parse_remaining("group=default") is None and parse_remaining(None) is None
    limiter = RateLimiter(0)  # no ceiling of our own: only what the server says
    sent = await limiter.acquire()
    limiter.done(sent, 0)  # the server's second is used up
    start = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - start >= 0.9
    limiter = RateLimiter(5, window=0.5)
    start = time.monotonic()
    for _ in range(10):
        await limiter.acquire()
    assert 0.45 <= time.monotonic() - start < 2
    limiter.pause(0.3)
    start = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - start >= 0.25


# ---------------------------------------------------------------------- command line
runner = CliRunner()


def test_collect_command_backfills_and_prints_a_summary(tmp_path: Path) -> None:
    server = FakeUpbit()
    server.add(M1, minute_series("KRW-BTC", START, 500, gaps=10))
    with server.serve():
        env = {"BATCHDB_UPBIT__BASE_URL": server.url, "BATCHDB_SQLITE__PATH": "m.sqlite3",
               "COLUMNS": "160"}
        result = runner.invoke(app, ["collect", "krw-btc", "--timeframe", "1m", "--since",
                                     "2024-03-01", "--until", "2024-03-01T18:00:00+09:00"],
                               env=env)
    assert result.exit_code == 0, result.output
    assert "KRW-BTC" in result.stdout and "ok" in result.stdout
    assert "requests" in result.stdout and "429s" in result.stdout
    assert len(stored(tmp_path / "m.sqlite3", "KRW-BTC")) == 490


@pytest.mark.parametrize(("args", "message"), [
    (["KRW-BTC", "-t", "2m"], "unknown timeframe '2m'"),
    (["KRWBTC", "-t", "1m"], "'KRWBTC' is not an Upbit market code"),
    (["KRW-BTC", "-t", "1m", "--since", "soon"], "'soon' is not an ISO 8601"),
    (["KRW-BTC", "-t", "1m", "--since", "2024-03-02", "--until", "2024-03-01"], "not before"),
    (["KRW-BTC", "-t", "1m", "--live", "--until", "2024-03-01"], "takes no --until"),
])
def test_collect_refuses_bad_arguments(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["collect", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_bad_upbit_settings_name_the_key(tmp_path: Path) -> None:
    result = runner.invoke(app, ["collect", "KRW-BTC", "-t", "1m"],
                           env={"BATCHDB_UPBIT__REQUESTS_PER_SECOND": "-1", "COLUMNS": "200"})
    assert result.exit_code == 2
    assert ("BATCHDB_UPBIT__REQUESTS_PER_SECOND: Input should be greater than or equal to 0 "
            "(got '-1')") in " ".join(result.output.split())
    assert not (tmp_path / "market_data.sqlite3").exists()  # refused before opening anything


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # import httpx fails as if not installed
    result = runner.invoke(app, ["collect", "KRW-BTC", "-t", "1m"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "pip install 'batchdb[upbit]'" in " ".join(result.output.split())


def test_the_settings_section_has_upbits_defaults() -> None:
    s = UpbitSettings()
    assert (s.base_url, s.websocket_url, s.requests_per_second, s.max_retries,
            s.timeout_seconds) == ("https://api.upbit.com", "wss://api.upbit.com/websocket/v1",
                                   10, 8, 10)


@pytest.mark.skipif(not BATCHDB.exists(), reason="the batchdb console script is not installed")
def test_sigint_during_a_backfill_commits_what_was_fetched(tmp_path: Path) -> None:
    import subprocess

    server = FakeUpbit()
    markets = ["KRW-BTC", "KRW-ETH"]
    for i, m in enumerate(markets):
        server.add(M1, minute_series(m, START, 20_000, gaps=500, seed=i))
    db = tmp_path / "m.sqlite3"
    with server.serve():
        env = {**os.environ, "BATCHDB_UPBIT__BASE_URL": server.url,
               "BATCHDB_SQLITE__PATH": str(db), "COLUMNS": "160"}
        proc = subprocess.Popen(
            [str(BATCHDB), "collect", *markets, "-t", "1m", "--since", "2024-03-01",
             "--until", "2024-03-20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)
        deadline = time.monotonic() + 60
        while len(server.requests) < 12:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        served = len(server.requests)
    assert proc.returncode == 0, err
    assert "Interrupted by SIGINT" in out and "SIGINT: stopping" in err
    assert "Traceback" not in out + err
    assert served < 2 * 20_000 // 200  # it did stop early
    total = 0
    for m in markets:
        rows = stored(db, m)
        total += len(rows)
        assert rows == expected(in_range(server.served(M1, m), rows[0][0], rows[-1][0] + 1))
    totals = next(line for line in out.splitlines() if "market(s)" in line).split()
    fetched, committed = (int(n.replace(",", "")) for n in totals[2:4])
    assert fetched == committed == total > 0


def test_the_readme_python_example_runs_against_the_fake_upbit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import re

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    code, = [c for c in re.findall(r"^```py\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
             if "Collector(" in c]
    server = FakeUpbit()
    for i, m in enumerate(["KRW-BTC", "KRW-ETH"]):
        server.add(M1, minute_series(m, START, 1440, gaps=40, seed=i))
    with server.serve():
        monkeypatch.setenv("BATCHDB_UPBIT__BASE_URL", server.url)
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.split() == ["2800", str(len(server.requests)), "True"]
    assert len(stored(tmp_path / "market_data.sqlite3", "KRW-ETH")) == 1400
