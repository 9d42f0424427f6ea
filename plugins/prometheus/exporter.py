"""The exporter: batchdb's hooks and ``get_queue_status()`` as Prometheus metrics.

Two sources, chosen by cost:

- **per batch** (``batchdb_batch_committed``, ``batchdb_batch_failed``,
  ``batchdb_maintenance_done``): operations, rows and batches by table, commit latency and
  batch write time. A batch is counted with one dictionary update per label set, and its
  operations' latencies (``batch.latencies``, which the scheduler computes for its own
  status anyway) are sorted once and bisected per bucket for large batches; the operations
  themselves are not read when the batch knows it holds one priority
  (``batch.priority_counts()``). prometheus-client's ``Histogram.observe`` per operation (a
  lock and a bucket search each) would cost the one-row path several percent, and so did
  reading each operation's priority and queue time and bucketing with numpy (210 µs per
  1,000-operation batch, 3.4% of a one-row run, against 55 µs and 0.9% now). Nothing is
  done per queued operation (``batchdb_operation_queued`` is not implemented).
- **at scrape time**: the queues, memory, batches in flight, callbacks, retries and splits
  are read from ``manager.get_queue_status()`` when Prometheus asks, in a custom collector:
  no cost at all between scrapes. The scrape runs in the HTTP server's thread, so the
  status is computed on the manager's event loop (``run_coroutine_threadsafe``), where the
  queues are consistent; a scrape made on that loop's own thread (an ASGI app serving the
  registry) computes it in place. Figures the spool adds to the status later belong in
  :meth:`PrometheusMetrics._status_families`.

The per-batch counts live in plain dicts and lists under one lock (taken once per batch by
the event loop, once per scrape by the server thread), exposed through the same collector.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from batchdb.hookspecs import hookimpl
from batchdb.models import BatchDBError, Priority

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from batchdb.backend import Backend, Batch
    from batchdb.manager import BatchDBManager

__all__ = ["LATENCY_BUCKETS", "MAINTENANCE_BUCKETS", "PrometheusMetrics"]

log = logging.getLogger("batchdb.metrics")

#: commit latency and batch write time buckets, seconds: 1 ms … 30 s
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: maintenance task buckets, seconds: 10 ms … 30 min
MAINTENANCE_BUCKETS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0)

_PRIORITY_NAMES = tuple(p.name for p in sorted(Priority, reverse=True))  # CRITICAL first
_MB = 1024 * 1024
_SORT_FROM = 16  # values from which a histogram sorts them to count its buckets
_monotonic = time.monotonic


class _Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum of the values."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def observe_all(self, values: list[float]) -> None:
        """Observe every value of ``values``. Many values are sorted once (a batch's
        latencies come nearly in order, which Timsort takes in one pass) and each bucket's
        count is one bisection. numpy was slower here: its calls release the GIL, and on
        the event loop each one then waited for the writer thread to hand it back (a
        1,000-value batch: 160 µs in a run, against 15 µs alone)."""
        if len(values) < _SORT_FROM:
            for value in values:
                self.observe(value)
            return
        counts = self.counts
        ordered = sorted(values)
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect_right(ordered, bound, below)  # le: value <= bound
            counts[i] += upto - below
            below = upto
        counts[-1] += len(ordered) - below
        self.total += sum(values)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, as the exposition format has them."""
        out = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out

    def copy(self) -> _Histogram:
        other = _Histogram.__new__(_Histogram)
        other.bounds = self.bounds
        other.counts, other.total = list(self.counts), self.total
        return other


def _run_to_end(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run a coroutine that never suspends (``get_queue_status``) in place."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("get_queue_status() suspended: it cannot be read in place")


class PrometheusMetrics(Collector):
    """batchdb's metrics for one running manager, on a prometheus-client registry.

    It is a batchdb plugin (its hook methods observe the manager) and a prometheus-client
    collector. ``registry``: where to expose the metrics (a fresh ``CollectorRegistry`` by
    default, ``exporter.registry``); give your own to serve them with the rest of your
    application's metrics. Hand it to the manager with ``BatchDBManager(...,
    plugins=[exporter])``; :meth:`serve` starts an HTTP endpoint of its own.

    One exporter observes one manager at a time; the counters add up over the manager's
    runs (``stop()`` then ``start()``), the figures read from the status are its current run's.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 status_timeout: float = 5.0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.status_timeout = status_timeout
        self._lock = threading.Lock()
        self._manager: BatchDBManager | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._operations: dict[tuple[str, str, str], int] = {}  # (table, priority, outcome)
        self._rows: dict[str, int] = {}
        self._batches: dict[tuple[str, str], int] = {}  # (table, outcome)
        self._latency: dict[str, _Histogram] = {}  # by priority
        self._write: dict[str, _Histogram] = {}  # by backend
        self._maintenance: dict[str, _Histogram] = {}  # by task
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._url = ""
        self.registry.register(self)

    # ------------------------------------------------------------------ HTTP endpoint
    def serve(self, port: int, host: str = "127.0.0.1") -> str:
        """Serve the registry over HTTP (prometheus-client's ``start_http_server``, in a
        daemon thread) until :meth:`close`; return the endpoint's URL. Port 0 takes a
        free port."""
        if self._server is not None:
            raise BatchDBError(f"the metrics endpoint is already served at {self.url}")
        try:
            self._server, self._thread = start_http_server(port, addr=host,
                                                           registry=self.registry)
        except OSError as exc:
            raise BatchDBError(f"metrics: cannot serve on {host}:{port}: "
                               f"{exc.strerror or exc}") from None
        port = int(self._server.server_port)
        shown = f"[{host}]" if ":" in host else host
        self._url = f"http://{shown}:{port}/metrics"
        return self._url

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` while served, else None."""
        return self._url if self._server is not None else None

    def close(self) -> None:
        """Stop the HTTP endpoint (if served) and wait for its thread."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def batchdb_manager_started(self, manager: BatchDBManager) -> None:
        """Observe ``manager`` (its status is read at scrape time on its event loop)."""
        if self._manager is not None and self._manager is not manager:
            raise BatchDBError("this PrometheusMetrics already observes another running "
                               "manager: give each manager an exporter of its own")
        self._manager = manager
        self._loop = asyncio.get_running_loop()

    @hookimpl
    def batchdb_manager_stopped(self, manager: BatchDBManager) -> None:
        """Stop reading the status of ``manager``; the counters stay."""
        if self._manager is manager:
            self._manager = self._loop = None

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        """Count a committed batch: its operations by priority, rows, latency, write time."""
        ops = batch.operations
        latencies = batch.latencies  # the scheduler's, one per operation
        if latencies is None or len(latencies) != len(ops):
            now = _monotonic()
            latencies = [now - op.enqueued_at for op in ops]
        counts = batch.priority_counts()
        table = batch.table.name
        with self._lock:
            if len(counts) == 1:  # the usual case: one priority, known without a look
                self._committed(table, next(iter(counts)).name, latencies)
            else:
                by_priority: dict[Priority, list[float]] = {}
                for op, latency in zip(ops, latencies, strict=True):
                    by_priority.setdefault(op.priority, []).append(latency)
                for prio in sorted(by_priority, reverse=True):
                    self._committed(table, prio.name, by_priority[prio])
            self._rows[table] = self._rows.get(table, 0) + batch.row_count
            key = (table, "committed")
            self._batches[key] = self._batches.get(key, 0) + 1
            name = backend.name
            write = self._write.get(name)
            if write is None:
                write = self._write[name] = _Histogram(LATENCY_BUCKETS)
            write.observe(seconds)

    def _committed(self, table: str, priority: str, latencies: list[float]) -> None:
        key = (table, priority, "committed")
        self._operations[key] = self._operations.get(key, 0) + len(latencies)
        latency = self._latency.get(priority)
        if latency is None:
            latency = self._latency[priority] = _Histogram(LATENCY_BUCKETS)
        latency.observe_all(latencies)

    @hookimpl
    def batchdb_batch_failed(self, batch: Batch, error: BaseException, backend: Backend) -> None:
        """Count a failed batch and its operations by priority."""
        table = batch.table.name
        counts = batch.priority_counts()
        with self._lock:
            for prio, n in counts.items():
                key = (table, prio.name, "failed")
                self._operations[key] = self._operations.get(key, 0) + n
            key2 = (table, "failed")
            self._batches[key2] = self._batches.get(key2, 0) + 1

    @hookimpl
    def batchdb_maintenance_done(self, task: str, seconds: float, result: dict[str, Any]) -> None:
        """Count a maintenance run and its seconds."""
        with self._lock:
            histogram = self._maintenance.get(task)
            if histogram is None:
                histogram = self._maintenance[task] = _Histogram(MAINTENANCE_BUCKETS)
            histogram.observe(seconds)

    # ------------------------------------------------------------------ collector
    def describe(self) -> Iterable[Metric]:
        """The metric families without samples (a registry checks names with it)."""
        return self._families({}, {}, {}, {}, {}, {}, {"running": False})

    def collect(self) -> Iterable[Metric]:
        """Every family: the per-batch counts, then the manager's status read now."""
        with self._lock:
            operations, rows = dict(self._operations), dict(self._rows)
            batches = dict(self._batches)
            latency = {k: h.copy() for k, h in self._latency.items()}
            write = {k: h.copy() for k, h in self._write.items()}
            maintenance = {k: h.copy() for k, h in self._maintenance.items()}
        return self._families(operations, rows, batches, latency, write, maintenance,
                              self._status())

    def _status(self) -> dict[str, Any] | None:
        """The observed manager's ``get_queue_status()``, computed on its event loop."""
        manager, loop = self._manager, self._loop
        if manager is None or loop is None:
            return None
        try:
            try:
                here = asyncio.get_running_loop()
            except RuntimeError:
                here = None
            if here is loop or not loop.is_running():
                return _run_to_end(manager.get_queue_status())
            future = asyncio.run_coroutine_threadsafe(manager.get_queue_status(), loop)
            try:
                return future.result(self.status_timeout)
            except TimeoutError:
                future.cancel()
                log.warning("metrics: the event loop did not answer within %.1fs; the queue "
                            "figures are left out of this scrape", self.status_timeout)
                return None
        except Exception:
            log.exception("metrics: get_queue_status() failed; the queue figures are left "
                          "out of this scrape")
            return None

    def _families(self, operations: dict[tuple[str, str, str], int], rows: dict[str, int],
                  batches: dict[tuple[str, str], int], latency: dict[str, _Histogram],
                  write: dict[str, _Histogram], maintenance: dict[str, _Histogram],
                  status: dict[str, Any] | None) -> list[Metric]:
        ops = CounterMetricFamily(
            "batchdb_operations", "Operations finished, by table, priority (as queued) and "
            "outcome (committed, failed)", labels=["table", "priority", "outcome"])
        for (table, priority, outcome), n in sorted(operations.items()):
            ops.add_metric([table, priority, outcome], n)
        rows_family = CounterMetricFamily(
            "batchdb_rows_committed", "Rows committed, by table", labels=["table"])
        for table, n in sorted(rows.items()):
            rows_family.add_metric([table], n)
        batches_family = CounterMetricFamily(
            "batchdb_batches", "Batches finished, by table and outcome (committed, failed); "
            "an operation failing alone in a batch counts as a failed batch of its own",
            labels=["table", "outcome"])
        for (table, outcome), n in sorted(batches.items()):
            batches_family.add_metric([table, outcome], n)
        latency_family = HistogramMetricFamily(
            "batchdb_commit_latency_seconds", "Seconds from queue_operation() to COMMIT of "
            "committed operations, by priority (as queued)", labels=["priority"])
        for priority in _PRIORITY_NAMES:
            if priority in latency:
                h = latency[priority]
                latency_family.add_metric([priority], h.buckets(), h.total)
        write_family = HistogramMetricFamily(
            "batchdb_batch_write_seconds", "Seconds the backend took to write a committed "
            "batch, by backend", labels=["backend"])
        for name, h in sorted(write.items()):
            write_family.add_metric([name], h.buckets(), h.total)
        maintenance_family = HistogramMetricFamily(
            "batchdb_maintenance_seconds", "Seconds of maintenance runs, by task (the count "
            "is the number of runs)", labels=["task"])
        for task, h in sorted(maintenance.items()):
            maintenance_family.add_metric([task], h.buckets(), h.total)
        families: list[Metric] = [ops, rows_family, batches_family, latency_family,
                                  write_family, maintenance_family]
        if status is not None:
            families.extend(self._status_families(status))
        return families

    @staticmethod
    def _status_families(status: dict[str, Any]) -> list[Metric]:
        """Families read from ``get_queue_status()`` (empty for ``describe``)."""
        present = bool(status.get("running"))

        def gauge(name: str, doc: str, value: float | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value if present else None)

        def counter(name: str, doc: str, value: float | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value if present else None)

        def by_priority(family: GaugeMetricFamily, values: dict[str, float],
                        scale: float = 1.0) -> GaugeMetricFamily:
            for priority in _PRIORITY_NAMES if present else ():
                family.add_metric([priority], values.get(priority, 0) * scale)
            return family

        stats = status.get("stats", {})
        callbacks = status.get("callbacks", {})
        return [
            by_priority(GaugeMetricFamily(
                "batchdb_queue_operations", "Operations queued, by priority (of the queue "
                "they wait in)", labels=["priority"]), status.get("queue_sizes", {})),
            by_priority(GaugeMetricFamily(
                "batchdb_queue_memory_bytes", "Estimated memory of the queued rows, by "
                "priority", labels=["priority"]), status.get("queue_memory_mb", {}), _MB),
            by_priority(GaugeMetricFamily(
                "batchdb_queue_oldest_wait_seconds", "Age of the oldest queued operation, by "
                "priority", labels=["priority"]), status.get("oldest_wait_seconds", {})),
            gauge("batchdb_batches_in_flight", "Batches handed to the backend and not "
                  "finished", status.get("batches_in_flight")),
            counter("batchdb_batch_retries_total", "Retries of batches after transient "
                    "errors (locked, busy, connection lost), the backend's own included",
                    stats.get("retries")),
            counter("batchdb_batch_splits_total", "Batches split in halves to isolate an "
                    "operation with bad data", stats.get("splits")),
            counter("batchdb_promotions_total", "Operations moved to a higher priority's "
                    "queue behind a later write of the same key", stats.get("promotions")),
            gauge("batchdb_callbacks_pending", "Finished operations whose callback has not "
                  "run yet", callbacks.get("pending")),
            gauge("batchdb_callbacks_running_late", "Callbacks past their timeout and still "
                  "running", callbacks.get("running_late")),
            counter("batchdb_callbacks_timed_out_total", "Callbacks abandoned or cancelled "
                    "at their timeout", callbacks.get("timed_out")),
            counter("batchdb_callbacks_raised_total", "Callbacks that raised an exception",
                    callbacks.get("raised")),
        ]
