"""The built wheel holds every module of core/, backends/ and plugins/ under ``batchdb``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPING = {"core": "batchdb", "backends": "batchdb/backends", "plugins": "batchdb/plugins"}


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("batchdb-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    expected = {
        f"{MAPPING[src.relative_to(ROOT).parts[0]]}/"
        f"{'/'.join(src.relative_to(ROOT).parts[1:])}"
        for folder in MAPPING
        for src in (ROOT / folder).rglob("*.py")
    }
    assert expected, "no source files found"
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert "batchdb/py.typed" in names
    assert not any(n.startswith(("core/", "backends/", "plugins/", "tests/")) for n in names)
    for line in ("sqlite = batchdb.backends.sqlite", "upbit = batchdb.plugins.upbit",
                 "batchdb = batchdb.cli:main"):
        assert line in entry_points
