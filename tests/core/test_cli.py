"""The ``batchdb`` command line, run through typer's CliRunner and as a real process,
against real SQLite files in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from batchdb import __version__
from batchdb.cli import app

DATA = Path(__file__).resolve().parents[1] / "data"
BATCHDB = Path(sys.executable).with_name("batchdb")


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "settings.toml"
    path.parent.mkdir()
    path.write_text(f'backend = "sqlite"\n[sqlite]\npath = "{tmp_path / "market.sqlite3"}"\n'
                    '[batch]\ninsert_batch_size = 500\n')
    return path


def db_of(tmp_path: Path) -> Path:
    return tmp_path / "market.sqlite3"


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Invoke the CLI in-process with a wide terminal (no folded lines to match across)."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


# ---------------------------------------------------------------------- ingest
@pytest.mark.parametrize(("name", "fmt", "expected"), [
    ("upbit_krw-btc_1m.json", "json", [("KRW-BTC", "1m", 30)]),
    ("upbit_mixed.ndjson", "ndjson", [("KRW-ETH", "60m", 20), ("KRW-XRP", "1m", 15)]),
    ("upbit_krw-sol_5m.csv", "csv", [("KRW-SOL", "5m", 25)]),
])
def test_ingest_each_format(settings_file: Path, tmp_path: Path, name: str, fmt: str,
                            expected: list[tuple[str, str, int]]) -> None:
    result = run("ingest", str(DATA / name), "--settings", str(settings_file))
    assert result.exit_code == 0, result.output
    total = sum(n for *_, n in expected)
    assert f"All {total} candles committed." in result.stdout
    assert f"{name}" in result.stdout and fmt in result.stdout
    assert query(db_of(tmp_path), "SELECT symbol, timeframe, COUNT(*) FROM candles "
                                  "GROUP BY 1, 2 ORDER BY 1, 2") == expected


def test_ingest_options_symbol_timeframe_priority(settings_file: Path, tmp_path: Path) -> None:
    result = run("ingest", str(DATA / "upbit_days_no_unit.json"), "--timeframe", "1d",
                 "--priority", "high", "--format", "json", "--chunk-size", "2",
                 "-s", str(settings_file))
    assert result.exit_code == 0, result.output
    assert query(db_of(tmp_path), "SELECT symbol, timeframe, COUNT(*) FROM candles "
                                  "GROUP BY 1, 2") == [("KRW-BTC", "1d", 5)]


def test_ingest_bad_lines_reports_file_and_line(settings_file: Path, tmp_path: Path) -> None:
    result = run("ingest", str(DATA / "bad_lines.ndjson"), str(DATA / "bad_lines.csv"),
                 str(DATA / "upbit_krw-btc_1m.json"), "--settings", str(settings_file))
    assert result.exit_code == 1, result.output
    for where in ("bad_lines.ndjson:4: bad JSON", "bad_lines.ndjson:7: 'trade_price' must be",
                  "bad_lines.ndjson:9: candle has no 'high_price'",
                  "bad_lines.csv:3: 'candle_acc_trade_volume' is not a number: 'lots'",
                  "bad_lines.csv:6: has 5 fields", "bad_lines.csv:8: 'candle_date_time_utc'"):
        assert where in result.stderr
    assert "6 line(s)/candle(s) failed" in result.stdout
    assert "Traceback" not in result.output
    assert query(db_of(tmp_path), "SELECT symbol, COUNT(*) FROM candles GROUP BY 1") == [
        ("KRW-ADA", 5), ("KRW-BTC", 30), ("KRW-DOGE", 10)]


def test_ingest_max_errors_limits_the_listing(settings_file: Path) -> None:
    result = run("ingest", str(DATA / "bad_lines.ndjson"), "--max-errors", "1",
                 "-s", str(settings_file))
    assert result.exit_code == 1
    assert "bad_lines.ndjson:4:" in result.stderr
    assert "bad_lines.ndjson:7:" not in result.stderr
    assert "2 more problem(s) not shown" in result.stderr


def test_ingest_missing_unreadable_and_truncated_files(settings_file: Path,
                                                       tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    result = run("ingest", str(missing), str(tmp_path), str(DATA / "truncated.json"),
                 str(DATA / "upbit_krw-sol_5m.csv"), "-s", str(settings_file))
    assert result.exit_code == 1, result.output
    assert f"{missing}: cannot be read: No such file or directory" in result.stderr
    assert f"{tmp_path}: cannot be read" in result.stderr
    assert "truncated.json: the file ends inside element 4" in result.stderr
    assert "3 file(s) could not be read completely" in result.stdout
    assert query(db_of(tmp_path), "SELECT symbol, COUNT(*) FROM candles GROUP BY 1") == [
        ("KRW-LINK", 4), ("KRW-SOL", 25)]


def test_ingest_bad_arguments_exit_2(settings_file: Path) -> None:
    bad_priority = run("ingest", str(DATA / "upbit_mixed.ndjson"), "--priority", "urgent",
                       "-s", str(settings_file))
    assert bad_priority.exit_code == 2 and "urgent" in bad_priority.output
    bad_source = run("ingest", str(DATA / "upbit_mixed.ndjson"), "--source", "binance",
                     "-s", str(settings_file))
    assert bad_source.exit_code == 2
    assert "no plugin normalises candles from source 'binance'" in bad_source.output


# ---------------------------------------------------------------------- settings errors
@pytest.mark.parametrize("command", [
    ["ingest", str(DATA / "upbit_mixed.ndjson")], ["demo", "--seconds", "1"], ["status"],
    ["maintain"], ["plugins"], ["config"]])
def test_broken_settings_file_exits_2_naming_the_file(tmp_path: Path,
                                                      command: list[str]) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[batch\ninsert_batch_size = 10\n")
    result = run(*command, "--settings", str(broken))
    assert result.exit_code == 2, result.output
    assert f"settings file {broken}: not valid TOML" in result.stderr
    assert "Traceback" not in result.output


def test_bad_settings_value_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "settings.toml"  # found as ./settings.toml (the working directory)
    bad.write_text("[batch]\ninsert_batch_size = -5\n")
    result = run("status")
    assert result.exit_code == 2
    assert "settings file settings.toml: batch.insert_batch_size:" in result.stderr
    assert "(got -5)" in result.stderr


def test_settings_env_variable_and_unknown_backend(tmp_path: Path, settings_file: Path) -> None:
    gone = run("config", env={"BATCHDB_SETTINGS": str(tmp_path / "gone.toml")})
    assert gone.exit_code == 2
    assert "gone.toml (from $BATCHDB_SETTINGS): not found" in gone.stderr
    nope = run("ingest", str(DATA / "upbit_mixed.ndjson"), "--backend", "nope",
               env={"BATCHDB_SETTINGS": str(settings_file)})
    assert nope.exit_code == 2
    assert "Invalid value for '--backend': no backend named 'nope' is installed" in nope.output
    assert "Traceback" not in nope.output


# ---------------------------------------------------------------------- demo
def test_demo_from_a_bare_directory(tmp_path: Path) -> None:
    """No settings file: the default market_data.sqlite3 in the working directory."""
    start = time.monotonic()
    result = run("demo", "--seconds", "2")
    elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 2 + 6
    db = tmp_path / "market_data.sqlite3"
    counts = dict(query(db, "SELECT 'orders', COUNT(*) FROM orders UNION ALL "
                            "SELECT 'candles', COUNT(*) FROM candles UNION ALL "
                            "SELECT 'backtest_results', COUNT(*) FROM backtest_results"))
    assert counts["orders"] > 10 and counts["candles"] > 1000
    assert counts["backtest_results"] >= 1000
    out = result.stdout
    for text in ("rows in the database", "trading bot", "CRITICAL", "backtester", "LOW",
                 "operations", "0 failed", "throughput", "rows/s", "commit latency",
                 f"{db} (sqlite)"):
        assert text in out
    for table, count in counts.items():
        assert f"{table}" in out and f"{count:,}" in out
    statuses = query(db, "SELECT DISTINCT status FROM orders ORDER BY 1")
    assert statuses == [("filled",), ("open",)]
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


def test_demo_db_option(tmp_path: Path, settings_file: Path) -> None:
    target = tmp_path / "elsewhere.sqlite3"
    result = run("demo", "--seconds", "1", "--db", str(target), "-s", str(settings_file),
                 "--backend", "sqlite")
    assert result.exit_code == 0, result.output
    assert query(target, "SELECT COUNT(*) FROM orders")[0][0] > 0
    assert not db_of(tmp_path).exists()


# ---------------------------------------------------------------------- status & maintain
def test_status_shows_tables_counts_and_markets(settings_file: Path, tmp_path: Path) -> None:
    assert run("ingest", str(DATA / "upbit_mixed.ndjson"), "-s", str(settings_file)
               ).exit_code == 0
    with sqlite3.connect(db_of(tmp_path)) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.executemany("INSERT INTO notes (body) VALUES (?)", [("a",), ("b",), ("c",)])
        # a virtual table whose module this Python lacks: it cannot be counted, the rest can
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("INSERT INTO sqlite_master (type, name, tbl_name, rootpage, sql) VALUES "
                     "('table', 'vt', 'vt', 0, 'CREATE VIRTUAL TABLE vt USING nosuchmodule(a)')")
    result = run("status", "-s", str(settings_file))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "journal_mode" in out and "wal" in out and str(db_of(tmp_path)) in out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "candles 35" in lines and "notes 3" in lines
    assert "vt cannot count: no such module: nosuchmodule" in lines
    assert "KRW-ETH 60m 20 2024-01-02 00:00:00 2024-01-02 19:00:00" in lines
    assert "KRW-XRP 1m 15 2024-01-02 00:00:00 2024-01-02 00:14:00" in lines


def test_status_of_a_missing_database_creates_nothing(settings_file: Path,
                                                      tmp_path: Path) -> None:
    result = run("status", "-s", str(settings_file))
    assert result.exit_code == 1
    assert f"database {db_of(tmp_path)} does not exist yet" in result.stderr
    assert not db_of(tmp_path).exists()


def test_maintain_tasks(settings_file: Path, tmp_path: Path) -> None:
    assert run("ingest", str(DATA / "upbit_krw-btc_1m.json"), "-s", str(settings_file)
               ).exit_code == 0
    default = run("maintain", "-s", str(settings_file))
    assert default.exit_code == 0, default.output
    lines = [" ".join(line.split()) for line in default.stdout.splitlines()]
    assert any(line.startswith("checkpoint ok busy=false") for line in lines)
    assert any(line.startswith("analyze ok analyzed=true") for line in lines)
    assert any(line.startswith("vacuum ok bytes_before=") for line in lines)
    assert not any(line.startswith("integrity_check") for line in lines)
    bogus = run("maintain", "integrity_check", "bogus", "analyze", "-s", str(settings_file))
    assert bogus.exit_code == 2  # an argument mistake: nothing runs
    assert ("Invalid value for 'TASKS...': backend 'sqlite' has no maintenance task 'bogus'; "
            "it has: checkpoint, analyze, vacuum, integrity_check") in " ".join(
        bogus.output.replace("│", " ").split())
    assert "integrity_check ok" not in bogus.stdout
    chosen = run("maintain", "integrity_check", "analyze", "-s", str(settings_file))
    assert chosen.exit_code == 0
    lines = [" ".join(line.split()) for line in chosen.stdout.splitlines()]
    assert any(line.startswith('integrity_check ok ok=true, messages=["ok"]') for line in lines)
    assert any(line.startswith("analyze ok") for line in lines)
    assert query(db_of(tmp_path), "SELECT COUNT(*) FROM candles") == [(30,)]


# ---------------------------------------------------------------------- plugins & config
def test_plugins_lists_entry_points_and_backends(tmp_path: Path) -> None:
    result = run("plugins")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert any(line.startswith("sqlite batchdb.backends.sqlite batchdb") and "loaded" in line
               for line in lines)
    assert any(line.startswith("upbit batchdb.plugins.upbit") and "normalize_candles" in line
               for line in lines)
    assert any(line.startswith("sqlite batchdb.backends.sqlite.backend.SQLiteBackend")
               and line.endswith("configured") for line in lines)
    conf = tmp_path / "s.toml"
    conf.write_text('[plugins]\ndisabled = ["upbit"]\n')
    disabled = run("plugins", "-s", str(conf))
    assert disabled.exit_code == 0
    assert any(" ".join(line.split()) == "upbit disabled"
               for line in disabled.stdout.splitlines())


def test_plugins_reports_a_plugin_that_fails_to_load(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party distribution whose batchdb entry point cannot be imported."""
    dist = tmp_path / "site" / "brokenplugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[batchdb]\nbroken = batchdb_no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = run("plugins")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert ("broken failed: ModuleNotFoundError: No module named "
            "'batchdb_no_such_module_xyz'") in lines
    assert any(line.startswith("sqlite batchdb.backends.sqlite") for line in lines)


def test_config_shows_sources_and_hides_passwords(tmp_path: Path) -> None:
    conf = tmp_path / "settings.toml"
    conf.write_text('[batch]\ninsert_batch_size = 2500\n'
                    '[postgres]\ndsn = "postgresql://trader:hunter2@db.example:5432/market"\n')
    result = run("config", "--backend", "sqlite",
                 env={"BATCHDB_BATCH__MAX_MEMORY_MB": "64"})
    assert result.exit_code == 0, result.output
    rows = {t[0]: t[1:] for t in map(str.split, result.stdout.splitlines()) if t}
    assert rows["backend"] == ["sqlite", "argument"]
    assert rows["batch.insert_batch_size"] == ["2500", "file"]
    assert rows["batch.max_memory_mb"] == ["64.0", "env", "BATCHDB_BATCH__MAX_MEMORY_MB"]
    assert rows["batch.update_batch_size"] == ["500", "default"]
    assert rows["postgres.dsn"] == ["postgresql://trader:***@db.example:5432/market", "file"]
    assert "hunter2" not in result.output
    assert "settings file: settings.toml" in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"batchdb {__version__}"


# ---------------------------------------------------------------------- signals (real processes)
def _wait_for_rows(db: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with sqlite3.connect(db, timeout=5) as conn:
                n = conn.execute("SELECT COUNT(*) FROM candles").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            n = 0
        if n:
            return int(n)
        time.sleep(0.02)
    raise AssertionError("the ingest never committed a row")


@pytest.mark.skipif(not BATCHDB.exists(), reason="the batchdb console script is not installed")
def test_sigterm_during_ingest_drains_and_reports(settings_file: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.ndjson"
    total = 150_000
    with big.open("w") as fh:
        for i in range(total):
            fh.write(json.dumps({
                "market": "KRW-BTC", "candle_date_time_utc":
                f"2020-01-{1 + i // 1440:02d}T{i // 60 % 24:02d}:{i % 60:02d}:00",
                "opening_price": 100.0 + i, "high_price": 101.0 + i, "low_price": 99.0 + i,
                "trade_price": 100.5 + i, "candle_acc_trade_volume": 1.0,
                "candle_acc_trade_price": 100.0, "unit": 1}) + "\n")
    command = [str(BATCHDB), "ingest", str(big), str(DATA / "upbit_mixed.ndjson"),
               "--chunk-size", "2000", "-s", str(settings_file)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    db = db_of(tmp_path)
    _wait_for_rows(db, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Interrupted by SIGTERM" in out
    assert "SIGTERM: stopping" in err
    summary = next(" ".join(line.split()) for line in out.splitlines()
                   if line.strip().startswith("big.ndjson"))
    _, fmt, read, committed, failed, *_ = summary.split()
    assert (fmt, failed) == ("ndjson", "0")
    rows = query(db, "SELECT COUNT(*) FROM candles")[0][0]
    assert int(read.replace(",", "")) == int(committed.replace(",", "")) == rows
    assert 0 < rows < total
    assert "upbit_mixed.ndjson" in out and "not read (interrupted)" in out
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.skipif(not BATCHDB.exists(), reason="the batchdb console script is not installed")
def test_sigint_ends_a_long_demo_early(tmp_path: Path) -> None:
    proc = subprocess.Popen([str(BATCHDB), "demo", "--seconds", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    db = tmp_path / "market_data.sqlite3"
    _wait_for_rows(db, proc)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert time.monotonic() - start < 15
    assert "Interrupted by SIGINT" in out and "rows in the database" in out
    assert "Traceback" not in out + err
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


def test_bench_command_writes_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "batchdb.cli", "bench", "--backends", "sqlite", "--rows", "3000",
         "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "batchdb-bench.json").read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert any("raw" in n for n in names) and any("batchdb" in n for n in names)
    assert (out / "batchdb-bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "upsert_new" in proc.stdout and "x raw" in proc.stdout


def test_bench_command_rejects_unknown_backend(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batchdb.cli", "bench", "--backends", "mongo", "--rows", "10"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "mongo" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------- issue #11
COMMANDS = ["ingest", "demo", "status", "maintain", "plugins", "config", "bench"]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_reads_like_a_careful_cli(command: str | None) -> None:
    text = _help(*([command] if command else []))
    usage = next(line.strip() for line in text.splitlines() if "Usage:" in line)
    assert "<bool>" not in text  # flags take no value
    assert "<list[" not in text and "{" not in usage
    assert "Show this message and exit." in text
    expected = {"ingest": "Usage: batchdb ingest [OPTIONS] FILES...",
                "maintain": "Usage: batchdb maintain [OPTIONS] [TASKS]...",
                None: "Usage: batchdb [OPTIONS] COMMAND [ARGS]..."}
    if command in expected:
        assert usage == expected[command]
    if command == "ingest":
        assert "<CRITICAL|HIGH|NORMAL|LOW>" in text and "[default: NORMAL]" in text
        assert "files...      <path>" in text


def test_version_takes_no_value() -> None:
    assert run("--version").stdout.strip() == f"batchdb {__version__}"
    for extra in (["false"], ["status"], ["--help", "x"]):
        result = run("--version", *extra)
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--version': takes no value" in result.output
        assert __version__ not in result.stdout


def test_option_errors_read_plainly(settings_file: Path) -> None:
    ndjson = str(DATA / "upbit_mixed.ndjson")
    cases = [
        (["ingest", ndjson, "--priority", "urgent"],
         "Invalid value for '--priority': 'urgent' is not one of CRITICAL, HIGH, NORMAL, LOW"),
        (["ingest", ndjson, "--format", "xml"],
         "Invalid value for '--format': 'xml' is not one of"),
        (["ingest", ndjson, "--source", "binance"],
         "Invalid value for '--source': no plugin normalises candles from source 'binance'"),
        (["ingest", ndjson, "--symbol", " "], "Invalid value for '--symbol': must not be empty"),
        (["ingest", ndjson, "--chunk-size", "0"], "Invalid value for '--chunk-size': "),
        (["bench", "--backends", "foo", "--rows", "10"], "Invalid value for '--backends': "),
        (["status", "--backend", "nosuch"], "Invalid value for '--backend': no backend named "
                                            "'nosuch' is installed"),
        (["config", "--backend", "nosuch"], "Invalid value for '--backend': "),
        (["plugins", "--backend", "nosuch"], "Invalid value for '--backend': "),
    ]
    for args, message in cases:
        result = run(*args, "-s", str(settings_file)) if args[0] != "bench" else run(*args)
        assert result.exit_code == 2, (args, result.output)
        text = " ".join(result.output.replace("│", " ").split())
        assert message in text, (args, text)
        assert "Value error" not in text and "Traceback" not in text
    chunk = run("ingest", ndjson, "--chunk-size", "0", "-s", str(settings_file))
    assert "(got '0')" in chunk.output


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", [["ingest", str(DATA / "upbit_mixed.ndjson")],
                                     ["demo", "--seconds", "1"], ["status"], ["maintain"]])
def test_settings_mistakes_exit_2_naming_the_key_and_the_file(tmp_path: Path,
                                                              command: list[str]) -> None:
    conf = tmp_path / "settings.toml"  # ./settings.toml: the working directory is tmp_path
    cases = [
        ('backend = "mysql"\n', "settings file settings.toml: backend: no backend named "
                                "'mysql' is installed"),
        (f'[sqlite]\npath = "{tmp_path / "nodir" / "x.db"}"\n',
         f"settings file settings.toml: sqlite.path: the directory {tmp_path / 'nodir'} "
         "of the database file"),
        ('[sqlite]\npath = ""\n', "settings file settings.toml: sqlite.path: must name a "
                                   "database file"),
        (f'[sqlite]\npath = "{tmp_path}"\n', f"sqlite.path: {tmp_path} is a directory"),
        ('bakend = "duckdb"\n[sqllite]\npath = "x.db"\n',
         "settings file settings.toml: unknown setting 'bakend' (did you mean 'backend'?); "
         "unknown section [sqllite] (did you mean 'sqlite'?)"),
        ('log_level = "LOUD"\n', "log_level: must be one of DEBUG, INFO, WARNING"),
    ]
    for text, message in cases:
        _write(conf, text)
        result = run(*command)
        assert result.exit_code == 2, (text, result.output)
        assert message in " ".join(result.stderr.split()), (text, result.stderr)
        assert "Traceback" not in result.output
    assert not (tmp_path / "nodir").exists()
    conf.unlink()
    env = run(*command, env={"BATCHDB_BACKEND": "mysql"})
    assert env.exit_code == 2 and "BATCHDB_BACKEND: no backend named 'mysql'" in env.stderr


def test_config_of_misspelt_settings_exits_2(tmp_path: Path) -> None:
    _write(tmp_path / "settings.toml", 'bakend = "duckdb"\n')
    result = run("config")
    assert result.exit_code == 2
    assert "unknown setting 'bakend' (did you mean 'backend'?)" in " ".join(
        result.stderr.split())
    (tmp_path / "settings.toml").unlink()
    bad_json = run("config", env={"BATCHDB_BATCH": "{bad"})
    assert bad_json.exit_code == 2 and "Traceback" not in bad_json.output
    assert "BATCHDB_BATCH: not valid JSON" in bad_json.stderr
    section = run("config", "--settings", str(_write(tmp_path / "ok.toml", "")),
                  env={"BATCHDB_BATCH": '{"max_retries": 2}'})
    rows = {t[0]: t[1:] for t in map(str.split, section.stdout.splitlines()) if t}
    assert rows["batch.max_retries"] == ["2", "env", "BATCHDB_BATCH"]


def _foreign_candles(backend: str, tmp_path: Path, dsn: str | None) -> dict[str, str]:
    """A database whose candles table is the user's own (not batchdb's); the env for it."""
    if backend == "sqlite":
        path = tmp_path / "user.sqlite3"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE candles (a, b)")
            conn.execute("INSERT INTO candles VALUES (1, 2)")
        return {"BATCHDB_BACKEND": "sqlite", "BATCHDB_SQLITE__PATH": str(path)}
    if backend == "duckdb":
        duckdb = pytest.importorskip("duckdb")
        path = tmp_path / "user.duckdb"
        conn = duckdb.connect(str(path))
        conn.execute("CREATE TABLE candles (a INTEGER, b INTEGER)")
        conn.execute("INSERT INTO candles VALUES (1, 2)")
        conn.close()
        return {"BATCHDB_BACKEND": "duckdb", "BATCHDB_DUCKDB__PATH": str(path)}
    assert dsn is not None
    from tests.pgserver import sql_exec

    sql_exec(dsn, "CREATE TABLE candles (a int, b int)")
    sql_exec(dsn, "INSERT INTO candles VALUES (1, 2)")
    return {"BATCHDB_BACKEND": "postgres", "BATCHDB_POSTGRES__DSN": dsn}


@pytest.mark.parametrize("backend", ["sqlite", "duckdb", "postgres"])
def test_no_command_shows_a_traceback_for_a_foreign_candles_table(
        request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> None:
    dsn = request.getfixturevalue("pg_dsn") if backend == "postgres" else None
    env: dict[str, str | None] = {**_foreign_candles(backend, tmp_path, dsn)}
    status = run("status", env=env)
    assert status.exit_code == 0, status.output
    text = " ".join(status.stdout.split())
    assert "the table candles is not batchdb's candles table (it has no column symbol, " \
           "timeframe, ts; its columns: a, b)" in text
    assert "candles 1" in text
    for args in (["ingest", str(DATA / "upbit_mixed.ndjson")], ["maintain"],
                 ["demo", "--seconds", "1"], ["plugins"], ["config"]):
        result = run(*args, env=env)
        assert "Traceback" not in result.output, (args, result.output)
        assert result.exit_code in (0, 1), (args, result.output)
    ingest = run("ingest", str(DATA / "upbit_mixed.ndjson"), env=env)
    assert "table 'candles' has no column(s) 'symbol'" in ingest.stderr


def test_ingest_an_upbit_error_response_and_single_objects(settings_file: Path,
                                                           tmp_path: Path) -> None:
    error = {"error": {"name": "too_many_requests", "message": "Too many API requests."}}
    compact = _write(tmp_path / "error.json", json.dumps(error))
    pretty = _write(tmp_path / "error_pretty.json", json.dumps(error, indent=2))
    candle = json.loads((DATA / "upbit_krw-btc_1m.json").read_text())[0]
    one = _write(tmp_path / "one.json", json.dumps(candle, indent=2))
    other = _write(tmp_path / "other.json", json.dumps({"foo": 1, "bar": 2}, indent=2))
    result = run("ingest", str(compact), str(pretty), str(one), str(other),
                 "-s", str(settings_file))
    assert result.exit_code == 1, result.output
    err = " ".join(result.stderr.split())
    for path in (compact, pretty):
        assert (f"{path}:1: an Upbit API error response, not a candle: too_many_requests: "
                "Too many API requests.") in err
    assert "give --symbol" not in err and "candle_date_time_utc'" not in err
    assert (f"{other}: not Upbit candles: no object has a candle field "
            "(candle_date_time_utc, ") in err and "the first one has: foo, bar" in err
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "one.json json object 1 1 0" in " ".join(lines)
    assert query(db_of(tmp_path), "SELECT symbol, COUNT(*) FROM candles GROUP BY 1") == [
        (candle["market"], 1)]


def test_ingest_csv_with_utc_z_emits_no_warning(settings_file: Path, tmp_path: Path) -> None:
    import warnings

    text = (DATA / "upbit_krw-sol_5m.csv").read_text().splitlines()
    header, rows = text[0].split(","), [line.split(",") for line in text[1:]]
    utc = header.index("candle_date_time_utc")
    for row in rows:
        row[utc] += "Z"
    path = _write(tmp_path / "export.csv", "\n".join(",".join(r) for r in [header, *rows]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("ingest", str(path), "-s", str(settings_file))
    assert result.exit_code == 0, result.output
    assert [str(w.message) for w in caught] == []
    assert "UserWarning" not in result.output
    assert query(db_of(tmp_path), "SELECT MIN(ts), MAX(ts), COUNT(*) FROM candles") == [
        (1704153600000, 1704160800000, 25)]


def test_demo_db_in_a_missing_directory_names_the_option(tmp_path: Path) -> None:
    result = run("demo", "--db", str(tmp_path / "nodir" / "x.db"), "--seconds", "1")
    assert result.exit_code == 2
    assert "Invalid value for '--db': the directory" in " ".join(
        result.output.replace("│", " ").split())
    assert not (tmp_path / "nodir").exists()


def test_missing_files_and_an_unwritable_bench_folder_are_usage_errors(tmp_path: Path) -> None:
    missing = run("ingest")
    assert missing.exit_code == 2 and "Missing argument 'FILES...'" in missing.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    outs = [blocker / "sub"]
    if not os.access(readonly, os.W_OK):  # (root may write anyway: nothing to refuse)
        outs.append(readonly / "x")
    for out in outs:
        result = run("bench", "--backends", "sqlite", "--rows", "10", "--out", str(out))
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.replace("│", " ").split())
        assert f"Invalid value for '--out': cannot write to the folder {out}" in text
        assert "Traceback" not in result.output
