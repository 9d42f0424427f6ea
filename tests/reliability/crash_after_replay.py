"""A manager that replays its spool and dies right after the first replayed batch commits,
before the spool notes it: ``python crash_after_replay.py SETTINGS_JSON`` (the arguments of
``load_settings``, the ``[spool]`` section included). Exits with code 9 at that moment; the
replay marks must keep the next replay from writing those operations twice."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from batchdb import BatchDBManager, hookimpl, load_settings
from batchdb.backend import Backend, Batch

CRASH_EXIT = 9


class CrashAfterReplayCommit:
    @hookimpl
    def batchdb_batch_committed(self, batch: Batch, seconds: float, backend: Backend) -> None:
        if any(op.spool_seq for op in batch.operations):
            os._exit(CRASH_EXIT)  # committed, not yet noted in the spool: a crash right there


async def main(overrides: dict[str, Any]) -> None:
    manager = BatchDBManager(settings=load_settings(None, **overrides),
                             plugins=[CrashAfterReplayCommit()])
    await manager.start()
    await asyncio.sleep(30)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
