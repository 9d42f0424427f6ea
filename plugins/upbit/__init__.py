"""Upbit candle normaliser: the Upbit REST candle JSON → rows of the ``candles`` table.

Dates are converted for the whole batch in one numpy call: a per-row
``datetime.fromisoformat`` would cost most of SQLite's write budget.

The collector (``batchdb collect``, :class:`Collector`) lives beside it in
``collector.py``, ``client.py``, ``ratelimit.py``, ``live.py`` and ``cli.py``; it needs the
``upbit`` extra (httpx, websockets) and is imported only when used.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np

from batchdb.candles import CANDLE_COLUMNS
from batchdb.hookspecs import RegisterSettings, hookimpl

if TYPE_CHECKING:
    import typer

    from .collector import Collector, CollectReport, MarketReport
    from .settings import UpbitSettings

__all__ = ["UPBIT_FIELDS", "UPBIT_NUMERIC_FIELDS", "UPBIT_REQUIRED_FIELDS", "CollectReport",
           "Collector", "MarketReport", "UpbitSettings", "batchdb_normalize_candles",
           "batchdb_register_commands", "batchdb_register_settings", "normalize_upbit_candles"]

_LAZY = {"Collector": "collector", "CollectReport": "collector", "MarketReport": "collector",
         "UpbitSettings": "settings"}


def __getattr__(name: str) -> Any:
    """The collector's names, imported on first use (every manager loads this plugin for
    its normaliser; the collector is only needed by those who collect)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

#: Upbit field → candles column: the one list of Upbit's candle fields (the file readers
#: of ``batchdb ingest`` and the normaliser below both use it)
UPBIT_FIELDS: dict[str, str] = {
    "opening_price": "open_price",
    "high_price": "high_price",
    "low_price": "low_price",
    "trade_price": "close_price",
    "candle_acc_trade_volume": "volume",
    "candle_acc_trade_price": "quote_volume",
}
#: fields every Upbit candle carries (a CSV header must have them)
UPBIT_REQUIRED_FIELDS: tuple[str, ...] = ("candle_date_time_utc", *UPBIT_FIELDS)
#: Upbit fields that hold numbers (converted from text when reading CSV)
UPBIT_NUMERIC_FIELDS: frozenset[str] = frozenset({
    *UPBIT_FIELDS, "unit", "timestamp", "prev_closing_price", "change_price", "change_rate",
    "converted_trade_price",
})
_NUMBER_TYPES = frozenset({int, float})


def _missing(candles: Sequence[Mapping[str, Any]], field: str) -> ValueError:
    for i, candle in enumerate(candles):
        if not isinstance(candle, Mapping):
            return ValueError(f"candle {i} is not an object: {type(candle).__name__}")
        if field not in candle or candle[field] is None:
            return ValueError(f"candle {i} has no {field!r}")
    return ValueError(f"a candle has no {field!r}")  # pragma: no cover - caller saw a KeyError


def _column(candles: Sequence[Mapping[str, Any]], field: str) -> list[Any]:
    try:
        return [c[field] for c in candles]
    except (KeyError, TypeError):
        raise _missing(candles, field) from None


def _numbers(values: list[Any], field: str) -> list[float]:
    # one pass over the types first: numpy would turn a True among floats into 1.0 and
    # choke on a list without saying which candle it came from
    if not set(map(type, values)) <= _NUMBER_TYPES:
        for i, v in enumerate(values):
            if v is None:
                raise ValueError(f"candle {i} has no {field!r}")
            if type(v) not in _NUMBER_TYPES and (isinstance(v, bool)
                                                 or not isinstance(v, int | float)):
                raise ValueError(f"candle {i}: {field!r} must be a number, got {v!r}")
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"candle {i}: {field!r} must be a finite number, got {values[i]!r}")
    result: list[float] = arr.tolist()
    return result


_UTC = ("Z", "z")
_ZONE_WARNING = "no explicit representation of timezones"


def _timestamps(values: list[Any]) -> list[int]:
    if set(map(type, values)) != {str}:  # numpy would read a number as epoch milliseconds
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ValueError(
                    f"candle {i}: 'candle_date_time_utc' is not an ISO date-time: {v!r}")
    if values and (values[0][-1:] in _UTC or values[-1][-1:] in _UTC):
        # Upbit's CSV export writes UTC with a trailing Z: numpy reads the time as UTC
        # either way, but warns about a zone on every batch (and refuses a lowercase z)
        values = [v[:-1] if v[-1:] in _UTC else v for v in values]
    try:
        with warnings.catch_warnings():  # an explicit offset (+09:00): converted to UTC
            warnings.filterwarnings("ignore", _ZONE_WARNING, UserWarning)
            arr = np.array(values, dtype="datetime64[ms]")
    except (ValueError, TypeError):
        for i, v in enumerate(values):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", _ZONE_WARNING, UserWarning)
                    np.datetime64(v, "ms")
                if not isinstance(v, str):
                    raise TypeError
            except (ValueError, TypeError):
                raise ValueError(
                    f"candle {i}: 'candle_date_time_utc' is not an ISO date-time: {v!r}"
                ) from None
        raise
    if np.isnat(arr).any():
        i = int(np.argmax(np.isnat(arr)))
        raise ValueError(f"candle {i}: 'candle_date_time_utc' is not an ISO date-time: "
                         f"{values[i]!r}")
    result: list[int] = arr.astype(np.int64).tolist()
    return result


def normalize_upbit_candles(
    symbol: str, timeframe: str, candles: Sequence[Mapping[str, Any]], source: str = "upbit"
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """Rows for the ``candles`` table from Upbit candle dicts, in ``CANDLE_COLUMNS`` order."""
    if not isinstance(symbol, str) or not symbol:
        raise ValueError(f"symbol must be a non-empty string, got {symbol!r}")
    if not isinstance(timeframe, str) or not timeframe:
        raise ValueError(f"timeframe must be a non-empty string, got {timeframe!r}")
    if isinstance(candles, Mapping | str | bytes):
        raise ValueError("candles must be a list of candle objects")
    markets = [c.get("market") for c in candles if isinstance(c, Mapping)]
    if any(m is not None and m != symbol for m in markets):
        for i, c in enumerate(candles):
            if isinstance(c, Mapping) and c.get("market") not in (None, symbol):
                raise ValueError(f"candle {i} is for market {c.get('market')!r}, not {symbol!r}")
    ts = _timestamps(_column(candles, "candle_date_time_utc"))
    prices = [_numbers(_column(candles, f), f) for f in UPBIT_FIELDS]
    now_ms = int(time.time() * 1000)
    rows = list(zip(repeat(symbol), repeat(timeframe), ts, *prices, repeat(source),
                    repeat(now_ms), strict=False))
    return CANDLE_COLUMNS, rows


@hookimpl
def batchdb_normalize_candles(
    symbol: str, timeframe: str, candles: Sequence[Any], source: str
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]] | None:
    """Normalise candles whose source is ``upbit``."""
    if source != "upbit":
        return None
    return normalize_upbit_candles(symbol, timeframe, candles, source)


@hookimpl
def batchdb_register_commands(app: typer.Typer) -> None:
    """``batchdb collect``: the Upbit candle collector."""
    from .cli import register

    register(app)


@hookimpl
def batchdb_register_settings(register: RegisterSettings) -> None:
    """The ``[upbit]`` section: checked whenever settings load, shown by ``batchdb config``."""
    from .settings import UpbitSettings

    register("upbit", UpbitSettings)
