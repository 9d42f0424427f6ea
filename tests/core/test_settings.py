"""Settings: defaults < settings.toml < BATCHDB_* environment < arguments; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchdb import BatchConfig, BatchDBManager, Priority, SettingsError, load_settings
from batchdb.backends.duckdb.settings import DuckDBSettings
from batchdb.backends.sqlite.settings import SQLiteSettings
from batchdb.settings import Settings, explain_settings, redact_dsn

REPO_SETTINGS = Path(__file__).resolve().parents[2] / "settings.toml"


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py


def _sqlite(settings: Settings) -> SQLiteSettings:
    return settings.section("sqlite", SQLiteSettings)


def _duckdb(settings: Settings) -> DuckDBSettings:
    return settings.section("duckdb", DuckDBSettings)


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
    assert (_sqlite(s).cache_size, _sqlite(s).mmap_size, _sqlite(s).busy_timeout_ms) == (
        10000, 268435456, 30000)
    assert BatchConfig().insert_batch_size == 1000


def test_shipped_settings_file_matches_defaults(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from batchdb.pluginmanager import BackendRegistry, create_plugin_manager

    sections = BackendRegistry(create_plugin_manager()).settings_sections()
    monkeypatch.chdir(tmp_path)  # no ./settings.toml: the defaults
    shipped = {k: v for k, v, _ in explain_settings(REPO_SETTINGS, sections)}
    defaults = {k: v for k, v, _ in explain_settings(None, sections)}
    assert shipped == defaults
    assert {"sqlite.path", "duckdb.path", "postgres.dsn"} <= set(defaults)


def test_file_then_env_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "settings.toml").write_text(
        'backend = "sqlite"\n[batch]\ninsert_batch_size = 2000\nupdate_batch_size = 50\n'
        '[sqlite]\npath = "from-file.db"\n')
    s = load_settings()
    assert (s.batch.insert_batch_size, s.batch.update_batch_size, _sqlite(s).path) == (
        2000, 50, "from-file.db")
    monkeypatch.setenv("BATCHDB_BATCH__INSERT_BATCH_SIZE", "3000")
    s = load_settings()
    assert (s.batch.insert_batch_size, s.batch.update_batch_size) == (3000, 50)
    s = load_settings(batch={"insert_batch_size": 4000}, sqlite={"readers": 2})
    assert (s.batch.insert_batch_size, s.batch.update_batch_size) == (4000, 50)
    assert (_sqlite(s).path, _sqlite(s).readers) == ("from-file.db", 2)
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
    assert _duckdb(load_settings()).path == "x.duckdb"
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
        ("[batch]\nbatch_size = 10",
         r"batch\.batch_size: unknown setting \(did you mean '(insert|update)_batch_size'\?\)"),
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


# ---------------------------------------------------------------------- issue #11
@pytest.mark.parametrize(("text", "message"), [
    ('bakend = "duckdb"\n', r"unknown setting 'bakend' \(did you mean 'backend'\?\)"),
    ('[sqllite]\npath = "x.db"\n', r"unknown section \[sqllite\] \(did you mean 'sqlite'\?\)"),
    ("[mysection]\nx = 1\n", r"unknown section \[mysection\]\. The settings are backend"),
    ('log_level = "LOUD"\n', r"log_level: must be one of DEBUG, INFO, WARNING, ERROR, "
                             r"CRITICAL \(in any case\) \(got 'LOUD'\)"),
    ('[sqlite]\npath = ""\n', r"sqlite\.path: must name a database file.*\(got ''\)"),
    ('[duckdb]\npath = " "\n', r"duckdb\.path: must name a database file"),
    ('backend = ""\n', r"backend: must name a backend plugin"),
])
def test_misspelt_and_invalid_settings_are_errors_naming_the_file(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    for load in (lambda: load_settings(), lambda: load_settings(path)):
        with pytest.raises(SettingsError, match=message) as err:
            load()
        assert str(err.value).startswith("settings file settings.toml: ") or str(
            err.value).startswith(f"settings file {path}: ")


def test_sections_of_installed_plugins_are_accepted_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text('[upbit]\nrequests_per_second = 5\n')  # the upbit plugin's entry point
    assert load_settings(path).model_extra == {"upbit": {"requests_per_second": 5}}
    path.write_text('[upbit]\nrequests_per_secnd = 5\n')  # checked by the plugin's own model
    with pytest.raises(SettingsError, match=r"settings\.toml: upbit\.requests_per_secnd: unknown "
                                            r"setting \(did you mean 'requests_per_second'\?\)"):
        load_settings(path)


def test_misspelt_argument_is_an_error_but_a_plugin_section_in_code_is_not() -> None:
    with pytest.raises(SettingsError, match=r"settings arguments: unknown setting 'bakend' "
                                            r"\(did you mean 'backend'\?\)"):
        load_settings(bakend="duckdb")
    assert load_settings(tracing={"path": "x"}).model_extra == {"tracing": {"path": "x"}}


def test_log_level_and_sqlite_keywords_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('log_level = "debug"\n[sqlite]\njournal_mode = "wal"\n'
                    'synchronous = "normal"\n[batch]\nbackpressure = "Raise"\n')
    s = load_settings(path)
    assert (s.log_level, _sqlite(s).journal_mode, _sqlite(s).synchronous, s.batch.backpressure) == (
        "DEBUG", "WAL", "NORMAL", "raise")


async def test_lowercase_journal_mode_opens_a_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(f'[sqlite]\npath = "{tmp_path / "x.sqlite3"}"\njournal_mode = "wal"\n'
                    'synchronous = "normal"\n[maintenance]\nenabled = false\n')
    manager = BatchDBManager.from_settings()
    async with manager:
        assert (await manager.fetch("PRAGMA journal_mode")) == [("wal",)]
        assert manager.backend.settings.synchronous == "NORMAL"  # type: ignore[attr-defined]


def test_every_constructor_reads_the_file_then_env_then_arguments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from batchdb import Settings

    (tmp_path / "settings.toml").write_text(
        "[batch]\ninsert_batch_size = 2000\nupdate_batch_size = 50\nmax_retries = 5\n")
    monkeypatch.setenv("BATCHDB_BATCH__UPDATE_BATCH_SIZE", "60")

    def factory() -> sqlite3.Connection:
        return sqlite3.connect(tmp_path / "seed.sqlite3")

    seed_form = BatchDBManager(factory)
    from_settings = BatchDBManager.from_settings(batch={"max_retries": 1})
    for config in (seed_form.config, from_settings.config, Settings().batch,
                   load_settings().batch):
        assert (config.insert_batch_size, config.update_batch_size) == (2000, 60)
    assert seed_form.config.max_retries == 5 and from_settings.config.max_retries == 1
    assert seed_form.backend_name == "sqlite"


def test_the_seed_form_reports_a_broken_settings_file(tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "settings.toml").write_text("bakend = 'duckdb'\n")
    with pytest.raises(SettingsError, match="settings file settings.toml: unknown setting"):
        BatchDBManager(lambda: sqlite3.connect(tmp_path / "x.db"))


def test_config_names_the_variable_that_holds_a_whole_section(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHDB_BATCH", '{"insert_batch_size": 77, "max_retries": 2}')
    sources = {k: src for k, _, src in explain_settings()}
    assert sources["batch.insert_batch_size"] == "env BATCHDB_BATCH"
    assert sources["batch.max_retries"] == "env BATCHDB_BATCH"
    assert sources["batch.update_batch_size"] == "default"
    monkeypatch.setenv("BATCHDB_BATCH__MAX_RETRIES", "3")
    sources = {k: src for k, _, src in explain_settings()}
    assert sources["batch.max_retries"] == "env BATCHDB_BATCH__MAX_RETRIES"


@pytest.mark.parametrize(("source", "message"), [
    ("file", "settings file settings.toml: backend: no backend named 'mysql' is installed"),
    ("env", "BATCHDB_BACKEND: no backend named 'mysql' is installed"),
    ("argument", "argument backend: no backend named 'mysql' is installed"),
])
def test_unknown_backend_is_a_settings_error_naming_its_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str) -> None:
    overrides = {}
    if source == "file":
        (tmp_path / "settings.toml").write_text('backend = "mysql"\n')
    elif source == "env":
        monkeypatch.setenv("BATCHDB_BACKEND", "mysql")
    else:
        overrides["backend"] = "mysql"
    with pytest.raises(SettingsError) as err:
        BatchDBManager.from_settings(None, **overrides)
    assert str(err.value).startswith(message)
    assert "installed backends: duckdb, postgres, sqlite" in str(err.value)


def test_a_misspelt_disabled_plugin_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text('[plugins]\ndisabled = ["upbt"]\n')
    with pytest.raises(SettingsError, match=r"settings file .*: plugins\.disabled: no plugin "
                                            r"named 'upbt' is installed \(did you mean "
                                            r"'upbit'\?\)"):
        load_settings(path)
    path.write_text('[plugins]\ndisabled = ["upbit"]\n')
    assert load_settings(path).plugins.disabled == ["upbit"]


def test_plugin_section_reads_file_then_env_then_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import BaseModel, Field

    class Upbit(BaseModel):
        base_url: str = "https://api.upbit.com"
        requests_per_second: float = Field(10, gt=0)
        max_retries: int = 8

    path = tmp_path / "settings.toml"
    path.write_text('[upbit]\nbase_url = "http://file"\nmax_retries = 3\n')
    monkeypatch.setenv("BATCHDB_UPBIT__BASE_URL", "http://env")
    monkeypatch.setenv("batchdb_upbit__requests_per_second", "2.5")
    section = load_settings(path, upbit={"max_retries": 1}).section("upbit", Upbit)
    assert section == Upbit(base_url="http://env", requests_per_second=2.5, max_retries=1)
    assert load_settings(path).section("upbit", Upbit).max_retries == 3

    monkeypatch.setenv("BATCHDB_UPBIT__REQUESTS_PER_SECOND", "0")
    monkeypatch.delenv("batchdb_upbit__requests_per_second")
    with pytest.raises(SettingsError,
                       match=r"BATCHDB_UPBIT__REQUESTS_PER_SECOND: .*greater than 0 \(got '0'\)"):
        load_settings(path).section("upbit", Upbit)
