"""Counters, commit-latency samples and finished-operation history of a scheduler, and the
one quantile batchdb reports.

Every p50/p99 batchdb prints — the queue status, the demo's closing report, the benchmark
tables — comes from :func:`latency_summary`, so the same samples always give the same figure.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import BatchOperation

__all__ = ["History", "SchedulerStats", "latency_summary", "quantile"]


def quantile(sorted_samples: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q ≤ 1) of samples sorted ascending: the smallest
    sample with at least ``q`` of all samples at or below it (p99 of 100 samples is the
    99th, of 200 the 198th)."""
    if not sorted_samples:
        raise ValueError("quantile of no samples")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    return sorted_samples[max(0, math.ceil(q * len(sorted_samples)) - 1)]


def latency_summary(seconds: Iterable[float]) -> dict[str, float | int | None]:
    """``count`` and p50/p99/max in milliseconds (rounded to µs) of latencies in seconds."""
    data = sorted(seconds)
    if not data:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"count": len(data),
            "p50_ms": round(quantile(data, 0.50) * 1000, 3),
            "p99_ms": round(quantile(data, 0.99) * 1000, 3),
            "max_ms": round(data[-1] * 1000, 3)}


@dataclass
class SchedulerStats:
    """Counters since start; ``latencies`` holds recent enqueue-to-commit times."""

    total_operations: int = 0
    successful_operations: int = 0
    failed_operations: int = 0
    total_processing_time: float = 0.0
    rows_committed: int = 0
    batches_committed: int = 0
    batches_failed: int = 0
    retries: int = 0
    splits: int = 0
    promotions: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=20000))

    def latency_quantiles(self) -> dict[str, float | None]:
        """p50/p99/max of recent commit latencies, in milliseconds."""
        summary = latency_summary(self.latencies)
        return {k: v for k, v in summary.items() if k != "count"}


class History:
    """The last ``keep`` finished operations by id, for wait(), and up to a quarter more
    plus two batches: they are kept in generations of plain dicts of about an eighth of
    ``keep``, each dropped whole (an OrderedDict evicting one entry per operation cost
    a measurable share of a one-row write).
    """

    __slots__ = ("_generations", "_keep", "_size", "_step")

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._step = max(1, keep // 8)
        self._generations: deque[dict[str, BatchOperation]] = deque([{}])
        self._size = 0

    def add(self, ops: list[BatchOperation]) -> None:
        """Record finished operations, forgetting the oldest beyond ``keep``."""
        if not self._keep:
            return
        generations = self._generations
        newest = generations[-1]
        newest.update([(op.operation_id, op) for op in ops])
        if len(newest) >= self._step:
            self._size += len(newest)
            generations.append({})
            # drop the oldest generation while the others still hold ``keep``
            while self._size - len(generations[0]) >= self._keep:
                self._size -= len(generations.popleft())

    def get(self, operation_id: str) -> BatchOperation | None:
        """The finished operation, or None if it is unknown or was forgotten."""
        for generation in reversed(self._generations):
            op = generation.get(operation_id)
            if op is not None:
                return op
        return None

    def __len__(self) -> int:
        return self._size + len(self._generations[-1])
