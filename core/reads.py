"""``BatchDBManager.fetch`` is for reads: the error every backend raises for a statement
that would write (or lock, or end a transaction) instead of running it."""

from __future__ import annotations

from .models import BatchDBError

__all__ = ["ReadOnlyFetchError", "not_a_read"]


class ReadOnlyFetchError(BatchDBError):
    """``fetch()`` was given a statement that would change the database; nothing ran."""


def not_a_read(sql: str, detail: str) -> ReadOnlyFetchError:
    """The error for ``sql`` given to ``fetch()``; ``detail`` says what the database (or the
    check) reported."""
    text = " ".join(sql.split())
    if len(text) > 80:
        text = text[:77] + "..."
    return ReadOnlyFetchError(
        f"fetch() is for reads, and {text!r} is not one ({detail}); nothing was changed. "
        "Queue writes with queue_operation() (they are batched and committed in order), "
        "or run other statements on a connection of your own")
