"""The Upbit candle collector: backfill history over REST, resume what the store lacks,
follow the current candles live (``live.py``), all written through batchdb's queues.

Paging goes backwards from ``until`` with ``to`` (exclusive) and ``count=200``, newest
first. A minute without trades has no candle, so a page may hold fewer candles than it
spans or skip minutes: the next ``to`` is the older of the page's oldest candle and the
page's span (200 units before ``to``), which is right whether Upbit counts 200 candles or
200 units, and only an empty page (nothing older) or reaching ``since`` ends the paging.

Resume reads the oldest and newest stored candle of the market and timeframe and fetches
only what lies outside them: from ``until`` down to the newest stored candle (included: it
may have been the unfinished current candle) and from the oldest stored one down to
``since``. A candle fetched twice is an upsert on (symbol, timeframe, ts), never a
duplicate. History is written at LOW priority, live updates at HIGH.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from batchdb.candles import candles_table
from batchdb.models import BatchDBError, BatchOperation, Priority

from .client import MAX_COUNT, Counters, UpbitBlocked, UpbitClient, UpbitError
from .ratelimit import RateLimiter
from .settings import UpbitSettings, require
from .timeframes import Timeframe, check_market, parse_when, timeframe

if TYPE_CHECKING:
    from batchdb.manager import BatchDBManager

__all__ = ["CollectReport", "Collector", "MarketReport"]

_T = TypeVar("_T")
_STORED = "SELECT MIN(ts), MAX(ts), COUNT(*) FROM candles WHERE symbol = ? AND timeframe = ?"


def _iso(ms: int) -> str:
    """``candle_date_time_utc`` of an instant (they compare as strings, in order)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.rstrip("Zz")).replace(tzinfo=UTC).timestamp() * 1000)


def _when(value: int | str | datetime | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(aware.timestamp() * 1000)
    return parse_when(value)


@dataclass
class MarketReport:
    """One market's backfill: what was planned, fetched and written."""

    market: str
    timeframe: str
    ranges: list[tuple[int | None, int]] = field(default_factory=list)  # [lo, hi) to fetch
    stored_before: int = 0  # candles of this market/timeframe in the store at the start
    candles: int = 0  # candles fetched and queued for writing
    committed: int = 0  # of which committed (the others failed: see error)
    requests: int = 0  # pages fetched
    span_ms: int | None = 0  # time the ranges cover (None: down to the market's start)
    covered_ms: int = 0  # of which already paged through
    newest_ms: int | None = None  # newest candle fetched or stored
    done: bool = False
    error: str | None = None


@dataclass
class CollectReport:
    """A collection run: per market, the shared request counters, and how it ended."""

    timeframe: str
    markets: dict[str, MarketReport]
    counters: Counters
    elapsed: float = 0.0
    interrupted: str | None = None  # the reason stop() was called with
    blocked: str | None = None  # Upbit's 418, if it came
    live_updates: int = 0  # candles upserted from the WebSocket
    live_connections: int = 0
    live_error: str | None = None

    @property
    def candles(self) -> int:
        """Candles fetched over REST and queued, all markets."""
        return sum(m.candles for m in self.markets.values())

    @property
    def ok(self) -> bool:
        """No market failed, no block, the live stream (if any) did not fail."""
        return (self.blocked is None and self.live_error is None
                and all(m.error is None for m in self.markets.values()))


class Collector:
    """Collects Upbit candles of one timeframe into a running manager's ``candles`` table.

    ``settings`` default to the manager's ``[upbit]`` section. Many markets are fetched at
    once, all within one shared rate limit. ``stop()`` (safe from a signal handler) ends
    the work between two pages: every page fetched is queued, and ``manager.stop()``
    commits it.

    >>> async with BatchDBManager.from_settings() as manager:      # doctest: +SKIP
    ...     collector = Collector(manager, "1m")
    ...     report = await collector.collect(["KRW-BTC", "KRW-ETH"], since="2024-03-01")
    """

    def __init__(self, manager: BatchDBManager, timeframe_name: str, *,
                 settings: UpbitSettings | None = None,
                 on_progress: Callable[[MarketReport], None] | None = None,
                 backoff_base: float = 0.25, backoff_cap: float = 30.0) -> None:
        require("httpx")
        self.manager = manager
        self.timeframe: Timeframe = timeframe(timeframe_name)
        self.settings = settings if settings is not None else \
            manager.settings.section("upbit", UpbitSettings)
        self.on_progress = on_progress
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.counters = Counters()
        self.limiter = RateLimiter(self.settings.requests_per_second)
        self.report = CollectReport(self.timeframe.name, {}, self.counters)
        self._stop = asyncio.Event()
        self._client: UpbitClient | None = None

    # ------------------------------------------------------------------ control
    def stop(self, reason: str = "stop()") -> None:
        """End the collection between two pages (and the live stream): what was fetched is
        queued; nothing more is requested."""
        if self.report.interrupted is None:
            self.report.interrupted = reason
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (or Upbit blocked us)."""
        return self._stop.is_set()

    async def unless_stopped(self, work: Awaitable[_T]) -> tuple[bool, _T | None]:
        """``(True, result)`` of ``work``, or ``(False, None)`` if stop() came first (the
        work is cancelled: an HTTP request or a wait, never a write)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False, None

    def _progress(self, report: MarketReport) -> None:
        if self.on_progress is not None:
            self.on_progress(report)

    # ------------------------------------------------------------------ entry points
    async def collect(self, markets: Iterable[str], *,
                      since: int | str | datetime | None = None,
                      until: int | str | datetime | None = None,
                      live: bool = False) -> CollectReport:
        """Backfill ``markets`` from ``until`` (default now) down to ``since`` (default:
        the market's first candle), fetching only what the store lacks; with ``live``,
        then follow their current candles until :meth:`stop`. Returns once everything
        fetched is committed."""
        codes = list(dict.fromkeys(check_market(m) for m in markets))
        if not codes:
            raise ValueError("no market given")
        lo, hi = _when(since), _when(until)
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"since ({_iso(lo)}) must be before until ({_iso(hi)})")
        if live and hi is not None:
            raise ValueError("until and live do not go together: live follows now")
        start = time.monotonic()
        self._client = UpbitClient(self.settings, self.limiter, self.counters,
                                   backoff_base=self.backoff_base, backoff_cap=self.backoff_cap)
        try:
            await self.manager.table_info(candles_table.name)  # created if missing
            for code in codes:
                self.report.markets.setdefault(
                    code, MarketReport(code, self.timeframe.name))
            await asyncio.gather(*(self._backfill(self.report.markets[c], lo, hi)
                                   for c in codes))
            if live and not self.stopping:
                from .live import LiveFollower

                await LiveFollower(self, codes).run()
            await self.manager.flush()  # the report speaks of committed candles
        finally:
            await self._client.aclose()
            self._client = None
            self.report.elapsed = time.monotonic() - start
        return self.report

    # ------------------------------------------------------------------ backfill
    async def plan(self, market: str, since: int | None, until: int | None
                   ) -> tuple[list[tuple[int | None, int]], int, int | None]:
        """The ranges ``[lo, hi)`` the store lacks (newest first), the candles stored, and
        the newest stored candle."""
        hi = until if until is not None else int(time.time() * 1000)
        (oldest, newest, count), = await self.manager.fetch(
            _STORED, (market, self.timeframe.name))
        if not count:
            return [(since, hi)], 0, None
        oldest, newest = int(oldest), int(newest)
        ranges: list[tuple[int | None, int]] = []
        if hi > newest:  # newer than the store; its newest candle again (maybe unfinished)
            ranges.append((newest if since is None else max(newest, since), hi))
        if since is None or since < oldest:  # older than the store, down to since
            ranges.append((since, min(oldest, hi)))
        return ranges, int(count), newest

    async def _backfill(self, report: MarketReport, since: int | None,
                        until: int | None) -> None:
        try:
            report.ranges, report.stored_before, report.newest_ms = await self.plan(
                report.market, since, until)
            spans = [hi - lo for lo, hi in report.ranges if lo is not None]
            report.span_ms = sum(spans) if len(spans) == len(report.ranges) else None
            self._progress(report)
            for lo, hi in report.ranges:
                if not await self.fetch_range(report, lo, hi, Priority.LOW):
                    break
            report.done = not self.stopping
        except UpbitBlocked as exc:
            report.error = self.report.blocked = str(exc)
            self.stop("Upbit blocked this IP (HTTP 418)")
        except (UpbitError, BatchDBError, ValueError) as exc:
            report.error = str(exc)  # this market fails alone
        self._progress(report)

    async def fetch_range(self, report: MarketReport, lo: int | None, hi: int,
                          priority: Priority) -> bool:
        """Page ``[lo, hi)`` of ``report.market`` backwards into the store at ``priority``;
        False if stop() ended it early."""
        assert self._client is not None
        tf = self.timeframe
        lo_iso = _iso(lo) if lo is not None else None
        to = hi
        base = report.covered_ms  # progress: the time paged through, as a share of the span
        while True:
            finished, page = await self.unless_stopped(
                self._client.candles(tf, report.market, to))
            if not finished or page is None:
                return False
            report.requests += 1
            if not page:  # nothing older: the market's first candle was reached
                break
            times = [c.get("candle_date_time_utc") for c in page]
            if not all(isinstance(t, str) for t in times):
                raise UpbitError(f"a candle of {report.market} has no candle_date_time_utc")
            oldest_iso: str = min(cast("list[str]", times))
            keep = page if lo_iso is None or oldest_iso >= lo_iso else \
                [c for c in page if c["candle_date_time_utc"] >= lo_iso]
            if keep:
                # a write is never cancelled: once fetched, a page is queued (and committed)
                await self.manager.insert_candles_batch(report.market, tf.name, keep, priority,
                                                        self.write_callback(report, len(keep)))
                report.candles += len(keep)
                newest = _ms(max(c["candle_date_time_utc"] for c in keep))
                if report.newest_ms is None or newest > report.newest_ms:
                    report.newest_ms = newest
            oldest = _ms(oldest_iso)
            report.covered_ms = base + hi - max(oldest, lo if lo is not None else oldest)
            self._progress(report)
            if lo is not None and oldest <= lo:
                break
            next_to = oldest
            if tf.step_ms is not None:  # 200 units back, across minutes without trades
                next_to = min(oldest, to - MAX_COUNT * tf.step_ms)
            if next_to >= to:  # a server sending candles at or after `to`: do not loop
                raise UpbitError(f"Upbit sent candles of {report.market} at or after "
                                 f"to={_iso(to)}: paging cannot go on")
            to = next_to
        if lo is not None:
            report.covered_ms = base + hi - lo
        return True

    @staticmethod
    def write_callback(report: MarketReport, n: int) -> Callable[[BatchOperation], None]:
        """Counts the candles of one write as committed, or records why they were not."""
        def done(op: BatchOperation) -> None:
            if op.error is None:
                report.committed += n
            elif report.error is None:
                report.error = f"writing {n} candles failed: {op.error}"
        return done

    async def latest(self, market: str) -> dict[str, Any] | None:
        """The current (newest) candle of ``market`` over REST, or None."""
        assert self._client is not None
        page = await self._client.candles(self.timeframe, market, None, 1)
        return page[0] if page else None
