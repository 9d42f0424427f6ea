"""Upbit's candle units: the ``--timeframe`` names, their REST paths and WebSocket types,
and ``WHEN`` (ISO 8601) parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["TIMEFRAMES", "Timeframe", "check_market", "format_to", "parse_when", "timeframe"]


@dataclass(frozen=True)
class Timeframe:
    """One candle unit: ``name`` as stored in ``candles.timeframe`` (``1m``), the REST
    ``path``, the fixed length in milliseconds (None for months and years) and the
    WebSocket ``candle.*`` type when Upbit streams that unit (else candles are built
    from ``trade``)."""

    name: str
    path: str
    step_ms: int | None
    ws_type: str | None

    def floor(self, ms: int) -> int:
        """The start of the candle holding the instant ``ms`` (UTC, as Upbit's
        ``candle_date_time_utc``; weeks start on Monday)."""
        if self.step_ms is not None and self.name != "1w":
            return ms - ms % self.step_ms
        t = datetime.fromtimestamp(ms / 1000, UTC)
        if self.name == "1w":
            start = datetime(t.year, t.month, t.day, tzinfo=UTC) - timedelta(days=t.weekday())
        elif self.name == "1M":
            start = datetime(t.year, t.month, 1, tzinfo=UTC)
        else:
            start = datetime(t.year, 1, 1, tzinfo=UTC)
        return int(start.timestamp() * 1000)


_S = 1000
_MINUTES = (1, 3, 5, 10, 15, 30, 60, 240)
TIMEFRAMES: dict[str, Timeframe] = {
    "1s": Timeframe("1s", "/v1/candles/seconds", _S, "candle.1s"),
    **{f"{m}m": Timeframe(f"{m}m", f"/v1/candles/minutes/{m}", m * 60 * _S, f"candle.{m}m")
       for m in _MINUTES},
    # Upbit's WebSocket streams candles up to 240m only: longer ones are built from trades
    "1d": Timeframe("1d", "/v1/candles/days", 86400 * _S, None),
    "1w": Timeframe("1w", "/v1/candles/weeks", 7 * 86400 * _S, None),
    "1M": Timeframe("1M", "/v1/candles/months", None, None),
    "1y": Timeframe("1y", "/v1/candles/years", None, None),
}


def timeframe(name: str) -> Timeframe:
    """The unit called ``name`` (case matters: ``1m`` is a minute, ``1M`` a month)."""
    try:
        return TIMEFRAMES[name]
    except KeyError:
        raise ValueError(f"unknown timeframe {name!r}; one of: "
                         f"{', '.join(TIMEFRAMES)}") from None


_MARKET = re.compile(r"[A-Z0-9]{2,10}-[A-Z0-9]{1,20}")


def check_market(code: str) -> str:
    """An Upbit market code (``KRW-BTC``), upper-cased: Upbit wants capitals."""
    upper = code.strip().upper()
    if not _MARKET.fullmatch(upper):
        raise ValueError(f"{code!r} is not an Upbit market code such as KRW-BTC")
    return upper


def parse_when(text: str) -> int:
    """``WHEN`` as epoch milliseconds: an ISO 8601 date (``2024-03-01``, midnight) or
    date-time (``2024-03-01T12:30:00``), with ``Z`` or an offset (``+09:00``) or none
    (then UTC, as Upbit's ``to``)."""
    value = text.strip()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or date-time "
                         "(e.g. 2024-03-01 or 2024-03-01T12:30:00+09:00)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def format_to(ms: int) -> str:
    """Upbit's ``to`` (exclusive) for an instant: whole seconds, UTC, rounded up so that
    the candle starting before ``ms`` is still included."""
    seconds = -(-ms // 1000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
