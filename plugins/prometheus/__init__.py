"""Prometheus metrics for batchdb, and ``batchdb top``: a plugin built only on the hooks.

Installed as the ``metrics`` plugin (entry-point group ``batchdb``; its settings are the
``[metrics]`` section). With ``prometheus_port`` set, every manager started in the process
serves ``/metrics`` on ``prometheus_host:prometheus_port`` while it runs: at
``batchdb_manager_started`` this module builds a :class:`PrometheusMetrics` with a registry of
its own, starts prometheus-client's HTTP server on it and registers the exporter on the
manager's plugin manager, so its per-batch hooks are called for that run only; at
``batchdb_manager_stopped`` it stops the server and unregisters it. With the port at 0 (the
default) nothing is registered, and the scheduler calls no per-batch hook for it.

An application that already serves a Prometheus registry mounts the exporter itself::

    metrics = PrometheusMetrics(registry=my_registry)
    manager = BatchDBManager(..., plugins=[metrics])

prometheus-client is an extra (``pip install 'batchdb[metrics]'``): this module imports
without it, so that ``batchdb plugins`` lists it and the port setting can name what is
missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from pydantic import BaseModel, ConfigDict, Field

from batchdb.hookspecs import RegisterSettings, hookimpl
from batchdb.models import BatchDBError

if TYPE_CHECKING:
    from batchdb.manager import BatchDBManager

    from .exporter import PrometheusMetrics

__all__ = ["SECTION", "MetricsSettings", "PrometheusMetrics", "batchdb_manager_started",
           "batchdb_manager_stopped", "batchdb_register_commands", "batchdb_register_settings",
           "require_prometheus_client"]

#: the settings section of this plugin (and its entry-point name)
SECTION = "metrics"
_EXPORTER = "metrics-exporter"  # the name of the per-run exporter on ``manager.pm``
INSTALL_HINT = "pip install 'batchdb[metrics]'"


class MetricsSettings(BaseModel):
    """The ``[metrics]`` section of ``settings.toml``."""

    model_config = ConfigDict(extra="forbid")

    prometheus_port: int = Field(default=0, ge=0, le=65535)
    """Port of the ``/metrics`` endpoint while a manager runs; 0: no endpoint."""
    prometheus_host: str = Field(default="127.0.0.1", min_length=1)
    """Address the endpoint listens on (``0.0.0.0`` for every interface)."""


def require_prometheus_client(what: str) -> None:
    """A clear :class:`BatchDBError` naming the extra when prometheus-client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise BatchDBError(f"{what} needs prometheus-client, which is not installed: "
                           f"{INSTALL_HINT}") from None


def __getattr__(name: str) -> Any:
    """``PrometheusMetrics`` on first use (it imports prometheus-client)."""
    if name == "PrometheusMetrics":
        require_prometheus_client("batchdb.plugins.prometheus.PrometheusMetrics")
        from .exporter import PrometheusMetrics

        return PrometheusMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def batchdb_manager_started(manager: BatchDBManager) -> None:
    """Serve ``/metrics`` for this run when ``[metrics] prometheus_port`` is set."""
    settings = manager.settings.section(SECTION, MetricsSettings)
    if not settings.prometheus_port:
        return
    require_prometheus_client(
        f"{manager.settings.where(SECTION + '.prometheus_port')} = {settings.prometheus_port}")
    from .exporter import PrometheusMetrics

    exporter = PrometheusMetrics()
    exporter.serve(settings.prometheus_port, settings.prometheus_host)
    try:
        exporter.batchdb_manager_started(manager)
        manager.pm.register(exporter, name=_EXPORTER)
    except BaseException:
        exporter.close()
        raise


@hookimpl
def batchdb_manager_stopped(manager: BatchDBManager) -> None:
    """Stop the endpoint this module started for the run, if any."""
    exporter: PrometheusMetrics | None = manager.pm.get_plugin(_EXPORTER)
    if exporter is None:
        return
    manager.pm.unregister(exporter)
    exporter.batchdb_manager_stopped(manager)
    exporter.close()


@hookimpl
def batchdb_register_settings(register: RegisterSettings) -> None:
    """The ``[metrics]`` section: checked whenever settings load, shown by ``batchdb
    config``."""
    register(SECTION, MetricsSettings)


@hookimpl
def batchdb_register_commands(app: typer.Typer) -> None:
    """``batchdb top``: a live view of a running process, read from its metrics endpoint."""
    from .top import top

    app.command("top")(top)
