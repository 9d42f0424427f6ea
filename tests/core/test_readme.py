"""Every ```python block of README.md runs as written, in a fresh working directory that
holds only the data the README names (tests/data/...), so an edit that breaks an example
fails here."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of README.md."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def test_the_readme_has_its_python_examples() -> None:
    assert len(python_blocks()) >= 2  # "Using it from Python" and the seed's example 2


@pytest.fixture
def readme_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with the data files the README refers to, no settings
    file and no BATCHDB_* variable: what a new user has."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)
    text = README.read_text(encoding="utf-8")
    for name in sorted(set(re.findall(r"tests/data/[\w.-]+", text))):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize(("line", "code"), python_blocks(),
                         ids=[f"README.md:{line}" for line, _ in python_blocks()])
def test_a_readme_python_block_runs_as_written(readme_dir: Path, line: int, code: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})


def test_the_using_it_from_python_example_writes_what_it_says(
        readme_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (line, code), = [(n, c) for n, c in python_blocks()
                     if "insert_candles_batch" in c and "orders" in c]
    for _ in range(2):  # a user may well run it twice
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert " True None\n" in out and "[(30,)]" in out
    conn = sqlite3.connect(readme_dir / "market_data.sqlite3")
    try:
        assert conn.execute("SELECT count(*), count(DISTINCT ingested_at) > 0 FROM candles "
                            "WHERE symbol = 'KRW-BTC' AND source = 'upbit'").fetchone() == (30, 1)
        assert conn.execute("SELECT order_id, market FROM orders").fetchall() == [
            ("o-1", "KRW-BTC")]
    finally:
        conn.close()


def test_the_seeds_example_2_block_writes_both_tables(readme_dir: Path) -> None:
    (line, code), = [(n, c) for n, c in python_blocks() if "backtest_results" in c]
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    conn = sqlite3.connect(readme_dir / "market_data.sqlite3")
    try:
        assert conn.execute("SELECT order_id, side FROM orders").fetchall() == [("o-2", "bid")]
        assert conn.execute("SELECT count(*), sum(pnl) FROM backtest_results").fetchone() == (
            100, 2475.0)
    finally:
        conn.close()


def test_the_reading_back_example_prints_what_it_says(
        readme_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (line, code), = [(n, c) for n, c in python_blocks() if "read_candles" in c]
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "['candles']"
    assert out[1] == "[(1704153600000, 56959834.0), (1704153660000, 56994223.0)]"
    assert out[2].startswith("[{'ts': 1704153600000, 'close_price': 56959834.0}, ")
    assert out[3] == "10 double"
    assert [line.split()[0] for line in out[4:8]] == ["8", "8", "8", "6"]  # 30 candles
    assert out[4] == "8 ('symbol', 'timeframe', 'ts')"
    assert out[8] == "15 parquet"
    import pyarrow.parquet as pq

    assert pq.read_table(readme_dir / "candles.parquet").num_rows == 15
