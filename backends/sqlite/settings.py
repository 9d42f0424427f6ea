"""Settings of the SQLite backend: the ``[sqlite]`` section of settings.toml
(``BATCHDB_SQLITE__KEY`` variables, ``sqlite={...}`` arguments)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from batchdb.settings import Section, database_path, upper_case

__all__ = ["SQLiteSettings"]


class SQLiteSettings(Section):
    """The embedded default: one SQLite file in WAL mode."""

    path: str = "market_data.sqlite3"
    journal_mode: Literal["WAL", "DELETE", "TRUNCATE", "PERSIST", "MEMORY"] = "WAL"
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    cache_size: int = 10000
    mmap_size: int = Field(268435456, ge=0)
    busy_timeout_ms: int = Field(30000, ge=0)
    foreign_keys: bool = True
    readers: int = Field(4, ge=1, le=64, description="reader connections in the pool")
    background_checkpoint_seconds: float = Field(
        0.2, ge=0,
        description="WAL mode: checkpoint from a separate connection at most this often while "
        "writes go on, instead of inside a writer's COMMIT; 0 leaves it to SQLite's "
        "auto-checkpoint in the writer",
    )
    check_types: bool = Field(
        True,
        description="check values against the declared column types of ordinary (non-STRICT) "
        "tables, as DuckDB and PostgreSQL do: text in a REAL column fails its operation "
        "instead of being stored as text; false keeps SQLite's flexible typing",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path_given(cls, value: Any) -> Any:
        return database_path(value)

    @field_validator("journal_mode", "synchronous", mode="before")
    @classmethod
    def _pragma_any_case(cls, value: Any) -> Any:
        return upper_case(value)  # SQLite takes "wal" and "normal" as well
