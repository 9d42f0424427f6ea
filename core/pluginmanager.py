"""Plugin manager: one per BatchDBManager, loaded from the ``batchdb`` entry-point group."""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Iterable
from importlib.metadata import Distribution, PackageNotFoundError, entry_points, metadata
from typing import Any

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .backend import Backend
from .models import BatchDBError

__all__ = ["BackendRegistry", "UnknownBackend", "await_me_maybe", "create_plugin_manager",
           "plugin_info"]

log = logging.getLogger("batchdb.plugins")


async def await_me_maybe(value: Any) -> Any:
    """Await ``value`` if it is awaitable (a hook may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


class UnknownBackend(BatchDBError, LookupError):
    """No installed plugin registers a backend of that name (a settings mistake)."""


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering the entry points that failed to load and why."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.load_errors: dict[str, BaseException] = {}
        #: the distribution of each entry-point plugin (its metadata is parsed only when
        #: shown: reading it cost two thirds of building a plugin manager)
        self.dists: dict[str, Distribution] = {}


def create_plugin_manager(
    disabled: Iterable[str] = (), extra_plugins: Iterable[object] = ()
) -> PluginManager:
    """A fresh plugin manager with every ``batchdb`` entry point except the disabled ones.

    A plugin that fails to import is logged and remembered instead of breaking every other
    plugin; selecting it later reports its error.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    for ep in entry_points(group=hookspecs.PROJECT):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            log.warning("batchdb plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
            pm.load_errors[ep.name] = exc
            continue
        pm.register(plugin, name=ep.name)
        unknown = _unknown_hooks(pm, plugin, ep.name)
        if unknown is not None:  # like a plugin that fails to import: the others keep working
            pm.unregister(plugin)
            log.warning("batchdb plugin %r (%s) not loaded: %s", ep.name, ep.value, unknown)
            pm.load_errors[ep.name] = unknown
            continue
        if ep.dist is not None:
            pm.dists[ep.name] = ep.dist
    for plugin in extra_plugins:
        registered = pm.register(plugin)
        unknown = _unknown_hooks(pm, plugin, registered or repr(plugin))
        if unknown is not None:  # a plugin handed over in code: the caller's mistake
            pm.unregister(plugin)
            raise unknown
    pm.check_pending()  # nothing unchecked is left (raises PluginValidationError)
    return pm


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object, name: str) -> BatchDBError | None:
    """An error naming the ``batchdb_*`` implementations of ``plugin`` that match no hook
    (a misspelt hook would otherwise register and never be called)."""
    specs = [n for n in dir(hookspecs) if n.startswith("batchdb_")]
    unknown = [caller.name for caller in pm.get_hookcallers(plugin) or []
               if not caller.has_spec()]
    if not unknown:
        return None
    parts = []
    for hook in unknown:
        close = difflib.get_close_matches(hook, specs, n=1, cutoff=0.7)
        parts.append(repr(hook) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return BatchDBError(f"plugin {name!r} implements {', '.join(parts)}, which is no batchdb "
                        f"hook; the hooks are: {', '.join(specs)}")


class BackendRegistry:
    """The backends the plugins handed over, by name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._backends: dict[str, type[Backend]] = {}
        self._load_errors: dict[str, BaseException] = getattr(pm, "load_errors", {})
        self._sections: dict[str, type[BaseModel]] = {}
        pm.hook.batchdb_register_backends(register=self._register)
        pm.hook.batchdb_register_settings(register=self._register_settings)

    def _register(self, name: str, cls: type[Backend]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise BatchDBError(f"plugin backend {name!r} is not a batchdb.Backend subclass")
        if name in self._backends and self._backends[name] is not cls:
            raise BatchDBError(f"two plugins register a backend named {name!r}")
        self._backends[name] = cls

    def settings_sections(self) -> dict[str, type[BaseModel]]:
        """The settings model of every section a plugin owns, by section name: each
        backend's ``settings_model`` and what plugins hand over through
        ``batchdb_register_settings``."""
        return {**{name: cls.settings_model for name, cls in self._backends.items()},
                **self._sections}

    def _register_settings(self, name: str, model: type[BaseModel]) -> None:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise BatchDBError(f"plugin settings section [{name}] is not a pydantic model")
        if self._sections.get(name, model) is not model or (
                name in self._backends and self._backends[name].settings_model is not model):
            raise BatchDBError(f"two plugins register a settings section [{name}]")
        self._sections[name] = model

    def names(self) -> list[str]:
        """Registered backend names, sorted."""
        return sorted(self._backends)

    def get(self, name: str) -> type[Backend]:
        """The backend class called ``name``; a clear error if none is registered."""
        try:
            return self._backends[name]
        except KeyError:
            if name in self._load_errors:
                err = self._load_errors[name]
                raise BatchDBError(f"backend plugin {name!r} failed to load: "
                                   f"{type(err).__name__}: {err}") from err
            hint = ""
            if name in _extras():
                hint = f" (install it with: pip install 'batchdb[{name}]')"
            known = ", ".join(self.names()) or "none"
            raise UnknownBackend(
                f"no backend named {name!r} is installed{hint}; installed backends: {known}"
            ) from None


def _extras() -> list[str]:
    """The optional extras of the installed batchdb distribution (a backend whose driver is
    an extra is named after it)."""
    try:
        return metadata("batchdb").get_all("Provides-Extra") or []
    except PackageNotFoundError:  # running from a source tree that is not installed
        return []


def plugin_info(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, module, entry point and hooks of every registered plugin (for ``batchdb plugins``)."""
    dists: dict[str, Distribution] = getattr(pm, "dists", {})
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({
            "name": name,
            "module": getattr(plugin, "__name__", type(plugin).__name__),
            "distribution": (f"{dist.name} {dist.version}"
                             if (dist := dists.get(name)) is not None else ""),
            "hooks": hooks,
        })
    blocked = [n for n in (ep.name for ep in entry_points(group=hookspecs.PROJECT))
               if pm.is_blocked(n)]
    out.extend({"name": n, "module": "", "distribution": "", "hooks": [], "disabled": True}
               for n in blocked)
    for name, err in getattr(pm, "load_errors", {}).items():
        out.append({"name": name, "module": "", "distribution": "", "hooks": [],
                    "error": f"{type(err).__name__}: {err}"})
    return out
