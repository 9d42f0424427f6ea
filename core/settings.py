"""Configuration: defaults < settings.toml < BATCHDB_* environment < explicit arguments."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

from .models import BatchDBError, Priority

_M = TypeVar("_M", bound=BaseModel)

__all__ = [
    "BatchConfig",
    "MaintenanceConfig",
    "PluginsConfig",
    "Section",
    "Settings",
    "SettingsError",
    "database_path",
    "explain_settings",
    "load_settings",
    "redact_dsn",
    "resolve_settings_path",
    "upper_case",
]

SETTINGS_ENV = "BATCHDB_SETTINGS"
DEFAULT_SETTINGS_FILE = "settings.toml"


class SettingsError(BatchDBError):
    """A settings file or value is wrong; the message names the file and the key."""


class Section(BaseModel):
    """A settings section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def upper_case(value: Any) -> Any:
    """A text value in upper case: SQLite and logging take their keywords in any case."""
    return value.strip().upper() if isinstance(value, str) else value


def database_path(value: Any) -> Any:
    """A database file's path: an empty one would open a file named after the current
    directory (SQLite) or a database in memory that vanishes (DuckDB)."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("must name a database file (':memory:' for a database in memory)")
    return value


class BatchConfig(Section):
    """How operations are batched, queued under a budget, lingered, retried and completed."""

    insert_batch_size: int = Field(1000, ge=1, description="rows per INSERT/UPSERT batch")
    update_batch_size: int = Field(500, ge=1, description="rows per UPDATE/DELETE batch")
    max_memory_mb: float = Field(100.0, gt=0, description="budget for queued rows")
    flush_interval_seconds: float = Field(
        10.0, gt=0, description="upper bound on how long any operation waits in a queue"
    )
    max_queue_size: int = Field(10000, ge=1, description="queued operations before backpressure")
    max_concurrent_batches: int = Field(
        3, ge=1, description="batches in flight (capped by the backend)"
    )
    linger_seconds: dict[str, float] = Field(
        default_factory=lambda: {"CRITICAL": 0.0, "HIGH": 0.01, "NORMAL": 0.1, "LOW": 0.5},
        description="how long a priority waits to fill a batch before dispatching it",
    )
    backpressure: Literal["wait", "raise"] = Field(
        "wait", description="when over budget: producers await room, or get QueueFull"
    )

    @field_validator("backpressure", mode="before")
    @classmethod
    def _backpressure_any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value
    backpressure_timeout_seconds: float | None = Field(
        None, gt=0, description="with backpressure=wait: raise QueueFull after this long"
    )
    max_retries: int = Field(
        8, ge=0, description="retries of a batch on locked/busy/lost connection"
    )
    retry_base_delay_seconds: float = Field(0.05, gt=0)
    retry_max_delay_seconds: float = Field(2.0, gt=0)
    callback_timeout_seconds: float = Field(30.0, gt=0)
    completed_history: int = Field(100_000, ge=0, description="finished operations kept for wait()")

    @field_validator("linger_seconds")
    @classmethod
    def _check_linger(cls, value: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, seconds in value.items():
            prio = Priority.parse(name)
            if seconds < 0:
                raise ValueError(f"linger for {prio.name} must be >= 0, got {seconds}")
            out[prio.name] = float(seconds)
        return out

    def linger_for(self, priority: Priority) -> float:
        """Linger of a priority, never longer than ``flush_interval_seconds``."""
        default = {"CRITICAL": 0.0, "HIGH": 0.01, "NORMAL": 0.1, "LOW": 0.5}[priority.name]
        return min(self.linger_seconds.get(priority.name, default), self.flush_interval_seconds)


class MaintenanceConfig(Section):
    """How often the manager runs each maintenance task (seconds); 0 disables a task."""

    enabled: bool = True
    wal_checkpoint_interval_seconds: float = Field(3600.0, ge=0)
    analyze_interval_seconds: float = Field(3600.0, ge=0)
    vacuum_interval_seconds: float = Field(86400.0, ge=0)


class SpoolConfig(Section):
    """Writing through a database outage: operations the database cannot take now are kept
    in a spool on local disk and replayed in order when it answers (see batchdb.spooler)."""

    enabled: bool = Field(False, description="keep operations the database cannot take now "
                                             "on local disk")
    path: str = Field("batchdb-spool", description="a directory on local disk")
    max_mb: float = Field(1024.0, gt=0, description="over it, producers wait (or get "
                                                      "QueueFull), as with the memory budget")
    after_seconds: float = Field(1.0, ge=0, description="how long a batch retries a transient "
                                                         "failure before it goes to the spool")

    @field_validator("path", mode="before")
    @classmethod
    def _path_given(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a directory on local disk")
        return value


class PluginsConfig(Section):
    """Plugins found through the ``batchdb`` entry-point group can be disabled by name."""

    disabled: list[str] = Field(default_factory=list)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DEFAULT_FILE = object()  # no path given: $BATCHDB_SETTINGS or ./settings.toml, if any
_toml_path: ContextVar[Path | object | None] = ContextVar("batchdb_toml_path",
                                                          default=_DEFAULT_FILE)


class Settings(BaseSettings):
    """Every setting of batchdb. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="BATCHDB_",
        env_nested_delimiter="__",
        extra="allow",
        validate_assignment=True,
    )

    backend: str = Field("sqlite", description="backend plugin name")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    batch: BatchConfig = Field(default_factory=BatchConfig)
    maintenance: MaintenanceConfig = Field(default_factory=MaintenanceConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    # where the values came from (set by load_settings), for messages naming the source
    _file: Path | object | None = PrivateAttr(default=_DEFAULT_FILE)
    _arguments: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_named(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a backend plugin, e.g. sqlite, duckdb or postgres")
        return value.strip() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_known(cls, value: Any) -> Any:
        level = upper_case(value)
        if isinstance(level, str) and level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (in any case)")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is _DEFAULT_FILE:  # Settings() built directly: the same file load_settings reads
            path = resolve_settings_path(None)
            if path is not None:
                check_settings_file(path)
        if isinstance(path, Path):
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def file(self) -> Path | None:
        """The settings file these settings were read from, if any."""
        if self._file is _DEFAULT_FILE:
            try:
                self._file = resolve_settings_path(None)
            except SettingsError:
                self._file = None
        return self._file if isinstance(self._file, Path) else None

    def origin(self, key: str) -> str:
        """Where the value of ``key`` (dotted: ``sqlite.path``) came from: ``argument``,
        ``env BATCHDB_…`` (the variable that holds it), ``settings file …`` or
        ``default``."""
        parts = key.split(".")
        if _holds(self._arguments, parts):
            return "argument"
        variable = env_variable(parts)
        if variable is not None:
            return f"env {variable}"
        path = self.file
        if path is not None:
            with contextlib.suppress(SettingsError):
                if _holds(_read_toml(path), parts):
                    return f"settings file {path}"
        return "default"

    def where(self, key: str) -> str:
        """``key`` and where its value came from, to begin a message: ``settings file
        settings.toml: backend``, ``BATCHDB_BACKEND``, ``argument backend`` or
        ``backend (default)``."""
        origin = self.origin(key)
        if origin.startswith("env "):
            variable = origin.removeprefix("env ")
            return variable if variable.upper().endswith(key.replace(".", "__").upper()) \
                else f"{variable} ({key})"
        if origin == "default":
            return f"{key} (default)"
        return f"{origin}: {key}" if origin != "argument" else f"argument {key}"

    def section(self, name: str, model: type[_M]) -> _M:
        """The ``[name]`` section of a plugin, validated by the plugin's own ``model``.

        Values come from the settings file's ``[name]`` table, then ``BATCHDB_NAME__KEY``
        variables (pydantic-settings reads variables only for the fields it knows, so a
        plugin's are gathered here), then arguments (``name={...}``). A bad value is a
        :class:`SettingsError` naming the key and where it came from.
        """
        if name in type(self).model_fields:
            value = getattr(self, name)
            raw: dict[str, Any] = value.model_dump() if isinstance(value, BaseModel) else {}
        else:
            raw = dict((self.model_extra or {}).get(name) or {})
        raw.update(_section_env(name))
        arguments = self._arguments.get(name)
        if isinstance(arguments, Mapping):
            raw.update(arguments)
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise SettingsError(self._describe_section_error(exc, name, model)) from None

    def _describe_section_error(self, exc: ValidationError, name: str,
                                model: type[BaseModel]) -> str:
        """Each refused value of a plugin's section, named with where it came from:
        ``settings file settings.toml: sqlite.path: must name a database file (got '')``."""
        parts = []
        for err in exc.errors():
            loc = [name, *(str(p) for p in err["loc"])]
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown setting" + _did_you_mean(loc[-1], list(model.model_fields))
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            parts.append(f"{self.where('.'.join(loc))}: {message}{shown}")
        return "; ".join(parts)

    def given(self, name: str) -> bool:
        """Whether a plugin's ``[name]`` section is set anywhere: the settings file, a
        ``BATCHDB_NAME…`` variable or an argument."""
        return bool((self.model_extra or {}).get(name) or _section_env(name)
                    or self._arguments.get(name))


def _section_env(name: str) -> dict[str, Any]:
    """``BATCHDB_NAME__KEY`` variables of one plugin section, as ``{key: value}`` (names in
    any case; values are strings, validated by the section's model). A ``BATCHDB_NAME``
    variable holding JSON gives the whole section."""
    prefix = f"BATCHDB_{name.upper()}"
    out: dict[str, Any] = {}
    for variable, value in os.environ.items():
        upper = variable.upper()
        if upper == prefix:
            try:
                whole = json.loads(value)
            except json.JSONDecodeError:
                raise SettingsError(f"{variable}: must hold the [{name}] section as a JSON "
                                    f"object (got {value!r})") from None
            if not isinstance(whole, dict):
                raise SettingsError(f"{variable}: must hold a JSON object (got {value!r})")
            out = {**whole, **out}
        elif upper.startswith(prefix + "__"):
            out[variable[len(prefix) + 2:].lower()] = value
    return out


def resolve_settings_path(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The file to read: ``path``, else ``$BATCHDB_SETTINGS``, else ``./settings.toml`` if any."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SettingsError(f"settings file {p}: not found")
        return p
    env = os.environ.get(SETTINGS_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise SettingsError(f"settings file {p} (from ${SETTINGS_ENV}): not found")
        return p
    p = Path(DEFAULT_SETTINGS_FILE)
    return p if p.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SettingsError(f"settings file {path}: not UTF-8 text, so not valid TOML "
                            f"(byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise SettingsError(f"settings file {path}: cannot be read: {exc.strerror}") from exc


def plugin_names() -> list[str]:
    """Names of the installed plugins (entry-point group ``batchdb``): each may have a
    settings section of its own."""
    return sorted({ep.name for ep in entry_points(group="batchdb")})


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(data: Mapping[str, Any], allow_plugin_tables: bool) -> list[str]:
    """Messages for the top-level keys of ``data`` that are no setting: a table may be the
    section of an installed plugin (or, for arguments, of a plugin given in code)."""
    fields = list(Settings.model_fields)
    if all(key in Settings.model_fields for key in data):
        return []  # (the common case, without reading the entry points)
    plugins = plugin_names()
    problems = []
    for key, value in data.items():
        if key in Settings.model_fields:
            continue
        if isinstance(value, Mapping) and (allow_plugin_tables or key in plugins):
            continue
        what = f"unknown section [{key}]" if isinstance(value, Mapping) else (
            f"unknown setting {key!r}")
        problems.append(what + _did_you_mean(key, fields + plugins))
    if problems:
        sections = [f"[{p}]" for p in plugins if p not in Settings.model_fields]
        problems[-1] += (f". The settings are {', '.join(fields)}"
                         + (f"; installed plugins may have a section: {', '.join(sections)}"
                            if sections else ""))
    return problems


def check_settings_file(path: Path) -> dict[str, Any]:
    """The TOML of a settings file, after checking that it is TOML and that every top-level
    key is a setting or the section of an installed plugin (a SettingsError naming the file
    and the key otherwise)."""
    data = _read_toml(path)
    problems = _unknown_keys(data, allow_plugin_tables=False)
    plugins = data.get("plugins")
    disabled = plugins.get("disabled") if isinstance(plugins, Mapping) else None
    if isinstance(disabled, list):
        installed = plugin_names()
        problems += [f"plugins.disabled: no plugin named {name!r} is installed"
                     f"{_did_you_mean(name, installed)}; installed: {', '.join(installed)}"
                     for name in disabled if isinstance(name, str) and name not in installed]
    if problems:
        raise SettingsError(f"settings file {path}: " + "; ".join(problems))
    return data


def _field_names(loc: tuple[int | str, ...]) -> list[str]:
    """The setting names where ``loc`` points (for a did-you-mean on an unknown key)."""
    model: Any = Settings
    for part in loc[:-1]:
        info: FieldInfo | None = getattr(model, "model_fields", {}).get(part)
        model = info.annotation if info is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    where = f"settings file {path}" if path else "settings (no settings file)"
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and err["loc"]:
            message = "unknown setting" + _did_you_mean(str(err["loc"][-1]),
                                                        _field_names(err["loc"]))
        parts.append(f"{key}: {message}{shown}")
    return f"{where}: " + "; ".join(parts) + " (values may also come from BATCHDB_* variables)"


def _describe_source_error(exc: SourceError) -> str:
    """A variable holding a section or a list that is not JSON, named."""
    found = re.search(r'field "([^"]+)"', str(exc))
    field = found.group(1) if found else ""
    prefix = f"BATCHDB_{field}".upper()
    names = sorted(n for n in os.environ if n.upper() == prefix
                   or n.upper().startswith(prefix + "__")) if field else []
    cause = exc.__cause__
    why = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    return (f"{', '.join(names) or 'a BATCHDB_* variable'}: not valid JSON ({why}); a "
            "section or a list is given as JSON, e.g. BATCHDB_BATCH='{\"max_retries\": 2}' "
            "or BATCHDB_PLUGINS__DISABLED='[\"upbit\"]'")


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load settings: defaults < TOML file < ``BATCHDB_*`` environment < ``overrides``.

    ``overrides`` take the file's structure, e.g. ``backend="sqlite",
    sqlite={"path": "x.db"}, batch={"insert_batch_size": 5000}``.
    """
    toml_path = resolve_settings_path(path)
    if toml_path is not None:
        check_settings_file(toml_path)  # a clear error for a broken file before pydantic
    problems = _unknown_keys(overrides, allow_plugin_tables=True)
    if problems:
        raise SettingsError("settings arguments: " + "; ".join(problems))
    token = _toml_path.set(toml_path)
    try:
        settings = Settings(**overrides)
        settings._file = toml_path
        settings._arguments = dict(overrides)
    except ValidationError as exc:
        raise SettingsError(_describe_validation_error(exc, toml_path)) from None
    except SourceError as exc:  # a BATCHDB_* variable pydantic-settings cannot parse
        raise SettingsError(_describe_source_error(exc)) from None
    finally:
        _toml_path.reset(token)
    _check_plugin_sections(settings)
    return settings


def _check_plugin_sections(settings: Settings) -> None:
    """Validate every section an installed plugin owns (a backend's included) that is set,
    so a mistake in ``[duckdb]`` is reported even while another backend is in use. The
    plugins are loaded only when something names a section that is not a core one."""
    fields = Settings.model_fields
    named = {*(settings.model_extra or {}), *(k for k in settings._arguments if k not in fields)}
    for variable in os.environ:
        upper = variable.upper()
        if upper.startswith("BATCHDB_"):
            section = upper.removeprefix("BATCHDB_").split("__", 1)[0].lower()
            if section not in fields:
                named.add(section)
    if not named:
        return
    from .pluginmanager import BackendRegistry, create_plugin_manager  # (imports backends)

    sections = BackendRegistry(create_plugin_manager(settings.plugins.disabled)
                               ).settings_sections()
    for name in sorted(named):
        model = sections.get(name)
        if model is not None and settings.given(name):
            settings.section(name, model)


def _holds(data: Mapping[str, Any], parts: list[str]) -> bool:
    """Whether nested ``data`` has a value at ``parts`` (or a scalar above it)."""
    for part in parts:
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def env_variable(parts: list[str]) -> str | None:
    """The ``BATCHDB_*`` variable that sets the setting at ``parts``: its own
    (``BATCHDB_BATCH__INSERT_BATCH_SIZE``) or the one holding its whole section as JSON
    (``BATCHDB_BATCH``); None if neither is set. Names match in any case, as
    pydantic-settings reads them."""
    present = {name.upper(): name for name in os.environ}
    for depth in range(len(parts), 0, -1):
        name = present.get("BATCHDB_" + "__".join(parts[:depth]).upper())
        if name is not None:
            return name
    return None


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key != "linger_seconds":
            yield from _leaves(value, name + ".")
        else:
            yield name, value


def explain_settings(
    path: str | os.PathLike[str] | None = None,
    sections: Mapping[str, type[BaseModel]] | None = None,
    **overrides: Any,
) -> list[tuple[str, Any, str]]:
    """Each effective setting with the place it came from (default, file, env, argument),
    the plugins' ``sections`` (name → settings model) included."""
    settings = load_settings(path, **overrides)
    toml_path = resolve_settings_path(path)
    file_keys = {k for k, _ in _leaves(_read_toml(toml_path))} if toml_path else set()
    env_keys = {k for k, _ in _leaves(EnvSettingsSource(Settings)())}
    for name in sections or {}:
        env_keys.update(f"{name}.{key}" for key in _section_env(name))
    arg_keys = {k for k, _ in _leaves(overrides)}
    rows = []
    dumped = {k: v for k, v in settings.model_dump(mode="json").items()
              if k in Settings.model_fields}
    for name, model in sorted((sections or {}).items()):
        dumped[name] = settings.section(name, model).model_dump(mode="json")
    for key, value in _leaves(dumped):
        variable = env_variable(key.split(".")) if key in env_keys else None
        if key in arg_keys:
            source = "argument"
        elif variable is not None:
            source = f"env {variable}"
        elif key in env_keys:  # (a variable pydantic-settings read by a name not found)
            source = "env BATCHDB_" + key.upper().replace(".", "__")
        elif key in file_keys:
            source = f"file {toml_path}"
        else:
            source = "default"
        if key.rsplit(".", 1)[-1] == "dsn":
            value = redact_dsn(str(value))
        rows.append((key, value, source))
    return rows


_DSN_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """A DSN with its password replaced by ``***`` (URL and key=value forms)."""
    return _KV_PASSWORD.sub(r"\1***", _DSN_PASSWORD.sub(r"\1***\3", dsn))
