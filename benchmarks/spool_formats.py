"""The two spool formats issue 13 names, measured on the same records: batchdb's append-only
segment log (:mod:`batchdb.spool`) and an SQLite file in WAL mode (one row per record, a
BLOB payload, ``synchronous=FULL`` so that a COMMIT is as durable as the log's fsync).

    python benchmarks/spool_formats.py [--batches 300] [--rows 1000] [--dir /tmp]

Each batch is one record of ``--rows`` one-row operations (the shape of a spooled batch of
one-row writes), appended and made durable one at a time, then read back in order and
marked done. Prints rows per second for each phase and format.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from batchdb.schema import TableInfo
from batchdb.spool import Spool

TABLE = TableInfo("ticks", ("symbol", "ts", "price", "volume"), ("symbol", "ts"))


def _body(batch: int, rows: int) -> bytes:
    now = time.time()
    return Spool.encode([(f"op-{batch}-{i}", 1, now,
                          [("KRW-BTC", batch * rows + i, 50_000_000.0 + i, 0.25)])
                         for i in range(rows)])


def log_format(root: Path, batches: int, rows: int) -> dict[str, float]:
    spool = Spool(root / "log")
    start = time.perf_counter()
    for b in range(batches):
        spool.append(TABLE, "INSERT", TABLE.columns, _body(b, rows), rows, rows, 1)
    append = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    for record in spool.records("ticks"):
        n += sum(len(op[3]) for op in record.ops)
        spool.mark_done([record.entry])
    drain = time.perf_counter() - start
    spool.close()
    assert n == batches * rows
    return {"append_rows_per_s": batches * rows / append, "drain_rows_per_s": n / drain}


def sqlite_format(root: Path, batches: int, rows: int) -> dict[str, float]:
    """The same records in SQLite: encoded the same way (the spool's pickler), one row per
    record, decoded by the same restricted unpickler, deleted when replayed (what marking
    done is there)."""
    from batchdb.spool import _load
    conn = sqlite3.connect(root / "spool.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY, tbl TEXT, kind TEXT, "
                 "n INTEGER, payload BLOB)")
    start = time.perf_counter()
    for b in range(batches):
        payload = _body(b, rows)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO records (tbl, kind, n, payload) VALUES (?, ?, ?, ?)",
                     ("ticks", "INSERT", rows, payload))
        conn.execute("COMMIT")
    append = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    seqs = [s for (s,) in conn.execute("SELECT seq FROM records WHERE tbl = ? ORDER BY seq",
                                       ("ticks",))]
    for seq in seqs:
        (payload,) = conn.execute("SELECT payload FROM records WHERE seq = ?", (seq,)).fetchone()
        n += sum(len(op_rows) for _, _, _, op_rows in _load(payload))
        conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
    drain = time.perf_counter() - start
    conn.close()
    assert n == batches * rows
    return {"append_rows_per_s": batches * rows / append, "drain_rows_per_s": n / drain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--dir", default=None, help="where the files go (a local disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for name, fn in (("segment log", log_format), ("sqlite wal", sqlite_format)):
            figures = fn(root, args.batches, args.rows)
            print(f"{name:12s} append {figures['append_rows_per_s']:>10,.0f} rows/s   "
                  f"drain {figures['drain_rows_per_s']:>10,.0f} rows/s")


if __name__ == "__main__":
    main()
