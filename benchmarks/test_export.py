"""Export speed and memory: ``batchdb export`` of a SQLite candles table to Parquet against
the raw paths, in one run, each round in fresh processes (their peak memory is their own):

- ``batchdb``: ``export_table`` through a manager (the ``batchdb export`` command without
  its progress bar), 65,536-row chunks from a SQLite reader, one row group each;
- ``raw pyarrow``: plain sqlite3 ``fetchmany`` of the same chunks, columns to Arrow arrays,
  ``pyarrow.parquet.ParquetWriter``: the same work with nothing of batchdb around it;
- ``duckdb sqlite_scan``: DuckDB's own ``COPY (SELECT * FROM sqlite_scan(...)) TO
  'file.parquet'`` reading the same file, when DuckDB's sqlite extension can be loaded (it
  is downloaded by ``INSTALL sqlite``: on a machine without network access it cannot, and
  the benchmark says so and leaves it out);
- ``batchdb, a quarter of the rows``: the same export of a quarter of the table, to show that
  peak memory does not grow with the table (what would a 10M-row table take: the same);
- ``batchdb query --format csv``: ``write_query`` (what ``batchdb query "SELECT * FROM
  candles" --format csv`` runs) writing the whole table as CSV to a file: its rows stream
  too, so its peak memory is flat as well (its rows/s, CSV text against Parquet, is not
  comparable with the others').

``--bench-rows`` sizes the table (default 1M; the README's figures: 2M rows, under a minute
a round on 2 cores). Rows/s, peak RSS growth per variant and every round are printed and
kept in ``extra_info``.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path

def rss_mb(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0

variant, db, out, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import pyarrow as pa, pyarrow.parquet as pq, sqlite3
from batchdb import BatchDBManager
from batchdb.workloads.export import export_table, DEFAULT_CHUNK_ROWS
where = f" WHERE ts < {limit}" if limit >= 0 else ""
snap = {}
base = rss_mb()
start = time.perf_counter()
if variant == "batchdb":
    async def go():
        m = BatchDBManager.from_settings(None, sqlite={"path": db},
                                         maintenance={"enabled": False})
        async with m:
            until = limit if limit >= 0 else None
            done = (await export_table(m, "candles", Path(out), until=until)).rows
            snap.update(file=rss_mb("RssFile"), anon=rss_mb("RssAnon"))  # reader still open
            return done
    rows = asyncio.run(go())
elif variant == "query-csv":
    from batchdb.workloads.export import write_query
    async def go():
        m = BatchDBManager.from_settings(None, sqlite={"path": db},
                                         maintenance={"enabled": False})
        async with m:
            with open(out, "w", newline="", encoding="utf-8") as f:
                done = await write_query(m, "SELECT * FROM candles" + where, f, "csv")
            snap.update(file=rss_mb("RssFile"), anon=rss_mb("RssAnon"))
            return done
    rows = asyncio.run(go())
elif variant == "raw":
    conn = sqlite3.connect(db)
    cur = conn.execute("SELECT * FROM candles" + where)
    names = [d[0] for d in cur.description]
    types = {"symbol": pa.string(), "timeframe": pa.string(), "source": pa.string(),
             "ts": pa.int64(), "ingested_at": pa.int64()}
    schema = pa.schema([(n, types.get(n, pa.float64())) for n in names])
    writer = pq.ParquetWriter(out, schema)
    rows = 0
    while chunk := cur.fetchmany(DEFAULT_CHUNK_ROWS):
        columns = list(zip(*chunk))
        writer.write_batch(pa.RecordBatch.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema=schema))
        rows += len(chunk)
    writer.close()
    snap.update(file=rss_mb("RssFile"), anon=rss_mb("RssAnon"))
    conn.close()
else:
    import duckdb
    conn = duckdb.connect()
    conn.execute("LOAD sqlite")
    conn.execute(f"COPY (SELECT * FROM sqlite_scan('{db}', 'candles'){where}) "
                 f"TO '{out}' (FORMAT parquet)")
    snap.update(file=rss_mb("RssFile"), anon=rss_mb("RssAnon"))
    rows = pq.ParquetFile(out).metadata.num_rows
seconds = time.perf_counter() - start
# VmHWM, the peak of this process's own memory: getrusage's ru_maxrss would carry the
# parent's peak over the fork and exec (Linux keeps it across execve)
peak = rss_mb("VmHWM")
# what of the RSS is file pages mapped into the process (batchdb's SQLite readers map the
# database, mmap_size 256 MB; shared with the page cache) and what is the heap, at the
# end of the export with the database still open
print(json.dumps({"rows": rows, "seconds": seconds, "base_rss_mb": base,
                  "peak_rss_mb": peak, "peak_rss_delta_mb": peak - base,
                  "end_file_mb": snap["file"], "end_anon_mb": snap["anon"]}))
"""

T0 = 1_704_067_200_000
MINUTE = 60_000


def _make_table(path: Path, rows: int) -> None:
    """batchdb's candles table (STRICT, WITHOUT ROWID, its own DDL), filled with plain
    sqlite3 (the fastest way to a big file; writing is not what is measured)."""
    from sqlalchemy.dialects import sqlite as sqlite_dialect
    from sqlalchemy.schema import CreateTable

    from batchdb.candles import candles_table

    conn = sqlite3.connect(path)
    conn.execute(str(CreateTable(candles_table).compile(dialect=sqlite_dialect.dialect())))
    markets = 20
    per_market = rows // markets

    def batches() -> Any:
        for m in range(markets):
            yield [(f"KRW-{m:03d}", "1m", T0 + i * MINUTE, 100.0 + i * 0.01, 101.0 + i * 0.01,
                    99.0 + i * 0.01, 100.5 + i * 0.01, 1.0 + i % 97 / 7,
                    None if i % 10 == 0 else (100.0 + i) * 3.3, "upbit", T0 + i)
                   for i in range(per_market)]

    for batch in batches():
        conn.executemany("INSERT INTO candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
        conn.commit()
    conn.close()


def _duckdb_sqlite_reason() -> str | None:
    """Why DuckDB's sqlite extension cannot be used here, or None when it can."""
    try:
        import duckdb
    except ImportError:
        return "duckdb is not installed"
    conn = duckdb.connect()
    try:
        conn.execute("LOAD sqlite")
        return None
    except duckdb.Error:
        try:
            conn.execute("INSTALL sqlite")
            conn.execute("LOAD sqlite")
            return None
        except duckdb.Error as exc:
            return f"DuckDB's sqlite extension cannot be installed: {str(exc).splitlines()[0]}"
    finally:
        conn.close()


def _child(variant: str, db: Path, out: Path, limit: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, variant, str(db), str(out), str(limit)],
                          capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{variant} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    out.unlink()
    return result


@pytest.mark.timeout(0)
def test_export_sqlite_to_parquet(benchmark: Any, tmp_path: Path, bench_rows: int,
                                  bench_rounds: int) -> None:
    db = tmp_path / "export.sqlite3"
    _make_table(db, bench_rows)
    rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM candles").fetchone()[0]
    quarter_limit = T0 + (rows // 20 // 4) * MINUTE  # a quarter of each market's candles
    reason = _duckdb_sqlite_reason()
    variants: dict[str, tuple[str, int]] = {"batchdb": ("batchdb", -1),
                                            "raw pyarrow": ("raw", -1)}
    if reason is None:
        variants["duckdb sqlite_scan"] = ("duckdb", -1)
    variants["batchdb, a quarter of the rows"] = ("batchdb", quarter_limit)
    variants["batchdb query --format csv"] = ("query-csv", -1)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    counter = iter(range(10**9))

    def one_round() -> None:
        k = next(counter)
        names = list(variants)
        for name in names[k % len(names):] + names[:k % len(names)]:
            variant, limit = variants[name]
            suffix = ".csv" if variant == "query-csv" else ".parquet"
            results[name].append(_child(variant, db, tmp_path / f"out-{k}{suffix}", limit))

    benchmark.pedantic(one_round, rounds=bench_rounds, iterations=1)
    info: dict[str, Any] = {"table_rows": rows, "duckdb_sqlite_scan": reason or "available"}
    print(f"\n  SQLite candles table: {rows:,} rows, "
          f"{db.stat().st_size / 1e6:,.0f} MB file; {bench_rounds} rounds, each variant in "
          "a fresh process")
    if reason is not None:
        print(f"  duckdb sqlite_scan left out: {reason}")
    baseline = statistics.median(r["rows"] / r["seconds"] for r in results["raw pyarrow"])
    for name, runs in results.items():
        rates = [r["rows"] / r["seconds"] for r in runs]
        median = statistics.median(rates)
        peak = statistics.median(r["peak_rss_delta_mb"] for r in runs)
        anon = statistics.median(r["end_anon_mb"] for r in runs)
        file_mb = statistics.median(r["end_file_mb"] for r in runs)
        info[name] = {"rows": runs[0]["rows"], "rows_per_s": round(median),
                      "rounds_rows_per_s": [round(r) for r in rates],
                      "ratio_to_raw_pyarrow": round(median / baseline, 3),
                      "peak_rss_delta_mb": round(peak, 1),
                      "end_rss_anon_mb": round(anon, 1), "end_rss_file_mb": round(file_mb, 1),
                      "rounds_peak_rss_delta_mb": [round(r["peak_rss_delta_mb"], 1)
                                                   for r in runs]}
        print(f"  {name:<32} {runs[0]['rows']:>10,} rows {median:>12,.0f} rows/s "
              f"{median / baseline:6.2f}x raw   peak RSS +{peak:,.1f} MB (at the end: heap "
              f"{anon:,.0f} MB, mapped files {file_mb:,.0f} MB)   rounds "
              f"{info[name]['rounds_rows_per_s']}")
    benchmark.extra_info.update(info)
    assert info["batchdb"]["rows"] == rows
