"""The raw-driver baselines: each backend written the fastest way its own driver allows.

A :class:`Store` is one database the benchmark writes to: ``reset`` gives it fresh tables,
``write_tuples``/``write_dicts`` are the raw paths (sqlite3 ``executemany`` or multi-row
``VALUES``, DuckDB through an Arrow table, PostgreSQL binary COPY into a staging table), and
``settings`` is the batchdb configuration that writes to the same database with the same
tuning. The backend-specific SQL here is the baseline batchdb is measured against; nothing
in the library imports it.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import secrets
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.schema import CreateTable

from batchdb.backends.duckdb.settings import DuckDBSettings
from batchdb.backends.postgres.settings import PostgresSettings
from batchdb.backends.sqlite.settings import SQLiteSettings
from batchdb.candles import CANDLE_COLUMNS, candles_table
from batchdb.settings import BatchConfig, Settings

from .data import ORDER_COLUMNS, orders_table

__all__ = [
    "BACKENDS",
    "CANDLE_KEY",
    "PG_DSN_ENV",
    "PG_SCHEMA",
    "DuckDBStore",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "backend_unavailable",
    "make_store",
    "normalize_upbit_raw",
]

BACKENDS: tuple[str, ...] = ("sqlite", "duckdb", "postgres")

#: the environment variable naming a PostgreSQL database the benchmark may use
PG_DSN_ENV = "BATCHDB_BENCH_PG_DSN"
PG_SCHEMA = "batchdb_bench"
_ENV_PREFIX_NOT_READ = "BATCHDB_BENCH_SETTINGS_UNUSED_"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def normalize_upbit_raw(market: str, timeframe: str, candles: Sequence[Mapping[str, Any]],
                        now_ms: int) -> list[tuple[Any, ...]]:
    """What a hand-written ingester does: per-row ``datetime.fromisoformat`` into tuples in
    ``CANDLE_COLUMNS`` order (the raw side of the ``upbit_candles`` workload)."""
    fromiso = dt.datetime.fromisoformat
    utc = dt.UTC
    return [
        (market, timeframe,
         (fromiso(c["candle_date_time_utc"]).replace(tzinfo=utc) - _EPOCH) // _MS,
         c["opening_price"], c["high_price"], c["low_price"], c["trade_price"],
         c["candle_acc_trade_volume"], c["candle_acc_trade_price"], "upbit", now_ms)
        for c in candles
    ]


CANDLE_KEY = ("symbol", "timeframe", "ts")
_VALUES = tuple(c for c in CANDLE_COLUMNS if c not in CANDLE_KEY)
_COLS = ", ".join(CANDLE_COLUMNS)
_SET = ", ".join(f"{c} = excluded.{c}" for c in _VALUES)
_CONFLICT = f"ON CONFLICT ({', '.join(CANDLE_KEY)}) DO UPDATE SET {_SET}"
_CANDLE_GETTER = itemgetter(*CANDLE_COLUMNS)
VALUES_ROWS = 1000  # rows per multi-row VALUES statement of the raw-values path: a batch


@functools.cache
def _upsert_values_sql(rows: int) -> str:
    one = "(" + ", ".join("?" * len(CANDLE_COLUMNS)) + ")"
    return (f"INSERT INTO candles ({_COLS}) VALUES {', '.join([one] * rows)} "  # noqa: S608
            f"{_CONFLICT}")
_ORDER_GETTER = itemgetter(*ORDER_COLUMNS)


def _dialect(name: str) -> sa.engine.Dialect:
    return sa.engine.make_url(f"{name}://").get_dialect()()


def _ddl(dialect: sa.engine.Dialect) -> list[str]:
    """CREATE TABLE of ``candles`` and ``orders`` (DuckDB takes PostgreSQL's)."""
    return [str(CreateTable(t).compile(dialect=dialect)).strip()
            for t in (candles_table, orders_table)]


def _bench_settings(**sections: Any) -> Settings:
    """batchdb settings for a run: the defaults and ``sections`` only (no settings file, no
    ``BATCHDB_*`` variable), so the comparison always runs the documented configuration."""
    sections.setdefault("maintenance", {"enabled": False})
    return Settings(_env_prefix=_ENV_PREFIX_NOT_READ, **sections)


class Store(ABC):
    """One database the benchmark writes to: its raw driver path and its batchdb settings."""

    backend: ClassVar[str]
    #: rows per raw transaction/statement: the batch size batchdb uses for this backend
    batch_size: int

    @abstractmethod
    def reset(self) -> None:
        """A fresh, empty database holding the ``candles`` and ``orders`` tables."""

    @abstractmethod
    def remove(self) -> None:
        """Delete what :meth:`reset` created."""

    @abstractmethod
    def connect(self) -> Any:
        """A raw driver connection, tuned like batchdb's."""

    @abstractmethod
    def write_tuples(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """Upsert one batch of candle tuples (``CANDLE_COLUMNS`` order), committed."""

    @abstractmethod
    def write_dicts(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert one batch of candle dicts, committed."""

    @abstractmethod
    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Read back (verification), on a connection of its own."""

    @abstractmethod
    def settings(self, **batch: Any) -> Settings:
        """batchdb settings writing to this database (``batch`` overrides ``[batch]``)."""

    def close(self, conn: Any) -> None:
        """Close a raw connection."""
        conn.close()

    def upsert_dicts(self, rows: Sequence[Mapping[str, Any]],
                     write: Callable[[Any, Sequence[Mapping[str, Any]]], None] | None = None
                     ) -> None:
        """The raw bulk path: connect, upsert ``rows`` batch by batch (with ``write``,
        :meth:`write_dicts` by default), close."""
        write = write or self.write_dicts
        conn = self.connect()
        try:
            size = self.batch_size
            for i in range(0, len(rows), size):
                write(conn, rows[i:i + size])
        finally:
            self.close(conn)

    def upsert_tuples(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Like :meth:`upsert_dicts`, from tuples (also used, untimed, to prefill)."""
        conn = self.connect()
        try:
            size = self.batch_size
            for i in range(0, len(rows), size):
                self.write_tuples(conn, rows[i:i + size])
        finally:
            self.close(conn)


class SQLiteStore(Store):
    """An SQLite file in WAL mode with the PRAGMAs of ``SQLiteSettings``."""

    backend = "sqlite"
    _UPSERT = (f"INSERT INTO candles ({_COLS}) "  # noqa: S608 - fixed identifiers
               f"VALUES ({', '.join('?' * len(CANDLE_COLUMNS))}) {_CONFLICT}")
    _INSERT_ORDER = (f"INSERT INTO orders ({', '.join(ORDER_COLUMNS)}) "  # noqa: S608
                     f"VALUES ({', '.join('?' * len(ORDER_COLUMNS))})")

    def __init__(self, path: Path, settings: SQLiteSettings | None = None) -> None:
        self.path = path
        self.sqlite = (settings or SQLiteSettings()).model_copy(update={"path": str(path)})
        self.batch_size = BatchConfig().insert_batch_size

    def pragmas(self) -> list[str]:
        """The PRAGMAs the SQLite backend applies to its writer, from the same settings."""
        s = self.sqlite
        return [
            f"PRAGMA busy_timeout = {int(s.busy_timeout_ms)}",
            f"PRAGMA journal_mode = {s.journal_mode}",
            f"PRAGMA synchronous = {s.synchronous}",
            f"PRAGMA cache_size = {int(s.cache_size)}",
            f"PRAGMA mmap_size = {int(s.mmap_size)}",
            f"PRAGMA foreign_keys = {'ON' if s.foreign_keys else 'OFF'}",
            "PRAGMA temp_store = MEMORY",
        ]

    def connect(self, autocommit: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None if autocommit else "DEFERRED")
        for pragma in self.pragmas():
            conn.execute(pragma)
        return conn

    def _files(self) -> list[Path]:
        # -batchdb: the file through which the processes writing the database coordinate
        return [self.path, *(self.path.with_name(self.path.name + s)
                             for s in ("-wal", "-shm", "-batchdb"))]

    def remove(self) -> None:
        for f in self._files():
            f.unlink(missing_ok=True)

    def reset(self) -> None:
        self.remove()
        conn = self.connect()
        try:
            for stmt in _ddl(_dialect("sqlite")):
                conn.execute(stmt)
        finally:
            conn.close()

    def write_tuples(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(self._UPSERT, rows)
        conn.execute("COMMIT")

    def write_dicts(self, conn: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(self._UPSERT, map(_CANDLE_GETTER, rows))
        conn.execute("COMMIT")

    def write_values(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Like :meth:`write_tuples` with multi-row ``VALUES`` statements instead of
        ``executemany``: one per batch, as batchdb's writer does."""
        conn.execute("BEGIN IMMEDIATE")
        for i in range(0, len(rows), VALUES_ROWS):
            chunk = rows[i:i + VALUES_ROWS]
            conn.execute(_upsert_values_sql(len(chunk)), list(chain.from_iterable(chunk)))
        conn.execute("COMMIT")

    def write_dicts_values(self, conn: sqlite3.Connection,
                           rows: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`write_values` from candle dicts."""
        self.write_values(conn, list(map(_CANDLE_GETTER, rows)))

    def insert_one_by_one(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """One ``execute`` per order row, COMMIT every ``batch_size`` rows."""
        conn = self.connect()
        sql = self._INSERT_ORDER
        size = self.batch_size
        try:
            execute = conn.execute
            for i in range(0, len(rows), size):
                execute("BEGIN IMMEDIATE")
                for row in rows[i:i + size]:
                    execute(sql, _ORDER_GETTER(row))
                execute("COMMIT")
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def settings(self, **batch: Any) -> Settings:
        return _bench_settings(backend="sqlite", sqlite=self.sqlite.model_dump(),
                               batch=batch)


class DuckDBStore(Store):
    """A DuckDB file; raw writes go through an Arrow table per batch."""

    backend = "duckdb"
    _UPSERT = f"INSERT INTO candles ({_COLS}) SELECT {_COLS} FROM bench_batch {_CONFLICT}"  # noqa: S608

    def __init__(self, path: Path, settings: DuckDBSettings | None = None) -> None:
        self.path = path
        self.duckdb = (settings or DuckDBSettings()).model_copy(update={"path": str(path)})
        self.batch_size = self.duckdb.batch_size

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.duckdb.threads is not None:
            config["threads"] = self.duckdb.threads
        if self.duckdb.memory_limit is not None:
            config["memory_limit"] = self.duckdb.memory_limit
        return config

    def connect(self) -> Any:
        import duckdb

        return duckdb.connect(str(self.path), config=self._config())

    def remove(self) -> None:
        for suffix in ("", ".wal"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)

    def reset(self) -> None:
        self.remove()
        conn = self.connect()
        try:
            for stmt in _ddl(_dialect("postgresql")):
                conn.execute(stmt)
        finally:
            conn.close()

    @staticmethod
    def _schema() -> Any:
        import pyarrow as pa

        types = {"symbol": pa.string(), "timeframe": pa.string(), "ts": pa.int64(),
                 "source": pa.string(), "ingested_at": pa.int64()}
        return pa.schema([(c, types.get(c, pa.float64())) for c in CANDLE_COLUMNS])

    def _upsert_arrow(self, conn: Any, table: Any) -> None:
        conn.register("bench_batch", table)
        try:
            conn.execute(self._UPSERT)
        finally:
            conn.unregister("bench_batch")

    def write_tuples(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        import pyarrow as pa

        schema = self._schema()
        columns = [pa.array(col, type=f.type) for col, f in zip(zip(*rows, strict=True),
                                                               schema, strict=True)]
        self._upsert_arrow(conn, pa.Table.from_arrays(columns, schema=schema))

    def write_dicts(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        import pyarrow as pa

        # one typed array per column: the fastest raw path (from_pylist is ~25% slower,
        # which would flatter batchdb's ratio)
        schema = self._schema()
        arrays = [pa.array([r[c] for r in rows], type=f.type)
                  for c, f in zip(CANDLE_COLUMNS, schema, strict=True)]
        self._upsert_arrow(conn, pa.Table.from_arrays(arrays, schema=schema))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()

    def settings(self, **batch: Any) -> Settings:
        return _bench_settings(backend="duckdb", duckdb=self.duckdb.model_dump(), batch=batch)


class PostgresStore(Store):
    """A PostgreSQL database; everything happens in the schema ``batchdb_bench``, which each
    run drops and creates again. Raw writes: binary COPY into a temporary staging table,
    then ``INSERT … SELECT … ON CONFLICT DO UPDATE``, one transaction per batch."""

    backend = "postgres"
    _TYPES = ("text", "text", "int8", "float8", "float8", "float8", "float8", "float8",
              "float8", "text", "int8")
    _COPY = f"COPY bench_stage ({_COLS}) FROM STDIN (FORMAT BINARY)"
    _MERGE = f"INSERT INTO candles ({_COLS}) SELECT {_COLS} FROM bench_stage {_CONFLICT}"  # noqa: S608

    def __init__(self, dsn: str, settings: PostgresSettings | None = None) -> None:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        self.base_dsn = dsn
        options = str(conninfo_to_dict(dsn).get("options") or "")
        self.dsn = make_conninfo(dsn, options=f"{options} -c search_path={PG_SCHEMA}".strip())
        self.postgres = (settings or PostgresSettings()).model_copy(update={"dsn": self.dsn})
        self.batch_size = self.postgres.batch_size

    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt.encode())

    def reset(self) -> None:
        self._admin(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE", f"CREATE SCHEMA {PG_SCHEMA}",
                    *_ddl(_dialect("postgresql")))

    def remove(self) -> None:
        self._admin(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.dsn)
        conn.execute("CREATE TEMPORARY TABLE bench_stage (LIKE candles INCLUDING DEFAULTS) "
                     "ON COMMIT DELETE ROWS")
        conn.commit()
        return conn

    def write_tuples(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        with conn.cursor() as cur:
            with cur.copy(self._COPY) as copy:
                copy.set_types(self._TYPES)
                write = copy.write_row
                for row in rows:
                    write(row)
            cur.execute(self._MERGE)
        conn.commit()

    def write_dicts(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        self.write_tuples(conn, list(map(_CANDLE_GETTER, rows)))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            return [tuple(r) for r in conn.execute(sql.encode()).fetchall()]

    def settings(self, **batch: Any) -> Settings:
        return _bench_settings(backend="postgres", postgres=self.postgres.model_dump(),
                               batch=batch)


def make_store(backend: str, workdir: Path, pg_dsn: str | None = None) -> Store:
    """A store for ``backend``: a new file name under ``workdir``, or the PostgreSQL DSN."""
    name = f"bench-{secrets.token_hex(4)}"
    if backend == "sqlite":
        return SQLiteStore(workdir / f"{name}.sqlite3")
    if backend == "duckdb":
        return DuckDBStore(workdir / f"{name}.duckdb")
    if backend == "postgres":
        dsn = pg_dsn or os.environ.get(PG_DSN_ENV)
        if not dsn:
            raise ValueError(f"the postgres benchmarks need a database: set {PG_DSN_ENV}")
        return PostgresStore(dsn)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def backend_unavailable(backend: str, pg_dsn: str | None = None, *,
                        check_dsn: bool = True) -> str | None:
    """Why ``backend`` cannot be benchmarked here, or None when it can.

    ``check_dsn=False`` leaves out the PostgreSQL DSN (for a caller that brings a server).
    """
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}"
    drivers = {"duckdb": ("duckdb", "pyarrow"), "postgres": ("psycopg",)}.get(backend, ())
    for module in drivers:
        try:
            __import__(module)
        except ImportError as exc:
            return f"{backend}: the driver {module!r} is not installed ({exc}); " \
                   f"pip install 'batchdb[{backend}]'"
    from batchdb.pluginmanager import BackendRegistry, create_plugin_manager

    try:
        BackendRegistry(create_plugin_manager()).get(backend)
    except Exception as exc:
        return f"{backend}: the batchdb backend is not available: {exc}"
    if check_dsn and backend == "postgres" and not (pg_dsn or os.environ.get(PG_DSN_ENV)):
        return (f"postgres: no server to write to; set {PG_DSN_ENV} to a database where the "
                f"benchmark may create (and drop) the schema {PG_SCHEMA!r}")
    return None

