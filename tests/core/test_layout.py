"""The layout holds: the library below, the programs above, no backend named in core.

``core/*.py`` is the library (``batchdb``): models, settings, schema, the backend contract,
the scheduler, the manager, the plugin manager. ``core/workloads/`` holds programs that
drive a manager (ingest, demo, bench) and ``core/cli.py`` the command line over them. The
library imports neither, nor a backend or plugin module: backends and plugins reach it
only through their entry points, like a third-party one would.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "core"
PACKAGE = "batchdb"

#: modules the library must not import (a module or anything below it)
PROGRAMS = ("batchdb.workloads", "batchdb.cli")
EXTENSIONS = ("batchdb.backends", "batchdb.plugins")

BUILT_IN_BACKENDS = frozenset({"sqlite", "duckdb", "postgres"})

#: Library files that still name a built-in backend, each to be fixed by the backend-contract
#: and backend-settings work of issue 12 (one backend registering exactly like a third-party
#: one). Remove a file from this set when it is fixed; the test below fails on a stale entry.
KNOWN_OFFENDERS = frozenset({
    # the value of the `backend` setting when nothing sets it: the embedded default has to be
    # named once, and a setting's default is where a reader looks for it
    "settings.py",
})


def _library_files() -> list[Path]:
    return sorted(p for p in CORE.glob("*.py") if p.name != "cli.py")


def _module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, absolute, with its line (``from . import x`` gives
    ``batchdb.x``, so a submodule imported by name is seen too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = PACKAGE  # core/*.py are the modules of the top-level package
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _dialect_arguments(tree: ast.AST) -> set[int]:
    """ids of string arguments naming a SQLAlchemy dialect for SQLAlchemy's per-dialect
    dispatch (``@compiles(element, "sqlite")``, ``type.with_variant(other, "sqlite")``).

    Those name SQLAlchemy's SQL dialect, which any backend on that database shares, not a
    batchdb backend plugin: the ``candles`` table's SQLite column types are a property of
    SQLite ``STRICT`` tables, whichever backend creates them.
    """
    ids: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("compiles", "with_variant"):
            ids.update(id(arg) for arg in node.args[1:] if isinstance(arg, ast.Constant))
    return ids


def _backend_names(path: Path) -> list[tuple[int, str]]:
    """String literals in ``path`` that are exactly the name of a built-in backend."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    exempt = _dialect_arguments(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in BUILT_IN_BACKENDS and id(node) not in exempt]


def test_the_files_are_where_the_layout_says() -> None:
    library = {p.name for p in _library_files()}
    assert {"__init__.py", "backend.py", "candles.py", "manager.py", "schema.py",
            "scheduler.py", "settings.py", "stats.py"} <= library
    assert not library & {"bench.py", "demo.py", "ingest.py"}, "programs belong in workloads/"
    workloads = CORE / "workloads"
    assert {p.name for p in workloads.glob("*.py")} >= {"__init__.py", "demo.py", "ingest.py",
                                                       "readers.py"}
    assert {p.name for p in (workloads / "bench").glob("*.py")} == {
        "__init__.py", "baselines.py", "data.py", "report.py", "runs.py"}


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: p.name)
def test_the_library_imports_no_program_and_no_backend(path: Path) -> None:
    wrong = [f"{path.name}:{line} imports {module}" for line, module in _imports(path)
             if _is_under(module, PROGRAMS + EXTENSIONS)]
    assert not wrong, "the library must not import workloads, the CLI, backends or plugins: " \
                      + "; ".join(wrong)


def test_the_import_walk_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from .workloads import bench\nfrom . import cli\n"
                      "import batchdb.backends.sqlite\nfrom .models import Priority\n")
    modules = {m for _, m in _imports(sample)}
    assert {"batchdb.workloads", "batchdb.workloads.bench", "batchdb.cli",
            "batchdb.backends.sqlite", "batchdb.models"} <= modules
    assert [m for m in sorted(modules) if _is_under(m, PROGRAMS + EXTENSIONS)] == [
        "batchdb.backends.sqlite", "batchdb.cli", "batchdb.workloads", "batchdb.workloads.bench"]


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_no_library_module_names_a_built_in_backend(path: Path) -> None:
    names = _backend_names(path)
    if path.name in KNOWN_OFFENDERS:
        assert names, f"{path.name} no longer names a built-in backend: remove it from " \
                      "KNOWN_OFFENDERS"
        return
    assert not names, f"{path.name} names built-in backends " + ", ".join(
        f"{value!r} (line {line})" for line, value in names) + ": core must treat every " \
        "backend alike; backend-specific code belongs in backends/<name>/"


def test_the_backend_name_check_sees_literals_but_not_dialect_dispatch(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('import sqlalchemy as sa\n'
                      'REAL = sa.Double().with_variant(sa.REAL(), "sqlite")\n'
                      'if backend == "duckdb":\n    pass\n'
                      '"""a docstring about sqlite"""\n')
    assert _backend_names(sample) == [(3, "duckdb")]
