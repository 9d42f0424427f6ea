"""One request budget shared by every market a Collector fetches.

Hand-written rather than aiolimiter (a leaky bucket): besides our own ceiling the limiter
has to obey what Upbit reports after each response (``Remaining-Req: group=candles;
min=…; sec=N``: N more requests in the server's current second) and stop everyone after a
429, and a fixed-rate bucket cannot be told either.

Our own ceiling is a sliding window: at most ``rate`` sends in any ``window`` seconds
(one second plus a margin, so that requests delayed on the way still land in separate
seconds of the server). A token bucket with a burst would allow up to twice the rate in
one second; evenly spaced sends would waste the first second.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["RateLimiter", "parse_remaining"]


def parse_remaining(header: str | None) -> int | None:
    """``sec`` of a ``Remaining-Req`` header (``group=candles; min=600; sec=9``), if any."""
    if not header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip() == "sec":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


class RateLimiter:
    """``await acquire()`` before each request, ``done(sent_at, sec)`` after it with the
    response's remaining count; ``pause(seconds)`` after a 429."""

    def __init__(self, rate: float, window: float = 1.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate  # 0: no ceiling of our own
        self.window = window
        self._clock = clock
        self._limit = max(1, math.floor(rate)) if rate > 0 else 0
        self._sent: deque[float] = deque()
        self._lock = asyncio.Lock()
        self._hold_until = 0.0  # after a 429, or the server's second used up
        self._server_left: int | None = None  # sends the server still allows until ...
        self._server_until = 0.0
        self._in_flight = 0
        self._capacity: int | None = None  # the most the server allowed in one second

    async def acquire(self) -> float:
        """Wait for a free slot; the send time it was granted (for :meth:`done`)."""
        async with self._lock:  # one waiter at a time: the slots go out in order
            while True:
                now = self._clock()
                if self._capacity is not None and now >= self._server_until:
                    # a new second of the server: as many as it allowed at most so far
                    self._server_left, self._server_until = self._capacity, now + self.window
                wait = self._hold_until - now
                if self._server_left is not None and now < self._server_until \
                        and self._server_left <= 0:
                    wait = max(wait, self._server_until - now)
                while self._sent and self._sent[0] <= now - self.window:
                    self._sent.popleft()
                if self._limit and len(self._sent) >= self._limit:
                    wait = max(wait, self._sent[0] + self.window - now)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self._sent.append(now)
            self._in_flight += 1
            if self._server_left is not None and now < self._server_until:
                self._server_left -= 1
            return now

    def done(self, sent_at: float, remaining: int | None) -> None:
        """The request sent at ``sent_at`` ended; its response said ``sec=remaining``
        (None: no header, or no response). Requests reach the server in any order, so every
        request still in flight may yet count in the server's second: they are taken off
        what it allows. Within one second of the server the lowest figure holds."""
        self._in_flight -= 1
        if remaining is None:
            return
        now = self._clock()
        self._capacity = max(self._capacity or 0, remaining + 1)
        left = remaining - self._in_flight
        until = sent_at + self.window  # the server's second ends by then at the latest
        if self._server_left is None or now >= self._server_until:
            self._server_left, self._server_until = left, until
        else:
            self._server_left = min(self._server_left, left)
            self._server_until = max(self._server_until, until)

    def pause(self, seconds: float) -> None:
        """No request from anyone for ``seconds`` (a 429's back-off)."""
        self._hold_until = max(self._hold_until, self._clock() + seconds)
