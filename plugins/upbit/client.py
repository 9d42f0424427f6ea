"""Upbit's REST candle endpoints through httpx, under the shared rate limit: 429s back off
(``Retry-After`` when given), 5xx, timeouts and dropped connections are retried with
backoff and jitter, a 418 (the IP is blocked) stops everything with Upbit's own words."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchdb.models import BatchDBError

from .ratelimit import RateLimiter, parse_remaining
from .settings import UpbitSettings, require
from .timeframes import Timeframe, format_to

if TYPE_CHECKING:
    import httpx

__all__ = ["MAX_COUNT", "Counters", "UpbitBlocked", "UpbitClient", "UpbitError", "backoff"]

MAX_COUNT = 200  #: candles per request, Upbit's maximum


class UpbitError(BatchDBError):
    """Upbit refused a request for good, or kept failing past ``max_retries``."""


class UpbitBlocked(UpbitError):
    """HTTP 418: Upbit blocked this IP address for a while; nothing more is requested."""


@dataclass
class Counters:
    """What the requests of one Collector met (shared by its markets)."""

    requests: int = 0
    rate_limited: int = 0  # 429 answers
    retries: int = 0  # requests sent again (429, 5xx, timeouts, dropped connections)
    server_errors: int = 0  # 5xx answers
    network_errors: int = 0  # timeouts and dropped connections


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter ("equal jitter": half fixed, half random), so that
    the markets that failed together do not all come back together."""
    delay = min(cap, base * 2.0 ** attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(response: httpx.Response) -> str:
    """Upbit's ``{"error": {"name", "message"}}``, or the body as it is (shortened)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return ": ".join(str(err[k]) for k in ("name", "message") if err.get(k))
    return str(body)[:300]


def blocked_message(response: httpx.Response) -> str:
    """The error for a 418, with how long Upbit says the block lasts."""
    said = _error_text(response)
    seconds = _retry_after(response.headers.get("Retry-After"))
    if seconds is not None:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + seconds))
        how_long = f"for {seconds:,.0f} seconds (until {until}, from its Retry-After)"
    else:
        how_long = "(Upbit gave no Retry-After: see its message for how long)"
    return (f"Upbit blocked this IP address (HTTP 418) {how_long} after too many requests; "
            f"collection stopped, everything fetched so far is kept. Upbit said: "
            f"{said or '(nothing)'}")


class UpbitClient:
    """GET candle pages, one at a time per caller, many callers at once."""

    def __init__(self, settings: UpbitSettings, limiter: RateLimiter, counters: Counters,
                 *, backoff_base: float = 0.25, backoff_cap: float = 30.0) -> None:
        httpx_ = require("httpx")
        self.settings = settings
        self.limiter = limiter
        self.counters = counters
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._httpx = httpx_
        # no Origin header (httpx sends none): Upbit allows a request with one only every
        # 10 seconds
        self._client: httpx.AsyncClient = httpx_.AsyncClient(
            base_url=settings.base_url, timeout=settings.timeout_seconds,
            headers={"Accept": "application/json"},
            limits=httpx_.Limits(max_connections=32, max_keepalive_connections=32))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def candles(self, tf: Timeframe, market: str, to_ms: int | None,
                      count: int = MAX_COUNT) -> list[dict[str, Any]]:
        """Up to ``count`` candles of ``market`` starting before ``to_ms`` (exclusive;
        None: the latest), newest first, as Upbit sends them."""
        params: dict[str, str | int] = {"market": market, "count": count}
        if to_ms is not None:
            params["to"] = format_to(to_ms)
        httpx_ = self._httpx
        attempt = 0
        while True:
            sent_at = await self.limiter.acquire()
            self.counters.requests += 1
            delay: float | None = None
            remaining = None
            response: httpx.Response | None = None
            try:
                response = await self._client.get(tf.path, params=params)
                remaining = parse_remaining(response.headers.get("Remaining-Req"))
            except httpx_.RequestError as exc:  # timeouts, refused/dropped connections, …
                self.counters.network_errors += 1
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            finally:  # (cancelled by stop() too)
                self.limiter.done(sent_at, remaining)
            if response is not None:
                status = response.status_code
                if status == 200:
                    try:
                        page = response.json()
                    except ValueError:
                        page = None
                    if isinstance(page, list) and all(isinstance(c, dict) for c in page):
                        return page
                    problem = f"not a JSON list of candles: {response.text[:200]!r}"
                elif status == 429:
                    self.counters.rate_limited += 1
                    delay = _retry_after(response.headers.get("Retry-After"))
                    if delay is None:
                        delay = backoff(attempt, self.backoff_base, self.backoff_cap)
                    self.limiter.pause(delay)  # everyone waits, not only this market
                    delay = 0.0
                    problem = f"429 Too Many Requests: {_error_text(response)}"
                elif status == 418:
                    raise UpbitBlocked(blocked_message(response))
                elif status >= 500:
                    self.counters.server_errors += 1
                    problem = f"HTTP {status}: {_error_text(response)}"
                else:  # 4xx: the request itself is wrong (unknown market, bad to)
                    raise UpbitError(f"Upbit refused {tf.path} for {market} (HTTP {status}): "
                                     f"{_error_text(response)}")
            if attempt >= self.settings.max_retries:
                raise UpbitError(f"{tf.path} for {market} failed {attempt + 1} times, giving "
                                 f"up (max_retries = {self.settings.max_retries}): {problem}")
            attempt += 1
            self.counters.retries += 1
            if delay is None:
                delay = backoff(attempt - 1, self.backoff_base, self.backoff_cap)
            if delay > 0:
                await asyncio.sleep(delay)
