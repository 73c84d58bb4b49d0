"""A ledger's reduced state saved beside it, so that a resume or ``status`` replays only
the lines written since.

The snapshot is a cache, like metadata.jsonl: the ledger stays the only source of row
facts. It holds what ``read_ledger(keep_last=False)`` had reduced after the ledger's
first ``offset`` bytes, with the CRC-32 of those bytes. It is used only when the ledger
still begins with exactly those bytes; anything else (another ledger, a line edited,
cut or repaired, a snapshot torn or of another format) and the ledger is read whole,
as if there were none. Its values are type-checked as they are loaded, so a snapshot
planted in the folder can claim no more than a ledger line could.

A file of JSON lines: a header (format, offset, lines, CRC, the folder-wide facts),
then the rows ``CHUNK_ROWS`` a line as columns, then a trailer with the row count.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from itertools import chain, islice, repeat
from operator import attrgetter
from pathlib import Path
from typing import Any, BinaryIO

from batch.files import atomic_file
from batch.state import Damage, Doubt, LedgerState, RowState, RowStatus
from batch.taskids import TaskIds

FORMAT = 1
PREFIX = ".wsbatch.state-"
# A read that replayed at least this many lines after the snapshot writes a new one;
# the variable is for tests, which reach it with small ledgers.
SNAPSHOT_LINES = 50_000
SNAPSHOT_LINES_ENV = "WSBATCH_SNAPSHOT_LINES"
CHUNK_ROWS = 1 << 14
_READ_BYTES = 1 << 22

_NONE = type(None)
# Each row field, with the types its values may have. Plain columns hold a value a row;
# the others a table of the values they take and an index a row (most rows share them).
_FIELDS: tuple[tuple[str, frozenset[type], bool], ...] = (
    ("base", frozenset({str}), False),
    ("fingerprint", frozenset({str, _NONE}), True),
    ("prediction_id", frozenset({str, _NONE}), True),
    ("seed", frozenset({int, _NONE}), True),
    ("outputs", frozenset({list}), True),
    ("retryable", frozenset({bool}), False),
    ("error", frozenset({str, _NONE}), False),
    ("code", frozenset({int, str, _NONE}), False),
    ("task_status", frozenset({str, _NONE}), False),
    ("submits", frozenset({int}), False),
    ("unknown", frozenset({int}), False),
    ("gone", frozenset({int}), False),
    ("submitted_at", frozenset({str, _NONE}), False),
    ("ts", frozenset({str, _NONE}), False),
    ("intent", frozenset({str, _NONE}), False),
    ("intent_price", frozenset({float, int}), False),
    ("damaged", frozenset({bool}), False),
)
_STATUS = {s.value: s for s in RowStatus}
_SPEND = ("billed_spend", "unknown_spend", "open_spend")
_COUNTS = ("submits", "possible_duplicates", "corrupt_lines")


class Stale(ValueError):
    """The snapshot is not of this ledger as it stands, or cannot be read."""


def snapshot_path(ledger: Path) -> Path:
    return ledger.with_name(PREFIX + ledger.name)


def snapshot_lines() -> int:
    value = os.environ.get(SNAPSHOT_LINES_ENV, "")
    return int(value) if value.isdigit() else SNAPSHOT_LINES


@dataclass(slots=True)
class Start:
    """Where a ledger read begins: a snapshot's state, after ``offset`` bytes (``lines``
    lines) whose CRC-32 is ``crc``."""

    state: LedgerState
    offset: int = 0
    lines: int = 0
    crc: int = 0


def prefix_crc(fh: BinaryIO, stop: int) -> int:
    """The CRC-32 of the file's first ``stop`` bytes (zlib's runs without the GIL)."""
    fh.seek(0)
    crc, left = 0, stop
    while left > 0:
        block = fh.read(min(_READ_BYTES, left))
        if not block:
            raise Stale("the ledger is shorter than the snapshot")
        crc = zlib.crc32(block, crc)
        left -= len(block)
    return crc


def load(ledger: Path, fh: BinaryIO, good_end: int) -> Start | None:
    """The snapshot's state when the ledger (open as ``fh``, whole lines to ``good_end``)
    still begins with the bytes it was made from; None otherwise."""
    try:
        snap = open(snapshot_path(ledger), "rb")  # noqa: SIM115 - closed below
    except OSError:
        return None
    try:
        with snap:
            return _load(snap, ledger.name, fh, good_end)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError, RecursionError):
        return None


def _load(snap: BinaryIO, name: str, fh: BinaryIO, good_end: int) -> Start:
    head = json.loads(snap.readline())
    if head.get("format") != FORMAT or head.get("ledger") != name:
        raise Stale("another format or another ledger")
    offset, lines, crc = head["offset"], head["lines"], head["crc32"]
    if not (isinstance(offset, int) and 0 < offset <= good_end and isinstance(lines, int)):
        raise Stale("past the ledger's end")
    if prefix_crc(fh, offset) != crc:
        raise Stale("the ledger's bytes changed")
    state = _folder_facts(head["state"])
    rows, pids = state.rows, []
    for _ in range(int(head["chunks"])):
        ids, states = _chunk(json.loads(snap.readline()))
        rows.update(zip(ids, states, strict=True))
        pids.append(map(_pid, states))
    if json.loads(snap.readline()) != {"end": len(rows)} or len(rows) != head["rows"]:
        raise Stale("torn, or rows missing")
    # A row's id string is the one in the known ids, as a read leaves it.
    extra = _strs(head["state"]["predictions"])
    state.predictions = TaskIds(chain(filter(None, chain.from_iterable(pids)), extra))
    return Start(state, offset, lines, crc)


_pid = attrgetter("prediction_id")
_doubt_fields = attrgetter(*(f.name for f in fields(Doubt)))  # as Doubt() takes them


def _strs(value: Any) -> list[str]:
    if not isinstance(value, list) or not set(map(type, value)) <= {str}:
        raise Stale("not a list of strings")
    return value


def _column(spec: Any, n: int, types: frozenset[type]) -> Iterable[Any]:
    if isinstance(spec, dict) and "all" in spec:
        if type(spec["all"]) not in types:
            raise Stale("a value of the wrong type")
        return repeat(spec["all"], n)
    if isinstance(spec, dict):
        table, index = spec["t"], spec["i"]
        if not set(map(type, table)) <= types or not set(map(type, index)) <= {int}:
            raise Stale("a value of the wrong type")
        if len(index) != n or (index and not 0 <= min(index) <= max(index) < len(table)):
            raise Stale("a column of the wrong length")
        return map(table.__getitem__, index)
    if not isinstance(spec, list) or len(spec) != n or not set(map(type, spec)) <= types:
        raise Stale("a column of the wrong type or length")
    return spec


def _chunk(data: Any) -> tuple[list[str], list[RowState]]:
    ids = _strs(data["ids"])
    n, cols = len(ids), data["cols"]
    columns = [_column(cols[name], n, types) for name, types, _ in _FIELDS]
    columns[0] = map(_STATUS.__getitem__, columns[0])
    outputs = list(columns[4])
    if not set(map(type, chain.from_iterable(outputs))) <= {str}:
        raise Stale("an output name that is not a string")
    columns[4] = map(tuple, outputs)
    return ids, list(map(RowState, *columns))


def _folder_facts(facts: Any) -> LedgerState:
    state = LedgerState()
    for name in _SPEND:
        setattr(state, name, float(facts[name]))
    for name in _COUNTS:
        setattr(state, name, int(facts[name]))
    state.price = float(facts["price"])
    for sha, url, when, base in facts["uploads"]:
        state.uploads[str(sha)] = (str(url), float(when), str(base))
    for key in ("runs", "finished"):
        records = facts[key]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise Stale(f"{key} are not records")
        setattr(state, key, records)
    for row, intent, price, ts, sha, keys, model, seed, fingerprint, counted in facts["doubts"]:
        doubt = Doubt(
            str(row),
            str(intent),
            float(price),
            _opt(ts),
            _opt(sha),
            tuple(_strs(keys)),
            _opt(model),
            int(seed),
            _opt(fingerprint),
            bool(counted),
        )
        state.doubts[doubt.intent] = doubt
    orphans = facts["orphans"]
    if not isinstance(orphans, dict) or not set(map(type, orphans.values())) <= {str}:
        raise Stale("orphans are not ids and rows")
    state.orphans = orphans
    state.damage = [Damage(int(line), _opt(row), str(why)) for line, row, why in facts["damage"]]
    return state


def _opt(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise Stale("not a string")


# -- writing ---------------------------------------------------------------------


def save(ledger: Path, start: Start) -> bool:
    """Write ``start`` as the ledger's snapshot (whole, or not at all); False when the
    folder refuses it (read-only, full): a cache missing costs only time."""
    if start.state.predictions.strings() is None:
        return False  # a run's ids kept as hashes: only a read's state is saved
    try:
        with atomic_file(snapshot_path(ledger)) as fh:
            fh.writelines(_encode(ledger.name, start))
    except OSError:
        return False
    return True


def _encode(name: str, start: Start) -> Iterator[bytes]:
    state = start.state
    rows = state.rows
    chunks = -(-len(rows) // CHUNK_ROWS)
    given = {pid for pid in map(_pid, rows.values()) if pid is not None}
    head = {
        "format": FORMAT,
        "ledger": name,
        "offset": start.offset,
        "lines": start.lines,
        "crc32": start.crc,
        "rows": len(rows),
        "chunks": chunks,
        "state": _folder_record(state, given),
    }
    yield _line(head)
    items = iter(rows.items())
    for _ in range(chunks):
        part = list(islice(items, CHUNK_ROWS))
        states = [s for _, s in part]
        cols: dict[str, Any] = {}
        for name, _types, plain in _FIELDS:
            values = list(map(attrgetter(name), states))
            if name == "base":
                values = [s.value for s in values]
            cols[name] = values if plain else _tabled(values)
        yield _line({"ids": [row_id for row_id, _ in part], "cols": cols})
    yield _line({"end": len(rows)})


def _tabled(values: list[Any]) -> dict[str, Any]:
    table: dict[Any, int] = {}
    index = [table.setdefault(v, len(table)) for v in values]
    if len(table) == 1:
        return {"all": values[0]}
    return {"t": list(table), "i": index}


def _folder_record(state: LedgerState, given: set[str]) -> dict[str, Any]:
    # Ids the rows no longer hold (a row paid again, a task found gone) are kept apart.
    return {
        **{name: getattr(state, name) for name in (*_SPEND, *_COUNTS, "price")},
        "uploads": [[sha, *entry] for sha, entry in state.uploads.items()],
        "runs": state.runs,
        "finished": state.finished,
        "predictions": [pid for pid in state.predictions.strings() or () if pid not in given],
        "doubts": [_doubt_fields(d) for d in state.doubts.values()],
        "orphans": state.orphans,
        "damage": [[d.line, d.row, d.reason] for d in state.damage],
    }


def _line(record: dict[str, Any]) -> bytes:
    # ASCII: a lone surrogate a ledger line escaped would not encode otherwise.
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"
