"""The benchmark's report: pytest-benchmark JSON, a PNG chart, a rich table and progress bar.

:func:`write_json` writes the layout of pytest-benchmark's ``--benchmark-json`` (``stats``
computed with its quartile method), so the comparison of ``batchdb bench`` and the suites in
``benchmarks/`` can be read by the same tools.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import sqlite3
import statistics
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from batchdb import __version__

from .data import WORKLOADS

if TYPE_CHECKING:
    from .runs import BenchReport

__all__ = [
    "ProgressCallback",
    "commit_info",
    "machine_info",
    "render_table",
    "rich_progress",
    "write_json",
    "write_plot",
]

ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, description)``: called before each run and once at the end."""


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
            # the name recorded comparisons (docs/bench/) carry, kept so they stay comparable
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

