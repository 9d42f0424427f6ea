"""What a connection factory (``BatchDBManager(lambda: sqlite3.connect(...))``)
must hand over, checked when batchdb opens its writer and its readers, each with a message
saying how to write the factory instead of a driver traceback."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from batchdb.models import BatchDBError

__all__ = ["IN_MEMORY", "NEW_CONNECTION", "check_factory_connection", "check_file_database",
           "make_read_only", "refused_as_write"]

NEW_CONNECTION = (
    "the connection factory must open a new connection each time it is called: batchdb "
    "calls it once for its writer thread and once for each reader, and uses each "
    "connection from its own thread; it returned {what}. Write "
    "BatchDBManager(lambda: sqlite3.connect('market_data.sqlite3')), not "
    "conn = sqlite3.connect(...); BatchDBManager(lambda: conn)"
)

IN_MEMORY = (
    "{where} is an in-memory (or temporary) SQLite database, which cannot be shared "
    "between batchdb's writer and its readers: each connection would get a database of "
    "its own, empty, and everything would be lost at stop() (WAL mode needs a file too). "
    "Use a file: BatchDBManager(lambda: sqlite3.connect('market_data.sqlite3')), or "
    "[sqlite] path = \"market_data.sqlite3\""
)


def check_factory_connection(conn: sqlite3.Connection,
                             in_use: Iterable[sqlite3.Connection | None]) -> None:
    """Raise a BatchDBError unless ``conn`` is a connection of its own, usable from the
    calling thread: not one of ``in_use`` (the writer's and readers' connections), and
    not one made in another thread with sqlite3's default ``check_same_thread=True``."""
    if any(conn is other for other in in_use):
        raise BatchDBError(NEW_CONNECTION.format(
            what="a connection it had returned before (the same connection again)"))
    try:
        conn.execute("SELECT 1").fetchone()
    except sqlite3.ProgrammingError as exc:
        if "thread" not in str(exc):
            raise
        raise BatchDBError(NEW_CONNECTION.format(
            what="a connection made earlier in another thread (sqlite3 refuses to use a "
                 "connection outside the thread that created it)")) from None


def check_file_database(conn: sqlite3.Connection, where: str) -> str:
    """The file of ``conn``'s main database; a BatchDBError for an in-memory or
    temporary database (SQLite reports no file for them)."""
    for _, name, file in conn.execute("PRAGMA database_list").fetchall():
        if name == "main":
            if not file:
                raise BatchDBError(IN_MEMORY.format(where=where))
            return str(file)
    raise BatchDBError(IN_MEMORY.format(where=where))


# what a reader connection may not do beyond writing (PRAGMA query_only refuses writes):
# open a transaction (BEGIN IMMEDIATE would take the write lock and keep it), attach files
_NOT_FOR_READERS = frozenset({sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT,
                              sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})
_REFUSED = ("attempt to write a readonly database", "not authorized")


def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None,
               source: str | None) -> int:
    if action in _NOT_FOR_READERS:
        return sqlite3.SQLITE_DENY
    if (action == sqlite3.SQLITE_PRAGMA and arg2 is not None and arg1 is not None
            and arg1.lower() == "query_only"):
        return sqlite3.SQLITE_DENY  # a reader stays read-only
    return sqlite3.SQLITE_OK


def make_read_only(conn: sqlite3.Connection) -> None:
    """Make ``conn`` a reader: autocommit (sqlite3 opens no transaction of its own, so a
    statement never leaves one, or a lock, behind), ``PRAGMA query_only``, and an
    authorizer refusing transactions, savepoints, ATTACH/DETACH and turning query_only
    off. A write given to ``fetch()`` then fails before it changes or locks anything."""
    conn.isolation_level = None
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_authorize)


def refused_as_write(exc: BaseException) -> bool:
    """True when ``exc`` is a reader refusing a statement that is not a read."""
    return isinstance(exc, sqlite3.DatabaseError) and any(r in str(exc) for r in _REFUSED)
