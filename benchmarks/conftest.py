"""pytest-benchmark suites: raw drivers and batchdb side by side, workloads from
batchdb.workloads.bench.

Run them explicitly (``pytest`` alone collects only ``tests/``)::

    pytest benchmarks/ --bench-rows 20000             # a quick check
    pytest benchmarks/ --benchmark-json bench.json    # the real run: 1M rows, 3 rounds
    pytest benchmarks/ -k "sqlite"                    # one backend

Options (or environment variables): ``--bench-rows`` / ``BATCHDB_BENCH_ROWS`` (default
1,000,000), ``--bench-rounds`` / ``BATCHDB_BENCH_ROUNDS`` (default 3), ``--bench-isolate``
(every round in a fresh spawned process; ``memory_flood`` always runs that way, so that its
peak memory is its own). PostgreSQL runs against ``BATCHDB_BENCH_PG_DSN`` or, when the server
binaries are installed, a throwaway server started for the session (tests/pgserver.py).

Each benchmark records ``rows_per_s``, ``ratio_to_raw``, ``peak_rss_delta_mb`` and its target
in ``extra_info``; a summary table and a verdict table (each target: met, missed within the
margin, missed) are printed at the end of the session. ``--bench-enforce`` (or
``BATCHDB_BENCH_ENFORCE=1``) turns a target missed beyond the margin into a failed
benchmark; the margin is ``bench.TARGET_MARGIN`` (a lower bound passes at 90% of it, an
upper bound at 110%).
"""

from __future__ import annotations

import importlib.util
import io
import os
import sqlite3
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchdb.workloads import bench

_HERE = Path(__file__).resolve().parent


class ChildClock:
    """A pytest-benchmark timer for runs executed in a child process.

    The child measures its own timed part; the target adds that to this clock, so the
    duration pytest-benchmark records (timer after minus timer before) is exactly the child's
    measurement — without process start-up, imports, data generation or checking.
    """

    __name__ = "batchdb_child_clock"

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Add a child's measured seconds."""
        self.now += seconds


CHILD_CLOCK = ChildClock()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("batchdb-bench", "batchdb benchmarks")
    group.addoption("--bench-rows", "--rows", type=int, default=None, dest="bench_rows",
                    help="rows per run (default $BATCHDB_BENCH_ROWS or 1000000)")
    group.addoption("--bench-rounds", type=int, default=None, dest="bench_rounds",
                    help="rounds per benchmark (default $BATCHDB_BENCH_ROUNDS or 3)")
    group.addoption("--bench-isolate", action="store_true", default=False,
                    dest="bench_isolate",
                    help="run every round in a fresh spawned process (own peak memory)")
    group.addoption("--bench-enforce", action="store_true", default=False,
                    dest="bench_enforce",
                    help="fail a benchmark that misses its design target by more than "
                         "the margin (default: $BATCHDB_BENCH_ENFORCE=1)")


def _isolated(config: pytest.Config, workload: str) -> bool:
    return bool(config.getoption("bench_isolate")) or workload == "memory_flood"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE not in Path(str(item.path)).resolve().parents:
            continue
        # a 1M-row benchmark with three rounds takes minutes: no per-test timeout here
        item.add_marker(pytest.mark.timeout(0))
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        if isinstance(case, bench.Case) and _isolated(config, case.workload):
            item.add_marker(pytest.mark.benchmark(timer=CHILD_CLOCK), append=False)


@pytest.fixture(scope="session")
def bench_rows(pytestconfig: pytest.Config) -> int:
    """Rows per run."""
    value = pytestconfig.getoption("bench_rows") or int(
        os.environ.get("BATCHDB_BENCH_ROWS", "1000000"))
    if value < 1:
        raise pytest.UsageError("--bench-rows must be at least 1")
    return int(value)


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig: pytest.Config) -> int:
    """Rounds per benchmark."""
    value = pytestconfig.getoption("bench_rounds") or int(
        os.environ.get("BATCHDB_BENCH_ROUNDS", "3"))
    if value < 1:
        raise pytest.UsageError("--bench-rounds must be at least 1")
    return int(value)


def _enforced(config: pytest.Config) -> bool:
    env = os.environ.get("BATCHDB_BENCH_ENFORCE", "").strip().lower()
    return bool(config.getoption("bench_enforce")) or env in ("1", "true", "yes")


@pytest.fixture(scope="session")
def bench_enforce(pytestconfig: pytest.Config) -> bool:
    """Whether a missed design target fails the benchmark (``--bench-enforce``)."""
    return _enforced(pytestconfig)


def _load_pgserver() -> Any:
    path = _HERE.parent / "tests" / "pgserver.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("batchdb_bench_pgserver", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PostgresServer


class _PgState:
    """The PostgreSQL database to use, found or started on first use: $BATCHDB_BENCH_PG_DSN,
    else a throwaway server (stopped at the end of the session)."""

    def __init__(self, base_dir: Callable[[], Path]) -> None:
        self._base_dir = base_dir
        self._ready = False
        self.dsn: str | None = None
        self.reason: str | None = None
        self.server: Any = None

    def ensure(self) -> None:
        """Find the DSN or start the server, once; on failure ``reason`` says why."""
        if self._ready:
            return
        self._ready = True
        self.dsn = os.environ.get(bench.PG_DSN_ENV) or None
        if self.dsn:
            return
        server_cls = _load_pgserver()
        if server_cls is None:
            self.reason = (f"no PostgreSQL: set {bench.PG_DSN_ENV}, or provide tests/pgserver.py "
                           "and the server binaries")
        elif not server_cls.available():
            reason = getattr(server_cls, "unavailable_reason", lambda: "server not available")()
            self.reason = f"no PostgreSQL: {bench.PG_DSN_ENV} is not set and {reason}"
        else:
            try:
                self.server = server_cls.start(self._base_dir())
                self.dsn = self.server.dsn
            except Exception as exc:
                self.reason = f"no PostgreSQL: the throwaway server did not start: {exc}"

    def stop(self) -> None:
        """Stop the throwaway server, if one was started."""
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="session")
def pg_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_PgState]:
    """PostgreSQL for the session, started only if a postgres benchmark runs."""
    state = _PgState(lambda: tmp_path_factory.mktemp("pg"))
    try:
        yield state
    finally:
        state.stop()


@dataclass
class _Session:
    """Results of this session, for ratios to raw and the summary table."""

    rows: int = 0
    rounds: int = 0
    results: dict[bench.Case, bench.BenchResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    availability: dict[str, str | None] = field(default_factory=dict)


_SESSION = _Session()


@pytest.fixture(scope="session")
def data_cache() -> bench.DataCache:
    """Data sets shared by consecutive benchmarks (raw, batchdb, … write the same rows)."""
    return bench.DataCache(2)


@pytest.fixture(scope="session")
def bench_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the databases of the runs live (each removed after its round)."""
    return tmp_path_factory.mktemp("bench")


RunCase = Callable[[Any, bench.Case], bench.BenchResult]
CheckTarget = Callable[[bench.BenchResult], None]


@pytest.fixture
def check_target(bench_enforce: bool) -> CheckTarget:
    """Hold a result to its design target: with ``--bench-enforce`` a miss by more than
    ``bench.TARGET_MARGIN`` fails the benchmark; without, it is only reported (the verdict
    table at the end of the session). A result without a target passes."""

    def check(result: bench.BenchResult) -> None:
        target = result.target_check()
        if target is None or not bench_enforce:
            return
        margin = bench.TARGET_MARGIN
        side = "at least" if target.at_least else "at most"
        assert target.met_within(margin), (
            f"{result.case.name}: target {target.text} missed: measured {target.shown}, "
            f"needed {side} {target.show(target.bound(margin))} (the target with a "
            f"{margin:.0%} margin)")

    return check


@pytest.fixture
def run_case(request: pytest.FixtureRequest, bench_rows: int, bench_rounds: int,
             bench_workdir: Path, data_cache: bench.DataCache, pg_state: _PgState) -> RunCase:
    """Benchmark one case in pedantic mode: a fresh database per round (setup), the timed
    write (target), the read-back check and removal (teardown); fills ``extra_info``."""

    def run(benchmark: Any, case: bench.Case) -> bench.BenchResult:
        if case.backend not in _SESSION.availability:
            reason = bench.backend_unavailable(case.backend, check_dsn=False)
            if reason is None and case.backend == "postgres":
                pg_state.ensure()
                reason = pg_state.reason
            _SESSION.availability[case.backend] = reason
        reason = _SESSION.availability[case.backend]
        if reason is not None:
            _SESSION.skipped[case.backend] = reason
            pytest.skip(reason)
        _SESSION.rows, _SESSION.rounds = bench_rows, bench_rounds
        benchmark.group = case.workload
        runs: list[bench.RunResult] = []
        if _isolated(request.config, case.workload):
            def target() -> None:
                result = bench.run_isolated(case, bench_rows, bench_workdir, pg_state.dsn)
                runs.append(result)
                CHILD_CLOCK.advance(result.seconds)

            benchmark.pedantic(target, rounds=bench_rounds)
        else:
            pending: list[bench.PreparedRun] = []

            def setup() -> tuple[tuple[bench.PreparedRun], dict[str, Any]]:
                prepared = bench.prepare_run(case, bench_rows, bench_workdir,
                                             pg_dsn=pg_state.dsn, cache=data_cache)
                pending.append(prepared)
                return (prepared,), {}

            def teardown(prepared: bench.PreparedRun) -> None:
                pending.remove(prepared)
                runs.append(prepared.finish())

            try:
                benchmark.pedantic(bench.PreparedRun.run, setup=setup, teardown=teardown,
                                   rounds=bench_rounds)
            finally:
                for prepared in pending:  # --benchmark-disable runs once, without teardown
                    if prepared.seconds is not None:
                        runs.append(prepared.finish())
                    else:
                        prepared.store.remove()
        raw = _SESSION.results.get(bench.Case(case.workload, case.backend, "raw"))
        result = bench.aggregate(case, runs, raw)
        _SESSION.results[case] = result
        benchmark.extra_info.update(result.extra_info())
        return result

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _SESSION.results:
        return
    order = {c: i for i, c in enumerate(bench.cases())}
    results = sorted(_SESSION.results.values(), key=lambda r: order.get(r.case, 0))
    report = bench.BenchReport(rows=_SESSION.rows, rounds=_SESSION.rounds, results=results,
                               skipped=dict(_SESSION.skipped))
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=False, color_system=None).print(
        bench.render_table(report))
    terminalreporter.write_sep("=", "batchdb: raw vs batchdb")
    terminalreporter.write(out.getvalue())
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=False, color_system=None).print(
        verdict_table(results, _enforced(terminalreporter.config)))
    terminalreporter.write_sep("=", "batchdb: design targets")
    terminalreporter.write(out.getvalue())


def verdict_table(results: list[bench.BenchResult], enforced: bool) -> Table:
    """One line per result that has a design target: the target, the figure, the verdict
    (met; missed but within ``bench.TARGET_MARGIN``; missed)."""
    margin = bench.TARGET_MARGIN
    if enforced:
        title = f"targets ENFORCED (--bench-enforce, {margin:.0%} margin)"
    else:
        title = "targets reported, not enforced (--bench-enforce or BATCHDB_BENCH_ENFORCE=1)"
    table = Table(title=title, title_justify="left")
    table.add_column("benchmark")
    table.add_column("target")
    table.add_column("measured", justify="right")
    table.add_column("verdict")
    missed = 0
    for r in results:
        target = r.target_check()
        if target is None:
            continue
        if target.met:
            verdict = "met"
        elif target.met_within(margin):
            verdict = f"missed, within the {margin:.0%} margin"
        else:
            missed += 1
            verdict = "MISSED, benchmark failed" if enforced else "MISSED"
        table.add_row(escape(r.case.name), target.text, target.shown, verdict)
    table.caption = (f"{missed} target(s) missed beyond the margin" if missed
                     else "no target missed beyond the margin")
    return table


def plain_table(path: Path) -> None:
    """The one-table schema of the everyday suites: ``t (id INTEGER PRIMARY KEY, v, s)``."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v REAL NOT NULL, s TEXT)")
    conn.commit()
    conn.close()


def _interleaved(benchmark: Any, tmp_path: Path, rounds: int, n_rows: int,
                 variants: dict[str, Callable[[Path], float]], baseline: str,
                 label: str = "") -> dict[str, Any]:
    """Run every variant once per round on a fresh ``plain_table`` file, the variant that
    goes first rotating round by round; record medians, every round, the ratios of the
    medians to ``baseline``'s and the median of the per-round ratios in ``extra_info``, and
    print them."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    counter = iter(range(10**9))

    def one_round() -> None:
        names = list(variants)
        k = next(counter)
        for name in names[k % len(names):] + names[:k % len(names)]:  # rotate who goes first
            path = tmp_path / f"{name.replace(' ', '-').replace(',', '')}-{k}.sqlite3"
            plain_table(path)
            times[name].append(variants[name](path))
            path.unlink()

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    medians = {name: statistics.median(t) for name, t in times.items()}
    info = {
        "rows_per_s": {name: round(n_rows / m) for name, m in medians.items()},
        "rounds_rows_per_s": {name: [round(n_rows / s) for s in t] for name, t in times.items()},
        "ratio": {name: round(medians[baseline] / m, 3) for name, m in medians.items()},
        # each round's variants ran back to back: the median of the per-round ratios
        # cancels the drift of this machine's speed between rounds
        "paired_ratio": {name: round(statistics.median(
            b / s for b, s in zip(times[baseline], t, strict=True)), 3)
            for name, t in times.items()},
    }
    benchmark.extra_info.update(info)
    print()
    for name in variants:
        print(f"  {label}{name:<28} {info['rows_per_s'][name]:>10,} rows/s  "
              f"{info['ratio'][name]:.3f}x (paired {info['paired_ratio'][name]:.3f}x)  "
              f"rounds {info['rounds_rows_per_s'][name]}")
    return info


@pytest.fixture
def plain_table_at() -> Callable[[Path], None]:
    """:func:`plain_table`: creates the everyday suites' table in a new SQLite file."""
    return plain_table


@pytest.fixture
def interleaved() -> Callable[..., dict[str, Any]]:
    """``interleaved(benchmark, tmp_path, rounds, n_rows, variants, baseline, label="")``:
    variants of one workload measured round by round in one run (see ``_interleaved``)."""
    return _interleaved
