"""Promise 1 on the DuckDB backend: SIGKILL at random moments loses no acknowledged
operation and leaves no half operation (same child, harness and checks as ``test_crash``).
The child runs ``checkpoint``, ``analyze`` and ``vacuum`` between writes, so kills also land
inside DuckDB checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .crashkit import CrashRun, assert_sound
from .reporting import record

pytest.importorskip("duckdb")
pytest.importorskip("pyarrow")

SEED = int(os.environ.get("BATCHDB_CRASH_SEED", "20240601"))
KILLS = int(os.environ.get("BATCHDB_CRASH_KILLS_DUCKDB", "25"))


def test_sigkill_duckdb_at_random_moments(tmp_path: Path) -> None:
    run = CrashRun(tmp_path, "duckdb", SEED, KILLS, finish_ops=150)
    record("crash_duckdb", run.run())
    assert_sound(run, {"insert", "update", "upsert", "delete", "candles"}, 150)
