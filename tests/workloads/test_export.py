"""``batchdb export`` and ``batchdb query`` on a real SQLite file: what only SQLite does
(values that do not fit a non-STRICT column's type), a failed export leaving no file,
the query formats, option mistakes, and the messages without pyarrow. The same round
trips on every backend are in tests/conformance/test_export.py."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from batchdb import BatchDBManager
from batchdb.cli import app
from batchdb.models import BatchDBError
from batchdb.reads import bind_named, epoch_ms
from batchdb.workloads.export import export_table, write_csv, write_query

pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SQLite file with candles (batchdb's table) and a loose, non-STRICT table."""
    path = tmp_path / "market.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE loose (id INTEGER PRIMARY KEY, price REAL, note TEXT)")
    conn.executemany("INSERT INTO loose VALUES (?, ?, ?)",
                     [(i, i * 0.5, f"n{i}") for i in range(100)])
    conn.commit()
    conn.close()
    (tmp_path / "settings.toml").write_text(f'[sqlite]\npath = "{path}"\n')
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def manager(db: Path) -> BatchDBManager:
    return BatchDBManager.from_settings(None, sqlite={"path": str(db)},
                                        maintenance={"enabled": False})


def test_a_value_that_does_not_fit_its_column_fails_the_export_alone(db: Path,
                                                                     tmp_path: Path) -> None:
    with sqlite3.connect(db) as conn:  # SQLite keeps text in a REAL column of a loose table
        conn.execute("INSERT INTO loose VALUES (100000, 'not a price', 'bad')")

    async def go() -> None:
        async with manager(db) as m:
            with pytest.raises(BatchDBError, match=r"table 'loose', column 'price': the "
                                                   r"value 'not a price' does not fit"):
                await export_table(m, "loose", tmp_path / "loose.parquet", chunk_rows=40)
            # no half file, under its name or the temporary one; CSV takes any value
            assert not list(tmp_path.glob("*loose.parquet*"))
            report = await export_table(m, "loose", tmp_path / "loose.csv")
            assert report.rows == 101
            # and the manager still reads
            assert await m.fetch("SELECT COUNT(*) FROM loose") == [(101,)]

    asyncio.run(go())
    assert (tmp_path / "loose.csv").read_text().splitlines()[-1] == "100000,not a price,bad"


def test_a_column_declared_with_another_type_is_typed_by_its_values(db: Path,
                                                                    tmp_path: Path) -> None:
    with sqlite3.connect(db) as conn:  # a "TIMESTAMP" column holding ISO text, untyped ones
        conn.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, at TIMESTAMP, x, n NUMERIC)")
        conn.executemany("INSERT INTO ev VALUES (?, ?, ?, ?)",
                         [(i, f"2024-01-01T00:00:0{i}", None, i * 2) for i in range(5)])

    async def go() -> None:
        async with manager(db) as m:
            await export_table(m, "ev", tmp_path / "ev.parquet")

    asyncio.run(go())
    table = pq.read_table(tmp_path / "ev.parquet")
    assert [str(f.type) for f in table.schema] == ["int64", "string", "string", "int64"]
    assert table.column("at").to_pylist()[1] == "2024-01-01T00:00:01"
    assert table.column("x").null_count == 5


def test_an_untyped_column_of_mixed_values_is_refused_by_parquet_only(db: Path,
                                                                       tmp_path: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE mixed (id INTEGER PRIMARY KEY, x)")
        conn.executemany("INSERT INTO mixed VALUES (?, ?)", [(1, 5), (2, "five"), (3, None)])
    result = run("export", "mixed", "--to", "m.parquet")
    assert result.exit_code == 1
    assert ("table 'mixed', column 'x' holds values of several types (int, str)"
            in " ".join(result.output.split()))
    assert not list(tmp_path.glob("*m.parquet*"))
    assert run("export", "mixed", "--to", "m.csv").exit_code == 0
    assert (tmp_path / "m.csv").read_text() == "id,x\n1,5\n2,five\n3,\n"


def test_export_command_options(db: Path, tmp_path: Path) -> None:
    result = run("export", "loose", "--to", "out.json")
    assert result.exit_code == 2 and "must end in .parquet or .csv" in result.output
    result = run("export", "loose", "--to", "x.csv", "--since", "last tuesday")
    assert result.exit_code == 2
    assert "'last tuesday' is neither epoch milliseconds nor an ISO 8601" in result.output
    result = run("export", "loose", "--to", "x.csv", "--market", "KRW-BTC")
    assert result.exit_code == 2
    assert "--market filters on a 'symbol' or 'market' column, and table 'loose' has none" \
        in result.output
    result = run("export", "loose", "--to", str(tmp_path / "no" / "x.csv"))
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not list(tmp_path.glob("x.*"))
    result = run("export", "loose", "--to", "x.csv")
    assert result.exit_code == 0, result.output
    assert "Exported 100 rows of loose to x.csv (csv" in result.stdout
    assert "100/100" in result.stderr  # the progress bar, on stderr
    rows = list(csv.reader(io.StringIO((tmp_path / "x.csv").read_text())))
    assert rows[0] == ["id", "price", "note"] and rows[3] == ["2", "1.0", "n2"]


@pytest.mark.parametrize("sql", [
    "SELECT id, price, note, NULL AS missing FROM loose ORDER BY id",
    "SELECT id, id, note FROM loose WHERE id < 30 ORDER BY id",  # a repeated name: id_2
    "SELECT id FROM loose WHERE id < 0",  # no rows
])
def test_query_output_streamed_in_chunks_is_the_whole_result_written_at_once(
        db: Path, sql: str) -> None:
    """``write_query`` writes each chunk as it comes (7 rows at a time here): the text is
    what writing the whole result at once gives (CSV as the export writes it, JSON as
    ``json.dumps(rows, indent=1)`` lays it out)."""

    async def go(fmt: Literal["csv", "json"]) -> tuple[str, int]:
        out = io.StringIO()
        async with manager(db) as m:
            n = await write_query(m, sql, out, fmt, chunk_rows=7)
        return out.getvalue(), n

    with sqlite3.connect(db) as conn:
        cursor = conn.execute(sql)
        columns = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    text, n = asyncio.run(go("csv"))
    whole = io.StringIO()
    write_csv(whole, columns, rows)
    assert n == len(rows)
    assert text == whole.getvalue()  # no rows: the header alone
    text, n = asyncio.run(go("json"))
    names = [f"{c}_2" if c in columns[:i] else c for i, c in enumerate(columns)]
    assert text == json.dumps([dict(zip(names, r, strict=True)) for r in rows],
                              ensure_ascii=False, indent=1) + "\n"
    assert n == len(rows)


def test_query_into_a_pipe_that_closes_early_ends_quietly(db: Path, tmp_path: Path) -> None:
    """``batchdb query … --format csv | head -n 3``: the rows stream out, and when the
    reader stops early the command ends with exit code 1 and no traceback."""
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO loose VALUES (?, ?, ?)",
                         [(i, i * 0.5, "x" * 50) for i in range(100, 200_000)])
    batchdb = Path(sys.executable).with_name("batchdb")
    query = subprocess.Popen([str(batchdb), "query", "SELECT * FROM loose", "--format", "csv"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert query.stdout is not None
    head = subprocess.run(["head", "-n", "3"], stdin=query.stdout, capture_output=True,
                          check=True, timeout=60)
    query.stdout.close()  # only head reads it
    stderr = query.communicate(timeout=60)[1].decode()
    assert head.stdout.decode() == "id,price,note\n0,0.0,n0\n1,0.5,n1\n"
    assert query.returncode == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_export_of_a_database_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text(f'[sqlite]\npath = "{tmp_path / "none.db"}"\n')
    result = run("export", "candles", "--to", "c.parquet")
    assert result.exit_code == 1 and "does not exist yet" in result.output
    assert not (tmp_path / "none.db").exists()


def test_query_formats(db: Path) -> None:
    sql = "SELECT id, price, note, NULL AS nothing_here FROM loose WHERE id < 3 ORDER BY id"
    result = run("query", sql)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].strip() == "3 rows"
    assert lines[2].split() == ["id", "price", "note", "nothing_here"]
    assert lines[4].split() == ["0", "0.0", "n0", "NULL"]
    result = run("query", sql, "--format", "csv")
    assert result.stdout == ("id,price,note,nothing_here\n0,0.0,n0,\n1,0.5,n1,\n"
                             "2,1.0,n2,\n")
    result = run("query", sql, "--format", "JSON")
    assert json.loads(result.stdout)[1] == {"id": 1, "price": 0.5, "note": "n1",
                                            "nothing_here": None}
    result = run("query", "SELECT id FROM loose WHERE id < 0", "--format", "json")
    assert json.loads(result.stdout) == []
    result = run("query", "SELECT * FROM no_such_table")
    assert result.exit_code == 1
    assert "error: OperationalError: no such table: no_such_table" in result.output
    result = run("query", "DROP TABLE loose")
    assert result.exit_code == 1 and "fetch() is for reads" in result.output
    result = run("query", sql, "--format", "xml")
    assert result.exit_code == 2
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM loose").fetchone() == (100,)


def test_parquet_without_pyarrow_names_the_extra_and_csv_still_works(
        db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    result = run("export", "loose", "--to", "x.parquet")
    assert result.exit_code == 1
    assert "export to Parquet needs pyarrow: pip install 'batchdb[arrow]'" in result.output
    assert not list(tmp_path.glob("*x.parquet*"))
    assert run("export", "loose", "--to", "x.csv").exit_code == 0


def test_status_lists_tables_through_list_tables(db: Path) -> None:
    result = run("status")
    assert result.exit_code == 0, result.output
    assert [line.split() for line in result.stdout.splitlines()
            if line.strip().startswith("loose")] == [["loose", "100"]]


# ---------------------------------------------------------------------- the pieces
def test_named_parameters_compile_per_paramstyle() -> None:
    sql = "SELECT :a, x::int, '12:30', 'a%' FROM t WHERE b = :b AND c = :a AND d = \\:lit"
    assert bind_named(sql, {"a": 1, "b": 2}, "qmark") == (
        "SELECT ?, x::int, '12:30', 'a%' FROM t WHERE b = ? AND c = ? AND d = :lit", (1, 2, 1))
    assert bind_named(sql, {"a": 1, "b": 2}, "format") == (
        "SELECT %s, x::int, '12:30', 'a%%' FROM t WHERE b = %s AND c = %s AND d = :lit",
        (1, 2, 1))
    # no parameter: the text as written (a literal % is not doubled for psycopg)
    assert bind_named("SELECT 'a%'", {}, "format") == ("SELECT 'a%'", ())
    with pytest.raises(ValueError, match="paramstyle"):
        bind_named(sql, {}, "numeric")


@pytest.mark.parametrize(("value", "expected"), [
    (1_704_067_200_000, 1_704_067_200_000),
    ("1704067200000", 1_704_067_200_000),
    ("2024-01-01", 1_704_067_200_000),
    ("2024-01-01T09:00:00+09:00", 1_704_067_200_000),
    ("2024-01-01T00:00:00.001Z", 1_704_067_200_001),
    ("1969-12-31T23:59:59.999Z", -1),
])
def test_epoch_ms(value: Any, expected: int) -> None:
    assert epoch_ms(value) == expected


def test_csv_values_read_back_the_same() -> None:
    out = io.StringIO()
    write_csv(out, ["a", "b", "c", "d"], [(0.1 + 0.2, None, b"\x00\xff", True),
                                         (1e-300, "x,\"y\"\n", b"", False)])
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows == [["a", "b", "c", "d"], ["0.30000000000000004", "", "00ff", "true"],
                    ["1e-300", "x,\"y\"\n", "", "false"]]
    assert float(rows[1][0]) == 0.1 + 0.2
