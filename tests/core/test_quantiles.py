"""One quantile everywhere: the demo's producer p99 and the benchmark's CRITICAL p99 are the
nearest rank of :func:`batchdb.stats.quantile`, the same figure the queue status shows.

The samples are chosen where the formulas used before disagreed: of 100 samples the demo's
``int(0.99 * n)`` (and the status's former ``floor``) took the 100th as p99, where nearest
rank takes the 99th.
"""

from __future__ import annotations

import pytest

from batchdb.models import Priority
from batchdb.stats import SchedulerStats, latency_summary, quantile
from batchdb.workloads.bench import Case, RunResult, aggregate
from batchdb.workloads.demo import ProducerStats

#: 1 ms … 100 ms, shuffled: p99 by nearest rank is 99 ms, p50 50 ms
SAMPLES = [((i * 37) % 100 + 1) / 1000 for i in range(100)]


def test_samples_are_where_the_old_formulas_differed() -> None:
    data = sorted(SAMPLES)
    assert data[int(0.99 * len(data))] == pytest.approx(0.100)  # the demo's old pick
    assert quantile(data, 0.99) == pytest.approx(0.099)


def test_demo_producer_quantiles_are_the_nearest_rank() -> None:
    producer = ProducerStats("bot", Priority.CRITICAL, "orders")
    producer.latencies.extend(SAMPLES)
    summary = latency_summary(SAMPLES)
    assert producer.latency_ms(0.99) == pytest.approx(99.0)
    assert producer.latency_ms(0.99) == pytest.approx(summary["p99_ms"])
    assert producer.latency_ms(0.5) == pytest.approx(summary["p50_ms"])
    assert ProducerStats("idle", Priority.LOW, "t").latency_ms(0.99) is None


def test_bench_and_queue_status_report_the_same_p99() -> None:
    case = Case("critical_latency", "sqlite", "batchdb")
    half = len(SAMPLES) // 2
    runs = [RunResult(case, 1000, 1.0, 0, extra={"_latencies": SAMPLES[:half],
                                                  "critical_writes": half}),
            RunResult(case, 1000, 1.0, 0, extra={"_latencies": SAMPLES[half:],
                                                  "critical_writes": half})]
    result = aggregate(case, runs)
    stats = SchedulerStats()
    stats.latencies.extend(SAMPLES)
    status = stats.latency_quantiles()
    lat = result.extra["critical_latency"]
    assert lat == latency_summary(SAMPLES)
    assert lat["p99_ms"] == status["p99_ms"] == pytest.approx(99.0)
    assert lat["p50_ms"] == status["p50_ms"] == pytest.approx(50.0)
    assert result.extra["critical_writes"] == len(SAMPLES)
    assert [r["count"] for r in result.extra["critical_latency_per_round"]] == [half, half]
