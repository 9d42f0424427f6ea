"""The batchdb hook contract (pluggy). Every hook is documented in docs/hooks.md.

Plugins implement these with ``@batchdb.hookimpl`` and register through the ``batchdb``
entry-point group. A hook may return a coroutine: the core awaits it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer
    from pydantic import BaseModel

    from .backend import Backend, Batch
    from .manager import BatchDBManager
    from .models import BatchOperation

__all__ = ["PROJECT", "RegisterBackend", "RegisterSettings", "hookimpl", "hookspec"]

PROJECT = "batchdb"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

RegisterBackend = Callable[[str, "type[Backend]"], None]
RegisterSettings = Callable[[str, "type[BaseModel]"], None]


@hookspec
def batchdb_register_backends(register: RegisterBackend) -> None:
    """Hand over backend classes: call ``register(name, BackendClass)`` once per backend.

    The class carries its settings model as ``settings_model``; its section in
    ``settings.toml`` is ``[name]``.
    """


@hookspec
def batchdb_register_settings(register: RegisterSettings) -> None:
    """Hand over the settings model of a plugin's own section: ``register(name, Model)``.

    The ``[name]`` section of settings.toml (and ``BATCHDB_NAME__KEY`` variables) is then
    validated by ``Model`` when a manager is built and shown by ``batchdb config``; the
    plugin reads it with ``settings.section(name, Model)``. A backend's ``settings_model``
    is registered with the backend: no need to hand it over again.
    """


@hookspec(firstresult=True)
def batchdb_normalize_candles(
    symbol: str, timeframe: str, candles: Sequence[Any], source: str
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]] | None:
    """Map source candles onto the ``candles`` table: return ``(columns, rows)``.

    Return None when ``source`` is not yours. Raise ``ValueError`` naming the field and
    the candle's index for a malformed candle: the whole operation fails with it.
    """


@hookspec
def batchdb_operation_queued(operation: BatchOperation) -> None:
    """An operation entered a queue (called in the producer's task: keep it cheap)."""


@hookspec
def batchdb_batch_committed(batch: Batch, seconds: float, backend: Backend) -> None:
    """A batch committed: ``batch.operations`` are acknowledged, ``batch.row_count`` rows."""


@hookspec
def batchdb_batch_failed(batch: Batch, error: BaseException, backend: Backend) -> None:
    """Operations of ``batch`` failed for good (after retries and splitting)."""


@hookspec
def batchdb_maintenance_done(task: str, seconds: float, result: dict[str, Any]) -> None:
    """A maintenance task (checkpoint, analyze, vacuum, …) finished."""


@hookspec
def batchdb_manager_started(manager: BatchDBManager) -> None:
    """``manager.start()`` opened the backend and is about to take operations.

    Called on the manager's event loop, before the per-batch hooks are looked up: a
    plugin may register observers on ``manager.pm`` here and their hooks are called for
    this run. An exception fails ``start()`` (the backend is closed again).
    """


@hookspec
def batchdb_manager_stopped(manager: BatchDBManager) -> None:
    """``manager.stop()`` committed what was queued and closed the backend.

    Called even when ``stop()`` did not drain, and after a ``start()`` that
    ``batchdb_manager_started`` failed; an exception is logged, never raised.
    """


@hookspec
def batchdb_register_commands(app: typer.Typer) -> None:
    """Add commands to the ``batchdb`` program: ``app.command()(function)`` (typer).

    Called once when the command line is built, for every installed plugin.
    """


@hookspec
def batchdb_spooled(batch: Batch) -> None:
    """The database could not take ``batch`` (a transient error for longer than
    ``spool.after_seconds``, or it is down): its operations are in the spool on local
    disk, fsynced (``state == "spooled"``); they are replayed when the database answers."""


@hookspec
def batchdb_spool_replayed(batch: Batch) -> None:
    """Operations of ``batch`` came back from the spool and were written to the database
    (each committed, or failed alone with bad data): their spool records are done."""
