"""Managers with the metrics plugin on each backend, and the helpers the tests share: a
free port, reading an endpoint over HTTP, and the parsed samples by name and labels."""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ManagerFactory, managers

BACKENDS = ("sqlite", "duckdb", "postgres")


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick of an ephemeral one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> str:
    """The body of a GET, as text (blocking: call it through ``asyncio.to_thread``)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode("utf-8"))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition text, by (sample name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (a KeyError naming it when absent)."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise KeyError(f"no sample {name}{labels}; samples: {sorted(k[0] for k in samples)}")
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(params=BACKENDS)
async def make_backend_manager(request: pytest.FixtureRequest, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch
                               ) -> AsyncIterator[tuple[str, ManagerFactory]]:
    """(backend name, factory of managers on a fresh database of it); PostgreSQL on the
    session's throwaway server (skipped, with the reason, where none can be started)."""
    name: str = request.param
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("BATCHDB_")]:
        monkeypatch.delenv(key)
    section: dict[str, Any]
    if name == "postgres":
        section = {"dsn": request.getfixturevalue("pg_dsn")}
    else:
        section = {"path": str(tmp_path / f"metrics.{name}")}
    async with managers(name, section) as factory:
        yield name, factory
