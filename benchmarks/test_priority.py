"""CRITICAL latency behind bulk writers, in one process and across processes on one SQLite file.

    pytest benchmarks/test_priority.py --bench-rows 1000000 -s

- ``critical_behind_backlog``: one process queues a ``--bench-rows`` LOW backlog at once as
  1000-row UPSERT operations (``max_queue_size = 100000``, ``max_memory_mb = 2000``), then
  writes 200 CRITICAL one-row INSERTs into another table, one every 5 ms, each awaited with
  ``wait()`` (target: p99 ≤ 25 ms, aim 10 ms).
- ``bot_beside_bulk[1]`` / ``[3]``: a bot process writes 300 CRITICAL one-row INSERTs, one
  every 10 ms, each awaited, while 1 or 3 other processes upsert 1000-row LOW operations
  over ``--bench-rows`` existing candles (new values); every process has the default
  settings. The same bulk processes also run alone (solo) right before, and each one's rows
  committed with the bot beside it are compared with its solo run (target: bot p99 ≤ 25 ms,
  each bulk ≥ 0.5x solo).

- ``four_priorities``: the bot (CRITICAL), a monitor (HIGH, one-row writes every 10 ms,
  each awaited), a chart (NORMAL, 200-row upserts every 20 ms) and a backtester (LOW,
  1000-row upserts) as four processes on one file; the backtester also runs alone.

Every process is a fresh ``python tests/reliability/priority_child.py``; each round uses a
fresh database. ``extra_info`` holds every round; the printed lines give medians and runs.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchdb.workloads import bench

CHILD = Path(__file__).resolve().parent.parent / "tests" / "reliability" / "priority_child.py"
BOT_WRITES = 300
BOT_INTERVAL = 0.01
CRITICAL_WRITES = 200
CRITICAL_INTERVAL = 0.005


def quantiles(latencies: list[float]) -> dict[str, float]:
    """p50/p99/max in ms (p99: the value below which 99% of the writes are)."""
    data = sorted(latencies)
    n = len(data)

    def q(p: float) -> float:
        return round(data[min(n - 1, math.ceil(p * n) - 1)] * 1000, 2)

    return {"p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": round(data[-1] * 1000, 2)}


def make_database(path: Path, rows: int) -> None:
    """A fresh file with the ``candles`` and ``orders`` tables, ``rows`` candles in it (the
    ones priority_child.candle(i, 0) describes)."""
    sys.path.insert(0, str(CHILD.parent))
    try:
        import priority_child
    finally:
        sys.path.pop(0)
    store = bench.SQLiteStore(path)
    store.reset()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        columns = list(priority_child.candle(0, 0.0))
        sql = (f"INSERT INTO candles ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        for start in range(0, rows, 100_000):
            conn.execute("BEGIN")
            conn.executemany(sql, (tuple(priority_child.candle(i, 0.0).values())
                                   for i in range(start, min(rows, start + 100_000))))
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def run_processes(configs: list[dict[str, Any]], timeout: float = 300.0) -> list[dict[str, Any]]:
    """Start one child per config, start them together once all are ready, return each
    one's result line."""
    procs = [subprocess.Popen([sys.executable, str(CHILD), json.dumps(cfg)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for cfg in configs]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"child did not start: {line!r}")
        start = f"{time.time() + 0.3}\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(start)
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"child failed ({proc.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-batchdb"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def critical_behind_backlog(workdir: Path, rows: int) -> dict[str, Any]:
    """One round of the in-process workload."""
    path = workdir / "backlog.sqlite3"
    _remove(path)
    make_database(path, 0)
    try:
        [result] = run_processes([{
            "role": "critical_backlog", "path": str(path), "backlog": rows,
            "count": CRITICAL_WRITES, "interval": CRITICAL_INTERVAL,
            "batch": {"max_queue_size": 100_000, "max_memory_mb": 2000}}])
    finally:
        _remove(path)
    return {**quantiles(result["latencies"]), "count": len(result["latencies"]),
            "low_ops_left": result["low_left"]}


def bot_beside_bulk(workdir: Path, rows: int, bulk: int) -> dict[str, Any]:
    """One round: the bulk processes alone, then with the bot (fresh database each)."""
    duration = BOT_WRITES * BOT_INTERVAL + 0.4
    path = workdir / "shared.sqlite3"

    def bulk_configs() -> list[dict[str, Any]]:
        return [{"role": "bulk", "path": str(path), "priority": "LOW", "rows": rows,
                 "duration": duration} for _ in range(bulk)]

    rates: dict[str, list[float]] = {}
    for phase in ("solo", "with_bot"):
        _remove(path)
        make_database(path, rows)
        configs = bulk_configs()
        if phase == "with_bot":
            configs.insert(0, {"role": "bot", "path": str(path), "priority": "CRITICAL",
                               "count": BOT_WRITES, "interval": BOT_INTERVAL, "delay": 0.2,
                               "first": 0})
        try:
            results = run_processes(configs)
        finally:
            _remove(path)
        if phase == "with_bot":
            latencies = results.pop(0)["latencies"]
            bot = {**quantiles(latencies), "count": len(latencies)}
        rates[phase] = [r["rows_in_window"] / r["seconds"] for r in results]
    ratios = [round(w / s, 3) for w, s in zip(rates["with_bot"], rates["solo"], strict=True)]
    return {**bot, "bulk_rows_per_s_solo": [round(r) for r in rates["solo"]],
            "bulk_rows_per_s_with_bot": [round(r) for r in rates["with_bot"]],
            "bulk_ratio": ratios}


def four_priorities(workdir: Path, rows: int) -> dict[str, Any]:
    """One round: the backtester alone, then the bot (CRITICAL), a monitor (HIGH, one-row
    writes every 10 ms), a chart (NORMAL, 200-row upserts every 20 ms) and the backtester
    (LOW, 1000-row upserts without pause), each its own process (fresh database each)."""
    duration = BOT_WRITES * BOT_INTERVAL + 0.4
    path = workdir / "four.sqlite3"
    backtester = {"role": "bulk", "path": str(path), "priority": "LOW", "rows": rows,
                  "duration": duration}
    _remove(path)
    make_database(path, rows)
    try:
        [solo] = run_processes([backtester])
    finally:
        _remove(path)
    make_database(path, rows)
    try:
        bot, monitor, chart, low = run_processes([
            {"role": "bot", "path": str(path), "priority": "CRITICAL", "count": BOT_WRITES,
             "interval": BOT_INTERVAL, "delay": 0.2, "first": 0},
            {"role": "bot", "path": str(path), "priority": "HIGH", "count": BOT_WRITES,
             "interval": BOT_INTERVAL, "delay": 0.2, "first": 10_000_000},
            {"role": "bulk", "path": str(path), "priority": "NORMAL", "rows": rows,
             "duration": duration, "op_rows": 200, "pause": 0.02},
            backtester])
    finally:
        _remove(path)
    monitor_q = quantiles(monitor["latencies"])
    return {**quantiles(bot["latencies"]), "count": len(bot["latencies"]),
            "monitor_high": monitor_q,
            "chart_rows_per_s": round(chart["rows_in_window"] / chart["seconds"]),
            "bulk_rows_per_s_solo": [round(solo["rows_in_window"] / solo["seconds"])],
            "bulk_rows_per_s_with_bot": [round(low["rows_in_window"] / low["seconds"])],
            "bulk_ratio": [round(low["rows_in_window"] / max(1, solo["rows_in_window"]), 3)]}


def _report(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"runs": runs}
    for key in ("p50_ms", "p99_ms", "max_ms"):
        summary[key] = statistics.median(r[key] for r in runs)
    if "bulk_ratio" in runs[0]:
        summary["min_bulk_ratio_median"] = statistics.median(min(r["bulk_ratio"]) for r in runs)
    print(f"\n{name}: median p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
          f"max {summary['max_ms']} ms"
          + (f", lowest bulk/solo {summary['min_bulk_ratio_median']}x"
             if "min_bulk_ratio_median" in summary else ""))
    for i, run in enumerate(runs, 1):
        print(f"  run {i}: {json.dumps(run)}")
    return summary


@pytest.fixture
def priority_workdir(tmp_path: Path) -> Path:
    """Where the rounds' databases live."""
    return tmp_path


def test_critical_behind_backlog(benchmark: Any, bench_rows: int, bench_rounds: int,
                                 priority_workdir: Path) -> None:
    """In one process: CRITICAL writes behind a LOW backlog queued at once (target: p99 ≤
    25 ms)."""
    runs: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: runs.append(critical_behind_backlog(priority_workdir,
                                                                   bench_rows)),
                       rounds=bench_rounds, iterations=1)
    benchmark.extra_info.update(_report("critical_behind_backlog", runs))
    assert all(r["count"] == CRITICAL_WRITES for r in runs)


@pytest.mark.parametrize("bulk", [1, 3])
def test_bot_beside_bulk(benchmark: Any, bench_rows: int, bench_rounds: int,
                         priority_workdir: Path, bulk: int) -> None:
    """Across processes: the bot's CRITICAL latency beside ``bulk`` LOW bulk processes, and
    each bulk process's throughput against its solo run (targets: p99 ≤ 25 ms, ≥ 0.5x)."""
    runs: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: runs.append(bot_beside_bulk(priority_workdir, bench_rows,
                                                           bulk)),
                       rounds=bench_rounds, iterations=1)
    benchmark.extra_info.update(_report(f"bot_beside_bulk[{bulk}]", runs))
    assert all(r["count"] == BOT_WRITES and len(r["bulk_ratio"]) == bulk for r in runs)


def test_four_priorities(benchmark: Any, bench_rows: int, bench_rounds: int,
                         priority_workdir: Path) -> None:
    """Four processes at four priorities on one file: the bot's CRITICAL latency, the
    monitor's HIGH latency (its linger, 10 ms, included), the chart's and the backtester's
    rows/s (the backtester against its solo run)."""
    runs: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: runs.append(four_priorities(priority_workdir, bench_rows)),
                       rounds=bench_rounds, iterations=1)
    benchmark.extra_info.update(_report("four_priorities", runs))
    assert all(r["count"] == BOT_WRITES and r["chart_rows_per_s"] > 0 for r in runs)


if __name__ == "__main__":  # quick runs without pytest: python test_priority.py ROWS WHAT
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    n, what = int(sys.argv[1]), sys.argv[2]
    if what == "backlog":
        print(critical_behind_backlog(work, n))
    elif what == "four":
        print(four_priorities(work, n))
    else:
        print(bot_beside_bulk(work, n, int(what)))
