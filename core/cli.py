"""The ``batchdb`` command line: ingest, demo, status, export, query, maintain, plugins,
config.

Every command reads the settings file given by ``--settings`` (default ``$BATCHDB_SETTINGS``
or ``./settings.toml``; built-in defaults when there is none) and takes ``--backend`` to use
another backend plugin. A wrong settings file or value exits with code 2 and one message that
names the file and the key; any other batchdb error exits with code 1 and its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
import typer.core
from pydantic import ValidationError
from rich import box
from rich.console import Console, Group
from rich.logging import RichHandler
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__
from .candles import candles_table
from .manager import BatchDBManager
from .models import BatchDBError, Priority
from .pluginmanager import BackendRegistry, UnknownBackend, create_plugin_manager, plugin_info
from .reads import epoch_ms
from .schema import quote_ident
from .settings import (
    SettingsError,
    explain_settings,
    load_settings,
    redact_dsn,
    resolve_settings_path,
)
from .workloads.demo import DEMO_TABLES, DemoReport, DemoWorkload
from .workloads.export import (
    DEFAULT_CHUNK_ROWS,
    ExportArgumentError,
    ExportReport,
    check_table,
    export_format,
    export_table,
    run_query,
    write_query,
)
from .workloads.ingest import FileReport, Ingester
from .workloads.readers import DEFAULT_CHUNK_SIZE

# the command kit for plugins adding commands (batchdb_register_commands, docs/hooks.md)
__all__ = ["Command", "app", "expected_errors", "fmt_int", "fmt_seconds", "main",
           "manager_from_options", "on_signals", "rich_table", "stderr_console", "stdout_console"]

T = TypeVar("T")

def _tidy_param(param: Any) -> None:
    """A parameter shown as a careful CLI shows it: a flag without a value type (``--help``,
    not ``--help <bool>``); an argument of many values as ``FILES...`` in the usage line
    and ``<path>`` in the help (not ``{files}...`` and ``<list[Path]>``)."""
    if isinstance(param, typer.core.TyperOption):
        if param.is_flag and param.metavar is None:
            param.metavar = ""  # what typer shows as the value's type
    elif isinstance(param, typer.core.TyperArgument) and type(param) is typer.core.TyperArgument:
        param.__class__ = _Argument


class _Argument(typer.core.TyperArgument):
    def display_type_rich(self, ctx: Any) -> str:
        shown = str(super().display_type_rich(ctx))
        element = re.fullmatch(r"<list\[(\w+)\]>", shown)
        return f"<{element.group(1).lower()}>" if element else shown

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = (self.metavar or self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return [name + ("..." if self.nargs != 1 else "")]

    def get_error_hint(self) -> str:  # "Missing argument 'FILES...'", as in the usage line
        name = (self.metavar or self.name or "").upper()
        return f"'{name}{'...' if self.nargs != 1 else ''}'"


def _clean_parameter_error(exc: typer.BadParameter) -> None:
    """An option error in plain words: without pydantic's "Value error," prefix, and with
    the value given when the message does not show it."""
    message = str(getattr(exc, "message", "")).removeprefix("Value error, ")
    cause = exc.__cause__
    if isinstance(cause, ValidationError) and cause.errors():
        given = cause.errors()[0].get("input")
        if given is not None and not isinstance(given, list | tuple) and str(given) not in message:
            message = f"{message} (got {given!r})"
    exc.message = message


class _TidyParams:
    """Options shown as a careful CLI shows them (see _tidy_param)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            _tidy_param(param)
        return params


class Command(_TidyParams, typer.core.TyperCommand):
    """typer's command, its help and its option errors tidied (see _tidy_param)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as exc:
            _clean_parameter_error(exc)
            raise


class _Group(_TidyParams, typer.core.TyperGroup):
    """The ``batchdb`` group: tidied help, and ``--version`` alone (``--version false``
    is an error, not the version)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if "--version" in args:
            at = args.index("--version")
            others = [a for a in args if a != "--version"]
            if all(a.startswith("-") for a in args[:at]) and others:
                raise typer.BadParameter(
                    f"takes no value and runs no command (got {' '.join(others)!r})",
                    ctx=ctx, param_hint="'--version'")
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="batchdb",
    cls=_Group,
    help="Priority-queued, memory-bounded batch writes to SQLite, DuckDB and PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold a DSN with its password
    rich_markup_mode="markdown",
)

SettingsOption = Annotated[
    Path | None,
    typer.Option(
        "--settings", "-s", dir_okay=False, show_default=False,
        help="Settings file [default: $BATCHDB_SETTINGS or ./settings.toml, if present].",
    ),
]
BackendOption = Annotated[
    str | None,
    typer.Option("--backend", "-b", show_default=False,
                 help="Backend plugin to use instead of the configured one."),
]
def _priority_option(value: str) -> str:
    """``--priority``: a priority's name in any case, shown in capitals like the default."""
    try:
        return Priority.parse(value).name
    except ValueError:
        names = ", ".join(p.name for p in sorted(Priority, reverse=True))
        raise typer.BadParameter(f"{value!r} is not one of {names} (in any case)") from None


# ---------------------------------------------------------------------- shared helpers
def stdout_console() -> Console:
    return Console(highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def expected_errors() -> Iterator[None]:
    """Turn the errors batchdb raises on purpose into one message and an exit code."""
    try:
        yield
    except SettingsError as exc:
        stderr_console().print(Text(f"error: {exc}", style="bold red"))
        raise typer.Exit(2) from None
    except BatchDBError as exc:
        stderr_console().print(Text(f"error: {exc}", style="bold red"))
        raise typer.Exit(1) from None


_LOGGING = {"configure": False}  # set by main(): an app embedding the CLI keeps its logging


def _setup_logging(level_name: str) -> None:
    """Log batchdb's records to stderr through rich, when run as the ``batchdb`` program.

    INFO records are left out unless the settings ask for DEBUG: the commands report what
    they did themselves.
    """
    if not _LOGGING["configure"]:
        return
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        level = logging.INFO
    logger = logging.getLogger("batchdb")
    logger.setLevel(level if level < logging.INFO else max(level, logging.WARNING))
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=stderr_console(), show_path=False, markup=False))
        logger.propagate = False


def _overrides(backend: str | None) -> dict[str, Any]:
    return {"backend": backend} if backend else {}


def _check_backend_option(backend: str | None) -> None:
    """``--backend NAME`` names an installed backend (a usage error, exit 2, otherwise)."""
    if backend is None:
        return
    try:
        BackendRegistry(create_plugin_manager()).get(backend)
    except UnknownBackend as exc:
        raise typer.BadParameter(str(exc), param_hint="'--backend'") from None


def manager_from_options(settings: Path | None, backend: str | None,
                         **overrides: Any) -> BatchDBManager:
    """A manager from the ``--settings`` and ``--backend`` options and ``overrides``
    (the settings file's structure); logging set up from its settings."""
    _check_backend_option(backend)
    manager = BatchDBManager.from_settings(settings, **_overrides(backend), **overrides)
    _setup_logging(manager.settings.log_level)
    _check_database_path(manager)
    return manager


def _check_database_path(manager: BatchDBManager) -> None:
    """The file of a file-based backend can be a database: not a directory, and in a
    directory that exists (a settings mistake: exit 2, naming the key and its source)."""
    path = _database_file(manager)
    if path is None:
        return
    where = manager.settings.where(f"{manager.backend_name}.path")
    if path.is_dir():
        raise SettingsError(f"{where}: {path} is a directory, not a database file")
    if not path.parent.is_dir():
        raise SettingsError(f"{where}: the directory {path.parent} of the database file "
                            f"{path} does not exist")


def _database_file(manager: BatchDBManager) -> Path | None:
    """The file of a file-based backend (one whose settings have a ``path``), if any."""
    path = getattr(manager.backend.settings, "path", None)
    if not isinstance(path, str) or not path or path == ":memory:":
        return None
    return Path(path)


def _require_database(manager: BatchDBManager) -> None:
    """Refuse to create an empty database file for a command that only reads or tidies."""
    path = _database_file(manager)
    if path is not None and not path.exists():
        raise BatchDBError(f"{manager.backend_name} database {path} does not exist yet "
                           "(nothing has been written; see `batchdb ingest` or `batchdb demo`)")


@contextlib.contextmanager
def on_signals(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback(name)`` on the first SIGINT/SIGTERM; a second one acts as usual."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def uninstall() -> None:
        while installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(installed.pop())

    def handler(sig: signal.Signals) -> None:
        uninstall()
        callback(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        uninstall()


def rich_table(title: str, **options: Any) -> Table:
    """A compact table (it has to fit 80 columns when the output is not a terminal)."""
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 pad_edge=False, collapse_padding=True, **options)


def fmt_int(value: float | int | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:,.2f}s"


def _show_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _iso_ms(ms: Any) -> str:
    try:
        return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ms)


# ---------------------------------------------------------------------- app
def _version(value: bool) -> None:
    if value:
        stdout_console().print(f"batchdb {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Priority-queued, memory-bounded batch writes through pluggable storage backends."""


# ---------------------------------------------------------------------- ingest
@app.command(cls=Command)
def ingest(
    files: Annotated[list[Path], typer.Argument(
        show_default=False, help="Candle files: JSON array (.json), NDJSON (.ndjson/.jsonl) "
        "or CSV (.csv) in the Upbit format.")],
    symbol: Annotated[str | None, typer.Option(
        "--symbol", help="Market of every candle [default: each candle's 'market'].")] = None,
    timeframe: Annotated[str | None, typer.Option(
        "--timeframe", help="Timeframe, e.g. 1m, 1d [default: from each candle's 'unit'].",
    )] = None,
    priority: Annotated[str, typer.Option(
        "--priority", metavar="<CRITICAL|HIGH|NORMAL|LOW>", callback=_priority_option,
        help="Queue priority of the writes (any case).")] = "NORMAL",
    source: Annotated[str, typer.Option(
        "--source", help="Candle format, i.e. the normaliser plugin to use.")] = "upbit",
    fmt: Annotated[Literal["auto", "json", "ndjson", "csv"], typer.Option(
        "--format", case_sensitive=False,
        help="File format; auto: from the extension and the first byte.")] = "auto",
    chunk_size: Annotated[int, typer.Option(
        "--chunk-size", min=1, help="Candles per insert_candles_batch call.",
    )] = DEFAULT_CHUNK_SIZE,
    max_errors: Annotated[int, typer.Option(
        "--max-errors", min=0, help="Problems printed one by one (all are counted).",
    )] = 100,
    settings: SettingsOption = None,
    backend: BackendOption = None,
) -> None:
    """Ingest Upbit-format candle files into the **candles** table.

    Files are streamed in chunks. A bad file, line or candle is reported with the file name
    and line number and the rest is still ingested. Exit code 0 when everything went in,
    1 when something failed. SIGINT/SIGTERM stops reading and commits what was read (exit
    code 0 unless something failed before).
    """
    for name, value in (("--symbol", symbol), ("--timeframe", timeframe), ("--source", source)):
        if value is not None and not value.strip():
            raise typer.BadParameter("must not be empty", param_hint=f"'{name}'")
    with expected_errors():
        manager = manager_from_options(settings, backend)
        ingester = Ingester(manager, symbol=symbol, timeframe=timeframe,
                            priority=Priority.parse(priority), source=source, fmt=fmt.lower(),
                            chunk_size=chunk_size)
        try:
            ingester.check_source()
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--source'") from None
        code = asyncio.run(_ingest(manager, ingester, files, max_errors))
    raise typer.Exit(code)


async def _ingest(manager: BatchDBManager, ingester: Ingester, files: Sequence[Path],
                  max_errors: int) -> int:
    out, err = stdout_console(), stderr_console()
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TextColumn("{task.fields[candles]:>10,} candles"), TimeElapsedColumn(),
        console=err, transient=False,
    )
    tasks: dict[str, TaskID] = {}
    shown = 0
    problems = 0
    signal_name: list[str] = []

    def on_error(message: str) -> None:
        nonlocal shown, problems
        problems += 1
        if shown < max_errors:
            shown += 1
            progress.console.print(Text(message, style="red"), soft_wrap=True)

    def on_progress(report: FileReport) -> None:
        task = tasks.get(report.path)
        if task is not None:
            progress.update(task, completed=report.bytes_read, candles=report.candles_read,
                            total=max(report.size_bytes, report.bytes_read) or None)

    def on_signal(name: str) -> None:
        signal_name.append(name)
        ingester.request_stop()
        progress.console.print(Text(f"{name}: stopping: no more reading, committing what "
                                    "was read (again to quit at once)", style="yellow"))

    ingester.on_error = on_error
    ingester.on_progress = on_progress
    for path in files:
        key = str(path)
        if key not in tasks:
            tasks[key] = progress.add_task(escape(path.name), total=None, candles=0)
    start = time.monotonic()
    await manager.start()
    try:
        with on_signals(on_signal), progress:
            reports = await ingester.ingest(files)
    finally:
        await manager.stop()
    elapsed = time.monotonic() - start
    _ingest_summary(out, reports, files, elapsed, signal_name[0] if signal_name else None)
    if problems > shown:
        err.print(Text(f"{problems - shown:,} more problem(s) not shown (--max-errors "
                       f"{max_errors})", style="red"))
    return 0 if all(r.ok for r in reports) else 1


def _ingest_summary(out: Console, reports: list[FileReport], files: Sequence[Path],
                    elapsed: float, interrupted: str | None) -> None:
    table = rich_table("ingest summary: candles read, rows committed, lines or candles failed")
    table.add_column("file", overflow="fold", min_width=12)
    table.add_column("format", no_wrap=True)
    for name in ("read", "committed", "failed", "rows/s", "elapsed"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    names = [Path(f).name for f in files]
    short = len(set(names)) == len(names)  # file names alone when they tell files apart
    for r in reports:
        if r.error is not None:
            status = Text("file error", style="red")
        elif r.failed:
            status = Text(f"{r.failed:,} failed", style="red")
        elif r.interrupted:
            status = Text("interrupted", style="yellow")
        else:
            status = Text("ok", style="green")
        table.add_row(Text(Path(r.path).name if short else r.path), r.format or "-",
                      fmt_int(r.candles_read), fmt_int(r.rows_committed), fmt_int(r.failed),
                      fmt_int(r.rows_per_second), fmt_seconds(r.elapsed), status)
    for path in files[len(reports):]:
        table.add_row(Text(path.name if short else str(path)), "-", "0", "0", "0", "-", "-",
                      Text("not read (interrupted)", style="yellow"))
    read = sum(r.candles_read for r in reports)
    committed = sum(r.rows_committed for r in reports)
    failed = sum(r.failed for r in reports)
    table.add_section()
    plural = "" if len(files) == 1 else "s"
    table.add_row(Text(f"{len(files)} file{plural}", style="bold"), "", fmt_int(read),
                  fmt_int(committed), fmt_int(failed),
                  fmt_int(committed / elapsed if elapsed > 0 else 0), fmt_seconds(elapsed), "")
    out.print(table)
    bad_files = [r for r in reports if r.error is not None]
    if failed or bad_files:
        parts = []
        if failed:
            parts.append(f"{failed:,} line(s)/candle(s) failed")
        if bad_files:
            parts.append(f"{len(bad_files)} file(s) could not be read completely")
        out.print(Text("Some input was not ingested: " + "; ".join(parts)
                       + " (see the file:line messages above).", style="bold red"))
        for r in bad_files:
            out.print(Text(f"file error: {r.path}: {r.error}", style="red"))
    else:
        out.print(Text(f"All {committed:,} candles committed.", style="bold green"))
    if interrupted:
        out.print(Text(f"Interrupted by {interrupted}: reading stopped; every candle read "
                       "before it was committed.", style="yellow"))


# ---------------------------------------------------------------------- demo
@app.command(cls=Command)
def demo(
    seconds: Annotated[float, typer.Option(
        "--seconds", min=0.5, help="How long the producers run.")] = 8.0,
    db: Annotated[Path | None, typer.Option(
        "--db", dir_okay=False, show_default=False,
        help="Database file for the sqlite/duckdb backend [default: from the settings, "
             "market_data.sqlite3 in the current directory].")] = None,
    settings: SettingsOption = None,
    backend: BackendOption = None,
) -> None:
    """Run a mixed-priority trading workload and watch the queues live.

    A trading bot writes orders (CRITICAL), a monitor upserts live candles (HIGH), a chart
    viewer backfills history (NORMAL) and a backtester writes results (LOW), all at once.
    """
    if db is not None and not db.parent.is_dir():
        raise typer.BadParameter(f"the directory {db.parent} of {db} does not exist",
                                 param_hint="'--db'")
    with expected_errors():
        overrides: dict[str, Any] = {}
        if db is not None:
            name = load_settings(settings, **_overrides(backend)).backend
            registry = BackendRegistry(create_plugin_manager())
            if "path" not in registry.get(name).settings_model.model_fields:
                raise typer.BadParameter(f"--db sets the file of a file-based backend; the "
                                         f"{name!r} backend has no file")
            overrides[name] = {"path": str(db)}
        manager = manager_from_options(settings, backend, **overrides)
        for table in DEMO_TABLES:
            manager.declare_table(table)
        report = asyncio.run(_demo(manager, seconds))
    raise typer.Exit(0 if report.ok else 1)


def _queue_panel(status: dict[str, Any], elapsed: float, seconds: float,
                 workload: DemoWorkload) -> Panel:
    queues = Table(box=None, expand=False, pad_edge=False)
    queues.add_column("priority")
    queues.add_column("queued ops", justify="right")
    queues.add_column("oldest wait", justify="right")
    sizes = status.get("queue_sizes", {})
    ages = status.get("oldest_wait_seconds", {})
    for prio in ("CRITICAL", "HIGH", "NORMAL", "LOW"):
        queues.add_row(prio, fmt_int(sizes.get(prio, 0)), f"{ages.get(prio, 0.0):.3f}s")
    stats = status.get("stats", {})
    latency = status.get("commit_latency", {})
    figures = Table(box=None, show_header=False, pad_edge=False)
    figures.add_column(style="bold")
    figures.add_column(justify="right")
    figures.add_row("memory", f"{status.get('estimated_memory_mb', 0.0):,.1f} MB")
    figures.add_row("rows committed", fmt_int(stats.get("rows_committed")))
    figures.add_row("batches", fmt_int(stats.get("batches_committed")))
    figures.add_row("in flight", fmt_int(status.get("batches_in_flight")))
    figures.add_row("commit latency p50", f"{_fmt_ms(latency.get('p50_ms'))} ms")
    figures.add_row("commit latency p99", f"{_fmt_ms(latency.get('p99_ms'))} ms")
    producers = Table(box=None, pad_edge=False)
    producers.add_column("producer")
    producers.add_column("priority")
    producers.add_column("ops ok", justify="right")
    producers.add_column("failed", justify="right")
    producers.add_column("rows", justify="right")
    for p in workload.producers:
        producers.add_row(p.name, p.priority.name, fmt_int(p.ops_ok), fmt_int(p.ops_failed),
                          fmt_int(p.rows_ok))
    grid = Table.grid(padding=(0, 4))
    grid.add_row(queues, figures)
    title = f"batchdb demo · {status.get('backend', '')} · {elapsed:,.1f}s of {seconds:g}s"
    return Panel(Group(grid, Text(""), producers), title=title, title_align="left")


async def _demo(manager: BatchDBManager, seconds: float) -> DemoReport:
    from rich.live import Live

    out = stdout_console()
    await manager.start()
    try:
        workload = DemoWorkload(manager)
        live = Live(console=out, auto_refresh=False, transient=False)
        last_line = 0.0

        def on_status(status: dict[str, Any], elapsed: float) -> None:
            nonlocal last_line
            live.update(_queue_panel(status, elapsed, seconds, workload), refresh=True)
            if not out.is_terminal and elapsed - last_line >= 1.0:
                last_line = elapsed  # no live display (a pipe or a file): a line a second
                stats = status.get("stats", {})
                sizes = status.get("queue_sizes", {})
                queued = " ".join(f"{p[0]}={sizes.get(p, 0)}"
                                  for p in ("CRITICAL", "HIGH", "NORMAL", "LOW"))
                out.print(f"{elapsed:5.1f}s  queued {queued}  committed "
                          f"{stats.get('rows_committed', 0):,} rows  "
                          f"{status.get('estimated_memory_mb', 0.0):.1f} MB")

        def on_signal(name: str) -> None:
            workload.request_stop(name)

        with on_signals(on_signal), live:
            report = await workload.run(seconds, on_status)
    finally:
        await manager.stop()
    if not out.is_terminal:
        out.line()  # the last live frame ends without a newline
    _demo_report(out, report)
    return report


def _demo_report(out: Console, report: DemoReport) -> None:
    rows = rich_table("rows in the database")
    rows.add_column("table")
    rows.add_column("rows", justify="right")
    for table, count in report.table_rows.items():
        rows.add_row(table, fmt_int(count))
    producers = rich_table("producers (latency: queued to committed)")
    producers.add_column("producer", no_wrap=True)
    producers.add_column("priority", no_wrap=True)
    producers.add_column("table", overflow="fold")
    for name in ("ops ok", "failed", "rows", "p50 ms", "p99 ms"):
        producers.add_column(name, justify="right", no_wrap=True)
    for p in report.producers:
        producers.add_row(p.name, p.priority.name, p.table, fmt_int(p.ops_ok),
                          fmt_int(p.ops_failed), fmt_int(p.rows_ok),
                          _fmt_ms(p.latency_ms(0.5)), _fmt_ms(p.latency_ms(0.99)))
    out.print(rows)
    out.print(producers)
    latency = report.commit_latency
    summary = Table(box=None, show_header=False, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("operations", f"{report.ops_ok:,} ok, {report.ops_failed:,} failed")
    summary.add_row("rows committed", f"{report.rows_committed:,} in "
                                      f"{report.batches_committed:,} batches")
    summary.add_row("throughput", f"{report.throughput:,.0f} rows/s over "
                                  f"{report.elapsed:.2f}s")
    summary.add_row("commit latency", f"p50 {_fmt_ms(latency.get('p50_ms'))} ms, "
                                      f"p99 {_fmt_ms(latency.get('p99_ms'))} ms, "
                                      f"max {_fmt_ms(latency.get('max_ms'))} ms")
    summary.add_row("database", Text(f"{report.database} ({report.backend})"))
    out.print(summary)
    for p in report.producers:
        if p.crashed:
            out.print(Text(f"{p.name} stopped early: {p.crashed}", style="bold red"))
        for message in p.errors[:5]:
            out.print(Text(f"{p.name}: {message}", style="red"))
    if report.interrupted:
        out.print(Text(f"Interrupted by {report.interrupted}: producers stopped, everything "
                       "queued was committed.", style="yellow"))


# ---------------------------------------------------------------------- status
@app.command(cls=Command)
def status(settings: SettingsOption = None, backend: BackendOption = None) -> None:
    """Show the database: backend status, tables with row counts, candles per market."""
    with expected_errors():
        manager = manager_from_options(settings, backend, maintenance={"enabled": False})
        _require_database(manager)
        # the spool is read, not opened: a running producer holds its lock
        spool = manager.settings.spool.model_copy()
        manager.settings.spool.enabled = False
        try:
            asyncio.run(_status(manager))
        except Exception as exc:
            if not spool.enabled or isinstance(exc, SettingsError):
                raise
            _spool_panel(spool.path, f"down ({exc})")
            raise typer.Exit(1) from None
        if spool.enabled:
            _spool_panel(spool.path, None)


def _spool_panel(path: str, error: str | None) -> None:
    """The spool's figures and the database's state (``up``, ``down since …``)."""
    from .spool import inspect_spool

    out = stdout_console()
    found = inspect_spool(path)
    table = rich_table(f"spool {Path(path).absolute()}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    if found is not None and found["down_since"] is not None:
        since = datetime.fromtimestamp(found["down_since"], UTC).isoformat(timespec="seconds")
        state = f"down since {since}" + (f": {error}" if error else "")
    else:
        state = error or "up"
    table.add_row("database", Text(state, style="red" if state != "up" else "green"))
    if found is None:
        table.add_row("operations", Text("0 (no spool there yet)"))
    else:
        age = found["oldest_age_seconds"]
        table.add_row("operations", fmt_int(found["operations"]))
        table.add_row("bytes", fmt_int(found["bytes"]))
        table.add_row("oldest", Text("-" if age is None else fmt_seconds(age)))
        table.add_row("tables", Text(", ".join(found["tables"]) or "-"))
    out.print(table)


async def _status(manager: BatchDBManager) -> None:
    out = stdout_console()
    await manager.start()
    try:
        backend_status = await manager.backend.status()
        tables = await manager.list_tables()
        counts: dict[str, int | str] = {}
        for name in tables:
            try:
                rows = await manager.fetch(f"SELECT COUNT(*) FROM {quote_ident(name)}")  # noqa: S608
            except Exception as exc:
                # one unreadable table (say, a virtual table whose module is not loaded) is
                # shown as such; the others are still counted
                counts[name] = f"cannot count: {exc}"
                continue
            counts[name] = int(rows[0][0])
        per_market: list[tuple[Any, ...]] = []
        not_ours = None
        if candles_table.name in tables:
            described = await manager.backend.describe_table(candles_table.name)
            columns = described.columns if described is not None else ()
            missing = [c for c in ("symbol", "timeframe", "ts") if c not in columns]
            if missing:  # a table of the user's own called candles
                not_ours = (f"the table candles is not batchdb's candles table (it has no "
                            f"column {', '.join(missing)}; its columns: "
                            f"{', '.join(columns) or 'none'}): no per-market summary")
            else:
                try:
                    per_market = await manager.fetch(
                        "SELECT symbol, timeframe, COUNT(*), MIN(ts), MAX(ts) FROM candles "
                        "GROUP BY symbol, timeframe ORDER BY symbol, timeframe")
                except Exception as exc:  # the user's database: report it, show the rest
                    not_ours = f"candles per market cannot be read: {exc}"
    finally:
        await manager.stop()
    info = rich_table(f"backend {manager.backend_name}", show_header=False)
    info.add_column(style="bold")
    info.add_column(overflow="fold")
    for key, value in backend_status.items():
        shown = redact_dsn(value) if isinstance(value, str) else value
        if isinstance(value, int) and not isinstance(value, bool) and "bytes" in key:
            shown = f"{value:,}"
        info.add_row(key, Text(_show_value(shown)))
    out.print(info)
    table = rich_table("tables")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, count in counts.items():
        table.add_row(Text(name), Text(count, style="red") if isinstance(count, str)
                      else fmt_int(count))
    if not counts:
        table.add_row(Text("(no tables yet)", style="dim"), "")
    out.print(table)
    if per_market:
        candles = rich_table("candles per market and timeframe")
        for name, justify in (("symbol", "left"), ("timeframe", "left"), ("rows", "right"),
                              ("first (UTC)", "left"), ("last (UTC)", "left")):
            candles.add_column(name, justify=justify)  # type: ignore[arg-type]
        for symbol, timeframe, count, first, last in per_market:
            candles.add_row(Text(str(symbol)), Text(str(timeframe)), fmt_int(count),
                            _iso_ms(first), _iso_ms(last))
        out.print(candles)
    if not_ours is not None:
        out.print(Text(not_ours, style="yellow"))


# ---------------------------------------------------------------------- export
def _when_option(value: str | None) -> str | None:
    """``--since``/``--until``: ISO 8601 or epoch milliseconds (checked before anything
    opens; the export converts it)."""
    if value is not None:
        try:
            epoch_ms(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc).removeprefix("time: ")) from None
    return value


@app.command(cls=Command)
def export(
    table: Annotated[str, typer.Argument(
        show_default=False, help="Table to export, as `batchdb status` lists it.")],
    to: Annotated[Path, typer.Option(
        "--to", dir_okay=False, show_default=False,
        help="File to write: FILE.parquet or FILE.csv (the extension chooses the format).")],
    market: Annotated[str | None, typer.Option(
        "--market", help="Only this market (the symbol column, or market).")] = None,
    timeframe: Annotated[str | None, typer.Option(
        "--timeframe", help="Only this timeframe, e.g. 1m.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="WHEN", callback=_when_option,
        help="Only rows with ts >= WHEN: ISO 8601 (2024-01-02, 2024-01-02T09:00:00Z; "
             "UTC unless it says otherwise) or epoch milliseconds.")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", metavar="WHEN", callback=_when_option,
        help="Only rows with ts < WHEN (as --since).")] = None,
    chunk_rows: Annotated[int, typer.Option(
        "--chunk-rows", min=1, help="Rows read and written at a time (a Parquet row group).",
    )] = DEFAULT_CHUNK_ROWS,
    settings: SettingsOption = None,
    backend: BackendOption = None,
) -> None:
    """Export a table to Parquet or CSV, streamed in chunks, with a progress bar.

    Memory stays flat whatever the table's size. --market, --timeframe, --since and --until
    apply to tables with those columns (candles); the file appears complete or not at all.
    """
    try:
        export_format(to)
    except ExportArgumentError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--to'") from None
    with expected_errors():
        manager = manager_from_options(settings, backend, maintenance={"enabled": False})
        _require_database(manager)
        try:
            report = asyncio.run(_export(manager, table, to, market=market,
                                         timeframe=timeframe, since=since, until=until,
                                         chunk_rows=chunk_rows))
        except ExportArgumentError as exc:
            raise typer.BadParameter(str(exc)) from None
    stdout_console().print(Text(
        f"Exported {report.rows:,} rows of {report.table} to {report.path} ({report.format}, "
        f"{report.bytes:,} bytes) in {fmt_seconds(report.seconds)} "
        f"({fmt_int(report.rows_per_second)} rows/s).", style="bold green"))


async def _export(manager: BatchDBManager, table: str, to: Path,
                  **options: Any) -> ExportReport:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("rows"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=stderr_console(), transient=False)
    task = progress.add_task(escape(f"{table} → {to.name}"), total=None)
    await manager.start()
    try:
        await check_table(manager, table)  # before the progress bar shows
        with progress:
            return await _database_errors(export_table(
                manager, table, to, on_total=lambda n: progress.update(task, total=n),
                on_rows=lambda n: progress.advance(task, n), **options))
    finally:
        await manager.stop()


async def _database_errors(work: Awaitable[T]) -> T:
    """``work``, with an error of the database's driver (a syntax error, a missing column)
    or of the file (a full disk) turned into a BatchDBError carrying its message: exit
    code 1, no traceback."""
    try:
        return await work
    except (BatchDBError, BrokenPipeError):  # the reader of the output went away
        raise
    except Exception as exc:
        raise BatchDBError(f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------- query
@app.command(cls=Command)
def query(
    sql: Annotated[str, typer.Argument(
        show_default=False, help="A read-only statement: SELECT, WITH … SELECT, EXPLAIN.")],
    fmt: Annotated[Literal["table", "csv", "json"], typer.Option(
        "--format", case_sensitive=False,
        help="table: a table on the terminal; csv or json: for other programs.")] = "table",
    settings: SettingsOption = None,
    backend: BackendOption = None,
) -> None:
    """Run a read-only query and print its rows; a statement that would write is refused."""
    with expected_errors():
        manager = manager_from_options(settings, backend, maintenance={"enabled": False})
        _require_database(manager)
        fmt = fmt.lower()  # type: ignore[assignment]
        if fmt != "table":  # streamed as the rows come
            with _stdout_to_a_pipe():
                asyncio.run(_query(manager, lambda: write_query(manager, sql, sys.stdout, fmt)))
            return
        columns, rows = asyncio.run(_query(manager, lambda: run_query(manager, sql)))
    table = rich_table(f"{len(rows):,} row{'' if len(rows) == 1 else 's'}")
    for name in columns:
        table.add_column(Text(name), overflow="fold")
    for row in rows:
        table.add_row(*(Text("NULL", style="dim") if v is None else Text(str(v)) for v in row))
    stdout_console().print(table)


async def _query(manager: BatchDBManager, work: Callable[[], Awaitable[T]]) -> T:
    await manager.start()
    try:
        return await _database_errors(work())
    finally:
        await manager.stop()


@contextlib.contextmanager
def _stdout_to_a_pipe() -> Iterator[None]:
    """A reader that stops early (``batchdb query … | head``) ends the output quietly, as
    Python's documentation on SIGPIPE advises: stdout is pointed at devnull so that the
    interpreter's last flush does not fail again, and the exit code is 1."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(1) from None


# ---------------------------------------------------------------------- maintain
@app.command(cls=Command)
def maintain(
    tasks: Annotated[list[str] | None, typer.Argument(
        show_default=False, help="Tasks to run, e.g. checkpoint analyze vacuum "
        "integrity_check [default: all the backend's tasks but integrity_check].")] = None,
    settings: SettingsOption = None,
    backend: BackendOption = None,
) -> None:
    """Run maintenance tasks now and show what they did."""
    with expected_errors():
        manager = manager_from_options(settings, backend, maintenance={"enabled": False})
        known = manager.backend.maintenance_tasks
        unknown = [t for t in tasks or () if t not in known]
        if unknown:  # before anything runs: an argument mistake
            raise typer.BadParameter(
                f"backend {manager.backend_name!r} has no maintenance task "
                f"{', '.join(map(repr, unknown))}; it has: {', '.join(known) or 'none'}",
                param_hint="'TASKS...'")
        _require_database(manager)
        chosen = list(tasks) if tasks else [t for t in known if t != "integrity_check"]
        results = asyncio.run(_maintain(manager, chosen))
    out = stdout_console()
    table = rich_table(f"maintenance on {manager.backend_name}")
    table.add_column("task")
    table.add_column("status")
    table.add_column("result", overflow="fold")
    failed = 0
    for task, ok, result in results:
        failed += not ok
        table.add_row(Text(task), Text("ok", style="green") if ok else
                      Text("failed", style="bold red"), Text(result))
    out.print(table)
    if not chosen:
        out.print(f"backend {manager.backend_name!r} has no maintenance tasks")
    raise typer.Exit(1 if failed else 0)


async def _maintain(manager: BatchDBManager,
                    tasks: Sequence[str]) -> list[tuple[str, bool, str]]:
    results = []
    await manager.start()
    try:
        for task in tasks:
            try:
                result = await manager.maintain(task)
            except (BatchDBError, ValueError) as exc:
                results.append((task, False, str(exc)))
                continue
            ok = bool(result.get("ok", True))
            shown = ", ".join(f"{k}={_show_value(v)}" for k, v in result.items())
            results.append((task, ok, shown))
    finally:
        await manager.stop()
    return results


# ---------------------------------------------------------------------- plugins
@app.command(cls=Command)
def plugins(settings: SettingsOption = None, backend: BackendOption = None) -> None:
    """List the plugins found through the ``batchdb`` entry points, and the backends."""
    with expected_errors():
        _check_backend_option(backend)
        loaded = load_settings(settings, **_overrides(backend))
        _setup_logging(loaded.log_level)
        pm = create_plugin_manager(loaded.plugins.disabled)
        registry = BackendRegistry(pm)
    out = stdout_console()
    table = rich_table("plugins (entry-point group 'batchdb')")
    for name in ("name", "module", "distribution", "hooks (batchdb_…)", "status"):
        table.add_column(name, overflow="fold")
    for info in sorted(plugin_info(pm), key=lambda i: str(i["name"])):
        if info.get("error"):
            state = Text(f"failed: {info['error']}", style="red")
        elif info.get("disabled"):
            state = Text("disabled", style="yellow")
        else:
            state = Text("loaded", style="green")
        hooks = ", ".join(h.removeprefix("batchdb_") for h in info["hooks"])
        table.add_row(Text(str(info["name"])), Text(str(info["module"])),
                      Text(str(info["distribution"])), Text(hooks), state)
    out.print(table)
    backends = rich_table("backends")
    backends.add_column("name")
    backends.add_column("class", overflow="fold")
    backends.add_column("maintenance tasks", overflow="fold")
    backends.add_column("")
    for name in registry.names():
        cls = registry.get(name)
        backends.add_row(Text(name), Text(f"{cls.__module__}.{cls.__qualname__}"),
                         Text(", ".join(cls.maintenance_tasks)),
                         Text("configured", style="bold") if name == loaded.backend else "")
    out.print(backends)
    if loaded.backend not in registry.names():
        stderr_console().print(Text(f"error: {loaded.where('backend')}: the backend "
                             f"{loaded.backend!r} is not available", style="bold red"))
        raise typer.Exit(2)


# ---------------------------------------------------------------------- config
_SECRET_WORDS = ("password", "secret", "token", "api_key")


@app.command(cls=Command)
def config(settings: SettingsOption = None, backend: BackendOption = None) -> None:
    """Show the effective settings and where each value comes from."""
    with expected_errors():
        _check_backend_option(backend)
        sections = BackendRegistry(create_plugin_manager()).settings_sections()
        rows = explain_settings(settings, sections, **_overrides(backend))
        path = resolve_settings_path(settings)
    out = stdout_console()
    table = rich_table("effective settings", caption=f"settings file: {path or '(none)'}",
                   caption_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for key, value, source in rows:
        leaf = key.rsplit(".", 1)[-1].lower()
        if isinstance(value, str) and "dsn" in leaf:
            value = redact_dsn(value)
        elif any(word in leaf for word in _SECRET_WORDS) and value:
            value = "***"
        if source.startswith("file "):
            source = "file"  # the path is in the caption
        style = "dim" if source == "default" else ""
        table.add_row(Text(key), Text(_show_value(value)), Text(source, style=style))
    out.print(table)


# ---------------------------------------------------------------------- bench
@app.command(cls=Command)
def bench(
    backends: Annotated[str, typer.Option(
        "--backends", help="Comma-separated backends to compare: sqlite,duckdb,postgres "
        "(postgres needs BATCHDB_BENCH_PG_DSN).")] = "sqlite,duckdb,postgres",
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows per workload.")] = 1_000_000,
    rounds: Annotated[int, typer.Option("--rounds", min=1,
                                        help="Runs per case (the median is reported).")] = 3,
    out: Annotated[Path, typer.Option(
        "--out", file_okay=False, help="Folder for batchdb-bench.json (pytest-benchmark format) "
        "and batchdb-bench.png.")] = Path("bench-results"),
) -> None:
    """Raw drivers vs batchdb on this machine: rows/s, ratio to raw, peak memory."""
    from .workloads.bench import render_table, rich_progress, run_comparison

    console = stdout_console()
    names = [b.strip() for b in backends.split(",") if b.strip()]
    try:  # before minutes of benchmarking: the results must have somewhere to go
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as exc:
        raise typer.BadParameter(f"cannot write to the folder {out}: "
                                 f"{exc.strerror or exc}", param_hint="'--out'") from None
    with expected_errors():
        try:
            with rich_progress(console) as progress:
                report = run_comparison(names, rows, out, progress, rounds=rounds)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--backends'") from None
    console.print(render_table(report))
    console.print(f"JSON: {report.json_path}"
                  + (f"   chart: {report.png_path}" if report.png_path else ""))
    if any(r.error for r in report.results):
        raise typer.Exit(1)


def _register_plugin_commands() -> None:
    """Commands of installed plugins (``batchdb_register_commands``), e.g. ``collect``."""
    create_plugin_manager().hook.batchdb_register_commands(app=app)


_register_plugin_commands()


def main() -> None:
    """Entry point of the ``batchdb`` console script."""
    _LOGGING["configure"] = True
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
