"""Candle files into a backend: the ingest driver over the streaming readers.

:class:`Ingester` reads files with :func:`batchdb.workloads.readers.read_chunks` and hands
the candles to :meth:`BatchDBManager.insert_candles_batch` in chunks (10,000 by default),
grouped by market and timeframe. A bad line or a candle the normaliser rejects fails alone,
reported as ``file:line``; the rest of the file is still ingested. Reading waits while a few
chunks are queued and not yet committed, so memory stays bounded whatever the file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchdb.manager import BatchDBManager
from batchdb.models import BatchOperation, OperationFailed, Priority, QueueFull
from batchdb.plugins.upbit import UPBIT_REQUIRED_FIELDS

from .readers import (
    DEFAULT_CHUNK_SIZE,
    FORMATS,
    BadRecord,
    Chunk,
    IngestError,
    detect_format,
    read_chunks,
)

__all__ = [
    "FileReport",
    "Ingester",
    "timeframe_from_unit",
    "upbit_error_response",
]

_CANDLE_INDEX = re.compile(r"\bcandle (\d+)\b")
_CANDLE_PREFIX = re.compile(r"\bcandle \d+: ")


def timeframe_from_unit(unit: Any) -> str:
    """The timeframe of an Upbit minute candle: ``unit`` 1 → ``"1m"``, 60 → ``"60m"``."""
    if isinstance(unit, bool) or not isinstance(unit, int | float):
        raise ValueError(f"'unit' must be a whole number of minutes, got {unit!r}")
    if unit != unit or unit < 1 or int(unit) != unit:  # NaN, zero/negative, fraction
        raise ValueError(f"'unit' must be a whole number of minutes >= 1, got {unit!r}")
    return f"{int(unit)}m"



@dataclass
class FileReport:
    """What happened to one file: counts, timing and the errors met."""

    path: str
    format: str | None = None
    size_bytes: int = 0
    bytes_read: int = 0
    candles_read: int = 0
    rows_committed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False
    started: float = 0.0
    finished: float = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds from the first read to the last commit of this file."""
        return max(0.0, self.finished - self.started)

    @property
    def rows_per_second(self) -> float:
        """Committed rows per second of :attr:`elapsed`."""
        return self.rows_committed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True when the whole file went in without a failed line."""
        return self.error is None and self.failed == 0


ErrorSink = Callable[[str], None]
ProgressSink = Callable[[FileReport], None]


class Ingester:
    """Reads candle files and writes them through ``manager.insert_candles_batch``.

    The manager must be running. ``symbol``/``timeframe`` override each candle's ``market``
    and ``unit``. ``on_error`` receives every problem as ``file:line: message``;
    ``on_progress`` receives the file's report after each chunk. Reading waits while
    ``max_pending`` operations are queued and not yet committed, so memory stays at a few
    chunks whatever the size of the file and however slow the database.
    """

    def __init__(
        self,
        manager: BatchDBManager,
        *,
        symbol: str | None = None,
        timeframe: str | None = None,
        priority: Priority | str | int = Priority.NORMAL,
        source: str = "upbit",
        fmt: str = "auto",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        on_error: ErrorSink | None = None,
        on_progress: ProgressSink | None = None,
        keep_errors: int = 1000,
        max_pending: int = 4,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
        if symbol is not None and not symbol:
            raise ValueError("symbol must not be empty")
        if timeframe is not None and not timeframe:
            raise ValueError("timeframe must not be empty")
        self.manager = manager
        self.symbol = symbol
        self.timeframe = timeframe
        self.priority = Priority.parse(priority)
        self.source = source
        self.fmt = fmt
        self.chunk_size = chunk_size
        self.on_error = on_error
        self.on_progress = on_progress
        self.keep_errors = keep_errors
        self.max_pending = max_pending
        self._pending: deque[str] = deque()
        self._stop = False

    # ------------------------------------------------------------------ control
    def request_stop(self) -> None:
        """Stop reading after the current chunk (what is queued still commits)."""
        self._stop = True

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stop

    def check_source(self) -> None:
        """Raise ValueError unless a plugin normalises candles from ``source``."""
        try:
            result = self.manager.pm.hook.batchdb_normalize_candles(
                symbol="CHECK", timeframe="1m", candles=[], source=self.source)
        except ValueError:
            return  # a normaliser took it and refused the empty list: the source is known
        if result is None:
            raise ValueError(f"no plugin normalises candles from source {self.source!r}")

    # ------------------------------------------------------------------ files
    async def ingest(self, paths: Sequence[str | Path]) -> list[FileReport]:
        """Ingest ``paths`` in order; return one report per file started.

        Returns once every queued candle has been committed or failed.
        """
        reports = []
        for path in paths:
            if self._stop:
                break
            reports.append(await self.ingest_file(path))
        await self.manager.flush()
        return reports

    async def ingest_file(self, path: str | Path) -> FileReport:
        """Read one file and queue its candles (use :meth:`ingest` to also await commits)."""
        report = FileReport(path=str(path), started=time.monotonic())
        try:
            p = Path(path)
            report.size_bytes = p.stat().st_size
            report.format = detect_format(p, self.fmt)
            required = UPBIT_REQUIRED_FIELDS if self.source == "upbit" else ()
            chunks = read_chunks(p, report.format, self.chunk_size, required=required)
            first = True
            while not self._stop:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                report.bytes_read = chunk.bytes_read
                if chunk.found is not None:
                    report.format = chunk.found
                await self._ingest_chunk(report, chunk, first)
                first = first and not chunk.candles
                if self.on_progress is not None:
                    self.on_progress(report)
            else:
                report.interrupted = True
                chunks.close()
        except IngestError as exc:
            self._file_error(report, exc.reason)
        except OSError as exc:
            self._file_error(report, f"cannot be read: {exc.strerror or exc}")
        report.finished = max(report.finished, time.monotonic())
        if self.on_progress is not None:
            self.on_progress(report)
        return report

    def _drop_error_responses(self, report: FileReport, chunk: Chunk) -> None:
        """Upbit API error responses among the candles (``{"error": {"name": ...,
        "message": ...}}``, saved by a collector) are reported as what they are, not as
        candles lacking fields."""
        found = [i for i, candle in enumerate(chunk.candles) if "error" in candle]
        for i in reversed(found):
            text = upbit_error_response(chunk.candles[i])
            if text is None:
                continue
            self._bad(report, BadRecord(report.path, chunk.lines[i], chunk.indices[i],
                                        f"an Upbit API error response, not a candle: {text}"))
            del chunk.candles[i], chunk.lines[i], chunk.indices[i]

    def _file_error(self, report: FileReport, reason: str) -> None:
        report.error = reason
        self._report(report, f"{report.path}: {reason}")

    def _report(self, report: FileReport, message: str) -> None:
        if len(report.errors) < self.keep_errors:
            report.errors.append(message)
        if self.on_error is not None:
            self.on_error(message)

    def _bad(self, report: FileReport, bad: BadRecord) -> None:
        report.failed += 1
        self._report(report, str(bad))

    async def _ingest_chunk(self, report: FileReport, chunk: Chunk, first: bool) -> None:
        report.candles_read += chunk.records
        for bad in chunk.bad:
            self._bad(report, bad)
        if self.source == "upbit":
            self._drop_error_responses(report, chunk)
        if not chunk.candles:
            return
        name = report.path
        if first and self.source == "upbit" and not any(
                any(f in c for f in UPBIT_REQUIRED_FIELDS) for c in chunk.candles):
            report.failed += len(chunk.candles)
            keys = ", ".join(map(str, list(chunk.candles[0])[:12])) or "none"
            raise IngestError(name, "not Upbit candles: no object has a candle field "
                                    f"({', '.join(UPBIT_REQUIRED_FIELDS)}); the first one "
                                    f"has: {keys}")
        if first and self.symbol is None and not any(
                isinstance(c.get("market"), str) and c["market"] for c in chunk.candles):
            report.failed += len(chunk.candles)
            raise IngestError(name, "the candles carry no 'market' field: give --symbol")
        if first and self.timeframe is None and not any("unit" in c for c in chunk.candles):
            report.failed += len(chunk.candles)
            raise IngestError(name, "the candles carry no 'unit' field (not minute candles?): "
                                    "give --timeframe")
        groups: dict[tuple[str, str], tuple[list[dict[str, Any]], list[BadRecord]]] = {}
        for candle, line, index in zip(chunk.candles, chunk.lines, chunk.indices, strict=True):
            where = BadRecord(name, line, index, "")
            symbol = self.symbol or candle.get("market")
            if not isinstance(symbol, str) or not symbol:
                self._bad(report, _with(where, "no 'market' field (give --symbol)"))
                continue
            timeframe = self.timeframe
            if timeframe is None:
                if "unit" not in candle:
                    self._bad(report, _with(where, "no 'unit' field (give --timeframe)"))
                    continue
                try:
                    timeframe = timeframe_from_unit(candle["unit"])
                except ValueError as exc:
                    self._bad(report, _with(where, str(exc)))
                    continue
            group = groups.get((symbol, timeframe))
            if group is None:
                group = groups[(symbol, timeframe)] = ([], [])
            group[0].append(candle)
            group[1].append(where)
        for (symbol, timeframe), (candles, places) in groups.items():
            await self._submit(report, symbol, timeframe, candles, places)

    async def _submit(self, report: FileReport, symbol: str, timeframe: str,
                      candles: list[dict[str, Any]], places: list[BadRecord]) -> None:
        """Queue one group; on a ValueError find the bad candles, report them, queue the rest."""
        try:
            await self._queue(report, symbol, timeframe, candles, places)
            return
        except ValueError as exc:
            if _CANDLE_INDEX.search(str(exc)) is None:
                self._fail_group(report, places, str(exc))
                return
        # the normaliser names only the first bad candle: test each one alone
        good: list[dict[str, Any]] = []
        good_places: list[BadRecord] = []
        hook = self.manager.pm.hook.batchdb_normalize_candles
        for candle, place in zip(candles, places, strict=True):
            try:
                hook(symbol=symbol, timeframe=timeframe, candles=[candle], source=self.source)
            except ValueError as exc:
                self._bad(report, _with(place, _candle_message(exc)))
                continue
            good.append(candle)
            good_places.append(place)
        while good:
            try:
                await self._queue(report, symbol, timeframe, good, good_places)
                return
            except ValueError as exc:
                match = _CANDLE_INDEX.search(str(exc))
                if match is None or int(match.group(1)) >= len(good):
                    self._fail_group(report, good_places, str(exc))
                    return
                i = int(match.group(1))
                self._bad(report, _with(good_places[i], _candle_message(exc)))
                del good[i], good_places[i]

    def _fail_group(self, report: FileReport, places: list[BadRecord], message: str) -> None:
        report.failed += len(places)
        self._report(report, f"{_span(places)}: {message}")

    async def _queue(self, report: FileReport, symbol: str, timeframe: str,
                     candles: list[dict[str, Any]], places: list[BadRecord]) -> None:
        span = _span(places)

        def done(op: BatchOperation) -> None:
            report.rows_committed += op.rows_affected
            report.finished = time.monotonic()
            if op.error is not None:
                report.failed += op.n_rows - op.rows_affected
                self._report(report, f"{span}: not committed: {op.error}")

        for attempt in range(3):
            try:
                op_id = await self.manager.insert_candles_batch(
                    symbol, timeframe, candles, self.priority, done, self.source)
                break
            except QueueFull:
                if attempt == 2:
                    raise
                await self.manager.flush()  # backpressure "raise": make room, then retry
        self._pending.append(op_id)
        while len(self._pending) > self.max_pending:
            # done() counts the outcome; a failure was reported there, a KeyError means
            # the operation finished long ago (beyond the manager's completed_history)
            with contextlib.suppress(OperationFailed, KeyError):
                await self.manager.wait(self._pending.popleft())


def upbit_error_response(value: Mapping[str, Any]) -> str | None:
    """``name: message`` of an Upbit API error response (``{"error": {"name": ...,
    "message": ...}}``), or None if ``value`` is not one."""
    error = value.get("error")
    if not isinstance(error, Mapping) or "candle_date_time_utc" in value:
        return None
    parts = [str(error[k]) for k in ("name", "message") if error.get(k) not in (None, "")]
    return ": ".join(parts) or json.dumps(error, ensure_ascii=False)[:200]


def _candle_message(exc: ValueError) -> str:
    """The normaliser's message about one candle, without its index in the batch."""
    return _CANDLE_INDEX.sub("candle", _CANDLE_PREFIX.sub("", str(exc)))


def _with(place: BadRecord, message: str) -> BadRecord:
    return BadRecord(place.path, place.line, place.index, message)


def _span(places: Sequence[BadRecord]) -> str:
    """``file:first-last`` for a group of candles (line numbers, or element indices)."""
    first, last = places[0], places[-1]
    if first.index is not None and first.line == last.line:
        lo, hi = first.index, last.index
        where = f"{first.path}:{first.line} (elements {lo}-{hi})"
        return where if lo != hi else first.location
    if first.line == last.line:
        return first.location
    return f"{first.path}:{first.line}-{last.line}"

