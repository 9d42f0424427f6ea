"""Streaming readers of candle files: JSON arrays, NDJSON and CSV in Upbit's field names.

Three formats are read, each streamed so a large file never has to fit in memory at once:

- **JSON array** (``.json``): the Upbit REST response, ``[{...}, {...}]``. Parsed element by
  element with :meth:`json.JSONDecoder.raw_decode` over a sliding text buffer, so memory stays
  at one block plus one chunk of candles; errors name the line and the element index.
- **NDJSON** (``.ndjson``/``.jsonl``, or a ``.json`` file that starts with ``{``): one candle
  object per line (a line holding a JSON array of candles is accepted too).
- **CSV** (``.csv``): a header row with the Upbit field names; the numeric Upbit fields are
  converted to floats (a value that is not a number makes that line bad), empty cells are
  absent fields.

:func:`read_chunks` yields :class:`Chunk` s of candle dicts with the line (and array index)
each came from; a line that is not a candle object is a :class:`BadRecord` in the chunk, so
it fails alone. The Upbit field names come from :mod:`batchdb.plugins.upbit`, the one place
they are written.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from pydantic_core import from_json

from batchdb.models import BatchDBError
from batchdb.plugins.upbit import UPBIT_NUMERIC_FIELDS, UPBIT_REQUIRED_FIELDS

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMATS",
    "BadRecord",
    "Chunk",
    "Format",
    "IngestError",
    "Record",
    "Run",
    "detect_format",
    "read_chunks",
]

Format = Literal["auto", "json", "ndjson", "csv"]
FORMATS: tuple[str, ...] = ("json", "ndjson", "csv")
DEFAULT_CHUNK_SIZE = 10_000

_BLOCK = 1 << 20  # bytes read from a file at a time
_MAX_ELEMENT = 16 << 20  # a JSON array element larger than this is reported as broken
_FAST_WINDOW = 1 << 18  # characters of a JSON array parsed in one from_json call
_WS = re.compile(r"[ \t\n\r]*")
_DELIMITERS = frozenset(" \t\n\r,]")
_BOUNDARY = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*\{")


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

