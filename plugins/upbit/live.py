"""``--live``: the markets' current candles from Upbit's quotation WebSocket.

The subscription is ``[{"ticket": …}, {"type": "candle.1m", "codes": [...]}, {"format":
"DEFAULT"}]``: DEFAULT keeps the REST field names (``opening_price``,
``candle_date_time_utc``, …), so each update goes through the same normaliser and the same
``insert_candles_batch`` as the history, at HIGH priority. SIMPLE would shorten the names
(``op``, ``cdttmu``) to save bandwidth; a few markets do not need that.

Upbit streams ``candle.1s`` and ``candle.1m`` … ``candle.240m``; days, weeks, months and
years are built from ``trade`` messages on top of the current candle read over REST (only
trades later than that candle's last tick, its ``timestamp``, are added).

Every (re)connection first backfills over REST what may have been missed since the newest
candle seen (the gap of a dropped connection), while the stream is already being read. A
dropped or refused connection is retried with exponential backoff and jitter; only
``stop()`` ends the loop (or an error message from Upbit, which would repeat).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from batchdb.models import BatchDBError, Priority

from .client import UpbitBlocked, UpbitError, backoff
from .collector import _iso, _ms
from .settings import require
from .timeframes import Timeframe

if TYPE_CHECKING:
    from .collector import Collector

__all__ = ["LiveFollower", "TradeCandle"]

log = logging.getLogger("batchdb.upbit")

_WRITE_EVERY = 1.0  # seconds between upserts of a trade-built candle (Upbit streams 1/s)


class TradeCandle:
    """The current candle of one market built from trades, on a REST seed."""

    def __init__(self, tf: Timeframe, market: str) -> None:
        self.tf = tf
        self.market = market
        self.candle: dict[str, Any] | None = None
        self.seeded = False
        self._pending: list[dict[str, Any]] = []

    def reset(self) -> None:
        """A new connection: hold trades until the next REST seed (trades may have been
        missed meanwhile, and the seed has them)."""
        self.seeded = False
        self._pending = []

    def seed(self, candle: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Start from Upbit's current candle (REST); apply the trades that came first."""
        self.candle = dict(candle) if candle is not None else None
        self.seeded = True
        pending, self._pending = self._pending, []
        # the seed itself is written too: it holds the trades missed while disconnected
        changed: list[dict[str, Any]] = [self.candle] if self.candle is not None else []
        for trade in pending:
            changed = self._merge(changed, self.add(trade))
        return changed

    @staticmethod
    def _merge(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
        by_time = {c["candle_date_time_utc"]: c for c in (*a, *b)}
        return list(by_time.values())

    def add(self, trade: dict[str, Any]) -> list[dict[str, Any]]:
        """Add one trade; the candles it changed (the finished one too, on a new period)."""
        if not self.seeded:
            self._pending.append(trade)
            return []
        price = float(trade["trade_price"])
        volume = float(trade["trade_volume"])
        ts = int(trade["trade_timestamp"])
        start = _iso(self.tf.floor(ts))
        current = self.candle
        if current is not None and start < current["candle_date_time_utc"]:
            return []  # a late trade of an older candle: the REST backfill has it
        if current is not None and start == current["candle_date_time_utc"]:
            if ts <= int(current.get("timestamp") or 0):
                return []  # already counted in the REST seed
            current["high_price"] = max(float(current["high_price"]), price)
            current["low_price"] = min(float(current["low_price"]), price)
            current["trade_price"] = price
            current["candle_acc_trade_volume"] = float(
                current["candle_acc_trade_volume"]) + volume
            current["candle_acc_trade_price"] = float(
                current["candle_acc_trade_price"]) + price * volume
            current["timestamp"] = ts
            return [current]
        self.candle = {"market": self.market, "candle_date_time_utc": start,
                       "opening_price": price, "high_price": price, "low_price": price,
                       "trade_price": price, "candle_acc_trade_volume": volume,
                       "candle_acc_trade_price": price * volume, "timestamp": ts}
        return [c for c in (current, self.candle) if c is not None]


class LiveFollower:
    """Follow ``markets`` for ``collector`` until it is stopped."""

    def __init__(self, collector: Collector, markets: list[str]) -> None:
        self.collector = collector
        self.markets = markets
        self.tf = collector.timeframe
        self.by_trades = self.tf.ws_type is None
        self.builders = {m: TradeCandle(self.tf, m) for m in markets}
        self._written: dict[tuple[str, str], float] = {}  # (market, candle) -> last upsert
        self._dirty: dict[tuple[str, str], dict[str, Any]] = {}

    def subscription(self) -> list[dict[str, Any]]:
        """The request message: ticket, type (candle or trade), format."""
        kind: dict[str, Any] = {"type": self.tf.ws_type or "trade", "codes": self.markets}
        if self.by_trades:
            kind["is_only_realtime"] = True  # the REST seed is the snapshot
        return [{"ticket": f"batchdb-{uuid.uuid4()}"}, kind, {"format": "DEFAULT"}]

    async def run(self) -> None:
        """Connect, subscribe, upsert; reconnect with backoff; until stop()."""
        client = require("websockets.asyncio.client")
        exceptions = require("websockets.exceptions")
        collector = self.collector
        report = collector.report
        settings = collector.settings
        attempt = 0
        while not collector.stopping:
            try:
                opened, ws = await collector.unless_stopped(client.connect(
                    settings.websocket_url, open_timeout=settings.timeout_seconds,
                    ping_interval=20, ping_timeout=20, close_timeout=1, max_size=2 ** 22))
                if not opened or ws is None:
                    break
                try:
                    if await self._session(ws):
                        attempt = 0  # it worked for a while: start the backoff afresh
                finally:
                    await ws.close()
            except UpbitError as exc:
                report.live_error = str(exc)
                if isinstance(exc, UpbitBlocked):
                    report.blocked = str(exc)
                collector.stop(f"live stream failed: {exc}")
                break
            except (exceptions.WebSocketException, OSError, TimeoutError) as exc:
                log.info("Upbit WebSocket: %s: %s", type(exc).__name__, exc)
            if collector.stopping:
                break
            delay = backoff(attempt, collector.backoff_base, collector.backoff_cap)
            attempt += 1
            await collector.unless_stopped(asyncio.sleep(delay))
        await self._flush(force=True)

    async def _session(self, ws: Any) -> bool:
        """One connection: subscribe, fill the gap over REST, upsert updates. True if any
        update came (the connection worked)."""
        collector = self.collector
        for builder in self.builders.values():
            builder.reset()
        await ws.send(json.dumps(self.subscription()))
        collector.report.live_connections += 1
        gap = asyncio.ensure_future(self._fill_gaps())
        got = False
        try:
            while not collector.stopping:
                received, message = await collector.unless_stopped(ws.recv())
                if not received or message is None:
                    break
                got = True
                try:
                    await self._handle(message)
                except ValueError as exc:  # one malformed message: skipped, said
                    log.warning("Upbit WebSocket: a message was skipped: %s", exc)
                if self.by_trades:
                    await self._flush(force=False)
        finally:
            await gap  # its writes are not cancelled: it ends by itself on stop()
        return got

    async def _fill_gaps(self) -> None:
        """REST backfill from the newest candle seen to now, per market (LOW: history);
        for trade-built units, the REST seed of the current candle."""
        collector = self.collector
        try:
            for market in self.markets:
                report = collector.report.markets[market]
                now = int(time.time() * 1000)
                if report.newest_ms is not None and report.newest_ms < now:
                    await collector.fetch_range(report, report.newest_ms, now, Priority.LOW)
                if self.by_trades and not collector.stopping:
                    seeded, seed = await collector.unless_stopped(collector.latest(market))
                    if seeded:
                        for candle in self.builders[market].seed(seed):
                            self._dirty[(market, candle["candle_date_time_utc"])] = candle
        except UpbitBlocked as exc:
            collector.report.blocked = collector.report.live_error = str(exc)
            collector.stop("Upbit blocked this IP (HTTP 418)")
        except (UpbitError, BatchDBError, ValueError) as exc:
            log.warning("Upbit gap backfill after reconnecting failed: %s", exc)

    async def _handle(self, message: str | bytes) -> None:
        data = json.loads(message)
        if not isinstance(data, dict):
            return
        if "error" in data:
            err = data["error"] if isinstance(data["error"], dict) else {}
            raise UpbitError(f"Upbit's WebSocket refused the subscription: "
                             f"{err.get('name', '')}: {err.get('message', data['error'])}")
        market = data.get("code")
        if market not in self.builders:
            return
        if data.get("type") == self.tf.ws_type:
            await self._upsert(market, [data])
        elif self.by_trades and data.get("type") == "trade":
            for candle in self.builders[market].add(data):
                self._dirty[(market, candle["candle_date_time_utc"])] = candle

    async def _flush(self, force: bool) -> None:
        """Upsert the trade-built candles that changed, each at most once a second (a
        finished candle, or everything when ``force``, at once)."""
        now = time.monotonic()
        for key, candle in list(self._dirty.items()):
            market, when = key
            current = self.builders[market].candle
            finished = current is None or current["candle_date_time_utc"] != when
            if current is not None and not finished:
                candle = current  # (a re-seed replaced the object that was marked)
            if force or finished or now - self._written.get(key, 0.0) >= _WRITE_EVERY:
                del self._dirty[key]
                if finished:
                    self._written.pop(key, None)
                else:
                    self._written[key] = now
                await self._upsert(market, [dict(candle)])

    async def _upsert(self, market: str, candles: list[dict[str, Any]]) -> None:
        report = self.collector.report
        mreport = report.markets[market]
        await self.collector.manager.insert_candles_batch(
            market, self.tf.name, candles, Priority.HIGH,
            self.collector.write_callback(mreport, 0))  # (counts only failures)
        report.live_updates += len(candles)
        for candle in candles:
            ts = _ms(candle["candle_date_time_utc"])
            if mreport.newest_ms is None or ts > mreport.newest_ms:
                mreport.newest_ms = ts
