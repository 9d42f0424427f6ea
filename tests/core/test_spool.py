"""The spool store on real files: format, checksums, torn tails, lock, permissions, full
disk. (The manager's use of it is tested on a real PostgreSQL server in
tests/backends/postgres/test_spool_outage.py, test_spool_ingest.py and
tests/reliability/test_spool_kill.py; on SQLite in tests/backends/sqlite/.)"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pickle
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import uuid
import zlib
import zoneinfo
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchdb.schema import TableInfo
from batchdb.spool import (
    FORMAT_VERSION,
    Spool,
    SpoolCorrupt,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    UnspoolableValue,
    inspect_spool,
)

TABLE = TableInfo("ticks", ("k", "v"), ("k",), {"k": "BIGINT", "v": "TEXT"}, frozenset({"k"}))
OTHER = TableInfo("orders", ("id", "qty"), ("id",))


def _append(spool: Spool, first: int, n: int = 3, table: TableInfo = TABLE,
            priority: int = 1) -> Any:
    ops = [(f"op-{first + i}", priority, 1.5, [(first + i, f"v{first + i}")]) for i in range(n)]
    return spool.append(table, "INSERT", table.columns, Spool.encode(ops), n, n, priority)


def _ids(spool: Spool, table: str = "ticks") -> list[str]:
    return [op[0] for record in spool.records(table) for op in record.ops]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_records_come_back_in_order_with_their_values(root: Path) -> None:
    values = (None, True, 7, 2**70, 1.25, "tëxt", b"\x00bytes", Decimal("1.10"),
              dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), dt.date(2024, 1, 2),
              dt.time(1, 2), dt.timedelta(seconds=3), uuid.UUID(int=5), [1, "a"], {"j": 1},
              dt.datetime(2024, 5, 1, 9, tzinfo=zoneinfo.ZoneInfo("Asia/Seoul")))
    with Spool(root) as spool:
        ops = [("a", 3, 1.0, [(1, v)]) for v in values]
        entry = spool.append(TABLE, "UPSERT", TABLE.columns, Spool.encode(ops), len(ops),
                             len(ops), 3)
        record = spool.read(entry)
        assert record.operation_type == "UPSERT" and record.columns == ("k", "v")
        assert [op[3][0][1] for op in record.ops] == list(values)
        assert list(entry.seqs) == list(range(1, len(values) + 1))


def test_reopened_spool_keeps_pending_records_and_table_descriptions(root: Path) -> None:
    with Spool(root) as spool:
        first = _append(spool, 0)
        _append(spool, 3)
        _append(spool, 0, table=OTHER, priority=3)
        spool.mark_done([first])
        spool_id = spool.spool_id
    with Spool(root) as spool:
        assert spool.spool_id == spool_id
        assert _ids(spool) == ["op-3", "op-4", "op-5"]
        assert spool.table_info("ticks") == TABLE  # kept for a start while the db is down
        assert spool.table_info("orders") == OTHER
        assert spool.tables() == ["orders", "ticks"]  # the highest priority first
        assert spool.pending_ops == 6


def test_sequence_numbers_are_never_reused(root: Path) -> None:
    """``(spool id, seq)`` names an operation in the database's replay marks: a spool that
    was emptied and deleted its segments must not hand the same numbers out again."""
    with Spool(root) as spool:
        entry = _append(spool, 0)
        spool.mark_done([entry])
        assert spool.pending_ops == 0
    with Spool(root) as spool:
        again = _append(spool, 10)
        assert again.first_seq == entry.first_seq + entry.count


def test_replayed_segments_are_deleted(root: Path) -> None:
    with Spool(root, segment_bytes=400) as spool:
        entries = [_append(spool, i * 3) for i in range(6)]
        segments = sorted(root.glob("seg-*.log"))
        assert len(segments) >= 3
        spool.mark_done(entries[:2])
        assert not segments[0].exists()  # its records are all replayed
        spool.mark_done(entries[2:])
        assert spool.pending_ops == 0 and spool.pending_bytes == 0
        assert len(list(root.glob("seg-*.log"))) == 1  # one empty, active segment
        assert (root / "done.log").stat().st_size == 0
    with Spool(root) as spool:
        assert spool.pending_ops == 0


def test_done_marks_survive_a_reopen_between_segments(root: Path) -> None:
    with Spool(root, segment_bytes=400) as spool:
        entries = [_append(spool, i * 3) for i in range(6)]
        spool.mark_done([entries[1], entries[4]])  # out of order, as tables replay apart
    with Spool(root, segment_bytes=400) as spool:
        assert _ids(spool) == [f"op-{i}" for e in (0, 2, 3, 5) for i in range(e * 3, e * 3 + 3)]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_records=st.integers(1, 6), cut=st.floats(0.0, 1.0, exclude_max=True),
       flip=st.booleans())
def test_a_torn_tail_is_dropped_and_every_earlier_record_survives(
        tmp_path: Path, n_records: int, cut: float, flip: bool) -> None:
    root = tmp_path / f"spool-{uuid.uuid4().hex}"
    with Spool(root) as spool:
        entries = [_append(spool, i * 3) for i in range(n_records)]
    last = entries[-1]
    segment = root / f"seg-{last.segment:010d}.log"
    data = segment.read_bytes()
    assert len(data) == last.offset + last.length
    if flip:  # the whole record is there but a byte of it is wrong
        pos = last.offset + int(cut * last.length)
        data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
    else:  # the append stopped at a random byte of the last record
        data = data[:last.offset + int(cut * last.length)]
    segment.write_bytes(data)
    with Spool(root) as spool:
        assert _ids(spool) == [f"op-{i}" for i in range((n_records - 1) * 3)]
        assert spool.torn_bytes == len(data) - last.offset
        # truncated at the last good record (with none left: to the segment's header)
        assert segment.stat().st_size == last.offset
        _append(spool, 100)  # and the spool goes on from there
    with Spool(root) as spool:
        assert _ids(spool)[-3:] == ["op-100", "op-101", "op-102"]
        assert spool.torn_bytes == 0


def test_damage_before_the_tail_is_reported(root: Path) -> None:
    with Spool(root, segment_bytes=400) as spool:
        entries = [_append(spool, i * 3) for i in range(6)]
    first = entries[0]
    segment = root / f"seg-{first.segment:010d}.log"
    data = bytearray(segment.read_bytes())
    data[first.offset + 20] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt, match="does not match its checksum, and it is not the tail"):
        Spool(root)


def _raw_record(payload_body: bytes) -> bytes:
    head = struct.pack("<BdQIIBH", 1, 1.0, 99, 1, 1, 1, 5) + b"ticks"
    shape = struct.pack("<H", 6) + b"INSERT" + struct.pack("<H", 0)
    payload = head + shape + payload_body
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def test_the_reader_loads_data_never_code(root: Path) -> None:
    """A record whose pickle names a callable (a spool file crafted by someone) is refused:
    the unpickler loads only the value types the spool writes."""
    with Spool(root) as spool:
        _append(spool, 0)
        segment = root / f"seg-{spool.pending('ticks')[0].segment:010d}.log"
    evil = pickle.dumps([("x", 1, 1.0, [(os.system, "true")])])
    with open(segment, "ab") as fh:
        fh.write(_raw_record(evil))
    with Spool(root) as spool:
        record = spool.pending("ticks")[-1]
        with pytest.raises(SpoolCorrupt, match="posix.system|os.system"):
            spool.read(record)


def test_a_value_the_spool_does_not_keep_names_its_operation() -> None:
    ops = [("a", 1, 1.0, [(1, "x")]), ("b", 1, 1.0, [(2, object())]), ("c", 1, 1.0, [(3, 1)])]
    with pytest.raises(UnspoolableValue, match="builtins.object") as info:
        Spool.encode(ops)
    assert info.value.index == 1


def test_a_second_process_gets_a_clear_error(root: Path) -> None:
    with Spool(root):
        with pytest.raises(SpoolLocked, match=f"in use by another process \\(pid {os.getpid()}"):
            Spool(root)
        script = ("import sys\nfrom batchdb.spool import Spool, SpoolLocked\n"
                  "try:\n    Spool(sys.argv[1])\nexcept SpoolLocked as exc:\n"
                  "    print(exc)\n    sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert "lock file" in proc.stdout and str(root) in proc.stdout
    with Spool(root):  # released on close
        pass


def test_the_lock_goes_with_a_killed_process(root: Path) -> None:
    script = ("import sys, time\nfrom batchdb.spool import Spool\n"
              "s = Spool(sys.argv[1])\nprint('open', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
        with pytest.raises(SpoolLocked):
            Spool(root)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with Spool(root):
        pass


def test_directory_and_files_are_private(root: Path) -> None:
    old = os.umask(0o022)
    try:
        with Spool(root, segment_bytes=400) as spool:
            entries = [_append(spool, i * 3) for i in range(4)]
            spool.mark_done(entries[:1])
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    files = list(root.iterdir())
    assert {p.name for p in files} >= {"lock", "meta.json", "tables.json", "done.log"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_an_existing_open_directory_is_made_private(root: Path) -> None:
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    with Spool(root):
        pass
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def _other_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.skip("no other user on this machine")


def test_another_users_spool_is_refused(root: Path) -> None:
    other = _other_user()
    with Spool(root):
        pass
    os.chown(root, other.pw_uid, other.pw_gid)
    with pytest.raises(SpoolError, match=f"belongs to {other.pw_name}"):
        Spool(root)


def test_a_file_of_another_user_in_the_spool_is_refused(root: Path) -> None:
    other = _other_user()
    with Spool(root) as spool:
        _append(spool, 0)
    os.chown(root / "tables.json", other.pw_uid, other.pw_gid)
    with pytest.raises(SpoolError, match="tables.json belongs to"):
        Spool(root)


@contextlib.contextmanager
def _tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """A small file system of its own (tmpfs), or a skip saying why there is none."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                           str(where)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_directory_that_is_not_writable_is_a_clear_error_at_start(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "size=1m", "mode=0700", "ro") as mount:
        with pytest.raises(SpoolError, match="not writable.*spool.path must be a writable"):
            Spool(mount)
        with pytest.raises(SpoolError, match="cannot create the directory"):
            Spool(mount / "spool")


def test_a_full_disk_appends_nothing_and_loses_nothing(tmp_path: Path) -> None:
    """A real file system that fills up: the append that does not fit raises SpoolFull and
    leaves no part of itself; what was appended before is intact, and once records are
    replayed (their segment deleted) appends work again."""
    with _tmpfs(tmp_path / "small", "size=256k", "mode=0700") as mount:
        root = mount / "spool"
        appended = []
        big = "x" * 20_000
        with Spool(root, segment_bytes=64 * 1024) as spool:
            with pytest.raises(SpoolFull, match="disk is full"):
                for i in range(100):
                    ops = [(f"op-{i}", 1, 1.0, [(i, big)])]
                    appended.append(spool.append(TABLE, "INSERT", TABLE.columns,
                                                 Spool.encode(ops), 1, 1, 1))
            assert appended, "nothing fitted at all"
            assert spool.pending_ops == len(appended)
        with Spool(root, segment_bytes=64 * 1024) as spool:
            assert spool.torn_bytes == 0  # no half record was left behind
            assert _ids(spool) == [f"op-{i}" for i in range(len(appended))]
            spool.mark_done(spool.pending("ticks")[:len(appended) // 2 + 1])
            ops = [("again", 1, 1.0, [(0, big)])]
            spool.append(TABLE, "INSERT", TABLE.columns, Spool.encode(ops), 1, 1, 1)
            assert _ids(spool)[-1] == "again"


def test_over_its_size_limit_the_spool_refuses_the_append(root: Path) -> None:
    with Spool(root, max_bytes=1000) as spool:
        _append(spool, 0, n=3)  # the first one always gets in
        with pytest.raises(SpoolFull, match="spool.max_mb"):
            for i in range(1, 100):
                _append(spool, i * 3)
        held = spool.pending_ops
        assert held >= 3 and spool.pending_bytes <= 1000


def test_a_spool_of_another_format_version_is_refused(root: Path) -> None:
    with Spool(root):
        pass
    meta = json.loads((root / "meta.json").read_text())
    meta["version"] = FORMAT_VERSION + 1
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SpoolError, match=f"format version {FORMAT_VERSION + 1}"):
        Spool(root)


def test_inspect_reads_a_spool_another_process_holds(root: Path) -> None:
    assert inspect_spool(root) is None
    with Spool(root) as spool:
        entries = [_append(spool, i * 3) for i in range(3)]
        spool.mark_done(entries[:1])
        seen = inspect_spool(root)
        assert seen is not None
        assert seen["operations"] == spool.pending_ops == 6
        assert seen["bytes"] == spool.pending_bytes
        assert seen["tables"] == ["ticks"] and seen["oldest_age_seconds"] >= 0
