"""``batchdb collect``: the Upbit collector on the command line (registered through the
``batchdb_register_commands`` hook). The core command line's helpers (settings and error
handling, signals, tables) are imported when the command runs: this module is imported
while the core's is being built."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.progress import TimeElapsedColumn as Elapsed
from rich.text import Text

from .settings import UpbitSettings, require
from .timeframes import TIMEFRAMES, check_market, parse_when, timeframe

if TYPE_CHECKING:
    from batchdb.manager import BatchDBManager

    from .collector import Collector, CollectReport, MarketReport

__all__ = ["collect", "register"]


def _when_option(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_when(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _timeframe_option(value: str) -> str:
    try:
        return timeframe(value).name
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def collect(
    markets: Annotated[list[str], typer.Argument(
        show_default=False, help="Upbit market codes, e.g. KRW-BTC KRW-ETH.")],
    timeframe_name: Annotated[str, typer.Option(
        "--timeframe", "-t", callback=_timeframe_option, show_default=False,
        help=f"Candle unit: {', '.join(TIMEFRAMES)}.")],
    since: Annotated[str | None, typer.Option(
        "--since", callback=_when_option, show_default=False,
        help="Oldest candle wanted: ISO 8601 date or date-time, UTC unless it has a zone "
             "[default: the market's first candle].")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", callback=_when_option, show_default=False,
        help="Newest candle wanted, exclusive (ISO 8601) [default: now].")] = None,
    live: Annotated[bool, typer.Option(
        "--live", help="After the backfill, follow the current candles from Upbit's "
        "WebSocket until SIGINT/SIGTERM.")] = False,
    settings: Annotated[Path | None, typer.Option(
        "--settings", "-s", dir_okay=False, show_default=False,
        help="Settings file [default: $BATCHDB_SETTINGS or ./settings.toml, if present]."
    )] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", "-b", show_default=False,
        help="Backend plugin to use instead of the configured one.")] = None,
) -> None:
    """Collect Upbit candles into the **candles** table: backfill, resume, follow live.

    Pages backwards from --until (default now) down to --since, 200 candles a request,
    several markets at once within Upbit's rate limit ([upbit] requests_per_second and the
    Remaining-Req header). A second run fetches only what the store lacks. History is
    written at LOW priority, live updates at HIGH. SIGINT/SIGTERM stops cleanly: every
    candle fetched is committed. Exit code 0 when every market was collected (or the run
    was interrupted), 1 when a market failed or Upbit blocked the IP (HTTP 418).
    """
    from batchdb.cli import expected_errors, manager_from_options

    try:
        codes = list(dict.fromkeys(check_market(m) for m in markets))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'MARKETS...'") from None
    lo = parse_when(since) if since else None
    hi = parse_when(until) if until else None
    if lo is not None and hi is not None and lo >= hi:
        raise typer.BadParameter(f"--since {since} is not before --until {until}",
                                 param_hint="'--since'")
    if live and until:
        raise typer.BadParameter("--live follows the current candles: it takes no --until",
                                 param_hint="'--until'")
    with expected_errors():
        manager = manager_from_options(settings, backend)
        upbit = manager.settings.section("upbit", UpbitSettings)
        require("httpx")
        if live:
            require("websockets")
        code = asyncio.run(_run(manager, upbit, codes, timeframe_name, lo, hi, live))
    raise typer.Exit(code)


async def _run(manager: BatchDBManager, upbit: UpbitSettings, codes: list[str], tf: str,
               since: int | None, until: int | None, live: bool) -> int:
    from batchdb.cli import on_signals, stderr_console, stdout_console

    from .collector import Collector

    out, err = stdout_console(), stderr_console()
    progress = Progress(
        TextColumn("{task.description:<12}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[candles]:>10,} candles {task.fields[requests]:>7,} req"),
        TextColumn("{task.fields[state]}"), Elapsed(), console=err, transient=False)
    tasks: dict[str, TaskID] = {m: progress.add_task(m, total=None, candles=0, requests=0,
                                                     state="") for m in codes}

    def on_progress(report: MarketReport) -> None:
        state = ("[red]failed[/]" if report.error else "[green]done[/]" if report.done
                 else "")
        total = report.span_ms if report.span_ms else None
        completed = report.covered_ms if total else 0
        if report.done and not report.error:
            total = completed = max(report.span_ms or 1, 1)
        progress.update(tasks[report.market], total=total, completed=completed,
                        candles=report.candles, requests=report.requests, state=state)

    collector = Collector(manager, tf, settings=upbit, on_progress=on_progress)

    def on_signal(name: str) -> None:
        collector.stop(name)
        progress.console.print(Text(f"{name}: stopping: no more requests, committing what "
                                    "was fetched (again to quit at once)", style="yellow"))

    await manager.start()
    try:
        with on_signals(on_signal), progress:
            if live:
                progress.console.print(Text("after the backfill: following live until "
                                            "SIGINT/SIGTERM", style="dim"))
            report = await collector.collect(codes, since=since, until=until, live=live)
    finally:
        await manager.stop()
    _summary(out, err, collector, report)
    return 0 if report.ok else 1


def _summary(out: Console, err: Console, collector: Collector, report: CollectReport) -> None:
    from batchdb.cli import fmt_int, fmt_seconds, rich_table

    table = rich_table(f"collected {report.timeframe} candles from Upbit")
    table.add_column("market", no_wrap=True)
    for name in ("stored before", "fetched", "committed", "requests"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", overflow="fold")
    for m in report.markets.values():
        if m.error:
            status = Text(f"failed: {m.error}", style="red")
        elif m.done:
            status = Text("ok", style="green")
        else:
            status = Text("interrupted", style="yellow")
        table.add_row(Text(m.market), fmt_int(m.stored_before), fmt_int(m.candles),
                      fmt_int(m.committed), fmt_int(m.requests), status)
    c = report.counters
    table.add_section()
    table.add_row(Text(f"{len(report.markets)} market(s)", style="bold"), "",
                  fmt_int(report.candles),
                  fmt_int(sum(m.committed for m in report.markets.values())),
                  fmt_int(c.requests), "")
    out.print(table)
    figures: list[tuple[str, Any]] = [
        ("candles", fmt_int(report.candles)),
        ("requests", f"{c.requests:,} ({c.retries:,} retries: {c.rate_limited:,} 429s, "
                     f"{c.server_errors:,} 5xx, {c.network_errors:,} timeouts/drops)"),
        ("time", fmt_seconds(report.elapsed)),
    ]
    if report.live_connections or report.live_updates:
        figures.append(("live", f"{report.live_updates:,} updates over "
                                f"{report.live_connections:,} connection(s)"))
    for key, value in figures:
        out.print(f"[bold]{key}[/]  {value}", highlight=False)
    if report.blocked:
        err.print(Text(f"error: {report.blocked}", style="bold red"))
    elif report.live_error:
        err.print(Text(f"error: {report.live_error}", style="bold red"))
    if report.interrupted and not report.blocked:
        out.print(Text(f"Interrupted by {report.interrupted}: every candle fetched before it "
                       "was committed.", style="yellow"))


def register(app: typer.Typer) -> None:
    """Add ``collect`` to the ``batchdb`` program, with the core's tidy command class."""
    from batchdb.cli import Command

    app.command("collect", cls=Command)(collect)
