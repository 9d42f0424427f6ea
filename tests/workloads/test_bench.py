"""batchdb.workloads.bench with tiny sizes: it runs, writes the JSON and the PNG, the table is
complete.

No assertion here is about speed: the numbers come from benchmarks/ and ``batchdb bench``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from batchdb.candles import CANDLE_COLUMNS
from batchdb.workloads import bench
from batchdb.workloads.bench import runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATS_KEYS = {"min", "max", "mean", "median", "stddev", "rounds", "iqr", "q1", "q3", "ops",
              "total", "data", "iterations"}


@pytest.fixture(autouse=True)
def _no_pg_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bench.PG_DSN_ENV, raising=False)


def _text(report: bench.BenchReport) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(bench.render_table(report))
    return out.getvalue()


def test_comparison_on_sqlite_in_spawned_processes(tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    report = bench.run_comparison(["sqlite", "postgres"], 2000, tmp_path,
                                  lambda done, total, what: calls.append((done, total, what)),
                                  rounds=1)

    expected = bench.cases(["sqlite"], bench.COMPARISON_WORKLOADS)
    assert [r.case for r in report.results] == expected
    assert len(expected) == 12  # raw + batchdb for 4 workloads, raw-values for 3, sqlite-utils
    for r in report.results:
        assert r.error is None, f"{r.case.name}: {r.error}"
        assert r.rows == bench.workload_rows(r.case.workload, 2000)
        assert len(r.seconds) == 1 and r.rows_per_s > 0
        assert r.peak_rss_mb >= 0
        if r.case.implementation == "raw":
            assert r.ratio_to_raw is None
        else:
            assert r.ratio_to_raw is not None and r.ratio_to_raw > 0
    assert report.result("one_row", "sqlite", "batchdb") is not None
    assert report.result("one_row", "sqlite", "batchdb").rows == 200  # type: ignore[union-attr]
    assert "postgres" in report.skipped and bench.PG_DSN_ENV in report.skipped["postgres"]

    # progress: one call per run, then the final one
    assert [c[0] for c in calls] == list(range(len(expected) + 1))
    assert all(c[1] == len(expected) for c in calls) and calls[-1][2] == "done"

    # the JSON has pytest-benchmark's layout
    assert report.json_path == tmp_path / "batchdb-bench.json"
    doc = json.loads(report.json_path.read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(doc)
    assert doc["machine_info"]["python_version"]
    assert len(doc["benchmarks"]) == len(expected)
    for entry, case in zip(doc["benchmarks"], expected, strict=True):
        assert entry["name"] == case.name and entry["group"] == case.workload
        assert set(entry["stats"]) >= STATS_KEYS and entry["stats"]["rounds"] == 1
        assert entry["stats"]["min"] == entry["stats"]["max"] == entry["stats"]["median"] > 0
        info = entry["extra_info"]
        assert info["rows_per_s"] > 0 and info["backend"] == "sqlite"
        assert "peak_rss_delta_mb" in info
    upsert = next(e for e in doc["benchmarks"] if e["name"] == "upsert_new[sqlite-batchdb]")
    assert upsert["extra_info"]["target"].startswith("≥ 0.90x")
    assert isinstance(upsert["extra_info"]["target_met"], bool)

    # the chart
    assert report.png_path == tmp_path / "batchdb-bench.png"
    assert report.png_path.read_bytes()[:8] == PNG_MAGIC

    # the table: one row per case, and the skipped backend named
    table = bench.render_table(report)
    assert table.row_count == len(expected)
    text = _text(report)
    for case in expected:
        assert case.label in text
    assert "skipped: postgres" in text

    # the temporary databases are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batchdb-bench.json",
                                                         "batchdb-bench.png"]


def test_latency_and_memory_workloads_in_process(tmp_path: Path) -> None:
    report = bench.run_comparison(["sqlite"], 3000, tmp_path, None, rounds=2,
                                  workloads=["critical_latency", "memory_flood"],
                                  isolate=False)
    latency = report.result("critical_latency", "sqlite", "batchdb")
    flood = report.result("memory_flood", "sqlite", "batchdb")
    assert latency is not None and latency.error is None
    assert flood is not None and flood.error is None
    lat = latency.extra["critical_latency"]
    assert lat["count"] == latency.extra["critical_writes"] > 0
    assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert len(latency.extra["critical_latency_per_round"]) == 2
    assert flood.extra["budget_mb"] == bench.FLOOD_BUDGET_MB
    assert flood.extra["producer_rows_per_s"] > 0
    assert not math.isnan(flood.rows_per_s)
    assert "p99" in _text(report)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        bench.run_comparison(["mysql"], 10, tmp_path)
    with pytest.raises(ValueError, match="rows"):
        bench.run_comparison(["sqlite"], 0, tmp_path)
    with pytest.raises(ValueError, match="unknown workload"):
        bench.run_comparison(["sqlite"], 10, tmp_path, workloads=["nope"])


def test_a_failing_run_is_reported_not_raised(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: bench.SQLiteStore, conn: object, rows: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(bench.SQLiteStore, "write_dicts", broken)
    report = bench.run_comparison(["sqlite"], 1000, tmp_path, rounds=1,
                                  workloads=["upsert_new"], isolate=False)
    raw = report.result("upsert_new", "sqlite", "raw")
    batchdb = report.result("upsert_new", "sqlite", "batchdb")
    assert raw is not None and raw.error == "RuntimeError: disk on fire"
    assert batchdb is not None and batchdb.error is None and batchdb.ratio_to_raw is None
    doc = json.loads(report.json_path.read_text())  # type: ignore[union-attr]
    assert "upsert_new[sqlite-raw]" in doc["errors"]
    assert "error: RuntimeError: disk on fire" in _text(report)


def test_raw_normaliser_matches_the_upbit_plugin() -> None:
    from batchdb.plugins.upbit import normalize_upbit_candles

    market, candles = bench.upbit_calls(50)[0]
    columns, rows = normalize_upbit_candles(market, "1m", candles)
    raw = bench.normalize_upbit_raw(market, "1m", candles, rows[0][-1])
    assert columns == CANDLE_COLUMNS
    assert raw == [(*r[:9], "upbit", r[10]) for r in rows]


def test_missing_optional_packages_are_reported(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = runs._importable
    monkeypatch.setattr(runs, "_importable",
                        lambda m: m not in ("sqlite_utils", "matplotlib") and real(m))
    report = bench.run_comparison(["sqlite"], 1000, tmp_path, rounds=1,
                                  workloads=["upsert_new"], isolate=False)
    assert [r.case.implementation for r in report.results] == ["raw", "raw-values", "batchdb"]
    assert "sqlite-utils" in report.skipped and "chart" in report.skipped
    assert report.png_path is None and report.json_path is not None
    assert not (tmp_path / "batchdb-bench.png").exists()


def _batchdb_result(workload: str, *, seconds: float = 1.0, peak_rss_mb: float = 0.0,
                    ratio_to_raw: float | None = None, extra: dict[str, Any] | None = None,
                    error: str | None = None) -> bench.BenchResult:
    """10,000 rows of batchdb on SQLite in one round of ``seconds``."""
    return bench.BenchResult(bench.Case(workload, "sqlite", "batchdb"), 10_000, [seconds],
                             peak_rss_mb, ratio_to_raw=ratio_to_raw, extra=extra or {},
                             error=error)


def test_target_checks_and_their_margin() -> None:
    margin = bench.TARGET_MARGIN
    assert margin == 0.10
    # a lower bound: ratio to raw (SQLite upsert_new: 0.9x)
    ratio = _batchdb_result("upsert_new", ratio_to_raw=0.85).target_check()
    assert ratio is not None and ratio.at_least and ratio.goal == 0.9
    assert not ratio.met and ratio.met_within(margin)  # 0.85 >= 0.81
    assert ratio.shown == "0.85x raw" and ratio.show(ratio.bound(margin)) == "0.81x raw"
    far = _batchdb_result("upsert_new", ratio_to_raw=0.80).target_check()
    assert far is not None and not far.met_within(margin)
    # rows/s: 10,000 rows in 0.1 s is the 100k target exactly
    one_row = _batchdb_result("one_row", seconds=0.1).target_check()
    assert one_row is not None and one_row.met and one_row.shown == "100,000 rows/s"
    # an upper bound: p99 (25 ms) passes at 27.5 ms with the margin, not at 27.6
    lat = {"critical_latency": {"p99_ms": 27.5}}
    p99 = _batchdb_result("critical_latency", extra=lat).target_check()
    assert p99 is not None and not p99.at_least and not p99.met and p99.met_within(margin)
    assert p99.show(p99.bound(margin)) == "27.5 ms"
    lat = {"critical_latency": {"p99_ms": 27.6}}
    p99 = _batchdb_result("critical_latency", extra=lat).target_check()
    assert p99 is not None and not p99.met_within(margin)
    flood = _batchdb_result("memory_flood", peak_rss_mb=100.0).target_check()
    assert flood is not None and flood.met and flood.shown == "100.0 MB"
    # target() is the strict verdict the report shows
    assert _batchdb_result("upsert_new", ratio_to_raw=0.85).target() == (
        "≥ 0.90x raw", False)
    # no target: raw, an error, no ratio yet, a NaN figure never passes
    raw = bench.BenchResult(bench.Case("upsert_new", "sqlite", "raw"), 10, [1.0], 0.0)
    assert raw.target_check() is None
    assert _batchdb_result("upsert_new", error="x").target_check() is None
    assert _batchdb_result("upsert_new").target_check() is None
    nan = _batchdb_result("one_row", seconds=math.nan).target_check()
    assert nan is not None and not nan.met_within(margin)
