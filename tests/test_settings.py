"""Settings: defaults < settings.toml < BATCHDB_* environment < arguments; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchdb import BatchConfig, BatchDBManager, Priority, SettingsError, load_settings
from batchdb.settings import explain_settings, redact_dsn

REPO_SETTINGS = Path(__file__).resolve().parents[1] / "settings.toml"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    import os
    for key in [k for k in os.environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)


def test_defaults_are_the_seeds() -> None:
    s = load_settings()
    assert s.backend == "sqlite"
    b = s.batch
    assert (b.insert_batch_size, b.update_batch_size, b.max_memory_mb,
            b.flush_interval_seconds, b.max_queue_size, b.max_concurrent_batches) == (
        1000, 500, 100.0, 10.0, 10000, 3)
    m = s.maintenance
    assert (m.wal_checkpoint_interval_seconds, m.analyze_interval_seconds,
            m.vacuum_interval_seconds) == (3600, 3600, 86400)
    assert (s.sqlite.cache_size, s.sqlite.mmap_size, s.sqlite.busy_timeout_ms) == (
        10000, 268435456, 30000)
    assert BatchConfig().insert_batch_size == 1000


def test_shipped_settings_file_matches_defaults() -> None:
    assert load_settings(REPO_SETTINGS).model_dump() == load_settings().model_dump()


def test_file_then_env_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "settings.toml").write_text(
        'backend = "sqlite"\n[batch]\ninsert_batch_size = 2000\nupdate_batch_size = 50\n'
        '[sqlite]\npath = "from-file.db"\n')
    s = load_settings()
    assert (s.batch.insert_batch_size, s.batch.update_batch_size, s.sqlite.path) == (
        2000, 50, "from-file.db")
    monkeypatch.setenv("BATCHDB_BATCH__INSERT_BATCH_SIZE", "3000")
    s = load_settings()
    assert (s.batch.insert_batch_size, s.batch.update_batch_size) == (3000, 50)
    s = load_settings(batch={"insert_batch_size": 4000}, sqlite={"readers": 2})
    assert (s.batch.insert_batch_size, s.batch.update_batch_size) == (4000, 50)
    assert (s.sqlite.path, s.sqlite.readers) == ("from-file.db", 2)
    sources = {k: src for k, _, src in explain_settings(batch={"max_retries": 1})}
    assert sources["batch.insert_batch_size"] == "env BATCHDB_BATCH__INSERT_BATCH_SIZE"
    assert sources["batch.update_batch_size"].startswith("file ")
    assert sources["batch.max_retries"] == "argument"
    assert sources["batch.max_memory_mb"] == "default"


def test_settings_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "conf" / "prod.toml"
    other.parent.mkdir()
    other.write_text('[duckdb]\npath = "x.duckdb"\n')
    monkeypatch.setenv("BATCHDB_SETTINGS", str(other))
    assert load_settings().duckdb.path == "x.duckdb"
    monkeypatch.setenv("BATCHDB_SETTINGS", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError,
                       match=r"missing\.toml \(from \$BATCHDB_SETTINGS\): not found"):
        load_settings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[batch\ninsert_batch_size = 1", "not valid TOML"),
        ("[batch]\ninsert_batch_size = 0", r"batch\.insert_batch_size: Input should be greater"),
        ('[batch]\ninsert_batch_size = "many"', r"batch\.insert_batch_size: .*integer"),
        ("[batch]\nbatch_size = 10", r"batch\.batch_size: Extra inputs are not permitted"),
        ('[batch]\nbackpressure = "drop"', r"batch\.backpressure: Input should be 'wait' or"),
        ('[batch.linger_seconds]\nURGENT = 1', r"priority must be one of"),
        ('[sqlite]\nsynchronous = "SOMETIMES"', r"sqlite\.synchronous"),
    ],
)
def test_bad_settings_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message) as err:
        load_settings(path)
    assert str(path) in str(err.value)


def test_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHDB_BATCH__MAX_MEMORY_MB", "lots")
    with pytest.raises(SettingsError, match=r"batch\.max_memory_mb.*'lots'"):
        load_settings()


def test_missing_explicit_file() -> None:
    with pytest.raises(SettingsError, match="nowhere.toml: not found"):
        load_settings("nowhere.toml")


def test_linger_is_capped_by_flush_interval() -> None:
    cfg = BatchConfig(flush_interval_seconds=0.3, linger_seconds={"LOW": 5})
    assert cfg.linger_for(Priority.LOW) == 0.3
    assert cfg.linger_for(Priority.CRITICAL) == 0.0


def test_dsn_passwords_are_redacted() -> None:
    assert redact_dsn("postgresql://bot:s3cr3t@db:5432/x") == "postgresql://bot:***@db:5432/x"
    assert redact_dsn("host=db password=s3cr3t user=bot") == "host=db password=*** user=bot"
    rows = explain_settings(postgres={"dsn": "postgresql://bot:hunter2@h/db"})
    assert "hunter2" not in repr(rows)


def test_manager_from_settings_applies_overrides(tmp_path: Path) -> None:
    m = BatchDBManager.from_settings(None, sqlite={"path": str(tmp_path / "a.db")},
                                     batch={"insert_batch_size": 77})
    assert m.config.insert_batch_size == 77
    assert m.backend_name == "sqlite"
    assert m.backend.settings.path == str(tmp_path / "a.db")  # type: ignore[attr-defined]
