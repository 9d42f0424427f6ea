"""The cost of the Prometheus metrics plugin: the same workload with metrics off and on,
interleaved round by round in one run (target: on ≥ 0.95x of off).

"On" is what a monitored process does: ``[metrics] prometheus_port`` set, so the plugin
serves ``/metrics`` and observes every batch, and a thread reading the endpoint once a
second the whole time (as ``batchdb top`` does; Prometheus usually scrapes every 15 s).
One-row and 100-row INSERT operations into a plain SQLite table, ``await
queue_operation(...)`` in a loop, then ``flush()``; ``--bench-rows`` sizes them (rows/10
one-row operations, rows/100 100-row ones: 1M gives 100,000 and 10,000).

    pytest benchmarks/test_metrics.py --bench-rows 1000000 --bench-rounds 5 -s
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchdb import BatchDBManager, OperationType, Priority


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows_committed(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "batchdb_rows_committed_total")


async def _timed(path: Path, ops: list[list[dict[str, Any]]], metrics: bool) -> float:
    """Seconds from the first queue_operation to the end of flush()."""
    port = _free_port() if metrics else 0
    manager = BatchDBManager.from_settings(None, sqlite={"path": str(path)},
                                           maintenance={"enabled": False},
                                           metrics={"prometheus_port": port})
    url = f"http://127.0.0.1:{port}/metrics"
    stop = threading.Event()
    scrapes: list[float] = []

    def scrape() -> None:  # a reader once a second, as batchdb top
        while not stop.wait(1.0):
            scrapes.append(_rows_committed(url))

    async with manager:
        reader = threading.Thread(target=scrape, daemon=True)
        if metrics:
            reader.start()
        gc.collect()
        start = time.perf_counter()
        for rows in ops:
            await manager.queue_operation("t", OperationType.INSERT, rows, Priority.NORMAL)
        await manager.flush()
        elapsed = time.perf_counter() - start
        stop.set()
        if metrics:
            reader.join()
            # the plugin really observed the run
            n_rows = sum(map(len, ops))
            assert await asyncio.to_thread(_rows_committed, url) == n_rows
        status = await manager.get_queue_status()
    assert status["stats"]["failed_operations"] == 0
    return elapsed


@pytest.mark.parametrize("rows_per_op", [1, 100])
def test_metrics_cost(benchmark: Any, tmp_path: Path, bench_rows: int, bench_rounds: int,
                      interleaved: Callable[..., dict[str, Any]], rows_per_op: int) -> None:
    """One table, one priority: metrics off vs on (served, observed, read every second)."""
    n_ops = bench_rows // (10 if rows_per_op == 1 else rows_per_op)
    ops = [[{"id": i * rows_per_op + j, "v": 1.5, "s": "x"} for j in range(rows_per_op)]
           for i in range(n_ops)]
    variants: dict[str, Callable[[Path], float]] = {
        "metrics off": lambda path: asyncio.run(_timed(path, ops, metrics=False)),
        "metrics on": lambda path: asyncio.run(_timed(path, ops, metrics=True)),
    }
    info = interleaved(benchmark, tmp_path, bench_rounds, n_ops * rows_per_op, variants,
                       "metrics off", label=f"{rows_per_op}-row ops, ")
    info["target"] = "metrics on >= 0.95x of off"
    benchmark.extra_info["target"] = info["target"]
    assert min(info["rows_per_s"].values()) > 0
