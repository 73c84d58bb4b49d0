"""A ledger's reduced state saved beside it, so that a resume or ``status`` replays only
the lines written since.

The snapshot is a cache, like metadata.jsonl: the ledger stays the only source of row
facts. It holds what ``read_ledger(keep_last=False)`` had reduced after the ledger's
first ``offset`` bytes, with the CRC-32 of those bytes. It is used only when the ledger
still begins with exactly those bytes; anything else (another ledger, a line edited,
cut or repaired, a snapshot torn or of another format) and the ledger is read whole,
as if there were none; so is a snapshot another version of the reducer made. Its values
are type- and range-checked as they are loaded, so a snapshot planted in the folder can
claim no more than a ledger line could (no negative or NaN spend, no count a reducer
never makes).

A file of JSON lines: a header (format, reducer, offset, lines, CRC, the folder-wide
facts), then the rows ``CHUNK_ROWS`` a line as columns, then a trailer with the row
count and the CRC-32 of every line before it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import stat
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from itertools import chain, islice, repeat
from operator import attrgetter
from pathlib import Path
from typing import Any, BinaryIO

from batch import __version__
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


def _anything(_values: Iterable[Any]) -> bool:
    return True


def _not_negative(values: Iterable[Any]) -> bool:
    return all(v >= 0 and math.isfinite(v) for v in values)


# Each row field, with the types its values may have and a check of the values a column
# takes. Plain columns hold a value a row; the others a table of the values they take and
# an index a row (most rows share them), so their check sees each value once.
_FIELDS: tuple[tuple[str, frozenset[type], bool, Callable[[Iterable[Any]], bool]], ...] = (
    ("base", frozenset({str}), False, _anything),
    ("fingerprint", frozenset({str, _NONE}), True, _anything),
    ("prediction_id", frozenset({str, _NONE}), True, _anything),
    ("seed", frozenset({int, _NONE}), True, _anything),
    ("outputs", frozenset({list}), True, _anything),
    ("retryable", frozenset({bool}), False, _anything),
    ("error", frozenset({str, _NONE}), False, _anything),
    ("code", frozenset({int, str, _NONE}), False, _anything),
    ("task_status", frozenset({str, _NONE}), False, _anything),
    ("submits", frozenset({int}), False, _not_negative),
    ("unknown", frozenset({int}), False, _not_negative),
    ("gone", frozenset({int}), False, _not_negative),
    ("submitted_at", frozenset({str, _NONE}), False, _anything),
    ("ts", frozenset({str, _NONE}), False, _anything),
    ("intent", frozenset({str, _NONE}), False, _anything),
    ("intent_price", frozenset({float, int}), False, _not_negative),
    ("damaged", frozenset({bool}), False, _anything),
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
    return int(value) if value.isascii() and value.isdigit() else SNAPSHOT_LINES


@functools.cache
def reducer_key() -> str:
    """What made a snapshot's state: this format, this version, this Python, and the
    source of every module that turns ledger lines into state. Any change to them (an
    upgrade, a downgrade, an edit) sets earlier snapshots aside."""
    digest = hashlib.sha256(f"{FORMAT} {__version__} {sys.version_info[:2]}".encode())
    for name in ("batch.events", "batch.state", "batch.ledger", "batch.snapshot"):
        module = importlib.import_module(name)  # loaded already: the ledger reads with it
        try:
            digest.update(Path(module.__file__ or "").read_bytes())
        except OSError:
            digest.update(b"?")  # no source beside it: the version stands for it
    return digest.hexdigest()[:32]


def covers(ledger: Path) -> bool:
    """Whether the ledger's snapshot was made from all of it as it stands (its header
    alone, unchecked: for waiting on a refresh, never for reading)."""
    try:
        with open(snapshot_path(ledger), "rb") as fh:
            head = json.loads(fh.readline())
        return isinstance(head, dict) and head.get("offset") == ledger.stat().st_size
    except (OSError, ValueError):
        return False


@dataclass(slots=True)
class Start:
    """Where a ledger read begins: a snapshot's state, after ``offset`` bytes (``lines``
    lines) whose CRC-32 is ``crc``."""

    state: LedgerState
    offset: int = 0
    lines: int = 0
    crc: int = 0


def _prefix(fh: BinaryIO, stop: int) -> tuple[int, int]:
    """The CRC-32 of the file's first ``stop`` bytes, and how many lines end in them; the
    last of them must end a line (zlib's CRC runs without the GIL)."""
    fh.seek(0)
    crc, lines, left, block = 0, 0, stop, b""
    while left > 0:
        block = fh.read(min(_READ_BYTES, left))
        if not block:
            raise Stale("the ledger is shorter than the snapshot")
        crc = zlib.crc32(block, crc)
        lines += block.count(b"\n")
        left -= len(block)
    if not block.endswith(b"\n"):
        raise Stale("the snapshot ends inside a line")
    return crc, lines


def _check_prefix(fh: BinaryIO, stop: int, result: list[tuple[int, int] | BaseException]) -> None:
    try:
        result.append(_prefix(fh, stop))
    except BaseException as exc:  # told to the loading thread, which sets the snapshot aside
        result.append(exc)


def load(ledger: Path, fh: BinaryIO, good_end: int) -> Start | None:
    """The snapshot's state when the ledger (open as ``fh``, whole lines to ``good_end``)
    still begins with the bytes it was made from; None otherwise."""
    try:
        # Not through a symlink, and never a FIFO or a device that would block the read.
        fd = os.open(snapshot_path(ledger), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with open(fd, "rb") as snap:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return _load(snap, ledger.name, fh, good_end)
    except Exception:  # a cache that cannot be read is set aside, whatever it holds
        return None


def _load(snap: BinaryIO, name: str, fh: BinaryIO, good_end: int) -> Start:
    line = snap.readline()
    body = zlib.crc32(line)
    head = json.loads(line)
    if (head.get("format"), head.get("reducer"), head.get("ledger")) != (
        FORMAT,
        reducer_key(),
        name,
    ):
        raise Stale("another format, reducer or ledger")
    offset, lines, crc = _count(head["offset"]), _count(head["lines"]), head["crc32"]
    if not 0 < offset <= good_end:
        raise Stale("past the ledger's end")
    # The ledger's bytes are checked beside the load (reads and CRC run without the GIL):
    # at 1M rows that is a gigabyte, half a second.
    prefix: list[tuple[int, int] | BaseException] = []
    check = threading.Thread(target=_check_prefix, args=(fh, offset, prefix), daemon=True)
    check.start()
    try:
        state = _folder_facts(head["state"])
        rows, pids = state.rows, []
        for _ in range(_count(head["chunks"])):
            line = snap.readline()
            body = zlib.crc32(line, body)
            ids, states = _chunk(json.loads(line))
            rows.update(zip(ids, states, strict=True))
            pids.append(map(_pid, states))
    finally:
        check.join()
    if prefix != [(crc, lines)]:
        raise Stale("the ledger's bytes changed")
    if json.loads(snap.readline()) != {"end": len(rows), "crc32": body}:
        raise Stale("torn, or changed since it was written")
    if len(rows) != head["rows"] or any(d.line > lines for d in state.damage):
        raise Stale("rows missing, or damage past its lines")
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


def _column(
    spec: Any, n: int, types: frozenset[type], check: Callable[[Iterable[Any]], bool]
) -> Iterable[Any]:
    if isinstance(spec, dict) and "all" in spec:
        if type(spec["all"]) not in types or not check((spec["all"],)):
            raise Stale("a value of the wrong type or range")
        return repeat(spec["all"], n)
    if isinstance(spec, dict):
        table, index = spec["t"], spec["i"]
        if not set(map(type, table)) <= types or not set(map(type, index)) <= {int}:
            raise Stale("a value of the wrong type")
        if len(index) != n or (index and not 0 <= min(index) <= max(index) < len(table)):
            raise Stale("a column of the wrong length")
        if not check(table):
            raise Stale("a value out of range")
        return map(table.__getitem__, index)
    if not isinstance(spec, list) or len(spec) != n or not set(map(type, spec)) <= types:
        raise Stale("a column of the wrong type or length")
    if not check(spec):
        raise Stale("a value out of range")
    return spec


def _chunk(data: Any) -> tuple[list[str], list[RowState]]:
    ids = _strs(data["ids"])
    n, cols = len(ids), data["cols"]
    columns = [_column(cols[name], n, types, check) for name, types, _, check in _FIELDS]
    columns[0] = map(_STATUS.__getitem__, columns[0])
    outputs = list(columns[4])
    if not set(map(type, chain.from_iterable(outputs))) <= {str}:
        raise Stale("an output name that is not a string")
    columns[4] = map(tuple, outputs)
    return ids, list(map(RowState, *columns))


def _folder_facts(facts: Any) -> LedgerState:
    state = LedgerState()
    for name in _SPEND:
        setattr(state, name, _amount(facts[name]))
    for name in _COUNTS:
        setattr(state, name, _count(facts[name]))
    state.price = _amount(facts["price"])
    for sha, url, when, base in facts["uploads"]:
        state.uploads[_str(sha)] = (_str(url), _amount(when), _str(base))
    for key in ("runs", "finished"):
        records = facts[key]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise Stale(f"{key} are not records")
        setattr(state, key, records)
    for row, intent, price, ts, sha, keys, model, seed, fingerprint, counted in facts["doubts"]:
        if type(seed) is not int or type(counted) is not bool:
            raise Stale("a doubt's seed or flag of the wrong type")
        doubt = Doubt(
            _str(row),
            _str(intent),
            _amount(price),
            _opt(ts),
            _opt(sha),
            tuple(_strs(keys)),
            _opt(model),
            seed,
            _opt(fingerprint),
            counted,
        )
        state.doubts[doubt.intent] = doubt
    orphans = facts["orphans"]
    if not isinstance(orphans, dict) or not set(map(type, orphans.values())) <= {str}:
        raise Stale("orphans are not ids and rows")
    state.orphans = orphans
    state.damage = [Damage(_count(n), _opt(row), _str(why)) for n, row, why in facts["damage"]]
    return state


def _amount(value: Any) -> float:
    """Money or a time: a finite number, never negative (as the reducer keeps them)."""
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise Stale("not an amount")
    return float(value)


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise Stale("not a count")
    return int(value)


def _str(value: Any) -> str:
    if type(value) is not str:
        raise Stale("not a string")
    return str(value)


def _opt(value: Any) -> str | None:
    return None if value is None else _str(value)


# -- writing ---------------------------------------------------------------------


def save(ledger: Path, start: Start) -> bool:
    """Write ``start`` as the ledger's snapshot (whole, or not at all); False when it
    cannot be (a read-only or full folder, a record nested too deep to encode): a cache
    missing costs only time."""
    if start.state.predictions.strings() is None:
        return False  # a run's ids kept as hashes: only a read's state is saved
    try:
        with atomic_file(snapshot_path(ledger)) as fh:
            fh.writelines(_encode(ledger.name, start))
    except (OSError, ValueError, RecursionError):
        return False
    return True


def _encode(name: str, start: Start) -> Iterator[bytes]:
    state = start.state
    rows = state.rows
    chunks = -(-len(rows) // CHUNK_ROWS)
    given = {pid for pid in map(_pid, rows.values()) if pid is not None}
    head = {
        "format": FORMAT,
        "reducer": reducer_key(),
        "ledger": name,
        "offset": start.offset,
        "lines": start.lines,
        "crc32": start.crc,
        "rows": len(rows),
        "chunks": chunks,
        "state": _folder_record(state, given),
    }
    line = _line(head)
    body = zlib.crc32(line)
    yield line
    items = iter(rows.items())
    for _ in range(chunks):
        part = list(islice(items, CHUNK_ROWS))
        states = [s for _, s in part]
        cols: dict[str, Any] = {}
        for name, _types, plain, _check in _FIELDS:
            values = list(map(attrgetter(name), states))
            if name == "base":
                values = [s.value for s in values]
            cols[name] = values if plain else _tabled(values)
        line = _line({"ids": [row_id for row_id, _ in part], "cols": cols})
        body = zlib.crc32(line, body)
        yield line
    yield _line({"end": len(rows), "crc32": body})


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
