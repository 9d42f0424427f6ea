"""Issue 13: the producer SIGKILLed during a PostgreSQL outage, restarted while the server is
still down, loses nothing that was acknowledged ``until="durable"``.

A PostgreSQL server of this module's own is stopped (``pg_ctl stop -m immediate``) while the
producer (``spool_child.py``) writes; the producer is then killed at seeded random moments
(``BATCHDB_SPOOL_KILLS``, default 10) and each time started again on the same spool while the
server is still down (it must start and accept writes; a kill in the middle of an append
leaves a torn tail). Then the server starts and the producer is killed a few more times
(``BATCHDB_SPOOL_REPLAY_KILLS``, default 3) in the middle of the replay: the database's
replay marks must keep each operation from being applied twice. A last producer finishes
cleanly. Then every acknowledged operation is in the database exactly once, no operation is
there in part, and no key holds an older value than an acknowledged later write of it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.postgres.outage import outage_server, start_again, stop_immediate
from tests.pgserver import PostgresServer, sql_exec, sql_rows

from .reporting import record
from .spool_child import KV_KEYS, PRIORITIES, SCHEMA, SHARED_KEYS

pytest.importorskip("psycopg")

CHILD = Path(__file__).with_name("spool_child.py")
SEED = int(os.environ.get("BATCHDB_CRASH_SEED", "20240601"))
KILLS = int(os.environ.get("BATCHDB_SPOOL_KILLS", "10"))
REPLAY_KILLS = int(os.environ.get("BATCHDB_SPOOL_REPLAY_KILLS", "3"))
ROWS = 10
RUN = 1_000_000  # operation numbers of run r start at r * RUN


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    yield from outage_server(tmp_path_factory.mktemp("kill"))


class Producer:
    def __init__(self, dsn: str, spool: Path, out: Path) -> None:
        self.dsn, self.spool, self.out = dsn, spool, out
        self.runs = 0

    def start(self, ops: int = 200_000, rate: float = 1500.0) -> subprocess.Popen[str]:
        first = self.runs * RUN
        self.runs += 1
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), "--dsn", self.dsn, "--spool", str(self.spool),
             "--out", str(self.out), "--first", str(first), "--ops", str(ops),
             "--rows", str(ROWS), "--rate", str(rate), "--window", "50"],
            stdout=subprocess.PIPE, stderr=(self.out / f"run-{self.runs}.err").open("w"),
            text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "running":
            proc.kill()
            proc.communicate(timeout=30)
            err = (self.out / f"run-{self.runs}.err").read_text()
            pytest.fail(f"the producer did not start (run {self.runs}): {line} {err[-3000:]}")
        return proc

    def log(self) -> str:
        """What every run wrote to stderr (its log)."""
        return "".join(p.read_text() for p in sorted(self.out.glob("run-*.err")))


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def _acked(out: Path) -> list[int]:
    path = out / "acked.log"
    text = path.read_text() if path.exists() else ""
    # a line cut by the kill is not an acknowledgement
    return sorted(int(x) for x in text.splitlines() if x.strip().isdigit())


def test_producer_killed_during_the_outage_loses_nothing_durable(server: PostgresServer,
                                                                 tmp_path: Path) -> None:
    rng = random.Random(SEED)
    name = server.create_database("kill")
    dsn = server.dsn_for(server.user, dbname=name)
    sql_exec(dsn, *SCHEMA)
    out = tmp_path / "out"
    out.mkdir()
    producer = Producer(dsn, tmp_path / "spool", out)
    kills = 0
    try:
        proc = producer.start()
        time.sleep(1.0)
        stop_immediate(server)
        for _ in range(KILLS):  # killed and restarted while the server is down
            time.sleep(rng.uniform(0.3, 2.0))
            _kill(proc)
            kills += 1
            proc = producer.start()
        acked_down = len(_acked(out))
        start_again(server)
        for _ in range(REPLAY_KILLS):  # killed in the middle of the replay
            time.sleep(rng.uniform(0.2, 1.2))
            _kill(proc)
            kills += 1
            proc = producer.start()
        time.sleep(rng.uniform(0.2, 1.0))
        _kill(proc)
        kills += 1
        last = producer.start(ops=20, rate=0.0)
        stdout, _ = last.communicate(timeout=240)
        assert last.returncode == 0 and "done" in stdout, producer.log()[-3000:]
    finally:
        if not server.running:
            start_again(server)
    acked = _acked(out)
    failures = (out / "failures.log").read_text()
    assert failures == "", failures[:2000]
    assert acked_down > 0
    # every acknowledged operation once and whole
    present = dict(sql_rows(dsn, "SELECT n, count(*) FROM log GROUP BY n"))
    lost = [n for n in acked if n not in present]
    assert not lost, f"{len(lost)} acknowledged operations lost, e.g. {lost[:10]}"
    assert sql_rows(dsn, "SELECT count(*) - count(DISTINCT (n, j)) FROM log") == [(0,)], \
        "a row written twice"
    half = {n: c for n, c in present.items() if c != ROWS}
    assert not half, f"half operations: {list(half.items())[:10]}"
    # no key lost an acknowledged later write to an older one
    for i, prio in enumerate(PRIORITIES):
        table = f"kv_{prio.name.lower()}"
        got = dict(sql_rows(dsn, f"SELECT k, v FROM {table}"))
        for n in acked:
            if n % 4 == i:
                assert got[n % KV_KEYS] >= n, f"{table} key {n % KV_KEYS}: {got} < {n}"
    shared = dict(sql_rows(dsn, "SELECT k, v FROM shared"))
    for n in acked:
        assert shared[n % SHARED_KEYS] >= n
    log = producer.log()
    record("spool_kill_postgres", {"kills": kills, "acknowledged_ops_checked": len(acked),
                                   "acknowledged_while_down": acked_down,
                                   "runs_started_while_down": KILLS,
                                   "replays_found_committed_by_marks": log.count(
                                       "were committed before")
                                   + log.count("committed by an earlier process"),
                                   "torn_tails_dropped": log.count("dropped a torn tail"),
                                   "operations_lost": len(lost),
                                   "half_applied_operations": len(half)})
    server.drop_database(name)
