"""Raw drivers vs batchdb, one pytest-benchmark group per workload (see conftest.py).

Within a group every backend's raw driver runs just before its batchdb (and peers), on the
same rows, so they sit side by side in pytest-benchmark's table and in the summary. Each
batchdb result is held to its design target (``check_target``): reported always, a failure
with ``--bench-enforce`` when missed by more than the margin (see conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from batchdb.workloads import bench

RunCase = Callable[[Any, bench.Case], bench.BenchResult]  # the run_case fixture (conftest.py)
CheckTarget = Callable[[bench.BenchResult], None]  # the check_target fixture (conftest.py)


def _cases(workload: str) -> Any:
    return pytest.mark.parametrize(
        "case", bench.cases(bench.BACKENDS, [workload]), ids=lambda c: c.param)


@_cases("upsert_new")
def test_upsert_new(benchmark: Any, run_case: RunCase, case: bench.Case,
                    check_target: CheckTarget) -> None:
    """Bulk upsert of new rows in 1000-row calls (sqlite target: batchdb ≥ 0.9x raw)."""
    result = run_case(benchmark, case)
    assert result.rows_per_s > 0
    check_target(result)


@_cases("upsert_existing")
def test_upsert_existing(benchmark: Any, run_case: RunCase, case: bench.Case,
                         check_target: CheckTarget) -> None:
    """Upsert over the same keys holding other values."""
    result = run_case(benchmark, case)
    assert result.rows_per_s > 0
    check_target(result)


@_cases("upbit_candles")
def test_upbit_candles(benchmark: Any, run_case: RunCase, case: bench.Case,
                       check_target: CheckTarget) -> None:
    """Upbit candle JSON, normalised and upserted (target: batchdb ≥ 0.75x raw)."""
    result = run_case(benchmark, case)
    assert result.rows_per_s > 0
    check_target(result)


@_cases("one_row")
def test_one_row(benchmark: Any, run_case: RunCase, case: bench.Case,
                 check_target: CheckTarget) -> None:
    """rows/10 single-row INSERT calls, then flush (target: ≥ 100k rows/s)."""
    result = run_case(benchmark, case)
    assert result.rows_per_s > 0
    check_target(result)


@_cases("critical_latency")
def test_critical_latency(benchmark: Any, run_case: RunCase, case: bench.Case,
                          check_target: CheckTarget) -> None:
    """CRITICAL single-row writes every 5 ms while a LOW backlog drains (target: p99 ≤ 25 ms);
    latencies are in extra_info["critical_latency"]."""
    result = run_case(benchmark, case)
    latency = result.extra["critical_latency"]
    print(f"\n{case.name}: {latency['count']} CRITICAL writes, p50 {latency['p50_ms']} ms, "
          f"p99 {latency['p99_ms']} ms, max {latency['max_ms']} ms")
    assert latency["count"] > 0
    check_target(result)


@_cases("memory_flood")
def test_memory_flood(benchmark: Any, run_case: RunCase, case: bench.Case,
                      check_target: CheckTarget) -> None:
    """Producers far faster than the database, max_memory_mb = 64 (target: RSS growth
    ≤ 128 MB); each round runs in its own process."""
    result = run_case(benchmark, case)
    print(f"\n{case.name}: peak RSS growth {result.peak_rss_mb:.1f} MB "
          f"(heap {result.peak_anon_mb or 0:.1f} MB), queue peak "
          f"{result.extra.get('queued_peak_mb')} MB of {bench.FLOOD_BUDGET_MB:.0f} MB")
    assert result.rows_per_s > 0
    check_target(result)
