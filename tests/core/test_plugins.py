"""The pluggy contract: entry points, third-party backends, observation hooks, disabling."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from batchdb import BatchDBError, BatchDBManager, Priority, hookimpl, load_settings
from batchdb.backend import Backend, Batch
from batchdb.backends.sqlite import SQLiteBackend
from batchdb.hookspecs import RegisterBackend
from batchdb.models import BatchOperation
from batchdb.pluginmanager import BackendRegistry, create_plugin_manager, plugin_info
from tests.conftest import make_table, rows_of, upbit_candles


def test_builtins_come_from_entry_points() -> None:
    info = {p["name"]: p for p in plugin_info(create_plugin_manager())}
    assert {"sqlite", "duckdb", "postgres", "upbit"} <= set(info)
    assert info["sqlite"]["hooks"] == ["batchdb_register_backends"]
    assert info["upbit"]["hooks"] == ["batchdb_normalize_candles", "batchdb_register_commands",
                                      "batchdb_register_settings"]
    assert info["sqlite"]["distribution"].startswith("batchdb ")


def test_each_manager_has_its_own_plugin_manager(tmp_path: Path) -> None:
    a = BatchDBManager.from_settings(None, sqlite={"path": str(tmp_path / "a.db")})
    b = BatchDBManager.from_settings(None, sqlite={"path": str(tmp_path / "b.db")})
    assert a.pm is not b.pm
    a.pm.register(object(), name="only-in-a")
    assert b.pm.get_plugin("only-in-a") is None


class TracingBackend(SQLiteBackend):
    """A third-party backend: SQLite that counts the batches it writes."""

    name = "tracing"
    written: list[int] = []

    def write_batch(self, batch: Batch) -> Any:
        self.written.append(batch.row_count)
        return super().write_batch(batch)


class RecordingPlugin:
    """Implements every observation hook; one of them is async."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    def batchdb_register_backends(self, register: RegisterBackend) -> None:
        register("tracing", TracingBackend)

    @hookimpl
    def batchdb_operation_queued(self, operation: BatchOperation) -> None:
        self.events.append(("queued", operation.operation_id))

    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        self.events.append(("committed", [op.operation_id for op in batch.operations]))

    @hookimpl
    def batchdb_batch_failed(self, batch: Batch, error: BaseException, backend: Backend) -> None:
        self.events.append(("failed", str(error)))

    @hookimpl
    async def batchdb_maintenance_done(self, task: str, seconds: float,
                                       result: dict[str, Any]) -> None:
        self.events.append(("maintenance", task))


async def test_third_party_backend_and_observation_hooks(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "t.db"
    make_table(db, "CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL);")
    plugin = RecordingPlugin()
    settings = load_settings(backend="tracing", tracing={"path": str(db)},
                             maintenance={"enabled": False})
    async with BatchDBManager(settings=settings, plugins=[plugin]) as m:
        assert isinstance(m.backend, TracingBackend)
        ok = await m.queue_operation("kv", "INSERT", [{"k": 1, "v": "a"}], Priority.HIGH)
        bad = await m.queue_operation("kv", "INSERT", [{"k": 2, "v": None}], Priority.HIGH)
        await m.flush()
        await m.maintain("checkpoint")
    kinds = [e[0] for e in plugin.events]
    assert kinds.count("queued") == 2 and "maintenance" in kinds
    assert ("committed", [ok]) in plugin.events
    assert any(e[0] == "failed" and "NOT NULL" in e[1] for e in plugin.events)
    assert bad not in [i for e in plugin.events if e[0] == "committed" for i in e[1]]
    assert TracingBackend.written and rows_of(db, "SELECT k FROM kv") == [(1,)]


async def test_disabling_a_plugin_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = BatchDBManager.from_settings(None, sqlite={"path": str(tmp_path / "d.db")},
                                     plugins={"disabled": ["upbit"]},
                                     maintenance={"enabled": False})
    assert m.pm.is_blocked("upbit")
    async with m:
        with pytest.raises(ValueError, match="no plugin normalises candles from source 'upbit'"):
            await m.insert_candles_batch("KRW-BTC", "1m", upbit_candles(2))


def test_unknown_backend_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BatchDBError, match="no backend named 'mongo' is installed; installed "
                                           "backends: .*sqlite"):
        BatchDBManager.from_settings(None, backend="mongo")


def test_a_broken_plugin_does_not_break_the_others(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "site" / "broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[batchdb]\nbroken = batchdb_no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pm = create_plugin_manager()
    assert "broken" in pm.load_errors and pm.has_plugin("sqlite")
    assert any(p.get("error") for p in plugin_info(pm) if p["name"] == "broken")
    with pytest.raises(BatchDBError, match="backend plugin 'broken' failed to load: "
                                           "ModuleNotFoundError"):
        BatchDBManager.from_settings(None, backend="broken")
    assert "batchdb_no_such_module_xyz" not in sys.modules


def test_registering_a_non_backend_is_refused(tmp_path: Path) -> None:
    class Bad:
        @hookimpl
        def batchdb_register_backends(self, register: RegisterBackend) -> None:
            register("bad", dict)  # type: ignore[arg-type]

    with pytest.raises(BatchDBError, match="'bad' is not a batchdb.Backend subclass"):
        BatchDBManager(settings=load_settings(), plugins=[Bad()])


def test_plugins_add_commands_to_the_command_line() -> None:
    import typer
    from typer.testing import CliRunner

    class Hello:
        @hookimpl
        def batchdb_register_commands(self, app: typer.Typer) -> None:
            @app.command()
            def hello(name: str = "world") -> None:
                """Say hello."""
                typer.echo(f"hello {name}")

    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """A program."""

    create_plugin_manager(extra_plugins=[Hello()]).hook.batchdb_register_commands(app=app)
    result = CliRunner().invoke(app, ["hello", "--name", "batchdb"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello batchdb\n"


def test_a_misspelt_hook_is_an_error_naming_it() -> None:
    class Typo:
        @hookimpl
        def batchdb_batch_comitted(self, batch: Batch, seconds: float, backend: Backend) -> None:
            """Never called: the hook is misspelt."""

    with pytest.raises(BatchDBError, match=r"implements 'batchdb_batch_comitted' \(did you "
                                           r"mean 'batchdb_batch_committed'\?\), which is no "
                                           r"batchdb hook"):
        create_plugin_manager(extra_plugins=[Typo()])
    # the manager refuses it too, before anything starts
    with pytest.raises(BatchDBError, match="batchdb_batch_comitted"):
        BatchDBManager(settings=load_settings(), plugins=[Typo()])


async def test_a_plugin_normalises_candles_of_its_own_source(tmp_path: Path) -> None:
    class Binance:
        """Binance klines ``[open_time_ms, open, high, low, close, volume, ...]``."""

        @hookimpl
        def batchdb_normalize_candles(self, symbol: str, timeframe: str,
                                      candles: list[Any], source: str
                                      ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]] | None:
            if source != "binance":
                return None
            columns = ("symbol", "timeframe", "ts", "open_price", "high_price", "low_price",
                       "close_price", "volume")
            return columns, [(symbol, timeframe, k[0] // 1000, float(k[1]), float(k[2]),
                              float(k[3]), float(k[4]), float(k[5])) for k in candles]

    settings = load_settings(sqlite={"path": str(tmp_path / "k.db")})
    async with BatchDBManager(settings=settings, plugins=[Binance()]) as m:
        op_id = await m.insert_candles_batch(
            "BTCUSDT", "1m", [[1700000000000, "1", "3", "0.5", "2", "10"]], source="binance")
        await m.wait(op_id)
        rows = await m.fetch("SELECT symbol, ts, high_price, close_price FROM candles")
    assert rows == [("BTCUSDT", 1700000000, 3.0, 2.0)]


def test_a_plugin_registers_its_settings_section(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import BaseModel, Field

    from batchdb import SettingsError
    from batchdb.settings import explain_settings

    class AlertSettings(BaseModel):
        webhook_url: str = ""
        min_failures: int = Field(1, ge=1)

    class Alerts:
        @hookimpl
        def batchdb_register_settings(self, register: Any) -> None:
            register("alerts", AlertSettings)

    sections = BackendRegistry(create_plugin_manager(extra_plugins=[Alerts()])
                               ).settings_sections()
    assert sections["alerts"] is AlertSettings and "sqlite" in sections
    monkeypatch.setenv("BATCHDB_ALERTS__MIN_FAILURES", "3")
    rows = {k: (v, src) for k, v, src in explain_settings(None, sections)}
    assert rows["alerts.min_failures"] == (3, "env BATCHDB_ALERTS__MIN_FAILURES")
    assert rows["alerts.webhook_url"] == ("", "default")
    settings = load_settings(sqlite={"path": str(tmp_path / "a.db")})
    manager = BatchDBManager(settings=settings, plugins=[Alerts()])
    assert manager.settings.section("alerts", AlertSettings).min_failures == 3
    monkeypatch.setenv("BATCHDB_ALERTS__MIN_FAILURES", "0")
    with pytest.raises(SettingsError, match=r"BATCHDB_ALERTS__MIN_FAILURES: .*greater than"):
        manager.settings.section("alerts", AlertSettings)
