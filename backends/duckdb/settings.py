"""Settings of the DuckDB backend: the ``[duckdb]`` section of settings.toml
(``BATCHDB_DUCKDB__KEY`` variables, ``duckdb={...}`` arguments)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from batchdb.settings import Section, database_path

__all__ = ["DuckDBSettings"]


class DuckDBSettings(Section):
    """The analytical alternative: one DuckDB file."""

    path: str = "market_data.duckdb"
    batch_size: int = Field(
        50_000, ge=1, description="rows per batch (DuckDB pays ~7 ms a statement)"
    )
    threads: int | None = Field(None, ge=1)
    memory_limit: str | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _path_given(cls, value: Any) -> Any:
        return database_path(value)
