"""The Upbit collector's own cost, against the fake Upbit of the tests on 127.0.0.1:

- ``multi_market``: a backfill of four markets of 1m candles, rate limit off on both sides
  (``requests_per_second = 0``, a server without a limit): candles per second from the
  first request to the last commit into SQLite — paging, JSON, normalising, queueing and
  writing, with the fake server in the same process;
- ``market_year``: one market paged alone (each request waits for the one before), which
  gives the cost of one request; from it, the time to backfill one market-year of 1m
  candles (525,600 candles, 2,628 requests of 200) at Upbit's real limit of 10 requests a
  second: the larger of the limit's 0.1 s and the measured cost per request, times the
  requests (network latency to Upbit comes on top of the measured cost; below 100 ms the
  limit hides it).

``--bench-rows`` sizes the multi-market run (candles in all; the single market gets a
quarter). Run: ``pytest benchmarks/test_collect.py --bench-rows 200000``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from batchdb import BatchDBManager
from batchdb.plugins.upbit import Collector


def _load_fake_upbit() -> Any:
    """The tests' fake Upbit (tests/ is not a package on the benchmarks' path)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "plugins" / "upbit" / "fakeupbit.py"
    spec = importlib.util.spec_from_file_location("batchdb_bench_fakeupbit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


_fake = _load_fake_upbit()
FakeUpbit, minute_series, ms_of = _fake.FakeUpbit, _fake.minute_series, _fake.ms_of

START = ms_of("2020-01-01T00:00:00")
YEAR_CANDLES = 365 * 24 * 60
UPBIT_LIMIT = 10  # candle requests per second


async def _backfill(server: Any, path: Path, markets: list[str], n: int) -> tuple[
        float, int, int]:
    """Seconds from the first request to everything committed; candles; requests."""
    manager = BatchDBManager.from_settings(
        None, sqlite={"path": str(path)}, maintenance={"enabled": False},
        upbit={"base_url": server.url, "requests_per_second": 0})
    async with manager:
        collector = Collector(manager, "1m")
        start = time.perf_counter()
        report = await collector.collect(markets, since=START, until=START + n * 60_000)
        await manager.flush()
        seconds = time.perf_counter() - start
    assert report.ok and report.candles == n * len(markets)
    return seconds, report.candles, report.counters.requests


def _rounds(benchmark: Any, tmp_path: Path, markets: list[str], n: int,
            rounds: int) -> list[tuple[float, int, int]]:
    server: Any = FakeUpbit(limit=None)
    for i, m in enumerate(markets):
        server.add("/v1/candles/minutes/1", minute_series(m, START, n, seed=i))
    results: list[tuple[float, int, int]] = []
    counter = iter(range(10**9))
    with server.serve():
        def one_round() -> None:
            path = tmp_path / f"collect-{next(counter)}.sqlite3"
            results.append(asyncio.run(_backfill(server, path, markets, n)))
            path.unlink()

        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return results


def test_multi_market(benchmark: Any, tmp_path: Path, bench_rows: int,
                      bench_rounds: int) -> None:
    """Four markets at once, no rate limit: the collector's candles per second."""
    markets = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL"]
    results = _rounds(benchmark, tmp_path, markets, bench_rows // len(markets), bench_rounds)
    rates = [candles / seconds for seconds, candles, _ in results]
    info = {"candles_per_s": round(statistics.median(rates)),
            "rounds_candles_per_s": [round(r) for r in rates],
            "requests": results[0][2], "candles": results[0][1]}
    benchmark.extra_info.update(info)
    print(f"\n  4 markets: {info['candles_per_s']:,} candles/s "
          f"({info['candles']:,} candles, {info['requests']:,} requests), rounds "
          f"{info['rounds_candles_per_s']}")


def test_market_year(benchmark: Any, tmp_path: Path, bench_rows: int,
                     bench_rounds: int) -> None:
    """One market alone: the cost of one request, and a market-year at Upbit's limit."""
    results = _rounds(benchmark, tmp_path, ["KRW-BTC"], max(2000, bench_rows // 4),
                      bench_rounds)
    per_request = statistics.median(seconds / requests for seconds, _, requests in results)
    requests = -(-YEAR_CANDLES // 200)
    year_seconds = requests * max(1 / UPBIT_LIMIT, per_request)
    info = {"seconds_per_request": round(per_request, 5),
            "market_year_requests": requests,
            "market_year_seconds_at_limit": round(year_seconds, 1),
            "market_year_seconds_unlimited": round(requests * per_request, 1)}
    benchmark.extra_info.update(info)
    print(f"\n  one request: {per_request * 1000:.2f} ms; one market-year of 1m candles: "
          f"{requests:,} requests, {year_seconds:,.0f} s at {UPBIT_LIMIT} requests/s "
          f"({requests * per_request:,.1f} s of the collector's own work)")
    assert per_request < 1 / UPBIT_LIMIT  # Upbit's limit, not the collector, sets the pace
