"""A fake Upbit on 127.0.0.1 (aiohttp, in a thread of its own), with Upbit's semantics as
its documentation states them:

- ``GET /v1/candles/{seconds,minutes/N,days,weeks,months,years}?market=&to=&count=``:
  candles starting before ``to`` (exclusive; ISO 8601, UTC unless it has a zone; none:
  the latest), newest first, at most ``count`` ≤ 200 of them; a minute without trades
  has no candle; an unknown market is a 404, count > 200 a 400;
- every answer carries ``Remaining-Req: group=candles; min=600; sec=N``; more than
  ``limit`` requests in one second get a 429 (the server counts requests per second and
  keeps the highest count it saw);
- faults on chosen request numbers, or at random: a 5xx, a slow answer, a dropped
  connection, a 429, a 418 (blocked, with Retry-After);
- ``/websocket/v1``: after ``[{"ticket"}, {"type": "candle.1s", "codes"}, {"format"}]`` it
  streams the current candle of each market (a price walk; each finished candle joins the
  REST data) or, for ``trade``, trades that build the current day candle; it closes the
  connection at random.

Every request is logged (``requests``) for the tests to check what the client asked.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

STEPS = {"seconds": 1000, "days": 86_400_000, "weeks": 7 * 86_400_000}
PATHS = ("/v1/candles/seconds", "/v1/candles/minutes/{unit}", "/v1/candles/days",
         "/v1/candles/weeks", "/v1/candles/months", "/v1/candles/years")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def ms_of(text: str) -> int:
    parsed = datetime.fromisoformat(text.replace(" ", "T"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def candle(market: str, ts: int, price: float, unit: int | None = 1,
           volume: float = 1.5) -> dict[str, Any]:
    """An Upbit REST candle (prices and volumes that survive a float round trip)."""
    out: dict[str, Any] = {
        "market": market, "candle_date_time_utc": iso(ts),
        "candle_date_time_kst": iso(ts + 9 * 3_600_000),
        "opening_price": price, "high_price": price + 7.0, "low_price": price - 3.0,
        "trade_price": price + 2.0, "timestamp": ts + 59_000,
        "candle_acc_trade_price": round(price * volume, 5), "candle_acc_trade_volume": volume,
    }
    if unit is not None:
        out["unit"] = unit
    return out


def minute_series(market: str, start_ms: int, n: int, *, gaps: int = 0, seed: int = 0,
                  step_ms: int = 60_000) -> list[dict[str, Any]]:
    """``n`` candles from ``start_ms`` on, with ``gaps`` minutes without trades left out."""
    rnd = random.Random(seed)
    skipped = set(rnd.sample(range(1, n - 1), gaps)) if gaps else set()
    unit = step_ms // 60_000 if step_ms >= 60_000 else None
    return [candle(market, start_ms + i * step_ms, 1000.0 + i + seed, unit)
            for i in range(n) if i not in skipped]


@dataclass
class Request:
    path: str
    market: str | None
    to: str | None
    count: int
    status: int
    at: float


@dataclass
class FakeUpbit:
    """The server's data and behaviour; ``serve()`` runs it."""

    limit: int | None = 10  # requests per second before 429s; None: no limit
    seed: int = 1
    faults: dict[int, str] = field(default_factory=dict)  # request number (1-based) -> fault
    fault_rate: float = 0.0  # chance of a random fault ("500", "503", "slow", "drop")
    slow_seconds: float = 1.0
    retry_after: str | None = None  # on injected 429s
    block_seconds: int = 600  # Retry-After of a 418
    ws_interval: float = 0.02  # seconds between WebSocket updates
    ws_close_rate: float = 0.0  # chance of closing after an update
    requests: list[Request] = field(default_factory=list)
    subscriptions: list[Any] = field(default_factory=list)
    ws_connections: int = 0
    max_per_second: int = 0
    rejected: int = 0  # 429s for going over the limit
    _data: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    _keys: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _per_second: Counter[int] = field(default_factory=Counter)
    url: str = ""
    ws_url: str = ""

    def __post_init__(self) -> None:
        self._rnd = random.Random(self.seed)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ data
    def add(self, path: str, candles: list[dict[str, Any]]) -> None:
        """Serve ``candles`` (any order) at ``path`` (e.g. ``/v1/candles/minutes/1``)."""
        for c in candles:
            key = (path, c["market"])
            rows = self._data.setdefault(key, [])
            keys = self._keys.setdefault(key, [])
            ts = ms_of(c["candle_date_time_utc"])
            i = bisect.bisect_left(keys, ts)
            if i < len(keys) and keys[i] == ts:
                rows[i] = c
            else:
                keys.insert(i, ts)
                rows.insert(i, c)

    def served(self, path: str, market: str) -> list[dict[str, Any]]:
        """Every candle of ``market`` at ``path``, oldest first."""
        with self._lock:
            return list(self._data.get((path, market), []))

    # ------------------------------------------------------------------ REST
    def _count_rate(self) -> int:
        second = int(time.monotonic())
        self._per_second[second] += 1
        n = self._per_second[second]
        self.max_per_second = max(self.max_per_second, n)
        return n

    def _headers(self, n: int) -> dict[str, str]:
        left = max(0, (self.limit or 10_000) - n)
        return {"Remaining-Req": f"group=candles; min=600; sec={left}"}

    async def _candles(self, request: web.Request) -> web.StreamResponse:
        number = len(self.requests) + 1
        q = request.query
        n = self._count_rate()
        record = Request(request.path, q.get("market"), q.get("to"),
                         int(q.get("count", "1") or 1), 200, time.monotonic())
        self.requests.append(record)
        headers = self._headers(n)
        fault = self.faults.get(number)
        if fault is None and self.fault_rate and self._rnd.random() < self.fault_rate:
            fault = self._rnd.choice(["500", "503", "slow", "drop"])
        if self.limit is not None and n > self.limit:
            self.rejected += 1
            fault = "429"
        if fault == "drop":
            record.status = 0
            assert request.transport is not None
            request.transport.close()  # the client sees the connection end, no answer
            return web.Response(status=500)
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif fault in ("500", "502", "503"):
            record.status = int(fault)
            return web.json_response({"error": {"name": "server_error", "message": "oops"}},
                                     status=int(fault), headers=headers)
        elif fault == "429":
            record.status = 429
            if self.retry_after is not None:
                headers["Retry-After"] = self.retry_after
            return web.json_response(
                {"error": {"name": "too_many_requests", "message": "Too many API requests."}},
                status=429, headers=headers)
        elif fault == "418":
            record.status = 418
            headers["Retry-After"] = str(self.block_seconds)
            return web.json_response(
                {"error": {"name": "blocked", "message": f"IP blocked for "
                           f"{self.block_seconds} seconds"}}, status=418, headers=headers)
        market = q.get("market", "")
        if record.count > 200 or record.count < 1:
            record.status = 400
            return web.json_response({"error": {"name": "invalid_parameter_count",
                                                "message": "count must be 1..200"}},
                                     status=400, headers=headers)
        path = request.path
        with self._lock:
            keys = self._keys.get((path, market))
            rows = self._data.get((path, market))
            if keys is None or rows is None:
                record.status = 404
                return web.json_response({"error": {"name": "Code not found",
                                                    "message": "Code not found"}},
                                         status=404, headers=headers)
            end = len(keys) if "to" not in q else bisect.bisect_left(keys, ms_of(q["to"]))
            page = rows[max(0, end - record.count):end][::-1]
        return web.json_response(page, headers=headers)

    # ------------------------------------------------------------------ WebSocket
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws_connections += 1
        msg = await ws.receive()
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return ws
        try:
            sub = json.loads(msg.data)
            kinds = [k for k in sub if isinstance(k, dict) and "type" in k]
            assert isinstance(sub, list) and "ticket" in sub[0] and kinds
        except (ValueError, AssertionError, TypeError, KeyError):
            await ws.send_bytes(json.dumps({"error": {"name": "WRONG_FORMAT",
                                                      "message": "bad request"}}).encode())
            await ws.close()
            return ws
        self.subscriptions.append(sub)
        kind = kinds[0]
        codes = list(kind["codes"])
        try:
            if kind["type"] == "trade":
                await self._stream_trades(ws, codes, request.transport)
            else:
                await self._stream_candles(ws, codes, kind["type"], request.transport)
        except (ConnectionError, RuntimeError):
            pass
        return ws

    async def _maybe_close(self, ws: web.WebSocketResponse, request_transport: Any) -> bool:
        if self.ws_close_rate and self._rnd.random() < self.ws_close_rate:
            if self._rnd.random() < 0.5:
                await ws.close()
            elif request_transport is not None:
                request_transport.close()  # dropped without a close frame
            return True
        return False

    async def _stream_candles(self, ws: web.WebSocketResponse, codes: list[str],
                              kind: str, transport: Any) -> None:
        assert kind == "candle.1s", kind  # the tests follow one-second candles
        path = "/v1/candles/seconds"
        while not ws.closed:
            now = int(time.time() * 1000)
            start = now - now % 1000
            for code in codes:
                with self._lock:
                    rows = self._data.setdefault((path, code), [])
                    keys = self._keys.setdefault((path, code), [])
                    if keys and keys[-1] == start:
                        current = dict(rows[-1])
                        price = current["trade_price"] + self._rnd.choice((-1.0, 1.0))
                        current["trade_price"] = price
                        current["high_price"] = max(current["high_price"], price)
                        current["low_price"] = min(current["low_price"], price)
                        current["candle_acc_trade_volume"] += 0.5
                        current["timestamp"] = now
                        rows[-1] = current
                    else:
                        base = rows[-1]["trade_price"] if rows else 5000.0
                        current = candle(code, start, base, None)
                        current["timestamp"] = now
                        keys.append(start)
                        rows.append(current)
                message = {"type": kind, "code": code, "stream_type": "REALTIME",
                           **{k: v for k, v in current.items() if k != "market"}}
                await ws.send_bytes(json.dumps(message).encode())
            if await self._maybe_close(ws, transport):
                return
            await asyncio.sleep(self.ws_interval)

    async def _stream_trades(self, ws: web.WebSocketResponse, codes: list[str],
                             transport: Any) -> None:
        path = "/v1/candles/days"
        seq = 0
        while not ws.closed:
            for code in codes:
                seq += 1
                with self._lock:
                    rows = self._data[(path, code)]
                    last = int(rows[-1]["timestamp"])
                    now = max(int(time.time() * 1000), last + 1)
                    price = float(rows[-1]["trade_price"]) + self._rnd.choice((-5.0, 5.0))
                    volume = self._rnd.choice((0.25, 0.5, 1.0))
                    day = now - now % STEPS["days"]
                    current = dict(rows[-1])
                    assert current["candle_date_time_utc"] == iso(day), "a day ended mid-test"
                    current["trade_price"] = price
                    current["high_price"] = max(float(current["high_price"]), price)
                    current["low_price"] = min(float(current["low_price"]), price)
                    current["candle_acc_trade_volume"] = float(
                        current["candle_acc_trade_volume"]) + volume
                    current["candle_acc_trade_price"] = float(
                        current["candle_acc_trade_price"]) + price * volume
                    current["timestamp"] = now
                    rows[-1] = current
                trade = {"type": "trade", "code": code, "trade_price": price,
                         "trade_volume": volume, "trade_timestamp": now, "ask_bid": "BID",
                         "sequential_id": seq, "stream_type": "REALTIME"}
                await ws.send_bytes(json.dumps(trade).encode())
            if await self._maybe_close(ws, transport):
                return
            await asyncio.sleep(self.ws_interval)

    # ------------------------------------------------------------------ running
    def app(self) -> web.Application:
        app = web.Application()
        for path in PATHS:
            app.router.add_get(path, self._candles)
        app.router.add_get("/websocket/v1", self._websocket)
        return app

    @contextlib.contextmanager
    def serve(self) -> Iterator[FakeUpbit]:
        """Run on 127.0.0.1 (a free port) in a thread; ``url``/``ws_url`` are set."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None,
                               shutdown_timeout=0.5)

        async def start() -> None:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]  # the port the OS chose
            self.url = f"http://127.0.0.1:{port}"
            self.ws_url = f"ws://127.0.0.1:{port}/websocket/v1"
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        thread = threading.Thread(target=run, name="fake-upbit", daemon=True)
        thread.start()
        assert ready.wait(10), "the fake Upbit did not start"
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    def settings(self, **extra: Any) -> dict[str, Any]:
        """``upbit={...}`` settings pointing at this server (quick retries for tests)."""
        return {"base_url": self.url, "websocket_url": self.ws_url, "timeout_seconds": 0.5,
                **extra}
