"""Benchmark cases and runs: what runs where, the timed part, the targets, the comparison.

Every run gets a fresh database (a new file, or a freshly created PostgreSQL schema
``batchdb_bench``) and its data already in memory; only the writing is timed: for raw,
connect + tune + write + close; for batchdb, ``start()`` + queueing + ``flush()`` +
``stop()`` (building the manager and loading its plugins happens before). After each run
the rows are read back and checked, untimed, so a fast but wrong run is an error, not a
number. Garbage is collected before each timed part, so every run starts from the same
collector state.

Peak memory is the growth of the process's resident set during the timed part: the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` when the run starts)
minus the resident set at the start (:class:`MemoryProbe`). :func:`run_comparison` runs each
run in its own process (``multiprocessing`` spawn), so no run inherits another's peak.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import math
import secrets
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchdb.backend import Backend, Batch
from batchdb.hookspecs import hookimpl
from batchdb.manager import BatchDBManager
from batchdb.models import BatchOperation, OperationType, Priority
from batchdb.stats import latency_summary

from .baselines import (
    BACKENDS,
    CANDLE_KEY,
    SQLiteStore,
    Store,
    backend_unavailable,
    make_store,
    normalize_upbit_raw,
)
from .data import (
    CALL_ROWS,
    SYMBOLS,
    T0_MS,
    TIMEFRAME,
    WORKLOADS,
    DataCache,
    candle_rows,
    candle_tuples,
    order_rows,
    upbit_calls,
    workload_rows,
)
from .report import ProgressCallback, commit_info, machine_info, write_json, write_plot

__all__ = [
    "COMPARISON_WORKLOADS",
    "CRITICAL_P99_TARGET_MS",
    "FLOOD_BUDGET_MB",
    "FLOOD_GROWTH_TARGET_MB",
    "IMPLEMENTATIONS",
    "ONE_ROW_TARGET",
    "TARGET_MARGIN",
    "BenchReport",
    "BenchResult",
    "Case",
    "MemoryProbe",
    "PreparedRun",
    "RunResult",
    "TargetCheck",
    "aggregate",
    "cases",
    "execute_case",
    "prepare_run",
    "proc_status",
    "run_comparison",
    "run_isolated",
]

#: what ``batchdb bench`` runs unless told otherwise
COMPARISON_WORKLOADS: tuple[str, ...] = ("upsert_new", "upsert_existing", "one_row",
                                         "upbit_candles")

#: (workload, backend) -> implementations, raw first (the ratios are taken against it).
#: ``raw-values``: the SQLite raw path with the technique batchdb's writer uses (multi-row
#: VALUES statements instead of executemany), so both baselines are in the same run.
IMPLEMENTATIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("upsert_new", "sqlite"): ("raw", "raw-values", "batchdb", "sqlite-utils"),
    ("upsert_new", "duckdb"): ("raw", "batchdb"),
    ("upsert_new", "postgres"): ("raw", "batchdb"),
    ("upsert_existing", "sqlite"): ("raw", "raw-values", "batchdb"),
    ("upsert_existing", "duckdb"): ("raw", "batchdb"),
    ("upsert_existing", "postgres"): ("raw", "batchdb"),
    ("upbit_candles", "sqlite"): ("raw", "raw-values", "batchdb"),
    ("upbit_candles", "duckdb"): ("raw", "batchdb"),
    ("upbit_candles", "postgres"): ("raw", "batchdb"),
    ("one_row", "sqlite"): ("raw", "batchdb"),
    ("one_row", "duckdb"): ("batchdb",),
    ("one_row", "postgres"): ("batchdb",),
    ("critical_latency", "sqlite"): ("batchdb",),
    ("critical_latency", "duckdb"): ("batchdb",),
    ("critical_latency", "postgres"): ("batchdb",),
    ("memory_flood", "sqlite"): ("batchdb",),
    ("memory_flood", "duckdb"): ("batchdb",),
    ("memory_flood", "postgres"): ("batchdb",),
}

CRITICAL_INTERVAL_SECONDS = 0.005
FLOOD_BUDGET_MB = 64.0
FLOOD_PRODUCERS = 4
_MB = 1024 * 1024


# ====================================================================== memory
def proc_status() -> dict[str, int]:
    """The ``Vm*``/``Rss*`` lines of /proc/self/status in bytes (empty where unavailable)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("Vm", "Rss")):
                    key, _, value = line.partition(":")
                    parts = value.split()
                    if len(parts) == 2 and parts[1] == "kB":
                        out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class MemoryProbe:
    """Peak resident-set growth of this process while the ``with`` block runs.

    ``peak_delta`` is ``VmHWM`` (reset at entry) minus ``VmRSS`` at entry. With a
    ``sample_interval`` a thread also samples ``RssAnon`` (the heap, without the file
    pages SQLite maps) for ``anon_peak_delta``. Without /proc (not Linux) the lifetime
    ``ru_maxrss`` growth is used: a lower bound.
    """

    def __init__(self, sample_interval: float | None = None) -> None:
        self.sample_interval = sample_interval
        self.start_rss = 0
        self.start_anon: int | None = None
        self.peak_delta = 0
        self.anon_peak_delta: int | None = None
        self.exact = False
        self._anon_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_maxrss = 0

    def _sample(self) -> None:
        interval = self.sample_interval or 0.01
        while not self._stop.wait(interval):
            anon = proc_status().get("RssAnon")
            if anon is not None and anon > self._anon_peak:
                self._anon_peak = anon

    def __enter__(self) -> MemoryProbe:
        self.exact = _reset_peak_rss()
        status = proc_status()
        self.start_rss = status.get("VmRSS", 0)
        self.start_anon = status.get("RssAnon")
        self._anon_peak = self.start_anon or 0
        self._start_maxrss = _maxrss_bytes()
        if self.sample_interval and self.start_anon is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="batchdb-bench-memory",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        status = proc_status()
        if self.exact and "VmHWM" in status:
            self.peak_delta = max(0, status["VmHWM"] - self.start_rss)
        else:
            self.peak_delta = max(0, _maxrss_bytes() - max(self._start_maxrss, self.start_rss))
        if self.start_anon is not None and "RssAnon" in status:
            peak = max(self._anon_peak, status["RssAnon"])
            self.anon_peak_delta = max(0, peak - self.start_anon)

# ====================================================================== runs
@dataclass(frozen=True)
class Case:
    """One implementation of one workload on one backend."""

    workload: str
    backend: str
    implementation: str

    @property
    def param(self) -> str:
        """``backend-implementation``, the pytest parameter id."""
        return f"{self.backend}-{self.implementation}"

    @property
    def name(self) -> str:
        """``workload[backend-implementation]``."""
        return f"{self.workload}[{self.param}]"

    @property
    def label(self) -> str:
        """The implementation, as a reader knows it (``sqlite3 raw``, ``batchdb``…)."""
        if self.implementation == "raw":
            return {"sqlite": "sqlite3 raw", "duckdb": "duckdb Arrow raw",
                    "postgres": "psycopg COPY raw"}.get(self.backend, "raw")
        if self.implementation == "raw-values":
            return "sqlite3 raw, multi-row VALUES"
        return self.implementation

    @property
    def long_label(self) -> str:
        """Backend and implementation (``sqlite: batchdb``), for the chart's legend."""
        return f"{self.backend}: {self.label}"


def cases(backends: Sequence[str] = BACKENDS,
          workloads: Sequence[str] = WORKLOADS) -> list[Case]:
    """Every (workload, backend, implementation) to run, raw before the others."""
    out = []
    for workload in workloads:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
        for backend in backends:
            for impl in IMPLEMENTATIONS.get((workload, backend), ()):
                out.append(Case(workload, backend, impl))
    return out


@dataclass
class RunResult:
    """One timed run: seconds, rows, peak memory growth, and workload figures."""

    case: Case
    rows: int
    seconds: float
    peak_rss_bytes: int
    peak_anon_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        """Rows written per second."""
        return self.rows / self.seconds if self.seconds > 0 else math.inf


class PreparedRun:
    """A run ready to go: fresh database, data in memory, manager built.

    :meth:`run` is the timed part; :meth:`finish` checks what was written and removes
    the database. For pytest-benchmark: ``setup`` = :func:`prepare_run`, ``target`` =
    :meth:`run`, ``teardown`` = :meth:`finish`.
    """

    def __init__(self, case: Case, rows: int, store: Store,
                 body: Callable[[], dict[str, Any] | None],
                 verify: Callable[[dict[str, Any]], None],
                 sample_interval: float | None = None) -> None:
        self.case = case
        self.rows = rows
        self.store = store
        self._body = body
        self._verify = verify
        self._sample_interval = sample_interval
        self.seconds: float | None = None
        self.probe: MemoryProbe | None = None
        self.extra: dict[str, Any] = {}
        self.result: RunResult | None = None

    def run(self) -> None:
        """Write the data (timed)."""
        probe = MemoryProbe(self._sample_interval)
        try:
            with probe:
                start = time.perf_counter()
                extra = self._body()
                self.seconds = time.perf_counter() - start
        finally:
            gc.unfreeze()
        self.probe = probe
        self.extra.update(extra or {})

    def finish(self) -> RunResult:
        """Check the database holds what was written, remove it, return the result."""
        try:
            if self.seconds is None or self.probe is None:
                raise RuntimeError(f"{self.case.name}: finish() before run()")
            self._verify(self.extra)
            self.result = RunResult(self.case, self.rows, self.seconds, self.probe.peak_delta,
                                    self.probe.anon_peak_delta, dict(self.extra))
            return self.result
        finally:
            gc.unfreeze()  # when run() never ran
            self.store.remove()


def _check(store: Store, table: str, expect_rows: int, column: str | None = None,
           expect_sum: float | None = None) -> None:
    if column is None:
        found = store.query(f"SELECT count(*) FROM {table}")[0]  # noqa: S608 - fixed names
        count, total = found[0], None
    else:
        count, total = store.query(f"SELECT count(*), sum({column}) FROM {table}")[0]  # noqa: S608
    if count != expect_rows:
        raise AssertionError(f"{table}: {count} rows written, expected {expect_rows}")
    if expect_sum is not None and not math.isclose(float(total or 0.0), expect_sum, rel_tol=1e-9):
        raise AssertionError(f"{table}: sum({column}) is {total}, expected {expect_sum} "
                             "(rows not written or not updated)")


def _run_async(main: Callable[[], Coroutine[Any, Any, dict[str, Any] | None]]
               ) -> Callable[[], dict[str, Any] | None]:
    def body() -> dict[str, Any] | None:
        return asyncio.run(main())

    return body


async def _queue_all(manager: BatchDBManager, table: str, rows: Sequence[Mapping[str, Any]],
                     op: OperationType, priority: Priority = Priority.NORMAL) -> None:
    for i in range(0, len(rows), CALL_ROWS):
        await manager.queue_operation(table, op, rows[i:i + CALL_ROWS], priority)


class _BatchTimes:
    """A plugin recording how long each committed batch took, by priority (from handing it
    to the backend to its commit), to explain the CRITICAL latencies."""

    def __init__(self) -> None:
        self.seconds: dict[Priority, list[float]] = {p: [] for p in Priority}

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        self.seconds[batch.operations[0].priority].append(seconds)

    def summary(self) -> dict[str, Any]:
        return {p.name: latency_summary(v) for p, v in self.seconds.items() if v}


def _critical_body(manager: BatchDBManager, backlog: Sequence[Mapping[str, Any]],
                   interval: float, batch_times: _BatchTimes
                   ) -> Callable[[], dict[str, Any] | None]:
    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        failures: list[str] = []
        async with manager:
            draining = True

            async def critical() -> int:
                i = 0
                while draining:
                    start = time.perf_counter()

                    def done(op: BatchOperation, start: float = start) -> None:
                        if op.error is None:
                            latencies.append(time.perf_counter() - start)
                        else:
                            failures.append(op.error)

                    await manager.queue_operation("orders", OperationType.INSERT,
                                                  order_rows(1, i), Priority.CRITICAL, done)
                    i += 1
                    await asyncio.sleep(interval)
                return i

            writer = asyncio.create_task(critical())
            await _queue_all(manager, "candles", backlog, OperationType.UPSERT, Priority.LOW)
            await manager.flush()
            draining = False
            written = await writer
            await manager.flush()
        if failures:
            raise AssertionError(f"{len(failures)} CRITICAL writes failed: {failures[0]}")
        lat = latency_summary(latencies)
        return {"critical_writes": written, "critical_latency": lat,
                "critical_interval_ms": interval * 1000, "batch_ms": batch_times.summary(),
                "_latencies": latencies}

    return _run_async(main)


def _flood_body(manager: BatchDBManager, n: int, producers: int
                ) -> Callable[[], dict[str, Any] | None]:
    # prices and volumes are built once; every row is a new dict with a new key, as a
    # producer decoding a feed would make them
    templates = candle_rows(CALL_ROWS)

    def make(block: int) -> list[dict[str, Any]]:
        symbol = SYMBOLS[block % len(SYMBOLS)]
        base = T0_MS + block // len(SYMBOLS) * CALL_ROWS * 60_000
        count = min(CALL_ROWS, n - block * CALL_ROWS)
        return [{**row, "symbol": symbol, "ts": base + j * 60_000}
                for j, row in enumerate(templates[:count])]

    blocks = math.ceil(n / CALL_ROWS)

    async def main() -> dict[str, Any]:
        queued_peak = 0.0
        async with manager:
            done = False

            async def sample() -> None:
                nonlocal queued_peak
                while not done:
                    status = await manager.get_queue_status()
                    queued_peak = max(queued_peak, float(status["estimated_memory_mb"]))
                    await asyncio.sleep(0.01)

            async def produce(k: int) -> None:
                for block in range(k, blocks, producers):
                    await manager.queue_operation("candles", OperationType.UPSERT, make(block))

            sampler = asyncio.create_task(sample())
            await asyncio.gather(*(produce(k) for k in range(producers)))
            await manager.flush()
            done = True
            await sampler
        return {"queued_peak_mb": round(queued_peak, 2)}

    # how fast the producers are on their own (untimed): rows built per second
    start = time.perf_counter()
    made = 0
    while time.perf_counter() - start < 0.2:
        made += len(make(0))
    producer_rate = made / (time.perf_counter() - start)

    body = _run_async(main)

    def run() -> dict[str, Any] | None:
        extra = body() or {}
        extra["producer_rows_per_s"] = round(producer_rate)
        return extra

    return run


def prepare_run(case: Case, rows: int, workdir: Path, *, pg_dsn: str | None = None,
                cache: DataCache | None = None) -> PreparedRun:
    """Build everything ``case`` needs (database, data, manager); nothing is timed yet.

    ``rows`` is the benchmark size (see :func:`workload_rows`); ``cache`` lets runs
    share their data sets.
    """
    if (case.workload, case.backend) not in IMPLEMENTATIONS or \
            case.implementation not in IMPLEMENTATIONS[(case.workload, case.backend)]:
        raise ValueError(f"no such benchmark case: {case.name}")
    cache = cache or DataCache(0)
    n = workload_rows(case.workload, rows)
    store = make_store(case.backend, workdir, pg_dsn)
    store.reset()
    try:
        prepared = _prepare(case, n, store, cache)
    except BaseException:
        store.remove()
        raise
    # every run starts from the same collector state: building the data leaves young
    # objects that would otherwise make the first collections of the timed part expensive.
    # The input data (up to millions of rows kept for the next runs) is then frozen out of
    # the collector until the run ends, for raw drivers and batchdb alike: otherwise each
    # full collection the timed part triggers walks the benchmark's own data set.
    gc.collect()
    gc.freeze()
    return prepared


def _prepare(case: Case, n: int, store: Store, cache: DataCache) -> PreparedRun:
    prepare = {
        "upsert_new": _prepare_upsert,
        "upsert_existing": _prepare_upsert,
        "upbit_candles": _prepare_candles,
        "one_row": _prepare_one_row,
        "critical_latency": _prepare_critical,
        "memory_flood": _prepare_flood,
    }[case.workload]
    return prepare(case, n, store, cache)


def _prepare_upsert(case: Case, n: int, store: Store, cache: DataCache) -> PreparedRun:
    data: list[dict[str, Any]] = cache.get(("candle_rows", n, 0), lambda: candle_rows(n))
    if case.workload == "upsert_existing":
        store.upsert_tuples(cache.get(("candle_tuples", n, 1),
                                      lambda: candle_tuples(n, variant=1)))
    expect = math.fsum(r["open_price"] for r in data)

    def verify(extra: dict[str, Any]) -> None:
        _check(store, "candles", n, "open_price", expect)

    def raw() -> None:
        store.upsert_dicts(data)

    def raw_values() -> None:
        assert isinstance(store, SQLiteStore)
        store.upsert_dicts(data, store.write_dicts_values)

    def sqlite_utils_upsert() -> None:
        import sqlite_utils

        assert isinstance(store, SQLiteStore)
        conn = store.connect(autocommit=False)
        try:
            sqlite_utils.Database(conn).table("candles").upsert_all(data, pk=CANDLE_KEY)
            conn.commit()
        finally:
            conn.close()

    body: Callable[[], dict[str, Any] | None]
    if case.implementation == "raw":
        body = raw
    elif case.implementation == "raw-values":
        body = raw_values
    elif case.implementation == "sqlite-utils":
        body = sqlite_utils_upsert
    else:
        manager = BatchDBManager(settings=store.settings())

        async def main() -> None:
            async with manager:
                await _queue_all(manager, "candles", data, OperationType.UPSERT)
                await manager.flush()

        body = _run_async(main)
    return PreparedRun(case, n, store, body, verify)


def _prepare_candles(case: Case, n: int, store: Store, cache: DataCache) -> PreparedRun:
    calls: list[tuple[str, list[dict[str, Any]]]] = cache.get(("upbit", n),
                                                             lambda: upbit_calls(n))
    expect = math.fsum(c["opening_price"] for _, cs in calls for c in cs)

    def verify(extra: dict[str, Any]) -> None:
        _check(store, "candles", n, "open_price", expect)

    def raw() -> None:
        conn = store.connect()
        write = store.write_tuples
        if case.implementation == "raw-values":
            assert isinstance(store, SQLiteStore)
            write = store.write_values
        try:
            size = store.batch_size
            buf: list[tuple[Any, ...]] = []
            for market, candles in calls:
                buf += normalize_upbit_raw(market, TIMEFRAME, candles, int(time.time() * 1000))
                if len(buf) >= size:
                    write(conn, buf[:size])
                    del buf[:size]
            if buf:
                write(conn, buf)
        finally:
            store.close(conn)

    if case.implementation in ("raw", "raw-values"):
        return PreparedRun(case, n, store, raw, verify)
    manager = BatchDBManager(settings=store.settings())

    async def main() -> None:
        async with manager:
            for market, candles in calls:
                await manager.insert_candles_batch(market, TIMEFRAME, candles)
            await manager.flush()

    return PreparedRun(case, n, store, _run_async(main), verify)


def _prepare_one_row(case: Case, n: int, store: Store, cache: DataCache) -> PreparedRun:
    orders: list[dict[str, Any]] = cache.get(("orders", n), lambda: order_rows(n))
    expect = math.fsum(r["price"] for r in orders)

    def verify(extra: dict[str, Any]) -> None:
        _check(store, "orders", n, "price", expect)

    def raw() -> None:
        assert isinstance(store, SQLiteStore)
        store.insert_one_by_one(orders)

    if case.implementation == "raw":
        return PreparedRun(case, n, store, raw, verify)
    manager = BatchDBManager(settings=store.settings())

    async def main() -> None:
        async with manager:
            queue = manager.queue_operation
            insert = OperationType.INSERT
            for i in range(n):
                await queue("orders", insert, orders[i:i + 1])
            await manager.flush()

    return PreparedRun(case, n, store, _run_async(main), verify)


def _prepare_critical(case: Case, n: int, store: Store, cache: DataCache) -> PreparedRun:
    backlog: list[dict[str, Any]] = cache.get(("candle_rows", n, 0), lambda: candle_rows(n))
    batch_times = _BatchTimes()
    manager = BatchDBManager(settings=store.settings(), plugins=[batch_times])

    def verify(extra: dict[str, Any]) -> None:
        _check(store, "candles", n)
        _check(store, "orders", int(extra["critical_writes"]))

    return PreparedRun(case, n, store, _critical_body(manager, backlog,
                                                      CRITICAL_INTERVAL_SECONDS, batch_times),
                       verify)


def _prepare_flood(case: Case, n: int, store: Store, cache: DataCache) -> PreparedRun:
    manager = BatchDBManager(settings=store.settings(max_memory_mb=FLOOD_BUDGET_MB))

    def verify(extra: dict[str, Any]) -> None:
        _check(store, "candles", n)

    return PreparedRun(case, n, store, _flood_body(manager, n, FLOOD_PRODUCERS), verify,
                       sample_interval=0.005)


WARMUP_ROWS = 2000


def execute_case(case: Case, rows: int, workdir: str, pg_dsn: str | None = None,
                 warmup: bool = False) -> RunResult:
    """Prepare, run (timed) and check one run; the entry point of each child process.

    ``warmup`` first runs the case once with a few rows (untimed), so that a fresh process
    does not count its first-use costs (lazy imports, caches, thread start-up) in the run.
    """
    if warmup:
        first = prepare_run(case, min(rows, WARMUP_ROWS), Path(workdir), pg_dsn=pg_dsn)
        first.run()
        first.finish()
    prepared = prepare_run(case, rows, Path(workdir), pg_dsn=pg_dsn)
    prepared.run()
    return prepared.finish()


# ====================================================================== aggregation
_RATIO_TARGETS: dict[tuple[str, str], float] = {
    ("upsert_new", "sqlite"): 0.9, ("upsert_existing", "sqlite"): 0.9,
    ("upbit_candles", "sqlite"): 0.75,
    ("upsert_new", "duckdb"): 0.8, ("upsert_existing", "duckdb"): 0.8,
    ("upbit_candles", "duckdb"): 0.75,
    ("upsert_new", "postgres"): 0.8, ("upsert_existing", "postgres"): 0.8,
    ("upbit_candles", "postgres"): 0.75,
}
ONE_ROW_TARGET = 100_000.0
CRITICAL_P99_TARGET_MS = 25.0
FLOOD_GROWTH_TARGET_MB = 2 * FLOOD_BUDGET_MB




#: the slack of an enforced target (``pytest benchmarks/ --bench-enforce``): a lower bound is
#: met at 90% of it and an upper bound at 110%, so that the noise of a shared machine does not
#: fail a run that is on target, while a real regression (a tenth off or worse) does
TARGET_MARGIN = 0.10


@dataclass(frozen=True)
class TargetCheck:
    """A result held to its design target: the figure measured, the goal, which way is better.

    :attr:`met` is the target itself (what the report's ✓/✗ shows); :meth:`met_within`
    allows a relative ``margin`` (see :data:`TARGET_MARGIN`) for a run that enforces it.
    """

    text: str
    measured: float
    goal: float
    #: True: the measured figure must be at least the goal; False: at most
    at_least: bool
    unit: str

    @property
    def met(self) -> bool:
        """The measured figure is on the right side of the goal."""
        return self.met_within(0.0)

    def bound(self, margin: float) -> float:
        """The goal moved by ``margin`` the way :meth:`met_within` allows."""
        return self.goal * (1.0 - margin if self.at_least else 1.0 + margin)

    def met_within(self, margin: float) -> bool:
        """The measured figure is on the right side of :meth:`bound` (0.1: at least 90% of
        a lower bound, at most 110% of an upper bound). NaN never is."""
        if self.at_least:
            return self.measured >= self.bound(margin)
        return self.measured <= self.bound(margin)

    def show(self, value: float) -> str:
        """A figure of this target with its unit (``0.93x raw``, ``123,456 rows/s``)."""
        if self.unit == "x raw":
            return f"{value:.2f}x raw"
        if self.unit == "rows/s":
            return f"{value:,.0f} rows/s"
        return f"{value:.1f} {self.unit}"

    @property
    def shown(self) -> str:
        """The measured figure with its unit."""
        return self.show(self.measured)


@dataclass
class BenchResult:
    """Every round of one case, summed up."""

    case: Case
    rows: int
    seconds: list[float]
    peak_rss_mb: float
    peak_anon_mb: float | None = None
    ratio_to_raw: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def median_seconds(self) -> float:
        """Median seconds of the rounds."""
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def rows_per_s(self) -> float:
        """Rows per second at the median round."""
        s = self.median_seconds
        return self.rows / s if s and s > 0 and not math.isnan(s) else math.nan

    def target(self) -> tuple[str, bool] | None:
        """The design target this result is held to (text, met), if it has one."""
        check = self.target_check()
        return None if check is None else (check.text, check.met)

    def target_check(self) -> TargetCheck | None:
        """The design target this result is held to, with the figure measured for it."""
        w, b = self.case.workload, self.case.backend
        if self.error is not None or self.case.implementation != "batchdb":
            return None
        if (w, b) in _RATIO_TARGETS and self.ratio_to_raw is not None:
            goal = _RATIO_TARGETS[(w, b)]
            return TargetCheck(f"≥ {goal:.2f}x raw", self.ratio_to_raw, goal, True, "x raw")
        if w == "one_row" and b == "sqlite":
            return TargetCheck(f"≥ {ONE_ROW_TARGET / 1000:.0f}k rows/s", self.rows_per_s,
                               ONE_ROW_TARGET, True, "rows/s")
        if w == "critical_latency" and b == "sqlite":
            p99 = self.extra.get("critical_latency", {}).get("p99_ms")
            if p99 is not None:
                return TargetCheck(f"p99 ≤ {CRITICAL_P99_TARGET_MS:.0f} ms", float(p99),
                                   CRITICAL_P99_TARGET_MS, False, "ms")
        if w == "memory_flood":
            return TargetCheck(f"RSS growth ≤ {FLOOD_GROWTH_TARGET_MB:.0f} MB",
                               self.peak_rss_mb, FLOOD_GROWTH_TARGET_MB, False, "MB")
        return None

    def extra_info(self) -> dict[str, Any]:
        """What goes into pytest-benchmark's ``extra_info``."""
        info: dict[str, Any] = {
            "workload": self.case.workload,
            "backend": self.case.backend,
            "implementation": self.case.implementation,
            "rows": self.rows,
            "rows_per_s": None if math.isnan(self.rows_per_s) else round(self.rows_per_s),
            "ratio_to_raw": None if self.ratio_to_raw is None else round(self.ratio_to_raw, 4),
            "peak_rss_delta_mb": round(self.peak_rss_mb, 2),
        }
        if self.peak_anon_mb is not None:
            info["peak_anon_delta_mb"] = round(self.peak_anon_mb, 2)
        target = self.target()
        if target is not None:
            info["target"], info["target_met"] = target
        info.update(self.extra)
        if self.error is not None:
            info["error"] = self.error
        return info


def aggregate(case: Case, runs: Sequence[RunResult], raw: BenchResult | None = None
              ) -> BenchResult:
    """Sum up the rounds of ``case``; ``raw`` is the raw result of the same workload and
    backend, for the ratio."""
    if not runs:
        raise ValueError(f"{case.name}: no runs to aggregate")
    extra: dict[str, Any] = {}
    latencies = [v for r in runs for v in r.extra.get("_latencies", ())]
    for r in runs:
        for key, value in r.extra.items():
            if not key.startswith("_"):
                extra.setdefault(key, value)
    if latencies or "critical_latency" in extra:
        extra["critical_latency"] = latency_summary(latencies)
        extra["critical_latency_per_round"] = [
            latency_summary(r.extra.get("_latencies", ())) for r in runs]
        extra["critical_writes"] = sum(int(r.extra.get("critical_writes", 0)) for r in runs)
    if "queued_peak_mb" in extra:
        extra["queued_peak_mb"] = max(float(r.extra.get("queued_peak_mb", 0)) for r in runs)
        extra["budget_mb"] = FLOOD_BUDGET_MB
    anon = [r.peak_anon_bytes for r in runs if r.peak_anon_bytes is not None]
    result = BenchResult(
        case=case, rows=runs[0].rows, seconds=[r.seconds for r in runs],
        peak_rss_mb=max(r.peak_rss_bytes for r in runs) / _MB,
        peak_anon_mb=max(anon) / _MB if anon else None, extra=extra,
    )
    if raw is not None and raw is not result and raw.error is None \
            and not math.isnan(raw.rows_per_s):
        result.ratio_to_raw = result.rows_per_s / raw.rows_per_s
    return result


# ====================================================================== the comparison
@dataclass
class BenchReport:
    """What :func:`run_comparison` measured, and where it wrote the JSON and the chart."""

    rows: int
    rounds: int
    results: list[BenchResult]
    #: what did not run, by backend (or ``sqlite-utils``, ``chart``), with the reason
    skipped: dict[str, str]
    json_path: Path | None = None
    png_path: Path | None = None
    machine_info: dict[str, Any] = field(default_factory=dict)
    commit_info: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""

    def result(self, workload: str, backend: str, implementation: str) -> BenchResult | None:
        """The result of one case, if it ran."""
        for r in self.results:
            c = r.case
            if (c.workload, c.backend, c.implementation) == (workload, backend, implementation):
                return r
        return None



def run_comparison(
    backends: list[str],
    rows: int,
    out_dir: Path,
    progress: ProgressCallback | None = None,
    *,
    rounds: int = 3,
    workloads: Sequence[str] = COMPARISON_WORKLOADS,
    pg_dsn: str | None = None,
    isolate: bool = True,
) -> BenchReport:
    """Run raw drivers and batchdb side by side on this machine and report.

    ``backends``: any of ``sqlite``, ``duckdb``, ``postgres``; a backend that cannot run
    here (driver or plugin missing, no PostgreSQL DSN: ``pg_dsn`` or ``$BATCHDB_BENCH_PG_DSN``)
    is skipped and its reason kept in ``report.skipped``. ``rows`` per run (one_row writes a
    tenth). Rounds are interleaved: round 1 of every case, then round 2…, so that noise hits
    raw and batchdb alike. Each run executes in a fresh spawned process (``isolate``), so its
    peak memory is its own; its database lives in a temporary folder under ``out_dir``,
    removed at the end. Writes ``out_dir/batchdb-bench.json`` (pytest-benchmark layout) and
    ``out_dir/batchdb-bench.png``. A run that fails is reported as an error for its case;
    the others go on. With ``isolate``, call it from a script only under
    ``if __name__ == "__main__":`` (multiprocessing's spawn imports the main module).
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    started = dt.datetime.now(dt.UTC).isoformat()
    skipped: dict[str, str] = {}
    usable = []
    for backend in dict.fromkeys(backends):
        reason = backend_unavailable(backend, pg_dsn)
        if reason is None:
            usable.append(backend)
        else:
            skipped[backend] = reason
    todo = cases(usable, workloads)
    if any(c.implementation == "sqlite-utils" for c in todo) and not _importable("sqlite_utils"):
        todo = [c for c in todo if c.implementation != "sqlite-utils"]
        skipped["sqlite-utils"] = ("sqlite-utils: not installed (pip install 'batchdb[bench]'), "
                                   "its upsert_all peer is left out")
    total = len(todo) * rounds
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = out_dir / f"tmp-{secrets.token_hex(4)}"
    workdir.mkdir()
    runs: dict[Case, list[RunResult]] = {c: [] for c in todo}
    errors: dict[Case, str] = {}
    done = 0
    try:
        for r in range(rounds):
            for case in todo:
                if progress is not None:
                    progress(done, total, f"round {r + 1}/{rounds}: {case.name}")
                if case not in errors:
                    try:
                        if isolate:
                            result = run_isolated(case, rows, workdir, pg_dsn)
                        else:
                            result = execute_case(case, rows, str(workdir), pg_dsn)
                        runs[case].append(result)
                    except Exception as exc:
                        errors[case] = f"{type(exc).__name__}: {exc}"
                done += 1
        if progress is not None:
            progress(done, total, "done")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results: list[BenchResult] = []
    raws: dict[tuple[str, str], BenchResult] = {}
    for case in todo:
        if case in errors or not runs[case]:
            results.append(BenchResult(case, workload_rows(case.workload, rows), [], 0.0,
                                       error=errors.get(case, "no run finished")))
            continue
        res = aggregate(case, runs[case], raws.get((case.workload, case.backend)))
        if case.implementation == "raw":
            raws[(case.workload, case.backend)] = res
        results.append(res)
    report = BenchReport(rows=rows, rounds=rounds, results=results, skipped=skipped,
                         machine_info=machine_info(), commit_info=commit_info(),
                         started_at=started)
    report.json_path = write_json(report, out_dir / "batchdb-bench.json")
    if _importable("matplotlib"):
        report.png_path = write_plot(report, out_dir / "batchdb-bench.png")
    else:
        report.skipped["chart"] = ("chart: matplotlib is not installed (pip install "
                                   "'batchdb[bench]'), no PNG written")
    return report


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_isolated(case: Case, rows: int, workdir: Path, pg_dsn: str | None = None) -> RunResult:
    """:func:`execute_case` in a fresh spawned process (after a small untimed warm-up run
    there), so the run's peak memory is its own. From a script, call it under
    ``if __name__ == "__main__":`` (multiprocessing's spawn imports the main module)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(execute_case, case, rows, str(workdir), pg_dsn, True).result()

