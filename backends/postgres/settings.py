"""Settings of the PostgreSQL backend: the ``[postgres]`` section of settings.toml
(``BATCHDB_POSTGRES__KEY`` variables, ``postgres={...}`` arguments)."""

from __future__ import annotations

from pydantic import Field

from batchdb.settings import Section

__all__ = ["PostgresSettings"]


class PostgresSettings(Section):
    """A PostgreSQL server, for many hosts writing into one store."""

    dsn: str = "postgresql://localhost:5432/batchdb"
    pool_size: int = Field(4, ge=1, le=64)
    batch_size: int = Field(20_000, ge=1)
    statement_timeout_ms: int = Field(60_000, ge=0)
    connect_timeout_seconds: float = Field(10.0, gt=0)
