"""Plugin manager: one per BatchDBManager, loaded from the ``batchdb`` entry-point group."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .backend import Backend
from .models import BatchDBError

__all__ = ["BackendRegistry", "await_me_maybe", "create_plugin_manager", "plugin_info"]

log = logging.getLogger("batchdb.plugins")


async def await_me_maybe(value: Any) -> Any:
    """Await ``value`` if it is awaitable (a hook may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


def create_plugin_manager(
    disabled: Iterable[str] = (), extra_plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A fresh plugin manager with every ``batchdb`` entry point except the disabled ones."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


class BackendRegistry:
    """The backends the plugins handed over, by name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._backends: dict[str, type[Backend]] = {}
        pm.hook.batchdb_register_backends(register=self._register)

    def _register(self, name: str, cls: type[Backend]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise BatchDBError(f"plugin backend {name!r} is not a batchdb.Backend subclass")
        if name in self._backends and self._backends[name] is not cls:
            raise BatchDBError(f"two plugins register a backend named {name!r}")
        self._backends[name] = cls

    def names(self) -> list[str]:
        """Registered backend names, sorted."""
        return sorted(self._backends)

    def get(self, name: str) -> type[Backend]:
        """The backend class called ``name``; a clear error if none is registered."""
        try:
            return self._backends[name]
        except KeyError:
            hint = ""
            if name in {"duckdb", "postgres"}:
                hint = f" (install it with: pip install 'batchdb[{name}]')"
            known = ", ".join(self.names()) or "none"
            raise BatchDBError(
                f"no backend named {name!r} is installed{hint}; installed backends: {known}"
            ) from None


def plugin_info(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, module, entry point and hooks of every registered plugin (for ``batchdb plugins``)."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({
            "name": name,
            "module": getattr(plugin, "__name__", type(plugin).__name__),
            "distribution": f"{dist.project_name} {dist.version}" if dist else "",
            "hooks": hooks,
        })
    blocked = [n for n in (ep.name for ep in entry_points(group=hookspecs.PROJECT))
               if pm.is_blocked(n)]
    out.extend({"name": n, "module": "", "distribution": "", "hooks": [], "disabled": True}
               for n in blocked)
    return out
