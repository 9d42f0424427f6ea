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
    """``await acquire()`` before each request; ``observe(sent_at, sec)`` with each
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
        self._observed_at = -math.inf

    async def acquire(self) -> float:
        """Wait for a free slot; the send time it was granted (for :meth:`observe`)."""
        async with self._lock:  # one waiter at a time: the slots go out in order
            while True:
                now = self._clock()
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
            if self._server_left is not None and now < self._server_until:
                self._server_left -= 1
            return now

    def observe(self, sent_at: float, remaining: int | None) -> None:
        """A response to the request sent at ``sent_at`` said ``sec=remaining``: the sends
        made since then already used some of that, and the rest of the server's second
        ends at the latest one second after the request."""
        if remaining is None or sent_at < self._observed_at:
            return  # no news, or older news than what we know
        self._observed_at = sent_at
        later = sum(1 for t in self._sent if t > sent_at)
        self._server_left = remaining - later
        self._server_until = sent_at + self.window

    def pause(self, seconds: float) -> None:
        """No request from anyone for ``seconds`` (a 429's back-off)."""
        self._hold_until = max(self._hold_until, self._clock() + seconds)
