"""Benchmark workloads: raw drivers and batchdb side by side, one implementation of each.

The package is cut by job: :mod:`.data` builds the rows, :mod:`.baselines` holds the
raw-driver stores (the backend-specific SQL batchdb is measured against), :mod:`.runs` the
cases, the timed runs, the RSS probe, the targets and :func:`run_comparison`, and
:mod:`.report` the JSON, the chart, the table and the progress bar. This module re-exports
their public names.

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
"""

from .baselines import (
    BACKENDS,
    PG_DSN_ENV,
    PG_SCHEMA,
    DuckDBStore,
    PostgresStore,
    SQLiteStore,
    Store,
    backend_unavailable,
    make_store,
    normalize_upbit_raw,
)
from .data import (
    WORKLOADS,
    DataCache,
    candle_rows,
    candle_tuples,
    order_rows,
    upbit_calls,
    workload_rows,
)
from .report import (
    ProgressCallback,
    render_table,
    rich_progress,
    write_json,
    write_plot,
)
from .runs import (
    COMPARISON_WORKLOADS,
    FLOOD_BUDGET_MB,
    IMPLEMENTATIONS,
    TARGET_MARGIN,
    BenchReport,
    BenchResult,
    Case,
    MemoryProbe,
    PreparedRun,
    RunResult,
    TargetCheck,
    aggregate,
    cases,
    execute_case,
    prepare_run,
    run_comparison,
    run_isolated,
)

__all__ = [
    "BACKENDS",
    "COMPARISON_WORKLOADS",
    "FLOOD_BUDGET_MB",
    "IMPLEMENTATIONS",
    "PG_DSN_ENV",
    "PG_SCHEMA",
    "TARGET_MARGIN",
    "WORKLOADS",
    "BenchReport",
    "BenchResult",
    "Case",
    "DataCache",
    "DuckDBStore",
    "MemoryProbe",
    "PostgresStore",
    "PreparedRun",
    "ProgressCallback",
    "RunResult",
    "SQLiteStore",
    "Store",
    "TargetCheck",
    "aggregate",
    "backend_unavailable",
    "candle_rows",
    "candle_tuples",
    "cases",
    "execute_case",
    "make_store",
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
