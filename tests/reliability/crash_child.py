"""The ingesting child of the crash tests: a BatchDBManager writing recognisable operations.

Run as a program (``python crash_child.py --db FILE --logs DIR --seed N``), it opens the
database, prints ``running`` and writes until it is killed (or, with ``--finish N``, writes N
more operations, stops cleanly and prints ``done``). With ``--zygote`` it is a fork server:
it imports everything once and forks a fresh child per request, so the harness restarts a
child in milliseconds instead of paying a second of imports per kill. Each forked child is
an ordinary process that builds its own manager and opens the file itself.

Every operation is numbered. Before it is queued, its definition is appended to
``submitted.log`` (one JSON line, written with a single ``write`` so a kill never leaves half
a line that counts); once it is committed (``wait()`` returned, or its callback saw success),
its number is appended to ``acked.log`` and the file is fsynced before anything else happens.
So every line of ``acked.log`` is an operation the database had committed.

Operations (all multi-row, every row tagged with the operation that wrote it):

- ``insert`` into ``events`` (composite key ``grp, j``) or ``notes`` (text key ``"grp/j"``):
  rows ``j = 0..k-1`` of group ``grp = n``;
- ``update`` / ``upsert`` / ``delete``: take one group inserted by an *acknowledged* insert
  (so it is surely there) that no other operation has claimed, and rewrite it (``upd = n``),
  rewrite and extend it by ``e`` rows, or delete it. A group is claimed at most once, even
  by an operation that never got acknowledged, so the state of each group is always one of a
  few states the checker can name;
- ``candles``: ``insert_candles_batch`` of ``k`` Upbit-format candles at minutes unique to
  ``n``; ``recandle``: upsert an acknowledged candles operation's candles with new prices.

The value of every column is a function of (operation, row), defined here and used by the
checker in ``test_crash.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from batchdb import BatchDBManager, BatchOperation, OperationFailed, Priority

metadata = sa.MetaData()

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("grp", sa.Integer, nullable=False),
    sa.Column("j", sa.Integer, nullable=False),
    sa.Column("upd", sa.Integer, nullable=False),
    sa.Column("val", sa.BigInteger, nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.PrimaryKeyConstraint("grp", "j"),
)

notes_table = sa.Table(
    "notes",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("grp", sa.Integer, nullable=False),
    sa.Column("j", sa.Integer, nullable=False),
    sa.Column("upd", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=True),
    sa.Index("notes_grp", "grp"),
)

TABLES = (events_table, notes_table)
SYMBOL = "KRW-BTC"
TIMEFRAME = "1m"
CANDLE_SLOTS = 64  # minutes reserved per candles operation
CANDLE_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
MODIFIERS = ("update", "upsert", "delete")
PRIORITIES = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)
_PATTERN = bytes(range(256)) * 3


# ---------------------------------------------------------------------- values
def val(n: int, j: int) -> int:
    """``events.val`` written by operation ``n`` for row ``j``."""
    return n * 1_000_003 + j * 7919


def note(n: int, j: int) -> str:
    """``events.note`` written by operation ``n`` for row ``j``."""
    return f"op{n}-row{j}"


def note_key(grp: int, j: int) -> str:
    """The text key of row ``j`` of group ``grp`` in ``notes``."""
    return f"{grp}/{j}"


def body(n: int, j: int) -> str:
    """``notes.body``: a few bytes to a few kB, with non-ASCII text."""
    return f"n{n}·j{j}·" + "ж" * ((n * 31 + j * 17) % 700)


def data(n: int, j: int) -> bytes | None:
    """``notes.data``: a blob, or NULL for one row in five."""
    if (n + j) % 5 == 0:
        return None
    start = (n + j) % 256
    return _PATTERN[start:start + (n * 13 + j) % 300]


def price(n: int, j: int) -> float:
    """Base price of candle ``j`` written by operation ``n`` (exact in binary)."""
    return 50_000.0 + n + j / 4


def candle_minute(grp: int, j: int) -> int:
    """Minute index of candle ``j`` of candles operation ``grp``."""
    return grp * CANDLE_SLOTS + j


def candle_ts(grp: int, j: int) -> int:
    """``candles.ts`` (epoch ms) of candle ``j`` of candles operation ``grp``."""
    return int(CANDLE_EPOCH.timestamp() * 1000) + candle_minute(grp, j) * 60_000


def candle_values(n: int, j: int) -> tuple[float, float, float, float, float, float]:
    """(open, high, low, close, volume, quote_volume) written by operation ``n``."""
    p = price(n, j)
    return (p, p + 8.0, p - 8.0, p + 2.5, 0.5 + j / 8, p * 2)


def upbit_candle(n: int, grp: int, j: int) -> dict[str, Any]:
    """Candle ``j`` of group ``grp`` as Upbit's API returns it, with operation ``n``'s prices."""
    when = CANDLE_EPOCH + timedelta(minutes=candle_minute(grp, j))
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    o, h, low, c, vol, quote = candle_values(n, j)
    return {
        "market": SYMBOL,
        "candle_date_time_utc": text,
        "candle_date_time_kst": text,
        "opening_price": o,
        "high_price": h,
        "low_price": low,
        "trade_price": c,
        "timestamp": candle_ts(grp, j) + 59_000,
        "candle_acc_trade_price": quote,
        "candle_acc_trade_volume": vol,
        "unit": 1,
    }


def operation_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows an operation writes, from its submitted.log definition."""
    n, kind, table, k = spec["n"], spec["kind"], spec["table"], spec["k"]
    grp = spec["target"] if spec["target"] is not None else n
    if kind in ("candles", "recandle"):
        return [upbit_candle(n, grp, j) for j in range(k)]
    if table == "events":
        if kind == "insert":
            return [{"grp": grp, "j": j, "upd": n, "val": val(n, j), "note": note(n, j)}
                    for j in range(k)]
        if kind == "update":
            return [{"grp": grp, "j": j, "upd": n, "val": val(n, j)} for j in range(k)]
        if kind == "upsert":
            return [{"grp": grp, "j": j, "upd": n, "val": val(n, j), "note": note(n, j)}
                    for j in range(k + spec["e"])]
        return [{"grp": grp, "j": j} for j in range(k)]
    if kind in ("insert", "upsert"):
        count = k + spec["e"] if kind == "upsert" else k
        return [{"key": note_key(grp, j), "grp": grp, "j": j, "upd": n, "body": body(n, j),
                 "data": data(n, j)} for j in range(count)]
    if kind == "update":
        return [{"key": note_key(grp, j), "upd": n, "body": body(n, j)} for j in range(k)]
    # a DELETE reads only the key; the other columns ride along
    return [{"key": note_key(grp, j), "grp": grp} for j in range(k)]


def read_log_lines(path: Path) -> list[str]:
    """Complete lines of a log (a final line without its newline was never finished)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]


# ---------------------------------------------------------------------- the child
class Child:
    """Plans, queues and acknowledges operations until killed (or ``finish`` are done)."""

    def __init__(self, manager: BatchDBManager, logs: Path, seed: int, run: int,
                 finish: int | None, maintenance: tuple[str, ...]) -> None:
        self.manager = manager
        self.maintenance_tasks = maintenance
        self.run = run
        self.finish = finish
        self.rng = random.Random(seed * 1_000_003 + run)
        self.sub_fd = os.open(logs / "submitted.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.ack_fd = os.open(logs / "acked.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.fail_fd = os.open(logs / "failed.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        specs = [json.loads(line) for line in read_log_lines(logs / "submitted.log")]
        acked = {int(line) for line in read_log_lines(logs / "acked.log")}
        self.next_n = max((s["n"] for s in specs), default=0) + 1
        self.specs = {s["n"]: s for s in specs}
        claimed = {s["target"] for s in specs if s["target"] is not None}
        # groups an acknowledged insert wrote and nobody claimed yet, per (table, kind)
        self.pool: dict[str, list[int]] = {"events": [], "notes": [], "candles": []}
        for s in specs:
            if s["n"] in acked and s["target"] is None and s["n"] not in claimed:
                self.pool[s["table"]].append(s["n"])
        self.window = asyncio.Semaphore(96)
        self.loop: asyncio.AbstractEventLoop  # set by main()
        self.pending: set[asyncio.Task[None]] = set()
        self.done = 0

    def _ack(self, op: BatchOperation, n: int) -> None:
        """Record a committed operation: append its number and fsync, before anything else.

        Plain callbacks run on batchdb's callback thread: the file writes are safe there,
        the bookkeeping (asyncio semaphore, pool) is handed to the event loop.
        """
        if not op.succeeded:
            self._failed(n, str(op.error))
            return
        os.write(self.ack_fd, f"{n}\n".encode())
        os.fsync(self.ack_fd)
        self.loop.call_soon_threadsafe(self._acked, n)

    def _acked(self, n: int) -> None:
        self.window.release()
        spec = self.specs[n]
        if spec["target"] is None:
            self.pool[spec["table"]].append(n)

    def _failed(self, n: int, error: str) -> None:
        """An operation failed: the harness expects none to, and reports these lines."""
        os.write(self.fail_fd, f"{n} {error}\n".encode())
        self.loop.call_soon_threadsafe(self.window.release)

    def _plan(self) -> dict[str, Any]:
        rng = self.rng
        n = self.next_n
        self.next_n += 1
        roll = rng.random()
        table = rng.choice(("events", "notes"))
        kind = "insert"
        target = None
        if roll < 0.12:
            table, kind = "candles", "candles"
            if rng.random() < 0.4 and self.pool["candles"]:
                kind = "recandle"
        elif roll < 0.55:
            kind = rng.choice(MODIFIERS)
        if kind in MODIFIERS or kind == "recandle":
            pool = self.pool[table]
            if pool:
                target = pool.pop(rng.randrange(len(pool)))
            else:
                kind = "candles" if table == "candles" else "insert"
        if target is not None:
            k = self.specs[target]["k"]
        elif kind == "candles":
            k = rng.randint(1, CANDLE_SLOTS)
        else:
            k = rng.randint(200, 800) if rng.random() < 0.02 else rng.randint(1, 24)
        spec = {"n": n, "kind": kind, "table": table, "target": target, "k": k,
                "e": rng.randint(1, 6) if kind == "upsert" else 0,
                "prio": rng.choice(PRIORITIES).name, "run": self.run}
        self.specs[n] = spec
        return spec

    async def _queue(self, spec: dict[str, Any]) -> str:
        rows = operation_rows(spec)
        prio = Priority[spec["prio"]]
        n = spec["n"]
        style = self.rng.choice(("wait", "callback", "async-callback"))
        callback: Callable[[BatchOperation], Any] | None = None
        if style == "callback":
            def callback(op: BatchOperation) -> None:
                self._ack(op, n)
        elif style == "async-callback":
            async def callback(op: BatchOperation) -> None:
                self._ack(op, n)
        if spec["kind"] in ("candles", "recandle"):
            op_id = await self.manager.insert_candles_batch(SYMBOL, TIMEFRAME, rows, prio,
                                                            callback)
        else:
            op_id = await self.manager.queue_operation(spec["table"], spec["kind"].upper(),
                                                       rows, prio, callback)
        if style == "wait":
            task = asyncio.get_running_loop().create_task(self._wait(op_id, n))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        return op_id

    async def _wait(self, op_id: str, n: int) -> None:
        try:
            op = await self.manager.wait(op_id)
        except OperationFailed as exc:
            self._failed(n, str(exc))
            return
        self._ack(op, n)

    async def _producer(self) -> None:
        while self.finish is None or self.done < self.finish:
            self.done += 1
            await self.window.acquire()
            spec = self._plan()
            line = json.dumps(spec, separators=(",", ":")) + "\n"
            os.write(self.sub_fd, line.encode())  # one write: the line is whole or absent
            await self._queue(spec)  # the window is released when the op completes
            if self.rng.random() < 0.3:
                await asyncio.sleep(self.rng.random() * 0.004)

    async def _maintenance(self) -> None:
        weights = {"checkpoint": 14, "analyze": 4, "vacuum": 1}
        supported = self.manager.backend.maintenance_tasks
        choices = [t for t in self.maintenance_tasks if t in weights and t in supported]
        while choices:
            await asyncio.sleep(0.02 + self.rng.random() * 0.06)
            task = self.rng.choices(choices, [weights[t] for t in choices])[0]
            await self.manager.maintain(task)

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.manager.start()
        print("running", flush=True)
        maintenance = asyncio.get_running_loop().create_task(self._maintenance())
        await asyncio.gather(*(self._producer() for _ in range(4)))
        await self.manager.flush()
        if self.pending:
            await asyncio.gather(*self.pending)
        maintenance.cancel()
        await self.manager.stop()  # drains the queues and runs the last callbacks
        print("done", flush=True)


#: the child's max_queue_size: operations committed but not yet acknowledged (callbacks
#: that have not run) count against it, so at a kill the acknowledgements lag the commits by
#: at most this plus what is in flight (ACK_LAG_BOUND)
QUEUE_BOUND = 2000
ACK_LAG_BOUND = QUEUE_BOUND + (3 + 1) * 300  # + max_concurrent_batches (+1 CRITICAL) batches


def build_manager(db: str, backend: str) -> BatchDBManager:
    """The manager of the child: small batches and lingers, so many transactions happen.

    ``db`` is the database file, or for ``postgres`` the DSN.
    """
    section: dict[str, Any] = {"path": db}
    batch = {"insert_batch_size": 300, "update_batch_size": 150, "max_concurrent_batches": 3,
             "max_queue_size": QUEUE_BOUND,
             "linger_seconds": {"CRITICAL": 0.0, "HIGH": 0.003, "NORMAL": 0.01, "LOW": 0.03}}
    if backend == "duckdb":
        section["batch_size"] = 2000
    elif backend == "postgres":  # the backend's batch size wins over the batch section's
        section = {"dsn": db, "batch_size": 300, "pool_size": 4}
    manager = BatchDBManager.from_settings(None, backend=backend, batch=batch,
                                           maintenance={"enabled": False},
                                           **{backend: section})
    # declared one by one (``tables=`` once raised AttributeError, see
    # test_crash.py::test_tables_argument_declares_tables)
    for table in TABLES:
        manager.declare_table(table)
    return manager


def run_child(args: argparse.Namespace, run: int, finish: int | None) -> None:
    """One child's life: build the manager, open the database, write (until killed)."""
    manager = build_manager(args.db, args.backend)
    tasks = tuple(t for t in args.maintenance.split(",") if t)
    child = Child(manager, args.logs, args.seed, run, finish, tasks)
    asyncio.run(child.main())


def _fork_child(args: argparse.Namespace, request: dict[str, Any]) -> int:
    """Fork a child that runs ``request``; its stdout/stderr go to files in the log folder."""
    run = int(request["run"])
    out = os.open(args.logs / f"run-{run:03d}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(args.logs / f"run-{run:03d}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    pid = os.fork()
    if pid:
        os.close(out)
        os.close(err)
        return pid
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        run_child(args, run, request.get("finish"))
        code = 0
    except BaseException:
        traceback.print_exc()
        print("error", flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def zygote(args: argparse.Namespace) -> None:
    """Fork server: import everything once, then fork one child per request line.

    A request is a JSON line ``{"run": N, "finish": M|null}``; the answer is ``pid P``.
    Children are reaped by the kernel (SIGCHLD ignored), so a killed child's pid vanishes
    from /proc as soon as it is dead and its locks are released.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    probe = args.db if args.backend == "postgres" else str(args.logs / "zygote-probe.db")
    build_manager(probe, args.backend)  # import lazy drivers (connects to nothing)
    os.write(1, b"ready\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        pid = _fork_child(args, json.loads(line))
        os.write(1, f"pid {pid}\n".encode())


def main() -> None:
    """Run one child now, or (``--zygote``) serve forked children to the harness."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True, help="database file, or DSN (postgres)")
    parser.add_argument("--logs", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run", type=int, default=0)
    parser.add_argument("--backend", default="sqlite")
    parser.add_argument("--finish", type=int, default=None)
    parser.add_argument("--maintenance", default="checkpoint,analyze,vacuum",
                        help="maintenance tasks run between writes, comma-separated")
    parser.add_argument("--zygote", action="store_true",
                        help="serve forked children (one per JSON line on stdin)")
    args = parser.parse_args()
    if args.zygote:
        zygote(args)
    else:
        run_child(args, args.run, args.finish)


if __name__ == "__main__":
    main()
