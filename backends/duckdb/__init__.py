"""The DuckDB backend plugin (extra ``batchdb[duckdb]``: duckdb and pyarrow).

Importing this package needs neither duckdb nor pyarrow: they are imported when the
backend is selected, and their absence is then one clear error naming the extra.
"""

from __future__ import annotations

from batchdb.hookspecs import RegisterBackend, hookimpl

from .backend import DuckDBBackend

__all__ = ["DuckDBBackend", "batchdb_register_backends"]


@hookimpl
def batchdb_register_backends(register: RegisterBackend) -> None:
    """Register the ``duckdb`` backend."""
    register("duckdb", DuckDBBackend)
