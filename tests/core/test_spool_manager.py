"""``[spool]`` settings and the manager's checks of them, on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchdb import BatchDBManager, SettingsError, load_settings
from batchdb.spool import SpoolError


def test_spool_settings_defaults_and_validation() -> None:
    spool = load_settings(None).spool
    assert (spool.enabled, spool.path, spool.max_mb, spool.after_seconds) == (
        False, "batchdb-spool", 1024.0, 1.0)
    with pytest.raises(SettingsError, match="spool.after_seconds"):
        load_settings(None, spool={"after_seconds": -1})
    with pytest.raises(SettingsError, match="spool.path"):
        load_settings(None, spool={"path": " "})
    with pytest.raises(SettingsError, match="spool.max_mb"):
        load_settings(None, spool={"max_mb": 0})


async def test_a_spool_that_cannot_be_used_fails_start_with_a_clear_error(
        db_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = load_settings(None, sqlite={"path": str(db_path)},
                             spool={"enabled": True, "path": str(blocker)})
    m = BatchDBManager(settings=settings)
    with pytest.raises(SpoolError, match="is not a directory"):
        await m.start()
    status = await m.get_queue_status()
    assert not status["running"]
    assert status["spool"] == {"enabled": True, "path": str(blocker)}


async def test_wait_until_durable_on_a_database_that_answers(db_path: Path,
                                                             tmp_path: Path) -> None:
    settings = load_settings(None, sqlite={"path": str(db_path)},
                             maintenance={"enabled": False},
                             spool={"enabled": True, "path": str(tmp_path / "spool")})
    async with BatchDBManager(settings=settings) as m:
        from tests.conftest import make_table
        make_table(db_path, "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        op_id = await m.queue_operation("t", "INSERT", [{"k": 1, "v": "a"}])
        op = await m.wait(op_id, until="durable")  # committed counts as durable
        assert op.state in ("committed", "spooled")
        assert (await m.wait(op_id)).state == "committed"
        with pytest.raises(ValueError, match="until must be 'committed' or 'durable'"):
            await m.wait(op_id, until="soon")
        status = await m.get_queue_status()
        assert status["spool"]["enabled"] and status["spool"]["database"] == "up"
        assert status["spool"]["operations"] == 0
