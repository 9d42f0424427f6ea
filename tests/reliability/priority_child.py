"""A process writing one SQLite file beside others, for the cross-process priority tests and
benchmarks (tests/reliability/test_priority_processes.py, benchmarks/test_priority.py).

Run as ``python priority_child.py CONFIG_JSON``; it prints ``ready`` once its manager is
open, reads the wall-clock start time from stdin (one line), waits for it (plus ``delay``),
writes, prints one JSON line of results and exits. Roles:

- ``bot``: ``count`` one-row INSERTs into ``orders`` at ``priority``, one every ``interval``
  seconds, each awaited with ``wait()``; reports every latency (queue call to wait() return).
- ``bulk``: 1000-row (``op_rows``) UPSERTs over ``rows`` existing candles (new prices each
  pass) at ``priority`` until ``start_at + duration``, at most ``inflight`` operations
  outstanding, ``pause`` seconds between two; reports the rows committed inside the window.
- ``backlog``: queues ``ops`` operations of ``op_rows`` rows into ``bulk`` (key ``k``, the
  operation's number in ``b``) at once, then waits for them.
- ``orders``: like ``bot`` with ``count`` writes back to back, order ids from ``first``.
- ``critical_backlog``: the in-process workload: ``backlog`` candles queued at once at LOW
  as 1000-row UPSERTs, then ``count`` CRITICAL one-row INSERTs, one every ``interval``,
  each awaited with ``wait()``; reports the latencies and the LOW operations still queued
  when the last CRITICAL committed.
- ``ordered``: ``count`` CRITICAL one-row orders, one every ``interval``; right after each
  is queued (its batch is then announced to the other processes), reads the highest
  ``seq`` of the ``commit_log`` table (filled by the parent's triggers) from a connection
  of its own; reports ``[order_id, seq]`` per order.
- ``hold``: queues one CRITICAL order and waits for it (the parent holds the write lock:
  this child then waits for its turn until it is killed).

Every role writes its own order ids (``first`` + i), so the parent can check them all.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from typing import Any

from batchdb import BatchDBManager, OperationType, Priority, Settings
from batchdb.backends.sqlite import backend as sqlite_backend

T0_MS = 1_704_067_200_000
SYMBOLS = [f"KRW-C{i}" for i in range(10)]


def candle(i: int, variant: float) -> dict[str, Any]:
    """Existing candle number ``i`` (see :func:`fill`) with prices shifted by ``variant``."""
    price = 100.0 + i % 1000 * 0.01 + variant
    return {"symbol": SYMBOLS[i % 10], "timeframe": "1m", "ts": T0_MS + i // 10 * 60_000,
            "open_price": price, "high_price": price + 1.0, "low_price": price - 1.0,
            "close_price": price + 0.5, "volume": 1.0 + variant, "quote_volume": price,
            "source": "bench", "ingested_at": T0_MS}


def order(i: int) -> dict[str, Any]:
    """Order number ``i``."""
    return {"order_id": i, "symbol": SYMBOLS[i % 10], "side": "buy", "price": 100.0 + i % 7,
            "quantity": 0.001, "ts": T0_MS + i}


def _settings(cfg: dict[str, Any]) -> Settings:
    return Settings(_env_prefix="BATCHDB_PRIORITY_CHILD_UNUSED_", backend="sqlite",
                    sqlite={"path": cfg["path"]}, maintenance={"enabled": False},
                    batch=cfg.get("batch", {}))


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    role = cfg["role"]
    priority = Priority[cfg.get("priority", "LOW")]
    if "yield_seconds" in cfg:  # a test makes the bounded yield long enough for a slow CI
        sqlite_backend._YIELD_SECONDS = float(cfg["yield_seconds"])
    manager = BatchDBManager(settings=_settings(cfg))
    result: dict[str, Any] = {"role": role, "priority": priority.name}
    backlog = [candle(j, 1.0) for j in range(int(cfg.get("backlog", 0)))]
    async with manager:
        print("ready", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cfg["start_at"] = float(line or 0.0) + float(cfg.get("delay", 0.0))
        await _sleep_until(cfg["start_at"])
        if role == "critical_backlog":
            for i in range(0, len(backlog), 1000):
                await manager.queue_operation("candles", OperationType.UPSERT,
                                              backlog[i:i + 1000], Priority.LOW)
            latencies = []
            due = time.perf_counter()
            for i in range(int(cfg["count"])):
                start = time.perf_counter()
                op_id = await manager.queue_operation("orders", OperationType.INSERT,
                                                      [order(i)], Priority.CRITICAL)
                await manager.wait(op_id)
                latencies.append(time.perf_counter() - start)
                due += float(cfg["interval"])
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            status = await manager.get_queue_status()
            result["latencies"] = latencies
            result["low_left"] = status["queue_sizes"]["LOW"]
        elif role in ("bot", "orders"):
            latencies = []
            interval = float(cfg.get("interval", 0.0))
            first = int(cfg.get("first", 0))
            due = time.perf_counter()
            for i in range(int(cfg["count"])):
                start = time.perf_counter()
                op_id = await manager.queue_operation("orders", OperationType.INSERT,
                                                      [order(first + i)], priority)
                await manager.wait(op_id)
                latencies.append(time.perf_counter() - start)
                if interval:
                    due += interval
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
            result["latencies"] = latencies
        elif role == "bulk":
            rows, inflight = int(cfg["rows"]), int(cfg.get("inflight", 4))
            op_rows, pause = int(cfg.get("op_rows", 1000)), float(cfg.get("pause", 0.0))
            end = float(cfg["start_at"]) + float(cfg["duration"])
            committed = 0
            pending: list[str] = []
            i = variant = 0
            while time.time() < end:
                batch = [candle((i + j) % rows, variant + 1.0) for j in range(op_rows)]
                i += op_rows
                if i >= rows:
                    i, variant = 0, variant + 1
                pending.append(await manager.queue_operation(
                    "candles", OperationType.UPSERT, batch, priority))
                if len(pending) >= inflight:
                    await manager.wait(pending.pop(0))
                    committed += op_rows
                if pause:
                    await asyncio.sleep(pause)
            result["rows_in_window"] = committed
            result["seconds"] = float(cfg["duration"])
        elif role == "backlog":
            op_rows = int(cfg["op_rows"])
            ids = []
            for b in range(int(cfg["ops"])):
                rows = [{"k": b * op_rows + j, "b": b} for j in range(op_rows)]
                ids.append(await manager.queue_operation("bulk", OperationType.INSERT,
                                                         rows, priority))
            for op_id in ids:
                await manager.wait(op_id)
        elif role == "ordered":
            probe = sqlite3.connect(cfg["path"])
            rounds = []
            first = int(cfg.get("first", 0))
            for i in range(int(cfg["count"])):
                await asyncio.sleep(float(cfg["interval"]))
                op_id = await manager.queue_operation("orders", OperationType.INSERT,
                                                      [order(first + i)], Priority.CRITICAL)
                seen = probe.execute("SELECT coalesce(max(seq), 0) FROM commit_log")
                rounds.append([first + i, seen.fetchone()[0]])
                await manager.wait(op_id)
            probe.close()
            result["rounds"] = rounds
        elif role == "hold":
            op_id = await manager.queue_operation("orders", OperationType.INSERT,
                                                  [order(int(cfg.get("first", 0)))],
                                                  Priority.CRITICAL)
            print("queued", flush=True)
            await manager.wait(op_id)
        else:
            raise SystemExit(f"unknown role {role!r}")
    return result


def main() -> None:
    cfg = json.loads(sys.argv[1])
    result = asyncio.run(run(cfg))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
