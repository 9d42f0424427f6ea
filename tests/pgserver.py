"""A throwaway PostgreSQL server for tests: initdb into a fresh directory, listen on 127.0.0.1.

    from tests.pgserver import PostgresServer

    if PostgresServer.available():
        with PostgresServer.start(tmp_path) as server:
            ...  # connect to server.dsn
            server.restart()

The server runs as an unprivileged user: PostgreSQL refuses to run as root, so when the tests
run as root the server runs as the ``postgres`` system user (created by Debian's package)
through ``runuser``. The superuser ``postgres`` connects without a password over TCP from
127.0.0.1; every other role needs its password (SCRAM), see :meth:`PostgresServer.add_user`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["PostgresServer", "sql_exec", "sql_rows", "with_params", "with_search_path"]

_RUN_AS = "postgres"  # the system user the server runs as when we are root
_SUPERUSER = "postgres"
_DBNAME = "batchdb"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.<port>" needs room


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin paths (newest last)."""
    version = Path(path).parent.name
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting for a parent that never reaps it, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def with_params(dsn: str, **params: str) -> str:
    """``dsn`` (a libpq URI) with more query parameters, e.g. ``application_name``
    (percent-encoded: libpq does not read ``+`` as a space)."""
    from urllib.parse import quote, urlencode

    return f"{dsn}{'&' if '?' in dsn else '?'}{urlencode(params, quote_via=quote, safe='')}"


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` whose sessions resolve unqualified names in ``schema`` (then public)."""
    return with_params(dsn, options=f"-c search_path={schema},public")


def sql_rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a separate, plain psycopg connection (what another client sees)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def sql_exec(dsn: str, *statements: str) -> None:
    """Run DDL/DML as a user of the database would, outside batchdb."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in statements:
            conn.execute(stmt)


class PostgresServer:
    """One PostgreSQL server in its own data directory, on a free port of 127.0.0.1.

    Build it with :meth:`start`; :attr:`dsn` connects as the superuser to the test database.
    """

    def __init__(self, bin_dir: Path, root: Path, port: int, *, owns_root: bool) -> None:
        self.bin_dir = bin_dir
        self.root = root  # holds data/ and server.log, owned by the server's user
        self.data_dir = root / "data"
        self.log_file = root / "server.log"
        self.port = port
        self.user = _SUPERUSER
        self.dbname = _DBNAME
        self.pid: int | None = None
        self._owns_root = owns_root  # a fallback directory outside base_dir: removed by stop()
        self._running = False

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def bin_directory() -> Path | None:
        """The directory holding initdb and pg_ctl (newest Debian version, else PATH)."""
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)
        for candidate in reversed(found):
            path = Path(candidate)
            if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
                return path
        initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if initdb and pg_ctl:
            real = Path(os.path.realpath(initdb)).parent
            if (real / "pg_ctl").is_file():
                return real
            return Path(initdb).parent
        return None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why no server can be started here, or None when one can."""
        if cls.bin_directory() is None:
            return ("PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin, no "
                    "initdb/pg_ctl on PATH): apt-get install -y postgresql")
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_RUN_AS)
            except KeyError:
                return (f"running as root and there is no {_RUN_AS!r} system user to run the "
                        "server as (PostgreSQL refuses to run as root)")
            if shutil.which("runuser") is None:
                return "running as root and runuser (util-linux) is not installed"
        return None

    @classmethod
    def available(cls) -> bool:
        """True when a server can be started (binaries found, an unprivileged user to run it)."""
        return cls.unavailable_reason() is None

    # ------------------------------------------------------------------ commands
    def _as_server_user(self, args: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", _RUN_AS, "--", *args]
        return args

    def _run(self, args: list[str], *, as_server: bool = True,
             timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        cmd = self._as_server_user(args) if as_server else args
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed with exit code {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}{self._log_tail()}"
            )
        return proc

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\nserver log (last lines):\n" + "\n".join(text.splitlines()[-lines:])

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    # ------------------------------------------------------------------ life cycle
    @staticmethod
    def _reachable_by_server_user(path: Path) -> bool:
        """True if the server's user can traverse every directory down to ``path``."""
        if os.geteuid() != 0:
            return True
        user = pwd.getpwnam(_RUN_AS)
        groups = {g for g in os.getgrouplist(_RUN_AS, user.pw_gid)}
        for p in [path, *path.parents]:
            st = p.stat()
            if st.st_uid == user.pw_uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid in groups:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                return False
        return True

    @classmethod
    def start(cls, base_dir: Path, *, port: int | None = None) -> PostgresServer:
        """initdb a fresh cluster under ``base_dir``, start it, create the test database.

        When ``base_dir`` is not reachable by the server's user (pytest's private temporary
        directories are mode 0700 for root), the cluster lives in a fresh directory under
        the system temporary directory instead (``base_dir/pgserver`` names it) and
        :meth:`stop` removes it.
        """
        reason = cls.unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        bin_dir = cls.bin_directory()
        assert bin_dir is not None
        base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        if cls._reachable_by_server_user(base_dir):
            root = Path(tempfile.mkdtemp(prefix="pgserver-", dir=base_dir))
            owns_root = False
        else:
            root = Path(tempfile.mkdtemp(prefix="batchdb-pgserver-"))
            owns_root = True
            with contextlib.suppress(OSError):
                (base_dir / "pgserver").write_text(f"{root}\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(_RUN_AS)
            os.chown(root, user.pw_uid, user.pw_gid)
        os.chmod(root, 0o700)
        server = cls(bin_dir, root, port or _free_port(), owns_root=owns_root)
        try:
            server._initdb()
            for attempt in range(3):
                try:
                    server._start_server()
                    break
                except RuntimeError:
                    if port is not None or attempt == 2:
                        raise
                    server.port = _free_port()  # the port was taken meanwhile: another one
                    server._write_port()
            server._run([server._bin("createdb"), "-h", "127.0.0.1", "-p", str(server.port),
                         "-U", _SUPERUSER, server.dbname], as_server=False)
        except BaseException:
            server.stop()
            raise
        return server

    def _initdb(self) -> None:
        self._run([self._bin("initdb"), "-D", str(self.data_dir), "-U", _SUPERUSER,
                   "-E", "UTF8", "--locale=C", "--auth-local=trust", "--auth-host=trust",
                   "--no-sync"])
        socket_dir = str(self.data_dir)
        if len(socket_dir) > _SOCKET_PATH_MAX:
            socket_dir = ""  # too long for a Unix socket path: TCP only
        with (self.data_dir / "postgresql.conf").open("a") as fh:
            fh.write(
                "\n# throwaway test server (tests/pgserver.py)\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{socket_dir}'\n"
                "max_connections = 100\n"
                "shared_buffers = 64MB\n"
                "logging_collector = off\n"
                "log_min_messages = warning\n"
                "log_timezone = 'UTC'\n"
                "timezone = 'UTC'\n"
            )
        self._write_port()
        (self.data_dir / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER      ADDRESS        METHOD\n"
            "local   all       all                      trust\n"
            f"host    all       {_SUPERUSER}  127.0.0.1/32   trust\n"
            "host    all       all       127.0.0.1/32   scram-sha-256\n"
        )

    def _write_port(self) -> None:
        (self.data_dir / "postgresql.port.conf").write_text(f"port = {self.port}\n")
        conf = self.data_dir / "postgresql.conf"
        text = conf.read_text()
        if "include_if_exists = 'postgresql.port.conf'" not in text:
            with conf.open("a") as fh:
                fh.write("include_if_exists = 'postgresql.port.conf'\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(_RUN_AS)
            os.chown(self.data_dir / "postgresql.port.conf", user.pw_uid, user.pw_gid)

    def _start_server(self) -> None:
        self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                   "-w", "-t", "60", "start"])
        self.pid = self._read_pid()
        self._running = True

    def _read_pid(self) -> int:
        with open(self.data_dir / "postmaster.pid") as fh:
            return int(fh.readline().strip())

    def restart(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected) and start it again on the
        same port and data."""
        self._stop_server()
        self._start_server()

    def _stop_server(self) -> None:
        if not self._running:
            return
        try:
            self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                       "-t", "60", "stop"])
        except (RuntimeError, subprocess.TimeoutExpired):
            self._kill()
        self._running = False
        self.pid = None

    def _kill(self) -> None:
        pid = self.pid
        if pid is None:
            return
        for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _pid_alive(pid):
                time.sleep(0.05)
            if not _pid_alive(pid):
                return

    def stop(self) -> None:
        """Stop the server (pg_ctl, or by its pid if pg_ctl fails); idempotent."""
        self._stop_server()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        """True between start and stop."""
        return self._running

    # ------------------------------------------------------------------ connecting
    @property
    def dsn(self) -> str:
        """libpq URI of the test database, as the superuser (no password needed)."""
        return self.dsn_for(self.user)

    def dsn_for(self, user: str, password: str | None = None, dbname: str | None = None) -> str:
        """libpq URI for another role (URL-quoted password) or database."""
        from urllib.parse import quote

        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname or self.dbname}"

    def psql(self, sql: str, dbname: str | None = None) -> str:
        """Run ``sql`` through psql as the superuser; return its unaligned output.

        Test helper only: the SQL text is the caller's own, never user input.
        """
        proc = self._run([self._bin("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At",
                          "-h", "127.0.0.1", "-p", str(self.port), "-U", _SUPERUSER,
                          "-d", dbname or self.dbname, "-c", sql], as_server=False)
        return proc.stdout.strip()

    def create_database(self, prefix: str, template: str | None = None) -> str:
        """A new database named ``prefix_<random>`` (a copy of ``template`` if given, which
        nobody may be connected to); returns its name. Names are quoted by psycopg."""
        import secrets

        import psycopg
        from psycopg import sql

        name = f"{prefix}_{secrets.token_hex(4)}"
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(stmt)
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its sessions first; no error if it is gone."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

    def add_user(self, name: str, password: str) -> str:
        """Create a login role that authenticates by password (SCRAM); return its DSN.

        The role owns nothing but may create tables in the public schema of the test
        database.
        """
        if not name.isidentifier():
            raise ValueError(f"role name must be a plain identifier, got {name!r}")
        literal = "'" + password.replace("'", "''") + "'"
        self.psql(f'CREATE ROLE "{name}" LOGIN PASSWORD {literal}; '
                  f'GRANT ALL ON SCHEMA public TO "{name}"; '
                  f'GRANT CREATE ON DATABASE "{self.dbname}" TO "{name}"')
        return self.dsn_for(name, password)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PostgresServer {self.dsn} pid={self.pid} {state} data={self.data_dir}>"
