"""Issue 13's outage proof: an ingest of ≥ 500k rows at four priorities through a PostgreSQL
server stopped with ``pg_ctl stop -m immediate`` for ≥ 20 s in the middle and started again.
The producer (tests/reliability/spool_child.py, a process of its own so that its RSS is its
own) never sees a failure; every operation ends committed exactly once; per table (and
across priorities, in the table all of them write) the later submission wins; the
producer's peak RSS stays within its memory budget plus 128 MB.

Size: ``BATCHDB_SPOOL_INGEST_OPS`` operations (default 23,000: 23,000 x 22 rows = 506,000
rows), paced over about 30 s so that the outage falls in the middle of the ingest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import PostgresServer, sql_exec, sql_rows
from tests.reliability.reporting import record
from tests.reliability.spool_child import KV_KEYS, PRIORITIES, SCHEMA, SHARED_KEYS

from .outage import outage_server, start_again, stop_immediate

pytest.importorskip("psycopg")

CHILD = Path(__file__).resolve().parents[2] / "reliability" / "spool_child.py"
OPS = int(os.environ.get("BATCHDB_SPOOL_INGEST_OPS", "23000"))
ROWS = 20  # rows of each log INSERT; each operation number also upserts 2 rows
OUTAGE_SECONDS = float(os.environ.get("BATCHDB_SPOOL_OUTAGE_SECONDS", "21"))
MEMORY_MB = 64.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    yield from outage_server(tmp_path_factory.mktemp("ingest"))


def check_database(dsn: str, numbers: list[int], rows: int) -> None:
    """Every operation number in ``numbers`` once and whole; the last writer of each key won."""
    n_ops = len(numbers)
    assert sql_rows(dsn, "SELECT count(*), count(DISTINCT (n, j)), count(DISTINCT n) FROM log"
                    ) == [(n_ops * rows, n_ops * rows, n_ops)]
    assert sql_rows(dsn, "SELECT count(*) FROM (SELECT n FROM log GROUP BY n "
                         "HAVING count(*) <> %s OR min(j) <> 0 OR max(j) <> %s) AS half",
                    (rows, rows - 1)) == [(0,)]
    for i, prio in enumerate(PRIORITIES):
        mine = [n for n in numbers if n % 4 == i]
        expected = {}
        for n in mine:
            expected[n % KV_KEYS] = n
        got = dict(sql_rows(dsn, f"SELECT k, v FROM kv_{prio.name.lower()}"))
        assert got == expected, f"kv_{prio.name.lower()}: the later submission did not win"
    shared = {}
    for n in numbers:
        shared[n % SHARED_KEYS] = n
    assert dict(sql_rows(dsn, "SELECT k, v FROM shared")) == shared


def test_ingest_at_four_priorities_through_a_20s_outage(server: PostgresServer,
                                                       tmp_path: Path) -> None:
    name = server.create_database("ingest")
    dsn = server.dsn_for(server.user, dbname=name)
    sql_exec(dsn, *SCHEMA)
    out = tmp_path / "out"
    out.mkdir()
    rate = OPS / 30.0
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "--dsn", dsn, "--spool", str(tmp_path / "spool"),
         "--out", str(out), "--ops", str(OPS), "--rows", str(ROWS), "--rate", f"{rate:.1f}",
         "--window", "2000", "--memory-mb", str(MEMORY_MB)],
        stdout=subprocess.PIPE, stderr=(out / "child.err").open("w"), text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "running"
        time.sleep(5.0)
        stop_immediate(server)
        down = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        start_again(server)
        outage = time.monotonic() - down
        stdout, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not server.running:
            start_again(server)
    stderr = (out / "child.err").read_text()
    failures = (out / "failures.log").read_text()
    assert proc.returncode == 0 and "done" in stdout, stderr[-3000:]
    assert failures == "", failures[:2000]  # the producer never saw a failure
    acked = sorted(int(x) for x in (out / "acked.log").read_text().split())
    assert acked == list(range(OPS))
    assert outage >= 20.0
    try:
        check_database(dsn, acked, ROWS)
    except AssertionError:
        print("\n".join(line for line in stderr.splitlines()
                        if any(w in line for w in ("COMMIT", "transaction", "committed",
                                                   "failed:"))))
        raise
    peak_mb = int((out / "peak_rss.txt").read_text()) / 1024
    assert peak_mb <= MEMORY_MB + 128, f"peak RSS {peak_mb:.0f} MB"
    assert "answers again" in stderr and "replaying the spool" in stderr
    spool = json.loads((out / "spool_status.json").read_text())
    # a good part of the ingest went through the spool, and all of it came back
    assert spool["spooled_operations"] > OPS  # of the 3 x OPS operations
    assert spool["replayed_operations"] + spool["skipped_as_committed"] == spool[
        "spooled_operations"]
    assert spool["operations"] == 0
    record("spool_ingest", {"operations": 3 * OPS, "rows": OPS * (ROWS + 2),
                            "outage_seconds": round(outage, 1),
                            "spooled_operations": spool["spooled_operations"],
                            "peak_rss_mb": round(peak_mb, 1)})
    server.drop_database(name)
