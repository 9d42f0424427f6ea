"""Every hook is documented in docs/hooks.md with its exact signature and has a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from batchdb import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
SPECS = {name: fn for name, fn in vars(hookspecs).items()
         if name.startswith("batchdb_") and callable(fn)}


def test_every_hook_is_documented_with_its_signature() -> None:
    documented = dict(re.findall(r"^## (batchdb_\w+)\(([^)]*)\)", DOCS, flags=re.MULTILINE))
    assert set(documented) == set(SPECS), "docs/hooks.md and core/hookspecs.py differ"
    for name, fn in SPECS.items():
        params = list(inspect.signature(fn).parameters)
        shown = [p.strip() for p in documented[name].split(",") if p.strip()]
        assert shown == params, f"{name}: documented ({documented[name]}), spec {params}"


def test_every_hook_has_a_test_of_its_own() -> None:
    here = Path(__file__).resolve()
    sources = [p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("test_*.py")
               if p != here]
    untested = [name for name in SPECS
                if not any(re.search(rf"def {name}\(", text) for text in sources)]
    assert not untested, f"hooks without a test implementing them: {untested}"
