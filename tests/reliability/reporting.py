"""The figures of a reliability run, for the README's "Guarantees" section.

Each test that produces figures calls :func:`record` with its section; the sections are
merged into the JSON file named by ``$BATCHDB_RELIABILITY_REPORT`` (if set) under a file
lock, so several modules (or pytest-xdist workers) can add to one report. The merged report
is printed as well (visible with ``pytest -s``).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["REPORT_ENV", "TOTALS", "record"]

REPORT_ENV = "BATCHDB_RELIABILITY_REPORT"

#: figures summed over the sections into ``totals``
TOTALS = ("kills", "acknowledged_ops_checked", "faults_injected", "hostile_cases_tried",
          "operations_lost", "half_applied_operations")


def _totals(sections: dict[str, dict[str, Any]]) -> dict[str, int]:
    totals = dict.fromkeys(TOTALS, 0)
    for figures in sections.values():
        for key in TOTALS:
            value = figures.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                totals[key] += value
    return totals


def record(section: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Add ``figures`` as ``section`` of the report; write and print the merged report."""
    stamped = {**figures, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path_text = os.environ.get(REPORT_ENV)
    report: dict[str, Any] = {"sections": {section: stamped}}
    if path_text:
        path = Path(path_text)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            text = fh.read()
            try:
                old = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError:
                old = {}
            sections = dict(old.get("sections", {})) if isinstance(old, dict) else {}
            sections[section] = stamped
            report = {"sections": sections}
            report["totals"] = _totals(sections)
            report["environment"] = {"python": platform.python_version(),
                                     "sqlite": sqlite3.sqlite_version,
                                     "machine": platform.machine(),
                                     "cpus": os.cpu_count()}
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    else:
        report["totals"] = _totals(report["sections"])
    print(f"\nbatchdb reliability figures ({section}):\n"
          + json.dumps({"section": stamped, "totals": report["totals"]}, indent=2,
                       sort_keys=True))
    return report
