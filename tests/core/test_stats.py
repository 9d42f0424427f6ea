"""The one quantile: the same samples give the same p99 wherever batchdb reports it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchdb.stats import SchedulerStats, latency_summary, quantile


def test_nearest_rank() -> None:
    data = [float(i) for i in range(1, 101)]
    assert quantile(data, 0.99) == 99.0
    assert quantile(data, 0.50) == 50.0
    assert quantile(data, 1.0) == 100.0
    assert quantile([7.0], 0.99) == 7.0
    assert quantile([float(i) for i in range(1, 201)], 0.99) == 198.0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="no samples"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        quantile([1.0], 0.0)


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=300),
       st.floats(0.01, 1.0))
def test_quantile_is_a_sample_with_enough_below(samples: list[float], q: float) -> None:
    data = sorted(samples)
    value = quantile(data, q)
    assert value in data
    assert sum(x <= value for x in data) >= q * len(data) - 1e-9
    assert sum(x < value for x in data) < q * len(data)


def test_status_and_summary_agree() -> None:
    stats = SchedulerStats()
    stats.latencies.extend(i / 1000 for i in range(1, 201))
    assert stats.latency_quantiles() == {"p50_ms": 100.0, "p99_ms": 198.0, "max_ms": 200.0}
    assert latency_summary(stats.latencies)["count"] == 200
    assert latency_summary([]) == {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
