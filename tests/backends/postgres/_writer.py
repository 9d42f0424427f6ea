"""One writer process for test_faults.py: its own BatchDBManager writing into shared tables.

    python _writer.py <dsn> <writer number> <operations> <rows per operation>

Writes ids ``writer * 1_000_000 + i`` into ``shared`` with INSERT operations of varying
size (some of one row, some of many), and one symbol's candles through
insert_candles_batch; prints ``OK <acknowledged operations>`` when every one committed.
"""

from __future__ import annotations

import asyncio
import sys

from batchdb import BatchDBManager, Priority


async def main(dsn: str, writer: int, n_ops: int, per_op: int) -> None:
    manager = BatchDBManager.from_settings(
        None, backend="postgres", postgres={"dsn": dsn, "pool_size": 2, "batch_size": 2000},
        maintenance={"enabled": False})
    acked = 0
    async with manager:
        ids = []
        next_id = writer * 1_000_000
        for i in range(n_ops):
            size = 1 if i % 3 == 0 else per_op
            rows = [{"id": next_id + k, "writer": writer, "payload": f"w{writer}-{i}-{k}"}
                    for k in range(size)]
            next_id += size
            ids.append(await manager.queue_operation("shared", "INSERT", rows,
                                                     Priority.NORMAL if i % 2 else "HIGH"))
        candles = [{"candle_date_time_utc": f"2024-01-01T{h:02d}:{m:02d}:00",
                    "opening_price": 1.0, "high_price": 2.0, "low_price": 0.5,
                    "trade_price": 1.5, "candle_acc_trade_volume": 3.0,
                    "candle_acc_trade_price": 4.5} for h in range(4) for m in range(60)]
        ids.append(await manager.insert_candles_batch(f"KRW-W{writer}", "1m", candles))
        await manager.flush()
        for op_id in ids:
            await manager.wait(op_id)  # raises if any operation failed
            acked += 1
    print(f"OK {acked}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
