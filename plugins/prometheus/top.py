"""``batchdb top``: a live view of a running batchdb process, read from its metrics endpoint.

The process to watch serves ``/metrics`` (``[metrics] prometheus_port``); ``top`` reads it
once a second with ``urllib``, parses it with prometheus-client's parser and shows what
changed since the previous reading: rows/s from the counters' deltas, commit latency
p50/p99 per priority from the histogram buckets' deltas (interpolated inside a bucket, as
Prometheus's ``histogram_quantile`` does), the queues and their memory from the gauges.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Annotated

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["Reading", "TopError", "histogram_quantile", "read_metrics", "render", "top"]

_PRIORITIES = ("CRITICAL", "HIGH", "NORMAL", "LOW")
_INF = math.inf
DEFAULT_URL = "http://127.0.0.1:9464/metrics"


class TopError(Exception):
    """The endpoint did not answer with batchdb's metrics (the message says why)."""


Buckets = list[tuple[float, float]]  # (le, cumulative count), sorted, +Inf last


@dataclass
class Reading:
    """One reading of the endpoint: the figures ``top`` shows."""

    at: float
    running: bool = False
    queued: dict[str, float] = field(default_factory=dict)
    memory_bytes: dict[str, float] = field(default_factory=dict)
    oldest_wait: dict[str, float] = field(default_factory=dict)
    rows_by_table: dict[str, float] = field(default_factory=dict)
    committed: dict[str, float] = field(default_factory=dict)  # operations, by priority
    failed: dict[str, float] = field(default_factory=dict)
    latency: dict[str, Buckets] = field(default_factory=dict)
    batches_failed: float = 0.0
    in_flight: float = 0.0
    retries: float = 0.0
    splits: float = 0.0
    callbacks_pending: float = 0.0
    callbacks_late: float = 0.0
    callbacks_timed_out: float = 0.0

    @property
    def rows(self) -> float:
        """Rows committed, all tables."""
        return sum(self.rows_by_table.values())


def read_metrics(url: str, timeout: float = 2.0) -> Reading:
    """Read and parse the endpoint; :class:`TopError` saying why when it cannot."""
    from prometheus_client.parser import text_string_to_metric_families

    if not url.startswith(("http://", "https://")):
        raise TopError(f"--url must be an http:// or https:// URL, got {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise TopError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise TopError(f"nothing answers at {url}: "
                       f"{getattr(reason, 'strerror', None) or reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a URL that is not one
        raise TopError(f"nothing answers at {url}: {exc}") from None
    reading = Reading(at=time.monotonic())
    found = False
    try:
        for family in text_string_to_metric_families(text):
            if family.name.startswith("batchdb_"):
                found = True
            for sample in family.samples:
                _take(reading, sample.name, sample.labels, sample.value)
    except ValueError as exc:
        raise TopError(f"{url} does not serve Prometheus metrics: {exc}") from None
    if not found:
        raise TopError(f"{url} answers, but with no batchdb metrics (is it a batchdb "
                       "process with [metrics] prometheus_port set?)")
    for buckets in reading.latency.values():
        buckets.sort()
    return reading


def _take(r: Reading, name: str, labels: dict[str, str], value: float) -> None:
    priority = labels.get("priority", "")
    if name == "batchdb_queue_operations":
        r.running = True
        r.queued[priority] = value
    elif name == "batchdb_queue_memory_bytes":
        r.memory_bytes[priority] = value
    elif name == "batchdb_queue_oldest_wait_seconds":
        r.oldest_wait[priority] = value
    elif name == "batchdb_rows_committed_total":
        r.rows_by_table[labels.get("table", "")] = value
    elif name == "batchdb_operations_total":
        outcome = r.committed if labels.get("outcome") == "committed" else r.failed
        outcome[priority] = outcome.get(priority, 0.0) + value
    elif name == "batchdb_commit_latency_seconds_bucket":
        r.latency.setdefault(priority, []).append((float(labels["le"]), value))
    elif name == "batchdb_batches_total" and labels.get("outcome") == "failed":
        r.batches_failed += value
    else:
        scalar = _SCALARS.get(name)
        if scalar is not None:
            setattr(r, scalar, value)


_SCALARS = {
    "batchdb_batches_in_flight": "in_flight",
    "batchdb_batch_retries_total": "retries",
    "batchdb_batch_splits_total": "splits",
    "batchdb_callbacks_pending": "callbacks_pending",
    "batchdb_callbacks_running_late": "callbacks_late",
    "batchdb_callbacks_timed_out_total": "callbacks_timed_out",
}


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile of cumulative ``(le, count)`` buckets, interpolated linearly
    inside its bucket (Prometheus's ``histogram_quantile``); None without observations.
    In the +Inf bucket it is the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == _INF:
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _delta(now: Buckets, before: Buckets | None) -> Buckets:
    if not before or len(before) != len(now):
        return now
    return [(le, count - old) for (le, count), (_, old) in zip(now, before, strict=True)]


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:,.1f}"


def _rate(now: float, before: float | None, seconds: float) -> float | None:
    if before is None or seconds <= 0:
        return None
    return max(now - before, 0.0) / seconds  # a counter reset (a new run): no negative rate


def _mb(n: float) -> str:
    return f"{n / (1024 * 1024):,.1f} MB"


def render(url: str, now: Reading, before: Reading | None,
           problem: str | None = None, live: bool = True) -> RenderableType:
    """One frame: queues per priority, latency, throughput, retries and failures."""
    seconds = now.at - before.at if before is not None else 0.0
    queues = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("priority", "left"), ("queued ops", "right"), ("memory", "right"),
                          ("oldest wait", "right"), ("committed ops/s", "right"),
                          ("p50 ms", "right"), ("p99 ms", "right"), ("failed ops", "right")):
        queues.add_column(name, justify=justify)  # type: ignore[arg-type]
    for prio in _PRIORITIES:
        buckets = now.latency.get(prio, [])
        recent = _delta(buckets, before.latency.get(prio) if before else None)
        style = ""
        if before is not None and (not recent or recent[-1][1] <= 0):
            recent, style = buckets, "dim"  # no commit in the last interval: since start
        rate = _rate(now.committed.get(prio, 0.0),
                     before.committed.get(prio, 0.0) if before else None, seconds)
        queues.add_row(
            prio, f"{now.queued.get(prio, 0):,.0f}", _mb(now.memory_bytes.get(prio, 0.0)),
            f"{now.oldest_wait.get(prio, 0.0):.3f}s",
            "—" if rate is None else f"{rate:,.0f}",
            Text(_ms(histogram_quantile(0.5, recent)), style=style),
            Text(_ms(histogram_quantile(0.99, recent)), style=style),
            f"{now.failed.get(prio, 0):,.0f}")
    rows_rate = _rate(now.rows, before.rows if before else None, seconds)
    figures = Table(box=None, show_header=False, pad_edge=False)
    figures.add_column(style="bold")
    figures.add_column(justify="right")
    figures.add_row("rows/s", "—" if rows_rate is None else f"{rows_rate:,.0f}")
    figures.add_row("rows committed", f"{now.rows:,.0f}")
    figures.add_row("memory queued", _mb(sum(now.memory_bytes.values())))
    figures.add_row("batches in flight", f"{now.in_flight:,.0f}")
    figures.add_row("retries", f"{now.retries:,.0f}")
    figures.add_row("splits", f"{now.splits:,.0f}")
    figures.add_row("failed batches", f"{now.batches_failed:,.0f}")
    figures.add_row("callbacks pending", f"{now.callbacks_pending:,.0f}")
    figures.add_row("callbacks late / timed out",
                    f"{now.callbacks_late:,.0f} / {now.callbacks_timed_out:,.0f}")
    tables = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    tables.add_column("table")
    tables.add_column("rows/s", justify="right")
    tables.add_column("rows", justify="right")
    for table, rows in sorted(now.rows_by_table.items(), key=lambda kv: -kv[1])[:8]:
        rate = _rate(rows, before.rows_by_table.get(table, 0.0) if before else None, seconds)
        tables.add_row(table, "—" if rate is None else f"{rate:,.0f}", f"{rows:,.0f}")
    grid = Table.grid(padding=(0, 4))
    grid.add_row(figures, tables)
    parts: list[RenderableType] = [queues, grid]
    if not now.running:
        parts.append(Text("the process serves metrics but its manager is not running",
                          style="yellow"))
    if problem:
        parts.append(Text(problem, style="bold red"))
    parts.append(Text("latency over the last interval (dim: none then, since start)"
                      + (" · Ctrl-C to quit" if live else ""), style="dim"))
    return Panel(Group(*parts), title=f"batchdb top · {url}", title_align="left")


def top(
    url: Annotated[str, typer.Option("--url", help="The metrics endpoint of the process "
                                     "to watch ([metrics] prometheus_port).")] = DEFAULT_URL,
    once: Annotated[bool, typer.Option("--once", help="Read twice, one interval apart, "
                                       "print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1,
                                            help="Seconds between readings.")] = 1.0,
) -> None:
    """Live view of a running batchdb process, read from its Prometheus endpoint."""
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        err.print(Text("error: batchdb top needs prometheus-client, which is not installed: "
                       "pip install 'batchdb[metrics]'", style="bold red"))
        raise typer.Exit(1) from None
    try:
        before = read_metrics(url)
        if once:
            time.sleep(interval)
            out.print(render(url, read_metrics(url), before, live=False))
            return
        _live(out, url, before, interval)
    except TopError as exc:
        err.print(Text(f"error: {exc}", style="bold red"))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # Ctrl-C before the live view began: a clean end too
        raise typer.Exit(0) from None


def _live(out: Console, url: str, first: Reading, interval: float) -> None:
    from rich.live import Live

    before, problem = first, None
    shown = render(url, first, None)
    try:
        with Live(shown, console=out, auto_refresh=False) as live:
            next_at = time.monotonic() + interval
            while True:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
                try:
                    now = read_metrics(url)
                except TopError as exc:  # the process went away: say so, keep trying
                    problem = f"{exc} (since {time.strftime('%H:%M:%S')}; retrying)" \
                        if problem is None else problem
                    live.update(render(url, before, None, problem), refresh=True)
                    continue
                problem = None
                live.update(render(url, now, before), refresh=True)
                before = now
    except KeyboardInterrupt:
        return
