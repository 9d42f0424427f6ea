"""The metrics plugin on SQLite, DuckDB and PostgreSQL: a known workload, the endpoint read
over HTTP and parsed with prometheus-client's parser, every figure checked against
``get_queue_status()`` and against what the workload did."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.error
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from batchdb import BatchDBError, BatchOperation, OperationType, Priority, SettingsError
from batchdb.plugins.prometheus import PrometheusMetrics
from batchdb.plugins.prometheus.exporter import LATENCY_BUCKETS, _Histogram
from batchdb.plugins.prometheus.top import histogram_quantile
from tests.conftest import ManagerFactory

from .conftest import free_port, http_get, parse, total, value

_MB = 1024 * 1024
PRIORITIES = ("CRITICAL", "HIGH", "NORMAL", "LOW")


def tables() -> list[sa.Table]:
    metadata = sa.MetaData()
    return [
        sa.Table("a", metadata, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("v", sa.Float, nullable=False)),
        sa.Table("b", metadata, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("v", sa.Float, nullable=False)),
    ]


def quick(**overrides: Any) -> dict[str, Any]:
    """Settings for the workload: LOW lingers (so that it stays queued while we look),
    callbacks time out after 0.1 s."""
    batch = {"linger_seconds": {"CRITICAL": 0.0, "HIGH": 0.0, "NORMAL": 0.05, "LOW": 60.0},
             "flush_interval_seconds": 120.0, "callback_timeout_seconds": 0.1,
             "max_retries": 2}
    return {"batch": batch, "tables": tables(), **overrides}


class Workload:
    """What it queued and what must have happened; ``release`` frees the late callback."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.raised = 0
        self.committed = {"CRITICAL": 10, "HIGH": 5 + 1, "NORMAL": 2 + 2, "LOW": 0}
        self.failed = {"NORMAL": 1}
        self.rows = {"a": 10 + 5 * 20 + 2, "b": 2 * 50 + 1}
        self.lingering = 7  # LOW one-row operations left queued

    def late(self, op: BatchOperation) -> None:
        self.release.wait(30)  # past callback_timeout_seconds: abandoned, then running late

    def boom(self, op: BatchOperation) -> None:
        self.raised += 1
        raise RuntimeError("a callback that raises")

    async def run(self, manager: Any) -> None:
        q = manager.queue_operation
        for i in range(10):
            await q("a", OperationType.INSERT, [{"id": i, "v": 1.0}], Priority.CRITICAL)
        for k in range(5):
            await q("a", OperationType.INSERT,
                    [{"id": 100 + 20 * k + j, "v": 2.0} for j in range(20)], Priority.HIGH)
        await manager.flush()
        # one batch of three at NORMAL: the middle one repeats a key, it fails alone
        ids = [await q("a", OperationType.INSERT, [{"id": n, "v": 3.0}], Priority.NORMAL)
               for n in (200, 0, 201)]
        for k in range(2):
            await q("b", OperationType.UPSERT,
                    [{"id": 50 * k + j, "v": 4.0} for j in range(50)], Priority.NORMAL,
                    self.boom)
        await q("b", OperationType.UPSERT, [{"id": 1000, "v": 5.0}], Priority.HIGH, self.late)
        await manager.flush()
        for n in ids[::2]:
            await manager.wait(n)
        await manager.maintain("analyze")
        for i in range(self.lingering):
            await q("b", OperationType.INSERT, [{"id": 2000 + i, "v": 6.0}], Priority.LOW)


def check_against_status(samples: dict[Any, float], status: dict[str, Any], work: Workload,
                         backend: str) -> None:
    stats = status["stats"]
    committed = total(samples, "batchdb_operations_total", outcome="committed")
    failed = total(samples, "batchdb_operations_total", outcome="failed")
    assert committed == stats["successful_operations"] == sum(work.committed.values())
    assert failed == stats["failed_operations"] == sum(work.failed.values())
    for prio in PRIORITIES:
        assert total(samples, "batchdb_operations_total", outcome="committed",
                     priority=prio) == work.committed[prio]
        assert total(samples, "batchdb_operations_total", outcome="failed",
                     priority=prio) == work.failed.get(prio, 0)
    assert value(samples, "batchdb_operations_total", table="a", priority="NORMAL",
                 outcome="failed") == 1
    # rows and batches
    assert total(samples, "batchdb_rows_committed_total") == stats["rows_committed"]
    for table, rows in work.rows.items():
        assert value(samples, "batchdb_rows_committed_total", table=table) == rows
    assert total(samples, "batchdb_batches_total", outcome="committed") == \
        stats["batches_committed"]
    assert total(samples, "batchdb_batches_total", outcome="failed") == \
        stats["batches_failed"] == 1
    # commit latency: one observation per committed operation, by its priority; the
    # slowest is at most the status's max (the bucket holding it holds them all)
    count = 0.0
    for prio in PRIORITIES:
        if work.committed[prio]:
            n = value(samples, "batchdb_commit_latency_seconds_count", priority=prio)
            assert n == work.committed[prio]
            assert value(samples, "batchdb_commit_latency_seconds_sum", priority=prio) > 0
            count += n
    assert count == stats["successful_operations"]
    max_s = status["commit_latency"]["max_ms"] / 1000
    le = next((b for b in LATENCY_BUCKETS if b >= max_s * 1.05 + 0.001), None)
    if le is not None:
        assert total(samples, "batchdb_commit_latency_seconds_bucket", le=repr(le)) == count
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in samples.items()
                     if n == "batchdb_commit_latency_seconds_bucket"
                     and dict(ls)["priority"] == "CRITICAL")
    p50 = histogram_quantile(0.5, buckets)  # interpolated inside its bucket: at most
    assert p50 is not None and 0 < p50 <= (le or 30.0)  # the bound of the max's bucket
    # batch write time: one observation per committed batch, the seconds the status adds up
    assert value(samples, "batchdb_batch_write_seconds_count", backend=backend) == \
        stats["batches_committed"]
    assert value(samples, "batchdb_batch_write_seconds_sum", backend=backend) == \
        pytest.approx(stats["total_processing_time"], rel=1e-9, abs=1e-9)
    # maintenance
    assert value(samples, "batchdb_maintenance_seconds_count", task="analyze") == 1
    # the status figures, read at scrape time
    for prio in PRIORITIES:
        assert value(samples, "batchdb_queue_operations", priority=prio) == \
            status["queue_sizes"][prio]
        assert value(samples, "batchdb_queue_memory_bytes", priority=prio) == \
            status["queue_memory_mb"][prio] * _MB
        assert value(samples, "batchdb_queue_oldest_wait_seconds", priority=prio) == \
            pytest.approx(status["oldest_wait_seconds"][prio], abs=2.0)
    assert status["queue_sizes"]["LOW"] == work.lingering
    memory = total(samples, "batchdb_queue_memory_bytes")
    assert memory == pytest.approx(status["estimated_memory_mb"] * _MB)
    assert memory > 0
    assert value(samples, "batchdb_batches_in_flight") == status["batches_in_flight"] == 0
    assert value(samples, "batchdb_batch_retries_total") == stats["retries"]
    assert value(samples, "batchdb_batch_splits_total") == stats["splits"]
    if backend != "sqlite":  # SQLite isolates a bad operation by savepoints, not splits
        assert stats["splits"] >= 1
    assert value(samples, "batchdb_promotions_total") == stats["promotions"]
    callbacks = status["callbacks"]
    assert value(samples, "batchdb_callbacks_pending") == callbacks["pending"]
    assert value(samples, "batchdb_callbacks_running_late") == callbacks["running_late"] == 1
    assert value(samples, "batchdb_callbacks_timed_out_total") == callbacks["timed_out"] == 1
    assert value(samples, "batchdb_callbacks_raised_total") == callbacks["raised"] == 2


async def test_endpoint_figures_match_the_status(
        make_backend_manager: tuple[str, ManagerFactory]) -> None:
    backend, make = make_backend_manager
    port = free_port()
    manager = make(metrics={"prometheus_port": port}, **quick())
    work = Workload()
    await manager.start()
    try:
        await work.run(manager)
        text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        status = await manager.get_queue_status()
        check_against_status(parse(text), status, work, backend)
        assert work.raised == 2
    finally:
        work.release.set()
        await manager.stop()
    # the endpoint goes with the manager
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
    assert manager.pm.get_plugin("metrics-exporter") is None


async def test_mounted_on_the_applications_registry(make_manager: ManagerFactory) -> None:
    """A user's own registry: no HTTP server; read in the loop's thread (an ASGI app) and
    from another thread (a WSGI server) alike."""
    registry = CollectorRegistry()
    exporter = PrometheusMetrics(registry=registry)
    manager = make_manager(plugins_extra=[exporter], **quick())
    work = Workload()
    await manager.start()
    try:
        await work.run(manager)
        status = await manager.get_queue_status()
        in_loop = generate_latest(registry).decode()
        in_thread = (await asyncio.to_thread(generate_latest, registry)).decode()
        check_against_status(parse(in_loop), status, work, "sqlite")
        check_against_status(parse(in_thread), status, work, "sqlite")
        assert exporter.url is None  # nothing served
    finally:
        work.release.set()
        await manager.stop()
    after = parse(generate_latest(registry).decode())
    assert total(after, "batchdb_rows_committed_total") == sum(work.rows.values()) + 7
    assert not [k for k in after if k[0] == "batchdb_queue_operations"]  # not observing


async def test_one_exporter_observes_one_manager(make_manager: ManagerFactory) -> None:
    exporter = PrometheusMetrics()
    first = make_manager(plugins_extra=[exporter])
    second = make_manager(plugins_extra=[exporter])
    await first.start()
    with pytest.raises(BatchDBError, match="already observes another running manager"):
        await second.start()
    assert second.pm.get_plugin("metrics-exporter") is None
    await first.stop()
    await second.start()  # free again once the first stopped
    await second.stop()


async def test_off_by_default_costs_no_hook(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    await manager.start()
    try:
        assert manager.pm.get_plugin("metrics-exporter") is None
        impls = manager.pm.hook.batchdb_batch_committed.get_hookimpls()
        assert not [i for i in impls if "prometheus" in i.plugin_name + str(i.plugin)]
    finally:
        await manager.stop()


async def test_port_from_an_environment_variable(make_manager: ManagerFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("BATCHDB_METRICS__PROMETHEUS_PORT", str(port))
    manager = make_manager()
    await manager.start()
    try:
        await manager.queue_operation("candles", OperationType.UPSERT, [
            {"symbol": "KRW-BTC", "timeframe": "1m", "ts": 0, "open_price": 1.0,
             "high_price": 1.0, "low_price": 1.0, "close_price": 1.0, "volume": 1.0}])
        await manager.flush()
        samples = parse(await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/"))
        assert value(samples, "batchdb_rows_committed_total", table="candles") == 1
    finally:
        await manager.stop()


@pytest.mark.parametrize("port", [-1, 70000, "nine"])
async def test_a_bad_port_names_the_key(make_manager: ManagerFactory, port: Any) -> None:
    # the section is the plugin's registered one: checked when the settings load, before
    # anything opens
    with pytest.raises(SettingsError, match=r"argument metrics\.prometheus_port: "):
        make_manager(metrics={"prometheus_port": port})


async def test_a_port_in_use_is_a_clear_error(make_manager: ManagerFactory) -> None:
    port = free_port()
    first = make_manager(metrics={"prometheus_port": port})
    second = make_manager(metrics={"prometheus_port": port})
    await first.start()
    with pytest.raises(BatchDBError, match=rf"cannot serve on 127\.0\.0\.1:{port}"):
        await second.start()
    assert not (await second.get_queue_status())["running"]
    await first.stop()
    await second.start()  # the backend was closed, the port is free now: it starts
    await second.stop()


async def test_missing_prometheus_client_names_the_extra(
        make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not installed
    manager = make_manager(metrics={"prometheus_port": free_port()})
    with pytest.raises(BatchDBError, match=r"pip install 'batchdb\[metrics\]'") as info:
        await manager.start()
    assert "metrics.prometheus_port" in str(info.value)
    with pytest.raises(BatchDBError, match="not running"):
        await manager.queue_operation("candles", "UPSERT", [{"symbol": "x"}])


async def test_a_scrape_while_the_loop_is_busy_leaves_the_queue_figures_out(
        make_manager: ManagerFactory) -> None:
    """The status is computed on the manager's loop: a loop that does not answer in time
    costs the scrape its queue figures, never a wrong figure or a hung scrape."""
    exporter = PrometheusMetrics(status_timeout=0.2)
    manager = make_manager(plugins_extra=[exporter])
    await manager.start()
    try:
        scrape = asyncio.get_running_loop().run_in_executor(None, generate_latest,
                                                            exporter.registry)
        time.sleep(0.6)  # the loop is blocked: the scrape's status call times out
        samples = parse((await scrape).decode())
        assert not [k for k in samples if k[0] == "batchdb_queue_operations"]
        samples = parse((await asyncio.to_thread(generate_latest, exporter.registry)).decode())
        assert [k for k in samples if k[0] == "batchdb_queue_operations"]
    finally:
        await manager.stop()


_LATENCIES = st.lists(st.one_of(st.sampled_from(LATENCY_BUCKETS),
                                st.floats(0, 40, allow_nan=False)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(small=_LATENCIES, large=_LATENCIES.filter(lambda v: len(v) >= 16),
       nearly_in_order=st.booleans())
def test_latency_buckets_count_as_prometheus_clients_own_histogram(
        small: list[float], large: list[float], nearly_in_order: bool) -> None:
    """The exporter buckets a batch's latencies itself (one by one for a few, sorted once
    for many): the same counts, "le" bounds included, and sum as prometheus-client's
    Histogram observing them one by one."""
    if nearly_in_order:  # as a batch's latencies come: the oldest operation first
        large = sorted(large, reverse=True)
    values = small + large
    ours = _Histogram(LATENCY_BUCKETS)
    ours.observe_all(small)
    ours.observe_all(large)
    registry = CollectorRegistry()
    theirs = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=registry)
    for v in values:
        theirs.observe(v)
    expected = {s.labels["le"]: s.value for s in next(iter(registry.collect())).samples
                if s.name == "h_bucket"}
    got = dict(ours.buckets())
    assert {float(k): v for k, v in got.items()} == {float(k): v for k, v in expected.items()}
    assert ours.total == pytest.approx(sum(values))
