"""The SQLite-WAL reference backend plugin."""

from __future__ import annotations

from batchdb.hookspecs import RegisterBackend, hookimpl

from .backend import SQLiteBackend

__all__ = ["SQLiteBackend", "batchdb_register_backends"]


@hookimpl
def batchdb_register_backends(register: RegisterBackend) -> None:
    """Register the ``sqlite`` backend."""
    register("sqlite", SQLiteBackend)
