"""The PostgreSQL backend plugin (``pip install 'batchdb[postgres]'``).

Importing this module never imports the driver: selecting the backend without psycopg
installed fails with one clear ``BatchDBError`` naming the extra to install.
"""

from __future__ import annotations

from batchdb.hookspecs import RegisterBackend, hookimpl

from .backend import PostgresBackend

__all__ = ["PostgresBackend", "batchdb_register_backends"]


@hookimpl
def batchdb_register_backends(register: RegisterBackend) -> None:
    """Register the ``postgres`` backend."""
    register("postgres", PostgresBackend)
