"""The candle file readers and the Ingester, against real SQLite files."""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchdb import BatchDBManager
from batchdb.workloads.ingest import Ingester, timeframe_from_unit
from batchdb.workloads.readers import BadRecord, Chunk, IngestError, detect_format, read_chunks

DATA = Path(__file__).resolve().parents[1] / "data"


def read_all(path: Path, **kwargs: Any) -> Chunk:
    """Every chunk of ``path`` merged into one (raises what read_chunks raises)."""
    merged = Chunk()
    for chunk in read_chunks(path, **kwargs):
        merged.candles += chunk.candles
        merged.lines += chunk.lines
        merged.indices += chunk.indices
        merged.bad += chunk.bad
        merged.bytes_read = chunk.bytes_read
    return merged


def candle(i: int, market: str | None = "KRW-BTC", unit: int | None = 1,
           **extra: Any) -> dict[str, Any]:
    """A valid Upbit minute candle, the i-th minute of 2024-03-01 (None: field left out)."""
    c: dict[str, Any] = {
        "candle_date_time_utc": f"2024-03-01T{i // 60:02d}:{i % 60:02d}:00",
        "opening_price": 1000.0 + i, "high_price": 1010.0 + i, "low_price": 990.0 + i,
        "trade_price": 1005.0 + i, "candle_acc_trade_volume": 1.5,
        "candle_acc_trade_price": 1500.0 + i,
    }
    if market is not None:
        c["market"] = market
    if unit is not None:
        c["unit"] = unit
    c.update(extra)
    return c


def db_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def manager_factory(tmp_path: Path) -> Iterator[Any]:
    """Managers on one real SQLite file in tmp_path (no settings file, no maintenance)."""
    db = tmp_path / "candles.sqlite3"

    def make() -> BatchDBManager:
        return BatchDBManager.from_settings(None, sqlite={"path": str(db)},
                                            maintenance={"enabled": False})

    make.db = db  # type: ignore[attr-defined]
    yield make


# ---------------------------------------------------------------------- readers
def test_json_array_sample_lines_and_indices() -> None:
    expected = json.loads((DATA / "upbit_krw-btc_1m.json").read_text())
    chunk = read_all(DATA / "upbit_krw-btc_1m.json")
    assert chunk.candles == expected
    assert chunk.indices == list(range(30))
    # indent=2: "[" on line 1, then 13 lines per candle
    assert chunk.lines == [2 + 13 * i for i in range(30)]
    assert chunk.bytes_read == (DATA / "upbit_krw-btc_1m.json").stat().st_size
    assert not chunk.bad


def test_json_array_tiny_blocks_and_windows_give_the_same_result() -> None:
    path = DATA / "upbit_krw-btc_1m.json"
    whole = read_all(path)
    for block, window in ((1, 40), (7, 300), (64, 5000), (4096, 1 << 16)):
        small = read_all(path, block=block, window=window, chunk_size=3)
        assert small.candles == whole.candles
        assert small.lines == whole.lines
        assert small.indices == whole.indices


json_scalars = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.none(),
    # strings that look like the boundaries the fast path cuts at
    st.sampled_from(["}, {", "},{", '"},{"', "}\n,\n{", "[", "]", "\\", "é€😀", ""]),
    st.text(max_size=12),
)
json_objects = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.one_of(json_scalars, st.lists(st.dictionaries(st.text(max_size=3), json_scalars,
                                                     max_size=2), max_size=3)),
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(
    elements=st.lists(st.one_of(json_objects, json_scalars), max_size=25),
    indent=st.sampled_from([None, 0, 1, 2]),
    block=st.integers(1, 97),
    window=st.integers(8, 400),
    chunk_size=st.integers(1, 9),
)
def test_json_array_reader_matches_json_module(
    tmp_path: Path, elements: list[Any], indent: int | None, block: int, window: int,
    chunk_size: int,
) -> None:
    """Whatever the cut points, every element comes back as json.loads reads it, with the
    line its text starts on; non-objects are bad records naming their element."""
    parts = [json.dumps(e, indent=indent, ensure_ascii=False) for e in elements]
    sep = ",\n" if indent is not None else ", "
    text = "[\n" + sep.join(parts) + "\n]\n"
    path = tmp_path / "prop.json"
    path.write_text(text, encoding="utf-8")
    starts, line = [], 2
    for part in parts:
        starts.append(line)
        line += part.count("\n") + (1 if indent is not None else 0)
    got = read_all(path, block=block, window=window, chunk_size=chunk_size)
    objects = [(i, e) for i, e in enumerate(elements) if isinstance(e, dict)]
    assert got.candles == [e for _, e in objects]
    assert got.indices == [i for i, _ in objects]
    assert got.lines == [starts[i] for i, _ in objects]
    assert [(b.index, b.line) for b in got.bad] == [
        (i, starts[i]) for i, e in enumerate(elements) if not isinstance(e, dict)]


def test_json_array_truncated_keeps_what_came_before(tmp_path: Path) -> None:
    chunks = []
    with pytest.raises(IngestError, match=r"truncated\.json: the file ends inside element 4"):
        for chunk in read_chunks(DATA / "truncated.json", chunk_size=100):
            chunks.append(chunk)
    assert [len(c.candles) for c in chunks] == [4]
    assert [c["market"] for c in chunks[0].candles] == ["KRW-LINK"] * 4


def test_json_array_broken_element_names_line_and_element(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    good = [json.dumps(candle(i)) for i in range(3)]
    path.write_text("[\n" + ",\n".join(good) + ',\n{"market": "KRW-BTC", oops},\n'
                    + json.dumps(candle(9)) + "\n]")
    seen = []
    with pytest.raises(IngestError, match=r"broken\.json: line 5 \(element 3\): bad JSON"):
        for chunk in read_chunks(path):
            seen += chunk.candles
    assert seen == [candle(i) for i in range(3)]


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file is empty"),
    ('{"market": "KRW-BTC"}', r"expected a JSON array .*use --format ndjson"),
    ("[" + json.dumps(candle(0)) + "] [1]", "unexpected data after the JSON array"),
    ("[" + json.dumps(candle(0)) + " " + json.dumps(candle(1)) + "]",
     r"expected ',' or '\]' after element 0"),
    ("[" + json.dumps(candle(0)) + ",", "not closed"),
    (b"[\xff\xfe]", "not UTF-8"),
])
def test_json_array_file_errors(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "x.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(IngestError, match=message):
        read_all(path, fmt="json")


def test_ndjson_bad_lines_are_records_with_line_numbers() -> None:
    chunk = read_all(DATA / "bad_lines.ndjson")
    assert [str(b) for b in chunk.bad] == [
        f"{DATA / 'bad_lines.ndjson'}:4: bad JSON: Expecting ',' delimiter (column 1)"]
    assert chunk.lines == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert len(chunk.candles) == 12  # lines 7 and 9 are JSON: the normaliser rejects them


def test_ndjson_arrays_blank_lines_bom_and_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson"
    body = (json.dumps([candle(0), candle(1)]) + "\n\n   \n" + json.dumps(candle(2)) + "\n"
            + "42\n" + json.dumps([candle(3), "nope"]) + "\n")
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    chunk = read_all(path)
    assert chunk.candles == [candle(0), candle(1), candle(2), candle(3)]
    assert chunk.lines == [1, 1, 4, 6]
    assert chunk.indices == [0, 1, None, 0]
    assert [(b.line, b.index, b.message) for b in chunk.bad] == [
        (5, None, "not a JSON object (got int)"), (6, 1, "not a JSON object (got str)")]


def test_ndjson_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(json.dumps(candle(0)).encode() + b'\n{"market": "\xff"}\n'
                     + json.dumps(candle(1)).encode() + b"\n")
    chunk = read_all(path)
    assert len(chunk.candles) == 2
    assert [(b.line, b.message.split(":")[0]) for b in chunk.bad] == [(2, "not UTF-8 text")]


def test_csv_numbers_and_bad_lines() -> None:
    chunk = read_all(DATA / "bad_lines.csv")
    assert [(b.line, b.message) for b in chunk.bad] == [
        (3, "'candle_acc_trade_volume' is not a number: 'lots'"),
        (6, "has 5 fields, the header has 11"),
    ]
    assert chunk.lines == [2, 4, 5, 7, 8, 9]
    first = chunk.candles[0]
    assert first["market"] == "KRW-ADA"
    assert first["opening_price"] == 700.36 and isinstance(first["opening_price"], float)
    assert first["unit"] == 1.0
    assert first["candle_date_time_utc"] == "2024-01-02T00:07:00"


def test_csv_empty_cells_blank_lines_bom_and_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    fields = ["market", "candle_date_time_utc", "opening_price", "high_price", "low_price",
              "trade_price", "candle_acc_trade_volume", "candle_acc_trade_price", "unit"]
    rows = [
        ["KRW-BTC", "2024-03-01T00:00:00", "1", "2", "0.5", "1.5", "10", "15", "1"],
        [],
        [" KRW-ETH ", "2024-03-01T00:01:00", " 3 ", "4", "2", "3", "1e2", "", " "],
    ]
    with path.open("w", newline="", encoding="utf-8-sig") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        writer.writerows(rows)
    chunk = read_all(path)
    assert not chunk.bad
    assert chunk.lines == [2, 4]
    assert chunk.candles[1] == {
        "market": "KRW-ETH", "candle_date_time_utc": "2024-03-01T00:01:00",
        "opening_price": 3.0, "high_price": 4.0, "low_price": 2.0, "trade_price": 3.0,
        "candle_acc_trade_volume": 100.0}


def test_csv_header_without_upbit_columns_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("market,time,open\nKRW-BTC,2024,1\n")
    with pytest.raises(IngestError, match=r"x\.csv: line 1: the CSV header lacks column\(s\) "
                                          r"candle_date_time_utc, opening_price"):
        read_all(path)
    assert len(read_all(path, required=()).candles) == 1


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"nope\.json: cannot be read: No such file"):
        read_all(tmp_path / "nope.json")
    with pytest.raises(IngestError, match="cannot be read"):
        read_all(tmp_path)  # a directory


def test_detect_format(tmp_path: Path) -> None:
    cases = {"a.csv": "x", "b.ndjson": "[", "c.jsonl": "[", "d.json": "  [", "e.json": "{}",
             "f.txt": "\n[", "g.txt": "{", "h": "market,x"}
    for name, head in cases.items():
        (tmp_path / name).write_text(head)
    assert {n: detect_format(tmp_path / n) for n in cases} == {
        "a.csv": "csv", "b.ndjson": "ndjson", "c.jsonl": "ndjson", "d.json": "json",
        "e.json": "ndjson", "f.txt": "json", "g.txt": "ndjson", "h": "csv"}
    assert detect_format(tmp_path / "a.csv", "json") == "json"
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        detect_format(tmp_path / "a.csv", "xml")


def test_timeframe_from_unit() -> None:
    assert [timeframe_from_unit(u) for u in (1, 60, 240.0)] == ["1m", "60m", "240m"]
    for bad in (0, -1, 1.5, "1", None, True, float("nan")):
        with pytest.raises(ValueError, match="'unit' must be"):
            timeframe_from_unit(bad)


def test_bad_record_location() -> None:
    assert str(BadRecord("f.json", 3, 7, "boom")) == "f.json:3 (element 7): boom"
    assert str(BadRecord("f.csv", 3, None, "boom")) == "f.csv:3: boom"
    assert str(BadRecord("f.csv", None, None, "boom")) == "f.csv: boom"


# ---------------------------------------------------------------------- the Ingester
async def test_ingest_sample_files_into_sqlite(manager_factory: Any) -> None:
    errors: list[str] = []
    async with manager_factory() as manager:
        ingester = Ingester(manager, on_error=errors.append, chunk_size=7)
        reports = await ingester.ingest([DATA / "upbit_krw-btc_1m.json",
                                         DATA / "upbit_mixed.ndjson",
                                         DATA / "upbit_krw-sol_5m.csv"])
    assert errors == []
    assert [(r.format, r.candles_read, r.rows_committed, r.failed, r.ok) for r in reports] == [
        ("json", 30, 30, 0, True), ("ndjson", 35, 35, 0, True), ("csv", 25, 25, 0, True)]
    assert db_rows(manager_factory.db, "SELECT symbol, timeframe, COUNT(*) FROM candles "
                                       "GROUP BY 1, 2 ORDER BY 1, 2") == [
        ("KRW-BTC", "1m", 30), ("KRW-ETH", "60m", 20), ("KRW-SOL", "5m", 25),
        ("KRW-XRP", "1m", 15)]
    btc = json.loads((DATA / "upbit_krw-btc_1m.json").read_text())[0]
    assert db_rows(manager_factory.db, "SELECT ts, open_price, close_price, volume, "
                   "quote_volume, source FROM candles WHERE symbol = 'KRW-BTC' ORDER BY ts "
                   "DESC LIMIT 1") == [(1704155340000, btc["opening_price"], btc["trade_price"],
                                        btc["candle_acc_trade_volume"],
                                        btc["candle_acc_trade_price"], "upbit")]


async def test_bad_lines_fail_alone_with_file_and_line(manager_factory: Any) -> None:
    errors: list[str] = []
    async with manager_factory() as manager:
        reports = await Ingester(manager, on_error=errors.append).ingest(
            [DATA / "bad_lines.ndjson", DATA / "bad_lines.csv"])
    nd, cs = DATA / "bad_lines.ndjson", DATA / "bad_lines.csv"
    assert errors == [
        f"{nd}:4: bad JSON: Expecting ',' delimiter (column 1)",
        f"{nd}:7: 'trade_price' must be a number, got 'abc'",
        f"{nd}:9: candle has no 'high_price'",
        f"{cs}:3: 'candle_acc_trade_volume' is not a number: 'lots'",
        f"{cs}:6: has 5 fields, the header has 11",
        f"{cs}:8: 'candle_date_time_utc' is not an ISO date-time: 'yesterday'",
    ]
    assert [(r.candles_read, r.rows_committed, r.failed, r.ok) for r in reports] == [
        (13, 10, 3, False), (8, 5, 3, False)]
    assert reports[0].errors == errors[:3]
    assert db_rows(manager_factory.db, "SELECT symbol, COUNT(*) FROM candles GROUP BY 1") == [
        ("KRW-ADA", 5), ("KRW-DOGE", 10)]


async def test_many_bad_candles_in_one_chunk(manager_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "many.ndjson"
    candles = [candle(i) for i in range(60)]
    bad = {5: ("opening_price", "x"), 17: ("trade_price", None), 18: ("low_price", float("inf")),
           40: ("candle_date_time_utc", "2024-13-45"), 59: ("market", "KRW-ETH")}
    for i, (key, value) in bad.items():
        candles[i][key] = value
    path.write_text("\n".join(json.dumps(c) for c in candles) + "\n")
    errors: list[str] = []
    async with manager_factory() as manager:
        [report] = await Ingester(manager, symbol="KRW-BTC", on_error=errors.append).ingest(
            [path])
    assert [int(e.split(":")[1]) for e in errors] == [6, 18, 19, 41, 60]
    assert "'opening_price' must be a number" in errors[0]
    assert "is for market 'KRW-ETH', not 'KRW-BTC'" in errors[4]
    assert (report.candles_read, report.rows_committed, report.failed) == (60, 55, 5)
    assert db_rows(manager_factory.db, "SELECT COUNT(*) FROM candles")[0][0] == 55


async def test_symbol_and_timeframe_options(manager_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "days.json"
    path.write_text(json.dumps([candle(i, market=None, unit=None) for i in range(4)]))
    errors: list[str] = []
    async with manager_factory() as manager:
        [no_options] = await Ingester(manager, on_error=errors.append).ingest([path])
        [with_options] = await Ingester(manager, symbol="KRW-XRP", timeframe="1d").ingest(
            [path])
    assert no_options.error == "the candles carry no 'market' field: give --symbol"
    assert (no_options.rows_committed, no_options.failed) == (0, 4)
    assert errors == [f"{path}: the candles carry no 'market' field: give --symbol"]
    assert with_options.ok and with_options.rows_committed == 4
    assert db_rows(manager_factory.db, "SELECT DISTINCT symbol, timeframe FROM candles") == [
        ("KRW-XRP", "1d")]


async def test_no_unit_needs_timeframe(manager_factory: Any) -> None:
    async with manager_factory() as manager:
        [report] = await Ingester(manager).ingest([DATA / "upbit_days_no_unit.json"])
    assert report.error is not None and "give --timeframe" in report.error
    assert report.rows_committed == 0 and not report.ok


async def test_later_candle_without_unit_fails_alone(manager_factory: Any,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson"
    rows = [candle(0), candle(1, unit=None), candle(2, unit=0), candle(3, unit=5)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    errors: list[str] = []
    async with manager_factory() as manager:
        [report] = await Ingester(manager, on_error=errors.append).ingest([path])
    assert errors == [f"{path}:2: no 'unit' field (give --timeframe)",
                      f"{path}:3: 'unit' must be a whole number of minutes >= 1, got 0"]
    assert report.rows_committed == 2
    assert db_rows(manager_factory.db, "SELECT timeframe FROM candles ORDER BY ts") == [
        ("1m",), ("5m",)]


async def test_missing_file_does_not_stop_the_others(manager_factory: Any,
                                                     tmp_path: Path) -> None:
    errors: list[str] = []
    async with manager_factory() as manager:
        reports = await Ingester(manager, on_error=errors.append).ingest(
            [tmp_path / "missing.json", DATA / "upbit_krw-sol_5m.csv"])
    assert reports[0].error is not None and "cannot be read" in reports[0].error
    assert errors == [f"{tmp_path / 'missing.json'}: cannot be read: No such file or directory"]
    assert reports[1].ok and reports[1].rows_committed == 25


async def test_database_refusal_is_reported_for_the_chunk(manager_factory: Any,
                                                          tmp_path: Path) -> None:
    """A candle the normaliser accepts but the database refuses (a CHECK constraint of a
    pre-existing table) fails its operation; the other chunks commit."""
    with sqlite3.connect(manager_factory.db) as conn:
        conn.execute("""CREATE TABLE candles (symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
            ts INTEGER NOT NULL, open_price REAL NOT NULL, high_price REAL NOT NULL,
            low_price REAL NOT NULL, close_price REAL NOT NULL CHECK (close_price < 5000),
            volume REAL NOT NULL, quote_volume REAL, source TEXT, ingested_at INTEGER NOT NULL,
            PRIMARY KEY (symbol, timeframe, ts))""")
    path = tmp_path / "x.ndjson"
    rows = [candle(i) for i in range(9)]
    rows[4]["trade_price"] = 9999.0
    path.write_text("\n".join(json.dumps(r) for r in rows))
    errors: list[str] = []
    async with manager_factory() as manager:
        [report] = await Ingester(manager, chunk_size=3, on_error=errors.append).ingest([path])
    assert len(errors) == 1 and errors[0].startswith(f"{path}:4-6: not committed:")
    assert "CHECK constraint failed" in errors[0]
    assert (report.rows_committed, report.failed) == (6, 3)
    assert db_rows(manager_factory.db, "SELECT COUNT(*) FROM candles")[0][0] == 6


async def test_request_stop_ends_reading_and_commits_what_was_read(
        manager_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "long.ndjson"
    path.write_text("\n".join(json.dumps(candle(i)) for i in range(1000)))
    async with manager_factory() as manager:
        ingester = Ingester(manager, chunk_size=100)
        chunks_seen = []

        def progress(report: Any) -> None:
            chunks_seen.append(report.candles_read)
            if report.candles_read >= 300:
                ingester.request_stop()

        ingester.on_progress = progress
        reports = await ingester.ingest([path, DATA / "upbit_krw-sol_5m.csv"])
    assert len(reports) == 1 and reports[0].interrupted
    assert reports[0].candles_read == reports[0].rows_committed == 300
    assert db_rows(manager_factory.db, "SELECT COUNT(*) FROM candles")[0][0] == 300


async def test_unknown_source_and_bad_options(manager_factory: Any) -> None:
    manager = manager_factory()
    with pytest.raises(ValueError, match="no plugin normalises candles from source 'binance'"):
        Ingester(manager, source="binance").check_source()
    Ingester(manager).check_source()
    for kwargs, message in (({"chunk_size": 0}, "chunk_size"), ({"fmt": "xml"}, "format"),
                            ({"symbol": ""}, "symbol"), ({"max_pending": 0}, "max_pending"),
                            ({"priority": "URGENT"}, "priority")):
        with pytest.raises(ValueError, match=message):
            Ingester(manager, **kwargs)
