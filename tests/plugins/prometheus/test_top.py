"""``batchdb top``: the real program, in a process of its own, watching a manager that
runs in this one (its endpoint served by the metrics plugin)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from batchdb import BatchDBManager, OperationType, Priority
from batchdb.plugins.prometheus.top import histogram_quantile
from tests.conftest import ManagerFactory

from .conftest import free_port

INF = float("inf")


async def batchdb(*args: str, interrupt_after: float | None = None,
                  timeout: float = 60) -> tuple[int, str, str]:
    """Run the ``batchdb`` program; SIGINT it after ``interrupt_after`` seconds if given."""
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchdb.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    if interrupt_after is not None:
        await asyncio.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def producing(manager: BatchDBManager) -> AsyncIterator[dict[str, int]]:
    """Writes one-row CRITICAL and 100-row LOW operations until the block ends."""
    done = {"rows": 0}
    stop = asyncio.Event()

    async def produce() -> None:
        i = 0
        while not stop.is_set():
            rows = [{"symbol": "KRW-BTC", "timeframe": "1m", "ts": i * 100 + j,
                     "open_price": 1.0, "high_price": 1.0, "low_price": 1.0,
                     "close_price": 1.0, "volume": 1.0} for j in range(100)]
            await manager.queue_operation("candles", OperationType.UPSERT, rows, Priority.LOW)
            await manager.queue_operation("candles", OperationType.UPSERT,
                                          [{**rows[0], "timeframe": "5m"}], Priority.CRITICAL)
            done["rows"] += 101
            i += 1
            await asyncio.sleep(0.002)

    task = asyncio.create_task(produce())
    try:
        yield done
    finally:
        stop.set()
        await task
        await manager.flush()


def figure(out: str, label: str) -> int:
    found = re.search(rf"{label}\s+([\d,]+)", out)
    assert found, f"no {label!r} in:\n{out}"
    return int(found.group(1).replace(",", ""))


async def test_once_shows_a_running_process(make_manager: ManagerFactory) -> None:
    port = free_port()
    manager = make_manager(metrics={"prometheus_port": port})
    await manager.start()
    try:
        async with producing(manager) as produced:
            await asyncio.sleep(0.3)
            code, out, err = await batchdb("top", "--once", "--interval", "0.5",
                                           "--url", f"http://127.0.0.1:{port}/metrics")
            seen = produced["rows"]
        assert code == 0, err
        assert f"batchdb top · http://127.0.0.1:{port}/metrics" in out
        for prio in ("CRITICAL", "HIGH", "NORMAL", "LOW"):
            assert re.search(rf"^\W*{prio}\s", out, re.MULTILINE), out
        assert 0 < figure(out, "rows committed") <= seen
        assert figure(out, "rows/s") > 0
        # CRITICAL committed operations per second and its latency percentiles
        critical = re.search(r"CRITICAL\s+\d+\s+[\d.]+ MB\s+[\d.]+s\s+([\d,]+)\s+([\d.,]+)\s+"
                             r"([\d.,]+)\s+0", out)
        assert critical, out
        rate, p50, p99 = (float(g.replace(",", "")) for g in critical.groups())
        assert rate > 0 and 0 < p50 <= p99
        assert "candles" in out and "Ctrl-C" not in out
    finally:
        await manager.stop()


async def test_live_view_refreshes_and_exits_cleanly_on_ctrl_c(
        make_manager: ManagerFactory) -> None:
    port = free_port()
    manager = make_manager(metrics={"prometheus_port": port})
    await manager.start()
    try:
        async with producing(manager):
            code, out, err = await batchdb("top", "--interval", "0.3", "--url",
                                           f"http://127.0.0.1:{port}/metrics",
                                           interrupt_after=4.0)
    finally:
        await manager.stop()
    assert code == 0, err
    assert "Traceback" not in err + out
    assert "Ctrl-C to quit" in out
    assert "rows committed" in out


async def test_nothing_answers_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    code, out, err = await batchdb("top", "--once", "--url", url)
    assert code == 1
    assert f"error: nothing answers at {url}" in " ".join(err.split())
    assert "Traceback" not in err + out


async def test_an_endpoint_without_batchdb_metrics_is_named() -> None:
    server, thread = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        code, _, err = await batchdb("top", "--once", "--url", url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert code == 1
    assert "answers, but with no batchdb metrics" in " ".join(err.split())


async def test_a_url_that_is_not_http_is_refused() -> None:
    code, _, err = await batchdb("top", "--once", "--url", "file:///etc/passwd")
    assert code == 1
    assert "must be an http:// or https:// URL" in " ".join(err.split())


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.5, [(0.001, 0.0), (0.01, 10.0), (INF, 10.0)], 0.0055),  # inside a bucket, linear
    (0.99, [(0.001, 0.0), (0.01, 10.0), (INF, 10.0)], 0.00991),
    (0.5, [(0.001, 5.0), (0.01, 5.0), (INF, 10.0)], 0.001),  # +Inf: the highest finite
    (0.5, [(0.001, 10.0), (INF, 10.0)], 0.0005),  # the first bucket starts at 0
    (0.5, [(0.001, 0.0), (INF, 0.0)], None),  # no observation
])
def test_histogram_quantile_as_prometheus_computes_it(q: float, buckets: Any,
                                                      expected: float | None) -> None:
    got = histogram_quantile(q, buckets)
    assert got == (None if expected is None else pytest.approx(expected))
