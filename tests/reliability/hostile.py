"""Hostile operations for the property tests of promise 3 (``test_hostile*.py``).

Strategies generate flush windows of good and hostile operations on a set of tables
described by :class:`Spec`; :func:`predict_call` says which calls must be refused at once,
and :func:`submit` makes the calls and checks those refusals. Each backend's test module
brings its tables and a reference that says what the database must do with the rest.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from hypothesis import strategies as st

from batchdb import BatchDBManager, OperationFailed, OperationType, Priority, SchemaError
from batchdb.plugins.upbit import normalize_upbit_candles

__all__ = [
    "HOSTILE_NAMES",
    "HOSTILE_VALUES",
    "SYMBOLS",
    "WEIRD",
    "Op",
    "Spec",
    "assert_same_rows",
    "cases",
    "check_outcomes",
    "check_shape_message",
    "final_write",
    "predict_call",
    "q",
    "shape_problem",
    "submit",
]

WEIRD = 'we"ird; DROP TABLE s; -- /* select */'
SYMBOLS = ("KRW-BTC", "KRW-ETH")


@dataclass(frozen=True)
class Spec:
    """What the test knows of a table: the kind of value each column takes (``INTEGER``,
    ``INT32``, ``REAL``, ``NUMBER``, ``TEXT``, ``BLOB``, ``BOOLEAN``, anything else: any),
    key, required columns."""

    name: str
    types: dict[str, str]
    pk: tuple[str, ...]
    required: tuple[str, ...]  # NOT NULL without a default
    rowid_key: bool = False  # INTEGER PRIMARY KEY: NULL there means "assign a rowid"

    @property
    def columns(self) -> tuple[str, ...]:
        """Column names in table order."""
        return tuple(self.types)



def q(name: str) -> str:
    """Quote an identifier (the test's own, independent of batchdb's)."""
    return '"' + name.replace('"', '""') + '"'



# ---------------------------------------------------------------------- values
HUGE_TEXT = st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "ж", "\x00", "€", "🙂"]),
                      st.integers(1 << 20, 3 << 20))
HUGE_BLOB = st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255),
                      st.integers(1 << 20, 3 << 20))
TEXT = st.text(max_size=24)  # any code point but surrogates, NUL included
BINARY = st.binary(max_size=24)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
INT64 = st.integers(-(2**63), 2**63 - 1)


def _good(kind: str) -> st.SearchStrategy[Any]:
    if kind == "INTEGER":
        return INT64
    if kind == "REAL":
        return FLOATS
    if kind == "TEXT":
        return TEXT
    if kind == "BLOB":
        return BINARY
    if kind == "INT32":
        return st.integers(-(2**31), 2**31 - 1)
    if kind == "BOOLEAN":
        return st.booleans()
    if kind == "NUMBER":
        return st.one_of(INT64, FLOATS, st.decimals(allow_nan=False, allow_infinity=False))
    return st.one_of(st.none(), INT64, FLOATS, TEXT, BINARY)


HOSTILE_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 2**63, -(2**63) - 1, 2**70, True, False,
                     "", "\x00", "a\x00b", "\ud800", "x\udfffy", "12", "-7.5", "abc",
                     "Robert'); DROP TABLE s;--", "nan", "NaN", "-Infinity", b"", b"\x00\xff",
                     None, 0.0, -0.0, 1e308,
                     5e-324, Decimal("1.5"), complex(1, 2)]),
    st.builds(dict, st.just({"a": 1})), st.builds(list, st.just([1, 2])),
    st.builds(set, st.just({1})), st.builds(tuple, st.just((1,))),
    TEXT, BINARY, FLOATS, st.integers(), HUGE_TEXT, HUGE_BLOB,
)

HOSTILE_NAMES = st.one_of(
    st.sampled_from([
        "s; DROP TABLE s; --", 's" WHERE 1=1; --', "s/*", "s --", "' OR '1'='1", "S",
        "sqlite_master", "sqlite_schema", "main.s", "[s]", "`s`", "s\x00", "", "SELECT",
        "DROP TABLE loose", "loose;", 'we"ird', WEIRD.upper(), "x" * 129, "candles ",
        "rowid", "oid", "_rowid_", "ID", "Name", "k)--", '"', "''", ";", "-- c ", "/* z*/",
    ]),
    st.text(alphabet=st.sampled_from(list("\"';-/*() \x00séLECT")), min_size=1, max_size=12),
)
NON_STR_NAMES = st.sampled_from([1, 2.5, None, b"s", ("s",), True])


# ---------------------------------------------------------------------- operations
@dataclass
class Op:
    """One generated call."""

    via: str  # "queue" or "candles" (insert_candles_batch)
    table: Any
    op_type: Any
    rows: Any
    priority: Any
    label: str
    symbol: str = "KRW-BTC"


def _key_value(draw: st.DrawFn, spec: Spec, column: str) -> Any:
    if spec.name == "candles":
        if column == "symbol":
            return draw(st.sampled_from(SYMBOLS))
        if column == "timeframe":
            return "1m"
        return draw(st.integers(0, 10**6)) * 60_000
    if spec.types[column] == "TEXT":
        return f"k{draw(st.integers(0, 10**6))}"
    return draw(st.integers(10, 10**6))


def _key_of(spec: Spec, row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in spec.pk)


@st.composite
def operations(draw: st.DrawFn, used: dict[str, list[tuple[Any, ...]]],
               specs: Mapping[str, Spec]) -> Op:
    """One operation, good or hostile, on one of ``specs``; ``used`` holds keys seen so far
    (for duplicates)."""
    label = draw(st.sampled_from(
        ["clean"] * 8 + ["bad_value"] * 6 + ["huge", "missing_col", "extra_col",
                                              "dup_in_op", "bad_later_row", "hostile_table",
                                              "non_str_table", "bad_call", "candles_batch"]))
    prio = draw(st.sampled_from(list(Priority)))
    if label == "candles_batch":
        return _candles_op(draw, prio)
    table = draw(st.sampled_from(list(specs)))
    spec = specs[table]
    op_type = draw(st.sampled_from(list(OperationType)))
    non_key = [c for c in spec.columns if c not in spec.pk]
    if op_type is OperationType.DELETE:
        extra = draw(st.lists(st.sampled_from(non_key), unique=True, max_size=2))
        columns = [*spec.pk, *extra]
    elif op_type is OperationType.UPDATE:
        columns = [*spec.pk, *draw(st.lists(st.sampled_from(non_key), unique=True,
                                            min_size=1))]
    else:
        optional = [c for c in non_key if c not in spec.required]
        columns = [*spec.required, *draw(st.lists(st.sampled_from(optional), unique=True))]
    columns = draw(st.permutations(columns))
    rows: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        # inserts mostly take new keys, keyed operations mostly hit keys already written
        odds = 2 if op_type in (OperationType.INSERT, OperationType.UPSERT) else 5
        existing = bool(used[table]) and draw(st.integers(1, odds)) > 1
        key = _twin(draw, spec, draw(st.sampled_from(used[table]))) if existing else tuple(
            _key_value(draw, spec, c) for c in spec.pk)
        row = dict(zip(spec.pk, key, strict=True))
        for c in columns:
            if c not in row:
                nullable = c not in spec.required and spec.name != "candles"
                row[c] = draw(st.one_of(st.none(), _good(spec.types[c])) if nullable
                              else _good(spec.types[c]))
        rows.append({c: row[c] for c in columns})
    _mutate(draw, label, spec, op_type, rows)
    for row in rows:
        if isinstance(row, dict) and all(c in row for c in spec.pk):
            try:
                key = _key_of(spec, row)
                hash(key)
            except TypeError:
                continue
            if not any(isinstance(v, float) and math.isnan(v) for v in key):
                used[table].append(key)
    op = Op("queue", table, op_type, rows, prio, label)
    if label == "hostile_table":
        op.table = draw(HOSTILE_NAMES)
    elif label == "non_str_table":
        op.table = draw(NON_STR_NAMES)
    elif label == "bad_call":
        _bad_call(draw, op)
    return op


def _mutate(draw: st.DrawFn, label: str, spec: Spec, op_type: OperationType,
            rows: list[Any]) -> None:
    columns = list(rows[0])
    if label in ("bad_value", "huge"):
        for _ in range(draw(st.integers(1, 2))):
            i = draw(st.integers(0, len(rows) - 1))
            c = draw(st.sampled_from(columns))
            value = draw(HUGE_TEXT | HUGE_BLOB if label == "huge" else HOSTILE_VALUES)
            if c in spec.pk and spec.rowid_key and (value is None or (
                    isinstance(value, float) and math.isnan(value))):
                value = math.inf  # a NULL rowid key means "any new id": order-dependent
            rows[i][c] = value
    elif label == "missing_col":
        i = draw(st.integers(0, len(rows) - 1))
        droppable = columns
        if spec.rowid_key and op_type is OperationType.INSERT and i == 0:
            # no key at all: new rowids, numbered in commit order, which priorities change
            droppable = [c for c in columns if c not in spec.pk] or columns
        c = draw(st.sampled_from(droppable))
        if i == 0:
            for row in rows:
                row.pop(c)  # the same columns everywhere: row 0 decides
        else:
            rows[i].pop(c)
    elif label == "extra_col":
        i = draw(st.integers(0, len(rows) - 1))
        name = draw(HOSTILE_NAMES | st.sampled_from(list(spec.columns)))
        rows[i][name] = draw(_good("ANY"))
    elif label == "dup_in_op":
        dup = dict(rows[0])
        for c in columns:
            if c not in spec.pk:
                dup[c] = draw(_good(spec.types[c]))
        rows.insert(draw(st.integers(1, len(rows))), dup)
    elif label == "bad_later_row":
        rows.append(dict(rows[0]))
        i = draw(st.integers(1, len(rows) - 1))
        rows[i] = draw(st.sampled_from([("a", "tuple"), "row", None, 7, [1, 2],
                                        {**rows[i], "zzz": 1}, {}]))


def _twin(draw: st.DrawFn, spec: Spec, key: tuple[Any, ...]) -> tuple[Any, ...]:
    """Sometimes the same key in another type the database finds equal ('7', 7.0 for 7)."""
    out = []
    for column, value in zip(spec.pk, key, strict=True):
        if spec.types[column] == "INTEGER" and type(value) is int and draw(st.integers(0, 3)) == 0:
            value = draw(st.sampled_from([str(value), float(value), f" {value} "]))
        out.append(value)
    return tuple(out)


def _bad_call(draw: st.DrawFn, op: Op) -> None:
    what = draw(st.sampled_from(["type", "prio", "container", "empty", "row0", "col"]))
    if what == "type":
        op.op_type = draw(st.sampled_from(["MERGE", "", "insert; drop", 3, None]))
    elif what == "prio":
        op.priority = draw(st.sampled_from(["URGENT", 7, -1, None, 2.5, "high;"]))
    elif what == "container":
        op.rows = draw(st.sampled_from([op.rows[0], "k=1", b"rows", {1, 2}, 42]))
    elif what == "empty":
        op.rows = []
    elif what == "row0":
        op.rows = [draw(st.sampled_from([("a", 1), "row", None, 3])), *op.rows[1:]]
    else:
        op.rows = [{draw(st.sampled_from([1, None, ("a",), 2.5])): 1, **op.rows[0]},
                   *op.rows[1:]]


def _candles_op(draw: st.DrawFn, prio: Priority) -> Op:
    symbol = draw(st.sampled_from(SYMBOLS))
    start = draw(st.integers(0, 10**6))
    candles: list[Any] = []
    for i in range(draw(st.integers(1, 4))):
        minute = start + i
        day, rest = divmod(minute, 1440)
        text = f"2024-{1 + (day // 28) % 12:02d}-{1 + day % 28:02d}T{rest // 60:02d}:" \
               f"{rest % 60:02d}:00"
        candles.append({"market": symbol, "candle_date_time_utc": text,
                        "opening_price": draw(FLOATS), "high_price": draw(FLOATS),
                        "low_price": draw(FLOATS), "trade_price": draw(FLOATS),
                        "candle_acc_trade_price": draw(FLOATS),
                        "candle_acc_trade_volume": draw(FLOATS), "unit": 1})
    if draw(st.booleans()):
        i = draw(st.integers(0, len(candles) - 1))
        field_name = draw(st.sampled_from(list(candles[i])))
        value = draw(HOSTILE_VALUES)
        candles[i][field_name] = value
    return Op("candles", "candles", OperationType.UPSERT, candles, prio, "candles_batch",
              symbol)


@st.composite
def cases(draw: st.DrawFn, specs: Mapping[str, Spec],
          template_rows: Mapping[str, list[dict[str, Any]]]) -> list[Op]:
    """A flush window: 2 to 10 operations on ``specs`` (whose tables hold
    ``template_rows``), good and hostile mixed."""
    used: dict[str, list[tuple[Any, ...]]] = {
        t: [_key_of(specs[t], r) for r in rows] for t, rows in template_rows.items()}
    return [draw(operations(used, specs)) for _ in range(draw(st.integers(2, 10)))]


# ---------------------------------------------------------------------- the model
def predict_call(op: Op, specs: Mapping[str, Spec]) -> tuple[type[Exception], str] | None:
    """The error the call must raise (type, message pattern), or None if it is queued."""
    if op.via == "candles":
        try:
            normalize_upbit_candles(op.symbol, "1m", op.rows)
        except ValueError as exc:
            return ValueError, re.escape(str(exc))
        return None
    try:
        op_type = OperationType.parse(op.op_type)
    except ValueError:
        return ValueError, "operation_type must be one of"
    try:
        Priority.parse(op.priority)
    except ValueError:
        return ValueError, "priority must be one of"
    rows = op.rows
    if not isinstance(rows, list | tuple):
        return ValueError, "data_rows must be a list of row mappings"
    if not rows:
        return ValueError, "is empty"
    table = op.table
    if not isinstance(table, str):
        return SchemaError, "table name must be a string"
    if not table or "\x00" in table or len(table) > 128:
        return SchemaError, "is not a valid name"
    if table not in specs:
        return SchemaError, f"unknown table {re.escape(repr(table))}"
    spec = specs[table]
    first = rows[0]
    if not isinstance(first, Mapping):
        return ValueError, "row 0 for table .* is not a mapping"
    columns = tuple(first)
    if not columns:
        return ValueError, "has no columns"
    for c in columns:
        if not isinstance(c, str):
            return SchemaError, "column names must be strings"
    unknown = [c for c in columns if c not in spec.types]
    if unknown:
        return SchemaError, f"has no column\\(s\\) {re.escape(repr(unknown[0]))}"
    if op_type is not OperationType.INSERT and any(k not in columns for k in spec.pk):
        return SchemaError, "lack primary-key column"
    if op_type is OperationType.UPDATE and all(c in spec.pk for c in columns):
        return SchemaError, "nothing to update"
    return None



def shape_problem(rows: Any) -> tuple[int, str] | None:
    """The first row that is not a mapping with row 0's keys: (index, what is wrong)."""
    first = rows[0]
    expected = list(first)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            return i, f"is not a mapping: {type(row).__name__}"
        missing = [c for c in expected if c not in row]
        extra = [c for c in row if c not in expected]
        if missing or extra:
            return i, (f"missing {missing}" if missing else f"extra {extra}")
    return None


def check_shape_message(op: Op, shape: tuple[int, str], message: str) -> None:
    """The error of an operation with a malformed row names the row and what is wrong."""
    i, what = shape
    assert f"row {i} for table {op.table!r}" in message, message
    if what.startswith("is not a mapping"):
        assert what in message, message
    else:
        for name in re.findall(r"'((?:[^'\\]|\\.)*)'", what):
            assert name in message, (name, message)


async def submit(manager: BatchDBManager, ops: list[Op], specs: Mapping[str, Spec],
                 figures: Counter[str]) -> list[tuple[Op, str]]:
    """Make every call; a call that must be refused raises the predicted error and queues
    nothing. Returns the accepted operations with their ids, in submission order."""
    accepted: list[tuple[Op, str]] = []
    for op in ops:
        figures["operations"] += 1
        refused = predict_call(op, specs)
        try:
            if op.via == "candles":
                op_id = await manager.insert_candles_batch(op.symbol, "1m", op.rows,
                                                           op.priority)
            else:
                op_id = await manager.queue_operation(op.table, op.op_type, op.rows,
                                                      op.priority)
        except (ValueError, SchemaError) as exc:
            assert refused is not None, f"{op.label}: refused at the call: {exc!r}"
            kind, pattern = refused
            assert isinstance(exc, kind), (exc, kind)
            assert re.search(pattern, str(exc)), (pattern, str(exc))
            figures["refused_at_call"] += 1
            continue
        assert refused is None, f"{op.label}: accepted, but should raise {refused}"
        accepted.append((op, op_id))
    return accepted


class Outcome(Protocol):
    """What a reference did with an operation: ``ok`` if it applied."""

    ok: bool


W = TypeVar("W", bound=Outcome)


async def check_outcomes(manager: BatchDBManager, accepted: list[tuple[Op, str]],
                         reference: Callable[[Op], W],
                         check_failure: Callable[[Op, W, str], None],
                         figures: Counter[str]) -> None:
    """Each accepted operation, in submission order (the reference's order): applied by the
    reference, then its outcome in batchdb compared — both commit, or both refuse it and
    ``check_failure`` judges batchdb's message."""
    for op, op_id in accepted:
        want = reference(op)
        try:
            await manager.wait(op_id)
        except OperationFailed as exc:
            assert not want.ok, f"{op.label} on {op.table!r} failed: {exc}"
            check_failure(op, want, str(exc))
            figures["failed_at_commit"] += 1
            continue
        assert want.ok, (f"{op.label} on {op.table!r} committed, but the reference "
                         f"refused it: {want}")
        figures["committed"] += 1


def assert_same_rows(actual: Mapping[str, Counter[tuple[Any, ...]]],
                     expected: Mapping[str, Counter[tuple[Any, ...]]]) -> None:
    """Table by table, the database holds the reference's rows: none more, none fewer."""
    for name, rows in expected.items():
        extra = actual[name] - rows
        missing = rows - actual[name]
        assert not extra and not missing, (
            f"table {name!r}: rows nobody asked for {list(extra)[:3]!r}, "
            f"rows lost {list(missing)[:3]!r}")


async def final_write(manager: BatchDBManager, accepted: list[tuple[Op, str]]) -> None:
    """After the window, a plain write into ``s`` commits, nothing is left queued and every
    accepted operation was counted once (the caller's reference writes the same row)."""
    final = await manager.queue_operation("s", "UPSERT", [{"id": 999_999_999, "name": "after"}])
    assert (await manager.wait(final)).succeeded
    status = await manager.get_queue_status()
    assert status["total_queued_operations"] == 0
    stats = status["stats"]
    assert stats["successful_operations"] + stats["failed_operations"] == len(accepted) + 1
