"""The PostgreSQL backend tests use the shared fixtures of ``tests/conftest.py``: the
session's server (``pg_server``), a fresh schema per test (``pg_schema``; ``pg_dsn`` sets
the search_path to it) and started managers on it (``make_pg_manager``). The plain-driver
helpers live in ``tests/pgserver.py`` and are re-exported here for the test modules."""

from __future__ import annotations

from tests.conftest import ManagerFactory
from tests.pgserver import sql_exec, sql_rows, with_search_path

__all__ = ["ManagerFactory", "sql_exec", "sql_rows", "with_search_path"]
