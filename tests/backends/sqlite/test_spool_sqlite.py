"""The spool replayed into SQLite: each replayed operation's spool mark is written in the
transaction that commits it, so a process that dies between the commit and the spool's own
note does not apply an INSERT twice when the spool is replayed again."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from batchdb import BatchDBManager, load_settings
from batchdb.schema import TableInfo
from batchdb.spool import Spool

CRASH_AFTER_REPLAY = Path(__file__).resolve().parents[2] / "reliability" / "crash_after_replay.py"

LOG = TableInfo("log", ("id", "v"), (), {"id": "INTEGER", "v": "TEXT"})


def _spool_with_records(path: Path, n: int) -> None:
    """A spool as a process that could not write ``n`` one-row INSERTs left it."""
    with Spool(path) as spool:
        for first in range(0, n, 5):
            ops = [(f"old-{i}", 1, 1.0, [(i, f"v{i}")]) for i in range(first, first + 5)]
            spool.append(LOG, "INSERT", LOG.columns, Spool.encode(ops), 5, 5, 1)


async def test_a_crash_between_a_replayed_commit_and_the_spools_note(tmp_path: Path) -> None:
    db, spool = tmp_path / "market.sqlite3", tmp_path / "spool"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE log (id INTEGER NOT NULL, v TEXT)")  # no key: twice shows
    _spool_with_records(spool, 40)
    proc = subprocess.run([sys.executable, str(CRASH_AFTER_REPLAY), json.dumps({
        "backend": "sqlite", "maintenance": {"enabled": False}, "sqlite": {"path": str(db)},
        "batch": {"insert_batch_size": 10}, "spool": {"enabled": True, "path": str(spool)}})],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]  # crash_after_replay.CRASH_EXIT
    with sqlite3.connect(db) as conn:
        committed = conn.execute("SELECT count(*) FROM log").fetchone()[0]
        marks = conn.execute("SELECT count(*) FROM batchdb_spool_applied").fetchone()[0]
    assert committed == marks > 0  # the rows and their marks, in one transaction
    settings = load_settings(None, backend="sqlite", maintenance={"enabled": False},
                             sqlite={"path": str(db)},
                             spool={"enabled": True, "path": str(spool)})
    async with BatchDBManager(settings=settings) as m:
        await m.flush()
        for _ in range(200):
            status = (await m.get_queue_status())["spool"]
            if status["operations"] == 0 and not status["replaying"]:
                break
            await asyncio.sleep(0.02)
        assert status["operations"] == 0
        assert status["skipped_as_committed"] == committed
        assert status["replayed_operations"] == 40 - committed
        assert (await m.wait("old-39")).state == "committed"  # replayed with its own id
        # the marks table is batchdb's bookkeeping, not one of the user's tables
        assert await m.list_tables() == ["log"]
        assert "batchdb_spool_applied" in await m.backend.list_tables()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM log").fetchone() == (40, 40)
        assert conn.execute("SELECT count(*) FROM batchdb_spool_applied").fetchone() == (0,)
