"""The producer of the spool's outage tests: a BatchDBManager with ``[spool] enabled``
writing recognisable operations at four priorities into PostgreSQL.

    python spool_child.py --dsn DSN --spool DIR --out DIR --first N --ops K [--rate R]

Operation ``n`` (``n = first .. first+K-1``) is, by ``n % 4``, at priority LOW, NORMAL,
HIGH or CRITICAL and does two things, each an operation of its own:

- ``INSERT`` into ``log`` (no primary key: a replay twice would show) of ``--rows`` rows
  ``(n, j)`` for ``j = 0..rows-1``: half an operation, or one written twice, shows;
- ``UPSERT`` into ``kv_<priority>`` of key ``n % 97`` with ``v = n``, and into ``shared``
  (one table for all priorities) of key ``n % 31`` with ``v = n``: the later submission
  must win within a table and across priorities.

Every operation is awaited ``until="durable"`` (committed or in the spool) a window at a
time; its number is then appended to ``acked.log`` (a whole line per ``write``). Failures
the producer sees are appended to ``failures.log``. With ``--rate`` the producer paces
itself to about that many operations per second. The child prints ``running`` once the
manager has started, ``done`` after a clean stop, its peak RSS (VmHWM) in
``peak_rss.txt`` and the spool's figures in ``spool_status.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path

from batchdb import BatchDBManager, Priority, load_settings

PRIORITIES = [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL]
KV_KEYS = 97
SHARED_KEYS = 31
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS log (n bigint NOT NULL, j int NOT NULL, p int NOT NULL)",
    *[f"CREATE TABLE IF NOT EXISTS kv_{p.name.lower()} (k int PRIMARY KEY, v bigint NOT NULL)"
      for p in PRIORITIES],
    "CREATE TABLE IF NOT EXISTS shared (k int PRIMARY KEY, v bigint NOT NULL)",
]


def peak_rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


async def produce(args: argparse.Namespace) -> int:
    out = Path(args.out)
    settings = load_settings(
        None, backend="postgres", maintenance={"enabled": False},
        postgres={"dsn": args.dsn, "connect_timeout_seconds": 2.0, "batch_size": 5000},
        batch={"max_memory_mb": args.memory_mb, "retry_base_delay_seconds": 0.05,
               "retry_max_delay_seconds": 0.5, "insert_batch_size": 5000},
        spool={"enabled": True, "path": args.spool, "after_seconds": 1.0})
    manager = BatchDBManager(settings=settings)
    acked = os.open(out / "acked.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    failures = os.open(out / "failures.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    await manager.start()
    print("running", flush=True)
    start = time.monotonic()
    window: list[tuple[int, list[str]]] = []
    failed = 0

    async def settle() -> None:
        nonlocal failed
        for n, ids in window:
            try:
                for op_id in ids:
                    await manager.wait(op_id, until="durable")
            except Exception as exc:
                failed += 1
                os.write(failures, f"{n} {type(exc).__name__}: {exc}\n".encode())
                continue
            os.write(acked, f"{n}\n".encode())
        window.clear()

    for n in range(args.first, args.first + args.ops):
        prio = PRIORITIES[n % 4]
        try:
            ids = [
                await manager.queue_operation(
                    "log", "INSERT", [{"n": n, "j": j, "p": int(prio)} for j in range(args.rows)],
                    prio),
                await manager.queue_operation(f"kv_{prio.name.lower()}", "UPSERT",
                                              [{"k": n % KV_KEYS, "v": n}], prio),
                await manager.queue_operation("shared", "UPSERT",
                                              [{"k": n % SHARED_KEYS, "v": n}], prio),
            ]
        except Exception as exc:
            failed += 1
            os.write(failures, f"{n} {type(exc).__name__}: {exc}\n".encode())
            continue
        window.append((n, ids))
        if len(window) >= args.window:
            await settle()
        if args.rate:
            ahead = (n - args.first + 1) / args.rate - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead)
    await settle()
    await manager.stop()
    spool = (await manager.get_queue_status())["spool"]
    (out / "spool_status.json").write_text(json.dumps(spool))
    (out / "peak_rss.txt").write_text(f"{peak_rss_kb()}\n")
    print("done", flush=True)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--ops", type=int, required=True)
    parser.add_argument("--rows", type=int, default=20, help="rows of each log INSERT")
    parser.add_argument("--rate", type=float, default=0.0, help="operations per second")
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--memory-mb", type=float, default=64.0)
    args = parser.parse_args()
    try:
        code = asyncio.run(produce(args))
    except Exception:
        traceback.print_exc()
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
