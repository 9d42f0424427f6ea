"""Candle files into a backend: streaming readers for Upbit-format files and the ingest driver.

Three formats are read, each streamed so a large file never has to fit in memory at once:

- **JSON array** (``.json``): the Upbit REST response, ``[{...}, {...}]``. Parsed element by
  element with :meth:`json.JSONDecoder.raw_decode` over a sliding text buffer, so memory stays
  at one block plus one chunk of candles; errors name the line and the element index.
- **NDJSON** (``.ndjson``/``.jsonl``, or a ``.json`` file that starts with ``{``): one candle
  object per line (a line holding a JSON array of candles is accepted too).
- **CSV** (``.csv``): a header row with the Upbit field names; the numeric Upbit fields are
  converted to floats (a value that is not a number makes that line bad), empty cells are
  absent fields.

:class:`Ingester` hands the candles to :meth:`BatchDBManager.insert_candles_batch` in chunks
(10,000 by default), grouped by market and timeframe. A bad line or a candle the normaliser
rejects fails alone, reported as ``file:line``; the rest of the file is still ingested.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import io
import itertools
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from pydantic_core import from_json

from batchdb.manager import BatchDBManager
from batchdb.models import BatchDBError, BatchOperation, OperationFailed, Priority, QueueFull

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMATS",
    "UPBIT_NUMERIC_FIELDS",
    "UPBIT_REQUIRED_FIELDS",
    "BadRecord",
    "Chunk",
    "FileReport",
    "Format",
    "IngestError",
    "Ingester",
    "detect_format",
    "read_chunks",
    "timeframe_from_unit",
    "upbit_error_response",
]

Format = Literal["auto", "json", "ndjson", "csv"]
FORMATS: tuple[str, ...] = ("json", "ndjson", "csv")
DEFAULT_CHUNK_SIZE = 10_000

#: fields every Upbit candle carries (the CSV header must have them for ``source=upbit``)
UPBIT_REQUIRED_FIELDS: tuple[str, ...] = (
    "candle_date_time_utc",
    "opening_price",
    "high_price",
    "low_price",
    "trade_price",
    "candle_acc_trade_volume",
    "candle_acc_trade_price",
)
#: Upbit fields that hold numbers (converted from text when reading CSV)
UPBIT_NUMERIC_FIELDS: frozenset[str] = frozenset({
    "opening_price", "high_price", "low_price", "trade_price", "candle_acc_trade_volume",
    "candle_acc_trade_price", "unit", "timestamp", "prev_closing_price", "change_price",
    "change_rate", "converted_trade_price",
})

_BLOCK = 1 << 20  # bytes read from a file at a time
_MAX_ELEMENT = 16 << 20  # a JSON array element larger than this is reported as broken
_FAST_WINDOW = 1 << 18  # characters of a JSON array parsed in one from_json call
_WS = re.compile(r"[ \t\n\r]*")
_DELIMITERS = frozenset(" \t\n\r,]")
_BOUNDARY = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*\{")
_CANDLE_INDEX = re.compile(r"\bcandle (\d+)\b")
_CANDLE_PREFIX = re.compile(r"\bcandle \d+: ")


class IngestError(BatchDBError):
    """A file (or the rest of it) cannot be read: missing, unreadable, or broken JSON."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = message


@dataclass(frozen=True)
class BadRecord:
    """One line or array element that could not be ingested, and why."""

    path: str
    line: int | None
    index: int | None
    message: str

    @property
    def location(self) -> str:
        """``file:line``, with the element index for JSON arrays."""
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return where if self.index is None else f"{where} (element {self.index})"

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass
class Chunk:
    """Up to ``chunk_size`` candles read from a file, with where each one came from."""

    candles: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    indices: list[int | None] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    bytes_read: int = 0
    #: what the file turned out to be when that differs from its detected format (a .json
    #: file holding one pretty-printed object: "json object")
    found: str | None = None

    @property
    def records(self) -> int:
        """Candles plus bad records in this chunk."""
        return len(self.candles) + len(self.bad)


class Run(NamedTuple):
    """Consecutive values read from a file: where each one starts, and the values."""

    lines: list[int]
    indices: list[int | None]
    values: list[Any]


Record = Run | BadRecord
_RUN = 1000  # values a reader collects before handing them over


class _Counter:
    """Bytes read so far from the file being streamed (and what the reader found it is)."""

    __slots__ = ("bytes", "found")

    def __init__(self) -> None:
        self.bytes = 0
        self.found: str | None = None  # e.g. "json object": the format, once read


def detect_format(path: str | Path, declared: str = "auto") -> str:
    """The format of ``path``: ``declared`` unless it is ``auto``, else from the extension
    and the first non-blank byte (``[`` JSON array, ``{`` NDJSON)."""
    if declared != "auto":
        if declared not in FORMATS:
            raise ValueError(f"unknown format {declared!r}; known: auto, {', '.join(FORMATS)}")
        return declared
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".ndjson", ".jsonl"):
        return "ndjson"
    try:
        with p.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise IngestError(p, f"cannot be read: {exc.strerror or exc}") from None
    head = head.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")
    if suffix == ".json":
        return "ndjson" if head.startswith(b"{") else "json"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "ndjson"
    return "csv"


def timeframe_from_unit(unit: Any) -> str:
    """The timeframe of an Upbit minute candle: ``unit`` 1 → ``"1m"``, 60 → ``"60m"``."""
    if isinstance(unit, bool) or not isinstance(unit, int | float):
        raise ValueError(f"'unit' must be a whole number of minutes, got {unit!r}")
    if unit != unit or unit < 1 or int(unit) != unit:  # NaN, zero/negative, fraction
        raise ValueError(f"'unit' must be a whole number of minutes >= 1, got {unit!r}")
    return f"{int(unit)}m"


# ---------------------------------------------------------------------- readers
class _JsonArrayScanner:
    """Streams the elements of one top-level JSON array from a binary file.

    Most of the array is parsed in runs of many elements, each in one
    ``pydantic_core.from_json`` call (see :meth:`fast_run`); where that cannot be used,
    and to word errors, elements are read one by one with ``json.JSONDecoder.raw_decode``.
    """

    def __init__(self, fh: IO[bytes], path: Path, counter: _Counter, block: int,
                 window: int = _FAST_WINDOW) -> None:
        self.fh = fh
        self.path = path
        self.counter = counter
        self.block = block
        self.window = window
        self.text = codecs.getincrementaldecoder("utf-8-sig")()
        self.decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line = 1  # the line number of buf[line_pos]
        self.line_pos = 0
        self.base = 0  # offset in the file's text of buf[0]

    def more(self) -> bool:
        """Append the next block to the buffer, dropping what is consumed; False at EOF."""
        if self.eof:
            return False
        data = self.fh.read(self.block)
        self.counter.bytes += len(data)
        try:
            text = self.text.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise IngestError(self.path, f"not UTF-8 text near byte {self.counter.bytes}: "
                                         f"{exc.reason}") from None
        if not data:
            self.eof = True
        self.line += self.buf.count("\n", self.line_pos, self.pos)
        self.base += self.pos
        self.buf = self.buf[self.pos:] + text
        self.pos = self.line_pos = 0
        return True

    def line_at(self, pos: int) -> int:
        """Line number of buffer position ``pos`` (positions asked for never go back)."""
        if pos > self.line_pos:
            self.line += self.buf.count("\n", self.line_pos, pos)
            self.line_pos = pos
        return self.line

    def next_char(self) -> str | None:
        """Skip whitespace; the next character (not consumed), or None at the end."""
        while True:
            match = _WS.match(self.buf, self.pos)
            self.pos = match.end() if match else self.pos
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return None

    def fast_run(self, first_index: int) -> Run | int:
        """Parse the next run of elements in one ``pydantic_core.from_json`` call.

        The run ends at the last ``}, {`` of a window of text. Such a cut may fall inside a
        string or a nested object; then the run does not parse, or does not parse into as
        many objects as cuts were found, and the caller reads that stretch element by
        element instead. Returns the run (and moves past it), or the file offset up to
        which to read element by element.
        """
        while len(self.buf) - self.pos < self.window and self.more():
            pass
        start = self.pos
        cuts = list(_BOUNDARY.finditer(self.buf, start, start + self.window))
        if not cuts:  # one element fills the window, or the array ends in it
            return self.base + start + self.window
        last = cuts[-1]
        try:
            values = from_json("[" + self.buf[start:last.start() + 1] + "]")
        except ValueError:
            return self.base + last.end()
        # all objects: every two neighbours are parted by one "}, {"; as many cuts as
        # elements then means no cut fell inside an element, so cuts[i] ends element i
        if len(values) != len(cuts) or not all(type(v) is dict for v in values):
            return self.base + last.end()
        if "\n" in self.buf[start:last.start()]:
            lines = [self.line_at(start)]
            lines.extend(self.line_at(cut.end() - 1) for cut in cuts[:-1])
        else:
            lines = [self.line_at(start)] * len(values)
        self.pos = last.end() - 1
        return Run(lines, list(range(first_index, first_index + len(values))), values)

    def _decode_one(self, index: int) -> tuple[Any, int] | None:
        """One element at ``pos`` with the json module: ``(value, end)``, or None when the
        buffer must first grow."""
        try:
            value, end = self.decoder.raw_decode(self.buf, self.pos)
        except json.JSONDecodeError as exc:
            at_end = exc.pos >= len(self.buf) - 16 or exc.msg.startswith("Unterminated string")
            if at_end and not self.eof and len(self.buf) - self.pos <= _MAX_ELEMENT:
                self.more()
                return None
            if at_end and self.eof:
                raise IngestError(self.path, f"the file ends inside element {index} (line "
                                             f"{self.line_at(self.pos)}): truncated?") from None
            raise IngestError(self.path, f"line {self.line_at(exc.pos)} (element {index}): "
                                         f"bad JSON: {exc.msg}") from None
        if not self.eof and (end >= len(self.buf) or self.buf[end] not in _DELIMITERS) \
                and len(self.buf) - self.pos <= _MAX_ELEMENT:
            self.more()  # a number may go on in the next block ("0" of "0.5")
            return None
        return value, end

    def elements(self) -> Iterator[Record]:
        """The array's elements, in runs, in order."""
        c = self.next_char()
        if c is None:
            raise IngestError(self.path, "the file is empty")
        if c != "[":
            hint = " (one object per line? use --format ndjson)" if c == "{" else ""
            raise IngestError(self.path, f"line {self.line_at(self.pos)}: expected a JSON array "
                                         f"of candles ('['), found {c!r}{hint}")
        self.pos += 1
        index = 0
        slow_until = 0  # file offset up to which elements are read one by one
        c = self.next_char()
        if c == "]":
            self.pos += 1
            c = None
            closed = True
        else:
            closed = False
        while not closed:
            if c is None:
                raise IngestError(self.path, "the JSON array is not closed (truncated file?)")
            if c == "{" and self.base + self.pos >= slow_until:
                run = self.fast_run(index)
                if isinstance(run, Run):
                    yield run
                    index += len(run.values)
                    c = self.next_char()
                    continue
                slow_until = run
            decoded = self._decode_one(index)
            if decoded is None:
                c = self.next_char()
                continue
            value, end = decoded
            yield Run([self.line_at(self.pos)], [index], [value])
            index += 1
            self.pos = end
            c = self.next_char()
            if c == ",":
                self.pos += 1
                c = self.next_char()
            elif c == "]":
                self.pos += 1
                closed = True
            elif c is not None:
                raise IngestError(self.path, f"line {self.line_at(self.pos)}: expected ',' or "
                                             f"']' after element {index - 1}, found {c!r}")
        if self.next_char() is not None:
            raise IngestError(self.path, f"line {self.line_at(self.pos)}: unexpected data after "
                                         "the JSON array (several arrays? use --format ndjson)")


def _not_object(value: Any) -> str:
    return f"not a JSON object (got {type(value).__name__})"


def _one_document(first: bytes, fh: IO[bytes], counter: _Counter) -> tuple[Any, Iterable[bytes]]:
    """A file whose first line opens a JSON value it does not close (a pretty-printed
    object, say an API response saved by a tool) is read whole: (the value, no lines), or
    (None, its lines) when it is not one JSON document either."""
    head = first.removeprefix(codecs.BOM_UTF8).strip()
    if head[:1] not in (b"{", b"["):
        return None, fh
    try:
        value = from_json(head)
    except ValueError:
        value = None
    else:
        try:
            whole = fh.tell() >= os.fstat(fh.fileno()).st_size
        except (OSError, ValueError):  # (io.UnsupportedOperation) not a file
            whole = False
        return (value if whole else None), fh  # more lines: NDJSON
    rest = fh.read()
    try:
        value = json.loads(first.removeprefix(codecs.BOM_UTF8) + rest)
    except ValueError:  # (UnicodeDecodeError too) not one document: line by line
        return None, io.BytesIO(rest)
    counter.bytes += len(rest)
    return value, ()


def _ndjson_records(fh: IO[bytes], path: Path, counter: _Counter) -> Iterator[Record]:
    name = str(path)
    run = Run([], [], [])
    first = fh.readline()
    document, rest = _one_document(first, fh, counter)
    if isinstance(document, list):
        counter.bytes += len(first)
        counter.found = "json"
        yield Run([1] * len(document), list(range(len(document))), document)
        return
    if document is not None:  # one JSON object: one candle (or an error naming it)
        counter.bytes += len(first)
        counter.found = "json object"
        yield Run([1], [None], [document])
        return
    for line_no, raw in enumerate(itertools.chain((first,) if first else (), rest), 1):
        counter.bytes += len(raw)
        if line_no == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            value = from_json(raw)  # ~4x faster than json.loads
        except ValueError:
            if raw.isspace() or not raw:
                continue
            try:  # the json module decides, and words the error
                value = json.loads(raw)
            except UnicodeDecodeError as exc:
                yield BadRecord(name, line_no, None, f"not UTF-8 text: {exc.reason}")
                continue
            except json.JSONDecodeError as exc:
                yield BadRecord(name, line_no, None,
                                f"bad JSON: {exc.msg} (column {exc.colno})")
                continue
        if isinstance(value, list):  # a whole API response on one line
            run.lines.extend([line_no] * len(value))
            run.indices.extend(range(len(value)))
            run.values.extend(value)
        else:
            run.lines.append(line_no)
            run.indices.append(None)
            run.values.append(value)
        if len(run.values) >= _RUN:
            yield run
            run = Run([], [], [])
    if run.values:
        yield run


def _csv_row(header: list[str], numeric: list[bool], row: list[str]) -> dict[str, Any] | str:
    """One CSV row as a candle, or the reason it is bad (empty cells are absent fields)."""
    candle: dict[str, Any] = {}
    for key, text, is_number in zip(header, row, numeric, strict=True):
        if not text or text.isspace():
            continue
        if is_number:
            try:
                candle[key] = float(text)
            except ValueError:
                return f"{key!r} is not a number: {text.strip()!r}"
        else:
            candle[key] = text.strip()
    return candle


def _csv_records(
    fh: IO[bytes], path: Path, counter: _Counter, required: Sequence[str]
) -> Iterator[Record]:
    name = str(path)
    undecodable: list[int] = []
    physical = 0

    def lines() -> Iterator[str]:
        nonlocal physical
        for raw in fh:
            counter.bytes += len(raw)
            physical += 1
            if physical == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                undecodable.append(physical)
                yield "\n"  # an empty row, reported below

    reader = csv.reader(lines())
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise IngestError(path, "the file is empty (a CSV header is expected)") from None
    except csv.Error as exc:
        raise IngestError(path, f"line 1: bad CSV header: {exc}") from None
    missing = [f for f in required if f not in header]
    if missing:
        raise IngestError(path, f"line 1: the CSV header lacks column(s) {', '.join(missing)} "
                                f"(it has: {', '.join(header)})")
    numeric = [h in UPBIT_NUMERIC_FIELDS for h in header]
    convert: list[Callable[[str], Any]] = [float if n else str.strip for n in numeric]
    width = len(header)
    run = Run([], [], [])
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield BadRecord(name, reader.line_num, None, f"bad CSV: {exc}")
            continue
        line_no = reader.line_num
        if undecodable and undecodable[-1] == physical:
            undecodable.pop()
            yield BadRecord(name, line_no, None, "not UTF-8 text")
            continue
        if len(row) != width:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            yield BadRecord(name, line_no, None,
                            f"has {len(row)} fields, the header has {width}")
            continue
        result: dict[str, Any] | str
        try:  # the common case in one expression; _csv_row finds what is wrong
            result = {k: f(v) for k, f, v in zip(header, convert, row, strict=True) if v}
        except ValueError:
            result = _csv_row(header, numeric, row)
        if isinstance(result, str):
            yield BadRecord(name, line_no, None, result)
            continue
        run.lines.append(line_no)
        run.indices.append(None)
        run.values.append(result)
        if len(run.values) >= _RUN:
            yield run
            run = Run([], [], [])
    if run.values:
        yield run


def read_chunks(
    path: str | Path,
    fmt: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    required: Sequence[str] = UPBIT_REQUIRED_FIELDS,
    block: int = _BLOCK,
    window: int = _FAST_WINDOW,
) -> Generator[Chunk, None, None]:
    """Stream ``path`` as chunks of up to ``chunk_size`` candles (plus the bad records met).

    ``required`` are the columns a CSV header must have; ``block`` is the read size and
    ``window`` the text a JSON array run spans (both only matter for tests). A file that
    cannot be read at all, or a JSON array that breaks off, raises :class:`IngestError`
    after the chunks read before the break were yielded.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    p = Path(path)
    kind = detect_format(p, fmt)
    counter = _Counter()
    try:
        fh = p.open("rb")
    except OSError as exc:
        raise IngestError(p, f"cannot be read: {exc.strerror or exc}") from None
    with fh:
        records: Iterator[Record]
        if kind == "json":
            records = _JsonArrayScanner(fh, p, counter, block, window).elements()
        elif kind == "ndjson":
            records = _ndjson_records(fh, p, counter)
        else:
            records = _csv_records(fh, p, counter, required)
        chunk = Chunk()
        name = str(p)
        error: IngestError | None = None
        try:
            for record in records:
                if isinstance(record, BadRecord):
                    chunk.bad.append(record)
                    if chunk.records >= chunk_size:
                        chunk.bytes_read = counter.bytes
                        yield chunk
                        chunk = Chunk()
                    continue
                lines, indices, values = record
                i = 0
                while i < len(values):
                    j = i + chunk_size - chunk.records
                    part = values[i:j]
                    if all(type(v) is dict for v in part):
                        chunk.candles.extend(part)
                        chunk.lines.extend(lines[i:j])
                        chunk.indices.extend(indices[i:j])
                    else:
                        for k, value in enumerate(part, i):
                            if isinstance(value, dict):
                                chunk.candles.append(value)
                                chunk.lines.append(lines[k])
                                chunk.indices.append(indices[k])
                            else:
                                chunk.bad.append(BadRecord(name, lines[k], indices[k],
                                                           _not_object(value)))
                    i = j
                    if chunk.records >= chunk_size:
                        chunk.bytes_read = counter.bytes
                        yield chunk
                        chunk = Chunk()
        except IngestError as exc:
            error = exc
        except OSError as exc:
            error = IngestError(p, f"read failed after {counter.bytes} bytes: "
                                   f"{exc.strerror or exc}")
        # what was read before a broken part still goes in, then the error is raised
        chunk.bytes_read = counter.bytes
        chunk.found = counter.found
        if chunk.records:
            yield chunk
        if error is not None:
            raise error


# ---------------------------------------------------------------------- ingest driver
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

