"""The demo workload: four producers of a trading system writing at once, at four priorities.

- a **trading bot** places and fills orders: single-row INSERTs and UPDATEs on ``orders``
  (CRITICAL);
- a **monitor** upserts the live 1-minute candle of five markets four times a second
  (HIGH, ``insert_candles_batch`` with Upbit-format dicts);
- a **chart viewer** backfills history in pages of 2,000 candles (NORMAL), five markets and
  five timeframes, at most 10,000 candles deep each (so repeated runs do not grow the file
  without end: they update the same rows);
- a **backtester** writes result rows to ``backtest_results`` in batches of 1,000 (LOW).

Prices follow a random walk. :class:`DemoWorkload` runs the producers as asyncio tasks on a
running :class:`~batchdb.BatchDBManager` and returns a :class:`DemoReport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from batchdb.candles import candles_table
from batchdb.manager import BatchDBManager
from batchdb.models import BatchDBError, BatchOperation, OperationFailed, OperationType, Priority
from batchdb.schema import quote_ident
from batchdb.stats import quantile

__all__ = [
    "DEMO_TABLES",
    "SYMBOLS",
    "DemoReport",
    "DemoWorkload",
    "ProducerStats",
    "backtest_results_table",
    "orders_table",
]

metadata = sa.MetaData()

orders_table = sa.Table(
    "orders",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("symbol", sa.Text, nullable=False),
    sa.Column("side", sa.Text, nullable=False, comment="buy or sell"),
    sa.Column("price", sa.Float, nullable=False),
    sa.Column("quantity", sa.Float, nullable=False),
    sa.Column("status", sa.Text, nullable=False, comment="open, filled"),
    sa.Column("created_at", sa.BigInteger, nullable=False, comment="epoch ms"),
    sa.Column("updated_at", sa.BigInteger, nullable=False, comment="epoch ms"),
)

backtest_results_table = sa.Table(
    "backtest_results",
    metadata,
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("strategy", sa.Text, nullable=False),
    sa.Column("symbol", sa.Text, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False, comment="simulated time, epoch ms"),
    sa.Column("equity", sa.Float, nullable=False),
    sa.Column("position", sa.Float, nullable=False),
    sa.Column("pnl", sa.Float, nullable=False),
    sa.PrimaryKeyConstraint("run_id", "strategy", "symbol", "step"),
)

#: the tables the demo declares (``candles`` is built in)
DEMO_TABLES: tuple[sa.Table, ...] = (orders_table, backtest_results_table)

SYMBOLS: tuple[str, ...] = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE")
_START_PRICES = {"KRW-BTC": 95_000_000.0, "KRW-ETH": 4_800_000.0, "KRW-XRP": 3_100.0,
                 "KRW-SOL": 280_000.0, "KRW-DOGE": 480.0}
_BACKFILL_TIMEFRAMES = ((1, "1m"), (5, "5m"), (15, "15m"), (60, "60m"), (240, "240m"))
_BACKFILL_PAGE = 200  # candles per call: the most Upbit serves a request
_BACKFILL_DEPTH = 10_000
_BACKTEST_BATCH = 1_000
_STRATEGIES = ("sma-cross-20-50", "breakout-55", "rsi-mean-revert")
_MINUTE_MS = 60_000


def _tick(price: float) -> float:
    """Round a price to five significant digits, as an exchange's tick size would."""
    return round(price, max(0, 4 - math.floor(math.log10(price))))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class ProducerStats:
    """What one producer wrote: operations and rows committed or failed, and latencies."""

    name: str
    priority: Priority
    table: str
    ops_ok: int = 0
    ops_failed: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=50_000))
    errors: list[str] = field(default_factory=list)
    crashed: str | None = None

    def record(self, op: BatchOperation) -> None:
        """Operation callback: count it, and its enqueue-to-commit latency."""
        if op.error is None:
            self.ops_ok += 1
            self.rows_ok += op.rows_affected
            if op.processed_at is not None:
                self.latencies.append(op.processed_at - op.created_at)
        else:
            self.ops_failed += 1
            self.rows_failed += op.n_rows - op.rows_affected
            if len(self.errors) < 20:
                self.errors.append(f"{op.operation_id}: {op.error}")

    def latency_ms(self, q: float) -> float | None:
        """The nearest-rank ``q`` quantile (:func:`batchdb.stats.quantile`, the one every
        p50/p99 batchdb prints comes from) of this producer's commit latencies, in ms."""
        if not self.latencies:
            return None
        return quantile(sorted(self.latencies), q) * 1000


@dataclass
class DemoReport:
    """The closing figures of a demo run."""

    seconds: float
    elapsed: float
    producers: list[ProducerStats]
    table_rows: dict[str, int]
    rows_committed: int
    batches_committed: int
    commit_latency: dict[str, float | None]
    database: str
    backend: str
    interrupted: str | None = None

    @property
    def ops_ok(self) -> int:
        """Operations committed."""
        return sum(p.ops_ok for p in self.producers)

    @property
    def ops_failed(self) -> int:
        """Operations that failed."""
        return sum(p.ops_failed for p in self.producers)

    @property
    def throughput(self) -> float:
        """Rows committed per second of the run."""
        return self.rows_committed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True when no operation failed and no producer crashed."""
        return self.ops_failed == 0 and not any(p.crashed for p in self.producers)


StatusSink = Callable[[dict[str, Any], float], None]


class DemoWorkload:
    """Runs the four demo producers against a running manager.

    The manager must have ``orders`` and ``backtest_results`` declared
    (``BatchDBManager.from_settings(tables=DEMO_TABLES)``) or present in the database.
    """

    def __init__(self, manager: BatchDBManager, *, seed: int | None = None) -> None:
        self.manager = manager
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"
        self.prices = dict(_START_PRICES)
        self.bot = ProducerStats("trading bot", Priority.CRITICAL, orders_table.name)
        self.monitor = ProducerStats("monitor (live 1m)", Priority.HIGH, candles_table.name)
        self.chart = ProducerStats("chart backfill", Priority.NORMAL, candles_table.name)
        self.backtest = ProducerStats("backtester", Priority.LOW, backtest_results_table.name)
        self.producers = [self.bot, self.monitor, self.chart, self.backtest]
        self._stop = asyncio.Event()
        self.interrupted: str | None = None

    def request_stop(self, reason: str | None = None) -> None:
        """End the run early (a signal): producers stop, what is queued is committed."""
        if reason is not None and self.interrupted is None:
            self.interrupted = reason
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once the run is ending."""
        return self._stop.is_set()

    # ------------------------------------------------------------------ the run
    async def run(self, seconds: float, on_status: StatusSink | None = None,
                  status_interval: float = 0.25) -> DemoReport:
        """Run the producers for ``seconds`` (or until :meth:`request_stop`), commit
        everything, then read the row counts back from the database."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        manager = self.manager
        before = (await manager.get_queue_status()).get("stats", {})
        start = time.monotonic()
        jobs = [(self.bot, self._trading_bot()), (self.monitor, self._monitor()),
                (self.chart, self._chart_backfill()), (self.backtest, self._backtester())]
        tasks = {asyncio.create_task(self._guard(stats, job), name=f"demo {stats.name}")
                 for stats, job in jobs}
        reporter = None
        if on_status is not None:
            reporter = asyncio.create_task(self._report_status(on_status, start,
                                                               status_interval))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        self._stop.set()
        await asyncio.gather(*tasks)
        await manager.flush()
        elapsed = time.monotonic() - start
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        status = await manager.get_queue_status()
        if on_status is not None:
            on_status(status, elapsed)
        after = status.get("stats", {})
        backend_status = await manager.backend.status()
        database = str(backend_status.get("path") or backend_status.get("dsn") or
                       manager.backend_name)
        return DemoReport(
            seconds=seconds,
            elapsed=elapsed,
            producers=self.producers,
            table_rows=await self._count_rows(),
            rows_committed=after.get("rows_committed", 0) - before.get("rows_committed", 0),
            batches_committed=(after.get("batches_committed", 0)
                               - before.get("batches_committed", 0)),
            commit_latency=status.get("commit_latency", {}),
            database=database,
            backend=manager.backend_name,
            interrupted=self.interrupted,
        )

    async def _guard(self, stats: ProducerStats, job: Awaitable[None]) -> None:
        """Run one producer; an error stops that producer alone and is reported."""
        try:
            await job
        except (BatchDBError, ValueError, RuntimeError) as exc:
            stats.crashed = f"{type(exc).__name__}: {exc}"

    async def _report_status(self, sink: StatusSink, start: float, interval: float) -> None:
        while True:
            sink(await self.manager.get_queue_status(), time.monotonic() - start)
            await asyncio.sleep(interval)

    async def _count_rows(self) -> dict[str, int]:
        counts = {}
        for table in (orders_table.name, candles_table.name, backtest_results_table.name):
            try:
                rows = await self.manager.fetch(f"SELECT COUNT(*) FROM {quote_ident(table)}")  # noqa: S608
            except Exception:  # the table was never created (its producer failed first)
                continue
            counts[table] = int(rows[0][0])
        return counts

    async def _settle(self, pending: deque[str], keep: int) -> None:
        """Wait until at most ``keep`` of a producer's operations are still queued."""
        while len(pending) > keep:
            with contextlib.suppress(OperationFailed):
                await self.manager.wait(pending.popleft())

    def _walk(self, symbol: str, scale: float = 0.0008) -> float:
        price = self.prices[symbol] * math.exp(self.rng.gauss(0.0, scale))
        self.prices[symbol] = price
        return _tick(price)

    # ------------------------------------------------------------------ producers
    async def _trading_bot(self) -> None:
        """Place orders one at a time (INSERT) and fill older ones (UPDATE), CRITICAL."""
        manager, rng = self.manager, self.rng
        open_orders: deque[str] = deque()
        n = 0
        while not self._stop.is_set():
            symbol = rng.choice(SYMBOLS)
            now = int(time.time() * 1000)
            order_id = f"{self.run_id}-{n:07d}"
            n += 1
            order = {
                "order_id": order_id, "symbol": symbol, "side": rng.choice(("buy", "sell")),
                "price": _tick(self.prices[symbol] * (1 + rng.uniform(-0.001, 0.001))),
                "quantity": round(rng.uniform(0.001, 2.0), 4), "status": "open",
                "created_at": now, "updated_at": now,
            }
            await manager.queue_operation(orders_table.name, OperationType.INSERT, [order],
                                          Priority.CRITICAL, self.bot.record)
            open_orders.append(order_id)
            if len(open_orders) > 20 or rng.random() < 0.4:
                fill = {"order_id": open_orders.popleft(), "status": "filled",
                        "updated_at": now}
                await manager.queue_operation(orders_table.name, OperationType.UPDATE, [fill],
                                              Priority.CRITICAL, self.bot.record)
            await asyncio.sleep(rng.uniform(0.002, 0.012))

    async def _monitor(self) -> None:
        """Upsert the live 1m candle of every market four times a second, HIGH."""
        live: dict[str, dict[str, Any]] = {}
        while not self._stop.is_set():
            now_ms = int(time.time() * 1000)
            minute = now_ms - now_ms % _MINUTE_MS
            for symbol in SYMBOLS:
                price = self._walk(symbol)
                volume = round(self.rng.uniform(0.01, 0.5), 8)
                candle = live.get(symbol)
                if candle is None or candle["timestamp"] < minute:
                    candle = live[symbol] = {
                        "market": symbol, "candle_date_time_utc": _iso(minute),
                        "candle_date_time_kst": _iso(minute + 9 * 3_600_000),
                        "opening_price": price, "high_price": price, "low_price": price,
                        "trade_price": price, "timestamp": now_ms,
                        "candle_acc_trade_volume": 0.0, "candle_acc_trade_price": 0.0,
                        "unit": 1,
                    }
                candle["high_price"] = max(candle["high_price"], price)
                candle["low_price"] = min(candle["low_price"], price)
                candle["trade_price"] = price
                candle["timestamp"] = now_ms
                candle["candle_acc_trade_volume"] = round(
                    candle["candle_acc_trade_volume"] + volume, 8)
                candle["candle_acc_trade_price"] = round(
                    candle["candle_acc_trade_price"] + volume * price, 2)
                await self.manager.insert_candles_batch(symbol, "1m", [dict(candle)],
                                                        Priority.HIGH, self.monitor.record)
            await asyncio.sleep(0.25)

    def _history_page(self, symbol: str, unit: int, newest_ms: int, count: int,
                      close: float) -> tuple[list[dict[str, Any]], float]:
        """``count`` Upbit-format candles ending at ``newest_ms``, newest first, whose
        newest close is ``close``; returns them and the oldest open (the next page's close)."""
        step = unit * _MINUTE_MS
        ts = newest_ms - step * np.arange(count, dtype=np.int64)
        moves = self.np_rng.normal(0.0, 0.0015 * math.sqrt(unit), count)
        closes = close * np.exp(-np.concatenate(([0.0], np.cumsum(moves[:-1]))))
        opens = closes * np.exp(-moves)
        spread = np.abs(self.np_rng.normal(0.0, 0.0008 * math.sqrt(unit), count))
        highs = np.maximum(opens, closes) * (1 + spread)
        lows = np.minimum(opens, closes) * (1 - spread)
        volumes = self.np_rng.gamma(2.0, 0.5 * unit, count)
        dates = ts.astype("datetime64[ms]").astype("datetime64[s]").astype(str).tolist()
        candles = [
            {"market": symbol, "candle_date_time_utc": d, "opening_price": _tick(o),
             "high_price": _tick(h), "low_price": _tick(lo), "trade_price": _tick(c),
             "timestamp": t + step - 1, "candle_acc_trade_volume": round(v, 8),
             "candle_acc_trade_price": round(v * c, 2), "unit": unit}
            for d, o, h, lo, c, t, v in zip(dates, opens.tolist(), highs.tolist(),
                                            lows.tolist(), closes.tolist(), ts.tolist(),
                                            volumes.tolist(), strict=True)
        ]
        return candles, float(opens[-1])

    async def _chart_backfill(self) -> None:
        """Page through history, 200 candles a call (as Upbit serves them), NORMAL; at most
        15 pages queued."""
        now_ms = int(time.time() * 1000)
        pending: deque[str] = deque()
        closes = {(s, u): self.prices[s] for s in SYMBOLS for u, _ in _BACKFILL_TIMEFRAMES}
        while not self._stop.is_set():
            for page in range(_BACKFILL_DEPTH // _BACKFILL_PAGE):
                for unit, timeframe in _BACKFILL_TIMEFRAMES:
                    step = unit * _MINUTE_MS
                    newest = now_ms - now_ms % step - step * (1 + page * _BACKFILL_PAGE)
                    for symbol in SYMBOLS:
                        if self._stop.is_set():
                            await self._settle(pending, 0)
                            return
                        candles, closes[symbol, unit] = await asyncio.to_thread(
                            self._history_page, symbol, unit, newest, _BACKFILL_PAGE,
                            closes[symbol, unit])
                        pending.append(await self.manager.insert_candles_batch(
                            symbol, timeframe, candles, Priority.NORMAL, self.chart.record))
                        await self._settle(pending, 15)
            closes = {(s, u): self.prices[s] for s, u in closes}  # next round: same rows

    async def _backtester(self) -> None:
        """Write simulated equity curves, 1,000 rows a call, LOW; at most 4 calls queued."""
        rng = self.rng
        pending: deque[str] = deque()
        steps: dict[tuple[str, str], int] = {}
        equity: dict[tuple[str, str], float] = {}
        start_ms = int(datetime(2023, 1, 1, tzinfo=UTC).timestamp() * 1000)
        while not self._stop.is_set():
            key = (rng.choice(_STRATEGIES), rng.choice(SYMBOLS))
            first = steps.get(key, 0)
            value = equity.get(key, 10_000_000.0)
            rows = []
            position = 0.0
            for step in range(first, first + _BACKTEST_BATCH):
                if rng.random() < 0.05:
                    position = rng.choice((-1.0, 0.0, 1.0))
                pnl = value * position * rng.gauss(0.0, 0.002)
                value += pnl
                rows.append({"run_id": self.run_id, "strategy": key[0], "symbol": key[1],
                             "step": step, "ts": start_ms + step * _MINUTE_MS,
                             "equity": round(value, 2), "position": position,
                             "pnl": round(pnl, 2)})
            steps[key] = first + _BACKTEST_BATCH
            equity[key] = value
            pending.append(await self.manager.queue_operation(
                backtest_results_table.name, OperationType.INSERT, rows, Priority.LOW,
                self.backtest.record))
            await self._settle(pending, 4)
            await asyncio.sleep(0.05)
        await self._settle(pending, 0)
