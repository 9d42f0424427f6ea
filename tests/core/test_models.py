"""The seed's data model: names, parsing, and what backends may rely on."""

from __future__ import annotations

import weakref

import pytest

from batchdb import BatchOperation, OperationType, Priority


def test_seed_fields_and_defaults() -> None:
    op = BatchOperation("id-1", "candles", OperationType.UPSERT, [{"a": 1}])
    assert (op.priority, op.estimated_size_mb, op.callback) == (Priority.NORMAL, 0.0, None)
    assert (op.is_processed, op.error, op.processing_time, op.processed_at) == (
        False, None, 0.0, None)
    assert op.created_at > 0
    # backends keep per-operation state in weak dictionaries (PostgreSQL's lost COMMITs)
    assert weakref.ref(op)() is op
    assert len({op, BatchOperation("id-1", "candles", OperationType.UPSERT, [])}) == 2


def test_priority_order_and_parsing() -> None:
    assert Priority.CRITICAL > Priority.HIGH > Priority.NORMAL > Priority.LOW
    assert Priority.parse("critical") is Priority.CRITICAL
    assert Priority.parse(" Low ") is Priority.LOW
    assert Priority.parse(2) is Priority.HIGH
    for bad in ("urgent", 9, True, None, 1.5):
        with pytest.raises(ValueError, match="priority must be one of"):
            Priority.parse(bad)  # type: ignore[arg-type]


def test_operation_type_parsing_and_hash() -> None:
    assert OperationType.parse("upsert") is OperationType.UPSERT
    assert OperationType.parse("DELETE") is OperationType.DELETE
    assert {OperationType.INSERT: 1}["INSERT"] == 1  # hashes as its text, like a str
    for bad in ("MERGE", "", 1, None):
        with pytest.raises(ValueError, match="operation_type must be one of"):
            OperationType.parse(bad)  # type: ignore[arg-type]
