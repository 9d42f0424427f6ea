"""Benchmark workloads: raw drivers and batchdb side by side, one implementation of each.

The pytest-benchmark suites in ``benchmarks/`` and ``batchdb bench`` (:func:`run_comparison`)
both import the workloads from here, so the two never measure different code.

Workloads (``WORKLOADS``), each run by several *implementations* on several *backends*:

``upsert_new``
    Upsert rows whose keys are not in the table yet (generic candle dicts).
    raw: the driver's fastest path at the backend's batch size (SQLite: BEGIN IMMEDIATE /
    ``executemany`` of ``itemgetter`` tuples / COMMIT per 1000 rows; DuckDB: an Arrow table
    per 50k rows, ``INSERT … ON CONFLICT DO UPDATE`` from it; PostgreSQL: binary COPY into a
    temporary staging table, ``INSERT … SELECT … ON CONFLICT``). batchdb: 1000-row
    ``queue_operation(UPSERT)`` calls, then ``flush()``. SQLite also runs raw-values (the
    raw path with one multi-row ``VALUES`` statement per 1000 rows instead of ``executemany``,
    the technique batchdb's SQLite writer uses) and sqlite-utils ``upsert_all``, the peer
    a Python user would otherwise pick.
``upsert_existing``
    The same, into a table that already holds the same keys with other values.
``upbit_candles``
    Upbit candle JSON. raw: per-row ``datetime.fromisoformat`` into tuples, then the raw
    upsert (SQLite: also raw-values); batchdb: ``insert_candles_batch`` in 1000-candle calls.
``one_row``
    ``rows // 10`` single-row INSERTs into an ``orders`` table. raw (SQLite only): one
    ``execute`` per row, COMMIT per 1000 rows; batchdb: one ``queue_operation`` per row.
``critical_latency``
    batchdb only: a LOW backlog of ``rows`` rows queued as 1000-row operations while a
    CRITICAL single-row write is queued every 5 ms; each write's enqueue→commit latency.
``memory_flood``
    batchdb only, ``max_memory_mb = 64``: producers build new rows much faster than the
    database takes them; the process's peak RSS growth is the result.

Every run gets a fresh database (a new file, or a freshly created PostgreSQL schema
``batchdb_bench``) and its data already in memory; only the writing is timed: for raw,
connect + tune + write + close; for batchdb, ``start()`` + queueing + ``flush()`` +
``stop()`` (building the manager and loading its plugins happens before). Both sides use
the same table and the same tuning: the PRAGMAs of :class:`~batchdb.settings.SQLiteSettings`
(and ``temp_store = MEMORY``, which the backend also sets) and the batch sizes of the
settings defaults. batchdb runs with the default settings (no settings file, no
``BATCHDB_*`` variable), maintenance off (its first task would come after an hour). After
each run the rows are read back and checked, untimed, so a fast but wrong run is an error,
not a number. Garbage is collected before each timed part, so every run starts from the
same collector state.

Peak memory is the growth of the process's resident set during the timed part: the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` when the run starts)
minus the resident set at the start. :func:`run_comparison` runs each run in its own
process (``multiprocessing`` spawn), so no run inherits another's peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import json
import math
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sqlalchemy as sa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.schema import CreateTable

from batchdb import __version__
from batchdb.backend import Backend, Batch
from batchdb.hookspecs import hookimpl
from batchdb.manager import BatchDBManager
from batchdb.models import BatchOperation, OperationType, Priority
from batchdb.schema import CANDLE_COLUMNS, candles_table
from batchdb.settings import BatchConfig, DuckDBSettings, PostgresSettings, Settings, SQLiteSettings

__all__ = [
    "BACKENDS",
    "COMPARISON_WORKLOADS",
    "IMPLEMENTATIONS",
    "PG_DSN_ENV",
    "WORKLOADS",
    "BenchReport",
    "BenchResult",
    "Case",
    "DataCache",
    "MemoryProbe",
    "PreparedRun",
    "ProgressCallback",
    "RunResult",
    "aggregate",
    "backend_unavailable",
    "candle_rows",
    "candle_tuples",
    "cases",
    "execute_case",
    "normalize_upbit_raw",
    "order_rows",
    "prepare_run",
    "render_table",
    "rich_progress",
    "run_comparison",
    "run_isolated",
    "upbit_calls",
    "workload_rows",
    "write_json",
    "write_plot",
]

#: workload names, in report order
WORKLOADS: tuple[str, ...] = (
    "upsert_new", "upsert_existing", "upbit_candles", "one_row", "critical_latency",
    "memory_flood",
)
#: what ``batchdb bench`` runs unless told otherwise
COMPARISON_WORKLOADS: tuple[str, ...] = ("upsert_new", "upsert_existing", "one_row",
                                         "upbit_candles")
BACKENDS: tuple[str, ...] = ("sqlite", "duckdb", "postgres")

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

#: the environment variable naming a PostgreSQL database the benchmark may use
PG_DSN_ENV = "BATCHDB_BENCH_PG_DSN"
PG_SCHEMA = "batchdb_bench"

CALL_ROWS = 1000  # rows per producer call (queue_operation / insert_candles_batch)
CRITICAL_INTERVAL_SECONDS = 0.005
FLOOD_BUDGET_MB = 64.0
FLOOD_PRODUCERS = 4
TIMEFRAME = "1m"
T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SYMBOLS: tuple[str, ...] = tuple(
    f"KRW-{c}" for c in ("BTC", "ETH", "XRP", "SOL", "ADA", "DOGE", "AVAX", "DOT", "LINK", "TRX")
)
_MB = 1024 * 1024
_ENV_PREFIX_NOT_READ = "BATCHDB_BENCH_SETTINGS_UNUSED_"

ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, description)``: called before each run and once at the end."""


# ====================================================================== data
def workload_rows(workload: str, rows: int) -> int:
    """Rows a workload writes for a benchmark size of ``rows`` (one_row: a tenth)."""
    return max(1, rows // 10) if workload == "one_row" else rows


def _slots(n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Symbol, minute and position-in-call of row i: each 1000-row call is one market's
    consecutive minutes, calls rotate over ten markets, every key is unique."""
    i = np.arange(n, dtype=np.int64)
    block, j = np.divmod(i, CALL_ROWS)
    minute = block // len(SYMBOLS) * CALL_ROWS + j
    symbols = [SYMBOLS[b] for b in (block % len(SYMBOLS)).tolist()]
    return symbols, minute, j


def candle_tuples(n: int, variant: int = 0) -> list[tuple[Any, ...]]:
    """``n`` candle rows as tuples in ``CANDLE_COLUMNS`` order; ``variant`` shifts the prices."""
    symbols, minute, j = _slots(n)
    ts = (T0_MS + minute * 60_000).tolist()
    price = (100.0 + j * 0.01 + variant).tolist()
    volume = (1.0 + j * 0.5 + variant).tolist()
    return [
        (s, TIMEFRAME, t, p, p + 1.0, p - 1.0, p + 0.5, v, v * p, "bench", T0_MS)
        for s, t, p, v in zip(symbols, ts, price, volume, strict=True)
    ]


def candle_rows(n: int, variant: int = 0) -> list[dict[str, Any]]:
    """``n`` generic candle rows as dicts (column -> value), the same values as tuples."""
    cols = CANDLE_COLUMNS
    return [dict(zip(cols, row, strict=True)) for row in candle_tuples(n, variant)]


def upbit_calls(n: int, variant: int = 0) -> list[tuple[str, list[dict[str, Any]]]]:
    """``n`` candles as Upbit's REST API returns them, as (market, up to 1000 candles) calls
    (newest first within a call, as Upbit sends them)."""
    symbols, minute, j = _slots(n)
    base = np.datetime64("2024-01-01T00:00:00", "s")
    utc = (base + minute.astype("timedelta64[m]")).astype(str).tolist()
    kst = (base + minute.astype("timedelta64[m]") + np.timedelta64(9, "h")).astype(str).tolist()
    price = (50_000_000.0 + j * 1000.0 + variant).tolist()
    stamp = (T0_MS + minute * 60_000 + 59_000).tolist()
    calls: list[tuple[str, list[dict[str, Any]]]] = []
    for start in range(0, n, CALL_ROWS):
        stop = min(start + CALL_ROWS, n)
        market = symbols[start]
        candles = [
            {
                "market": market,
                "candle_date_time_utc": utc[k],
                "candle_date_time_kst": kst[k],
                "opening_price": price[k],
                "high_price": price[k] + 10.0,
                "low_price": price[k] - 10.0,
                "trade_price": price[k] + 5.0,
                "timestamp": stamp[k],
                "candle_acc_trade_price": 123_456.5 + k % CALL_ROWS,
                "candle_acc_trade_volume": 0.25 + (k % CALL_ROWS) / 1000,
                "unit": 1,
            }
            for k in range(start, stop)
        ]
        candles.reverse()
        calls.append((market, candles))
    return calls


def order_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` order rows (one per single-row write), ids from ``start``."""
    return [
        {"order_id": i, "symbol": SYMBOLS[i % len(SYMBOLS)], "side": "buy" if i % 2 else "sell",
         "price": 100.0 + i % 1000 * 0.01, "quantity": 0.001 * (1 + i % 7), "ts": T0_MS + i}
        for i in range(start, start + n)
    ]


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def normalize_upbit_raw(market: str, timeframe: str, candles: Sequence[Mapping[str, Any]],
                        now_ms: int) -> list[tuple[Any, ...]]:
    """What a hand-written ingester does: per-row ``datetime.fromisoformat`` into tuples in
    ``CANDLE_COLUMNS`` order (the raw side of the ``upbit_candles`` workload)."""
    fromiso = dt.datetime.fromisoformat
    utc = dt.UTC
    return [
        (market, timeframe,
         (fromiso(c["candle_date_time_utc"]).replace(tzinfo=utc) - _EPOCH) // _MS,
         c["opening_price"], c["high_price"], c["low_price"], c["trade_price"],
         c["candle_acc_trade_volume"], c["candle_acc_trade_price"], "upbit", now_ms)
        for c in candles
    ]


class DataCache:
    """Keeps the most recent data sets, so that consecutive runs (raw, batchdb, rounds)
    write the very same rows without building them again."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """The value for ``key``, built with ``make`` if it is not kept."""
        if key in self._items:
            value = self._items.pop(key)
        else:
            while len(self._items) >= max(1, self.size):
                self._items.pop(next(iter(self._items)))
            value = make()
        self._items[key] = value
        return value

    def clear(self) -> None:
        """Forget every data set."""
        self._items.clear()


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


# ====================================================================== stores
_orders_metadata = sa.MetaData()
orders_table = sa.Table(
    "orders",
    _orders_metadata,
    sa.Column("order_id", sa.BigInteger().with_variant(sa.INTEGER(), "sqlite"),
              primary_key=True, autoincrement=False),
    sa.Column("symbol", sa.Text, nullable=False),
    sa.Column("side", sa.Text, nullable=False),
    sa.Column("price", sa.Double().with_variant(sa.REAL(), "sqlite"), nullable=False),
    sa.Column("quantity", sa.Double().with_variant(sa.REAL(), "sqlite"), nullable=False),
    sa.Column("ts", sa.BigInteger().with_variant(sa.INTEGER(), "sqlite"), nullable=False),
)
ORDER_COLUMNS: tuple[str, ...] = tuple(c.name for c in orders_table.columns)
_KEY = ("symbol", "timeframe", "ts")
_VALUES = tuple(c for c in CANDLE_COLUMNS if c not in _KEY)
_COLS = ", ".join(CANDLE_COLUMNS)
_SET = ", ".join(f"{c} = excluded.{c}" for c in _VALUES)
_CONFLICT = f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET {_SET}"
_CANDLE_GETTER = itemgetter(*CANDLE_COLUMNS)
VALUES_ROWS = 1000  # rows per multi-row VALUES statement of the raw-values path: a batch


@functools.cache
def _upsert_values_sql(rows: int) -> str:
    one = "(" + ", ".join("?" * len(CANDLE_COLUMNS)) + ")"
    return (f"INSERT INTO candles ({_COLS}) VALUES {', '.join([one] * rows)} "  # noqa: S608
            f"{_CONFLICT}")
_ORDER_GETTER = itemgetter(*ORDER_COLUMNS)


def _dialect(name: str) -> sa.engine.Dialect:
    return sa.engine.make_url(f"{name}://").get_dialect()()


def _ddl(dialect: sa.engine.Dialect) -> list[str]:
    """CREATE TABLE of ``candles`` and ``orders`` (DuckDB takes PostgreSQL's)."""
    return [str(CreateTable(t).compile(dialect=dialect)).strip()
            for t in (candles_table, orders_table)]


def _bench_settings(**sections: Any) -> Settings:
    """batchdb settings for a run: the defaults and ``sections`` only (no settings file, no
    ``BATCHDB_*`` variable), so the comparison always runs the documented configuration."""
    sections.setdefault("maintenance", {"enabled": False})
    return Settings(_env_prefix=_ENV_PREFIX_NOT_READ, **sections)


class Store(ABC):
    """One database the benchmark writes to: its raw driver path and its batchdb settings."""

    backend: ClassVar[str]
    #: rows per raw transaction/statement: the batch size batchdb uses for this backend
    batch_size: int

    @abstractmethod
    def reset(self) -> None:
        """A fresh, empty database holding the ``candles`` and ``orders`` tables."""

    @abstractmethod
    def remove(self) -> None:
        """Delete what :meth:`reset` created."""

    @abstractmethod
    def connect(self) -> Any:
        """A raw driver connection, tuned like batchdb's."""

    @abstractmethod
    def write_tuples(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """Upsert one batch of candle tuples (``CANDLE_COLUMNS`` order), committed."""

    @abstractmethod
    def write_dicts(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert one batch of candle dicts, committed."""

    @abstractmethod
    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Read back (verification), on a connection of its own."""

    @abstractmethod
    def settings(self, **batch: Any) -> Settings:
        """batchdb settings writing to this database (``batch`` overrides ``[batch]``)."""

    def close(self, conn: Any) -> None:
        """Close a raw connection."""
        conn.close()

    def upsert_dicts(self, rows: Sequence[Mapping[str, Any]],
                     write: Callable[[Any, Sequence[Mapping[str, Any]]], None] | None = None
                     ) -> None:
        """The raw bulk path: connect, upsert ``rows`` batch by batch (with ``write``,
        :meth:`write_dicts` by default), close."""
        write = write or self.write_dicts
        conn = self.connect()
        try:
            size = self.batch_size
            for i in range(0, len(rows), size):
                write(conn, rows[i:i + size])
        finally:
            self.close(conn)

    def upsert_tuples(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Like :meth:`upsert_dicts`, from tuples (also used, untimed, to prefill)."""
        conn = self.connect()
        try:
            size = self.batch_size
            for i in range(0, len(rows), size):
                self.write_tuples(conn, rows[i:i + size])
        finally:
            self.close(conn)


class SQLiteStore(Store):
    """An SQLite file in WAL mode with the PRAGMAs of ``SQLiteSettings``."""

    backend = "sqlite"
    _UPSERT = (f"INSERT INTO candles ({_COLS}) "  # noqa: S608 - fixed identifiers
               f"VALUES ({', '.join('?' * len(CANDLE_COLUMNS))}) {_CONFLICT}")
    _INSERT_ORDER = (f"INSERT INTO orders ({', '.join(ORDER_COLUMNS)}) "  # noqa: S608
                     f"VALUES ({', '.join('?' * len(ORDER_COLUMNS))})")

    def __init__(self, path: Path, settings: SQLiteSettings | None = None) -> None:
        self.path = path
        self.sqlite = (settings or SQLiteSettings()).model_copy(update={"path": str(path)})
        self.batch_size = BatchConfig().insert_batch_size

    def pragmas(self) -> list[str]:
        """The PRAGMAs the SQLite backend applies to its writer, from the same settings."""
        s = self.sqlite
        return [
            f"PRAGMA busy_timeout = {int(s.busy_timeout_ms)}",
            f"PRAGMA journal_mode = {s.journal_mode}",
            f"PRAGMA synchronous = {s.synchronous}",
            f"PRAGMA cache_size = {int(s.cache_size)}",
            f"PRAGMA mmap_size = {int(s.mmap_size)}",
            f"PRAGMA foreign_keys = {'ON' if s.foreign_keys else 'OFF'}",
            "PRAGMA temp_store = MEMORY",
        ]

    def connect(self, autocommit: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None if autocommit else "DEFERRED")
        for pragma in self.pragmas():
            conn.execute(pragma)
        return conn

    def _files(self) -> list[Path]:
        # -batchdb: the file through which the processes writing the database coordinate
        return [self.path, *(self.path.with_name(self.path.name + s)
                             for s in ("-wal", "-shm", "-batchdb"))]

    def remove(self) -> None:
        for f in self._files():
            f.unlink(missing_ok=True)

    def reset(self) -> None:
        self.remove()
        conn = self.connect()
        try:
            for stmt in _ddl(_dialect("sqlite")):
                conn.execute(stmt)
        finally:
            conn.close()

    def write_tuples(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(self._UPSERT, rows)
        conn.execute("COMMIT")

    def write_dicts(self, conn: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(self._UPSERT, map(_CANDLE_GETTER, rows))
        conn.execute("COMMIT")

    def write_values(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Like :meth:`write_tuples` with multi-row ``VALUES`` statements instead of
        ``executemany``: one per batch, as batchdb's writer does."""
        conn.execute("BEGIN IMMEDIATE")
        for i in range(0, len(rows), VALUES_ROWS):
            chunk = rows[i:i + VALUES_ROWS]
            conn.execute(_upsert_values_sql(len(chunk)), list(chain.from_iterable(chunk)))
        conn.execute("COMMIT")

    def write_dicts_values(self, conn: sqlite3.Connection,
                           rows: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`write_values` from candle dicts."""
        self.write_values(conn, list(map(_CANDLE_GETTER, rows)))

    def insert_one_by_one(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """One ``execute`` per order row, COMMIT every ``batch_size`` rows."""
        conn = self.connect()
        sql = self._INSERT_ORDER
        size = self.batch_size
        try:
            execute = conn.execute
            for i in range(0, len(rows), size):
                execute("BEGIN IMMEDIATE")
                for row in rows[i:i + size]:
                    execute(sql, _ORDER_GETTER(row))
                execute("COMMIT")
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def settings(self, **batch: Any) -> Settings:
        return _bench_settings(backend="sqlite", sqlite=self.sqlite.model_dump(),
                               batch=batch)


class DuckDBStore(Store):
    """A DuckDB file; raw writes go through an Arrow table per batch."""

    backend = "duckdb"
    _UPSERT = f"INSERT INTO candles ({_COLS}) SELECT {_COLS} FROM bench_batch {_CONFLICT}"  # noqa: S608

    def __init__(self, path: Path, settings: DuckDBSettings | None = None) -> None:
        self.path = path
        self.duckdb = (settings or DuckDBSettings()).model_copy(update={"path": str(path)})
        self.batch_size = self.duckdb.batch_size

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.duckdb.threads is not None:
            config["threads"] = self.duckdb.threads
        if self.duckdb.memory_limit is not None:
            config["memory_limit"] = self.duckdb.memory_limit
        return config

    def connect(self) -> Any:
        import duckdb

        return duckdb.connect(str(self.path), config=self._config())

    def remove(self) -> None:
        for suffix in ("", ".wal"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)

    def reset(self) -> None:
        self.remove()
        conn = self.connect()
        try:
            for stmt in _ddl(_dialect("postgresql")):
                conn.execute(stmt)
        finally:
            conn.close()

    @staticmethod
    def _schema() -> Any:
        import pyarrow as pa

        types = {"symbol": pa.string(), "timeframe": pa.string(), "ts": pa.int64(),
                 "source": pa.string(), "ingested_at": pa.int64()}
        return pa.schema([(c, types.get(c, pa.float64())) for c in CANDLE_COLUMNS])

    def _upsert_arrow(self, conn: Any, table: Any) -> None:
        conn.register("bench_batch", table)
        try:
            conn.execute(self._UPSERT)
        finally:
            conn.unregister("bench_batch")

    def write_tuples(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        import pyarrow as pa

        schema = self._schema()
        columns = [pa.array(col, type=f.type) for col, f in zip(zip(*rows, strict=True),
                                                               schema, strict=True)]
        self._upsert_arrow(conn, pa.Table.from_arrays(columns, schema=schema))

    def write_dicts(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        import pyarrow as pa

        # one typed array per column: the fastest raw path (from_pylist is ~25% slower,
        # which would flatter batchdb's ratio)
        schema = self._schema()
        arrays = [pa.array([r[c] for r in rows], type=f.type)
                  for c, f in zip(CANDLE_COLUMNS, schema, strict=True)]
        self._upsert_arrow(conn, pa.Table.from_arrays(arrays, schema=schema))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()

    def settings(self, **batch: Any) -> Settings:
        return _bench_settings(backend="duckdb", duckdb=self.duckdb.model_dump(), batch=batch)


class PostgresStore(Store):
    """A PostgreSQL database; everything happens in the schema ``batchdb_bench``, which each
    run drops and creates again. Raw writes: binary COPY into a temporary staging table,
    then ``INSERT … SELECT … ON CONFLICT DO UPDATE``, one transaction per batch."""

    backend = "postgres"
    _TYPES = ("text", "text", "int8", "float8", "float8", "float8", "float8", "float8",
              "float8", "text", "int8")
    _COPY = f"COPY bench_stage ({_COLS}) FROM STDIN (FORMAT BINARY)"
    _MERGE = f"INSERT INTO candles ({_COLS}) SELECT {_COLS} FROM bench_stage {_CONFLICT}"  # noqa: S608

    def __init__(self, dsn: str, settings: PostgresSettings | None = None) -> None:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        self.base_dsn = dsn
        options = str(conninfo_to_dict(dsn).get("options") or "")
        self.dsn = make_conninfo(dsn, options=f"{options} -c search_path={PG_SCHEMA}".strip())
        self.postgres = (settings or PostgresSettings()).model_copy(update={"dsn": self.dsn})
        self.batch_size = self.postgres.batch_size

    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt.encode())

    def reset(self) -> None:
        self._admin(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE", f"CREATE SCHEMA {PG_SCHEMA}",
                    *_ddl(_dialect("postgresql")))

    def remove(self) -> None:
        self._admin(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.dsn)
        conn.execute("CREATE TEMPORARY TABLE bench_stage (LIKE candles INCLUDING DEFAULTS) "
                     "ON COMMIT DELETE ROWS")
        conn.commit()
        return conn

    def write_tuples(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        with conn.cursor() as cur:
            with cur.copy(self._COPY) as copy:
                copy.set_types(self._TYPES)
                write = copy.write_row
                for row in rows:
                    write(row)
            cur.execute(self._MERGE)
        conn.commit()

    def write_dicts(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        self.write_tuples(conn, list(map(_CANDLE_GETTER, rows)))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            return [tuple(r) for r in conn.execute(sql.encode()).fetchall()]

    def settings(self, **batch: Any) -> Settings:
        return _bench_settings(backend="postgres", postgres=self.postgres.model_dump(),
                               batch=batch)


def make_store(backend: str, workdir: Path, pg_dsn: str | None = None) -> Store:
    """A store for ``backend``: a new file name under ``workdir``, or the PostgreSQL DSN."""
    name = f"bench-{secrets.token_hex(4)}"
    if backend == "sqlite":
        return SQLiteStore(workdir / f"{name}.sqlite3")
    if backend == "duckdb":
        return DuckDBStore(workdir / f"{name}.duckdb")
    if backend == "postgres":
        dsn = pg_dsn or os.environ.get(PG_DSN_ENV)
        if not dsn:
            raise ValueError(f"the postgres benchmarks need a database: set {PG_DSN_ENV}")
        return PostgresStore(dsn)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def backend_unavailable(backend: str, pg_dsn: str | None = None, *,
                        check_dsn: bool = True) -> str | None:
    """Why ``backend`` cannot be benchmarked here, or None when it can.

    ``check_dsn=False`` leaves out the PostgreSQL DSN (for a caller that brings a server).
    """
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}"
    drivers = {"duckdb": ("duckdb", "pyarrow"), "postgres": ("psycopg",)}.get(backend, ())
    for module in drivers:
        try:
            __import__(module)
        except ImportError as exc:
            return f"{backend}: the driver {module!r} is not installed ({exc}); " \
                   f"pip install 'batchdb[{backend}]'"
    from batchdb.pluginmanager import BackendRegistry, create_plugin_manager

    try:
        BackendRegistry(create_plugin_manager()).get(backend)
    except Exception as exc:
        return f"{backend}: the batchdb backend is not available: {exc}"
    if check_dsn and backend == "postgres" and not (pg_dsn or os.environ.get(PG_DSN_ENV)):
        return (f"postgres: no server to write to; set {PG_DSN_ENV} to a database where the "
                f"benchmark may create (and drop) the schema {PG_SCHEMA!r}")
    return None


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


def _latency_summary(latencies: Sequence[float]) -> dict[str, Any]:
    if not latencies:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    data = sorted(latencies)
    n = len(data)

    def q(p: float) -> float:
        return round(data[min(n - 1, math.ceil(p * n) - 1)] * 1000, 3)

    return {"count": n, "p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": round(data[-1] * 1000, 3)}


class _BatchTimes:
    """A plugin recording how long each committed batch took, by priority (from handing it
    to the backend to its commit), to explain the CRITICAL latencies."""

    def __init__(self) -> None:
        self.seconds: dict[Priority, list[float]] = {p: [] for p in Priority}

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        self.seconds[batch.operations[0].priority].append(seconds)

    def summary(self) -> dict[str, Any]:
        return {p.name: _latency_summary(v) for p, v in self.seconds.items() if v}


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
        lat = _latency_summary(latencies)
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
            sqlite_utils.Database(conn).table("candles").upsert_all(data, pk=_KEY)
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


def _stats(seconds: Sequence[float]) -> dict[str, Any]:
    """pytest-benchmark's ``stats`` block (its quartile method) for per-round seconds."""
    data = sorted(seconds)
    n = len(data)
    mean = statistics.fmean(data)
    stddev = statistics.stdev(data) if n > 1 else 0.0
    if n == 1:
        q1 = q3 = data[0]
    elif n % 2:
        k, r = n // 4, n % 4
        if r == 1:
            q1 = 0.25 * data[k - 1] + 0.75 * data[k]
            q3 = 0.75 * data[3 * k] + 0.25 * data[3 * k + 1]
        else:
            q1 = 0.75 * data[k] + 0.25 * data[k + 1]
            q3 = 0.25 * data[3 * k + 1] + 0.75 * data[3 * k + 2]
    else:
        q1 = statistics.median(data[: n // 2])
        q3 = statistics.median(data[n // 2:])
    iqr = q3 - q1
    lo = [v for v in data if v >= q1 - 1.5 * iqr]
    hi = [v for v in data if v <= q3 + 1.5 * iqr]
    iqr_out = sum(1 for v in data if v < q1 - 1.5 * iqr or v > q3 + 1.5 * iqr)
    sd_out = sum(1 for v in data if v < mean - stddev or v > mean + stddev)
    total = math.fsum(data)
    return {
        "min": data[0], "max": data[-1], "mean": mean, "stddev": stddev, "rounds": n,
        "median": statistics.median(data), "iqr": iqr, "q1": q1, "q3": q3,
        "iqr_outliers": iqr_out, "stddev_outliers": sd_out, "outliers": f"{sd_out};{iqr_out}",
        "ld15iqr": lo[0] if lo else data[0], "hd15iqr": hi[-1] if hi else data[-1],
        "ops": n / total if total else 0.0, "total": total, "data": list(seconds),
        "iterations": 1,
    }


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
        w, b = self.case.workload, self.case.backend
        if self.error is not None:
            return None
        if self.case.implementation == "batchdb":
            if (w, b) in _RATIO_TARGETS and self.ratio_to_raw is not None:
                goal = _RATIO_TARGETS[(w, b)]
                return f"≥ {goal:.2f}x raw", self.ratio_to_raw >= goal
            if w == "one_row" and b == "sqlite":
                return f"≥ {ONE_ROW_TARGET / 1000:.0f}k rows/s", self.rows_per_s >= ONE_ROW_TARGET
            if w == "critical_latency" and b == "sqlite":
                p99 = self.extra.get("critical_latency", {}).get("p99_ms")
                if p99 is not None:
                    return f"p99 ≤ {CRITICAL_P99_TARGET_MS:.0f} ms", p99 <= CRITICAL_P99_TARGET_MS
            if w == "memory_flood":
                return (f"RSS growth ≤ {FLOOD_GROWTH_TARGET_MB:.0f} MB",
                        self.peak_rss_mb <= FLOOD_GROWTH_TARGET_MB)
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
        extra["critical_latency"] = _latency_summary(latencies)
        extra["critical_latency_per_round"] = [
            _latency_summary(r.extra.get("_latencies", ())) for r in runs]
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


def machine_info() -> dict[str, Any]:
    """The machine, as pytest-benchmark describes it (plus memory and driver versions)."""
    info: dict[str, Any] = {
        "node": platform.node(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python_compiler": platform.python_compiler(),
        "python_implementation": platform.python_implementation(),
        "python_implementation_version": platform.python_version(),
        "python_version": platform.python_version(),
        "python_build": list(platform.python_build()),
        "release": platform.release(),
        "system": platform.system(),
        "cpu": {"count": os.cpu_count()},
        "sqlite_version": sqlite3.sqlite_version,
        "batchdb_version": __version__,
    }
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"]["brand_raw"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="ascii") as fh:
            info["memory_total_mb"] = int(fh.readline().split()[1]) // 1024
    for module in ("duckdb", "pyarrow", "psycopg", "sqlite_utils"):
        with contextlib.suppress(Exception):
            mod = __import__(module)
            info[f"{module}_version"] = str(getattr(mod, "__version__", "unknown"))
    return info


def commit_info() -> dict[str, Any]:
    """The git commit of the batchdb source, as pytest-benchmark records it."""
    where = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    info: dict[str, Any] = {"id": "unversioned", "time": None, "author_time": None,
                            "dirty": False, "project": "batchdb", "branch": "(unknown)"}
    try:
        info["id"] = git("rev-parse", "HEAD")
        info["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
        info["time"] = git("show", "-s", "--pretty=format:%cI")
        info["author_time"] = git("show", "-s", "--pretty=format:%aI")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        info["branch"] = "(detached head)" if branch == "HEAD" else branch
    except (OSError, subprocess.SubprocessError) as exc:
        info["error"] = repr(exc)
    return info


def write_json(report: BenchReport, path: Path) -> Path:
    """Write ``report`` in pytest-benchmark's ``--benchmark-json`` layout."""
    benchmarks = []
    for r in report.results:
        if r.error is not None or not r.seconds:
            continue
        c = r.case
        benchmarks.append({
            "group": c.workload,
            "name": c.name,
            "fullname": f"batchdb.bench::{c.name}",
            "params": {"backend": c.backend, "implementation": c.implementation},
            "param": c.param,
            "extra_info": r.extra_info(),
            "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": report.rounds,
                        "max_time": None, "min_time": None, "warmup": False,
                        "mode": "batchdb bench: one spawned process per run"},
            "stats": _stats(r.seconds),
        })
    doc = {
        "machine_info": report.machine_info or machine_info(),
        "commit_info": report.commit_info or commit_info(),
        "benchmarks": benchmarks,
        "datetime": report.started_at or dt.datetime.now(dt.UTC).isoformat(),
        "version": __version__,
        "skipped": report.skipped,
        "errors": {r.case.name: r.error for r in report.results if r.error is not None},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    return path


def write_plot(report: BenchReport, path: Path) -> Path:
    """A PNG bar chart: rows/s per workload, one bar per implementation (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    ok = [r for r in report.results if r.error is None and not math.isnan(r.rows_per_s)]
    workloads = [w for w in WORKLOADS if any(r.case.workload == w for r in ok)]
    labels: list[str] = []
    for r in ok:
        if r.case.long_label not in labels:
            labels.append(r.case.long_label)
    fig = Figure(figsize=(max(8.0, 2.2 * len(workloads) + 2), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            found = [r for r in ok if r.case.workload == w and r.case.long_label == label]
            if found:
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(found[0].rows_per_s)
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, labels=[_short(v) for v in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(workloads)), [w.replace("_", " ") for w in workloads])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _short(v)))
    ax.set_ylabel("rows / s (median of rounds)")
    ax.set_title(f"batchdb vs raw drivers — {report.rows:,} rows, {report.rounds} round(s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _short(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


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


# ====================================================================== presentation
def render_table(report: BenchReport) -> Table:
    """The report as a rich table: rows/s, ratio to raw, peak memory, target per case."""
    table = Table(title=f"batchdb bench — {report.rows:,} rows, {report.rounds} round(s), "
                        "median rows/s", title_justify="left")
    table.add_column("workload")
    table.add_column("backend")
    table.add_column("implementation")
    table.add_column("rows", justify="right")
    table.add_column("rows/s", justify="right")
    table.add_column("x raw", justify="right")
    table.add_column("peak RSS Δ MB", justify="right")
    table.add_column("target")
    last = None
    for r in report.results:
        c = r.case
        if last is not None and c.workload != last:
            table.add_section()
        last = c.workload
        if r.error is not None:
            table.add_row(c.workload, c.backend, c.label, f"{r.rows:,}", "—", "—", "—",
                          f"[red]error: {r.error}[/red]")
            continue
        target = r.target()
        if target is None:
            shown = ""
        else:
            shown = f"[green]✓ {target[0]}[/green]" if target[1] else f"[red]✗ {target[0]}[/red]"
        lat = r.extra.get("critical_latency")
        if isinstance(lat, dict) and lat.get("p99_ms") is not None:
            shown += f" (p50 {lat['p50_ms']:.1f} / p99 {lat['p99_ms']:.1f} / " \
                     f"max {lat['max_ms']:.1f} ms)"
        ratio = "" if r.ratio_to_raw is None else f"{r.ratio_to_raw:.2f}x"
        if c.implementation == "raw":
            ratio = "1.00x"
        table.add_row(c.workload, c.backend, c.label, f"{r.rows:,}", f"{r.rows_per_s:,.0f}",
                      ratio, f"{r.peak_rss_mb:.1f}", shown)
    if report.skipped:
        table.caption = "skipped: " + "; ".join(report.skipped.values())
    return table


@contextlib.contextmanager
def rich_progress(console: Console | None = None) -> Iterator[ProgressCallback]:
    """A rich progress bar; the ``progress`` callback to give :func:`run_comparison`."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=False) as bar:
        task = bar.add_task("benchmark", total=None)

        def update(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        yield update

