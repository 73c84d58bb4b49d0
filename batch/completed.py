"""The completed output files of an output folder, read from its ledgers in memory that
never holds their events: what ``metadata.jsonl`` and the exports are made of.

A row's final state is decided by its last events, and a ledger may hold several runs'
events for one row (retries, a failed then completed row, ``--retry-failed``, shards).
So the ledgers are read in passes, keeping about a hundred bytes a row (its id, an
offset, a sort key), never its events:

1. every event goes through the reducer's own ``apply`` (``batch.state``), on a one-row
   scratch state seeded with what is kept per row: whether its base status is
   completed, its open submit intent, and the offset of the line the reducer keeps as
   its ``last`` event. No second set of rules decides a row; shards merge by the time
   of each row's last event, as ``merge_states`` does.
2. the deciding ``completed`` lines are read back in file order, and each output file
   that exists gets one sort key: its name, then where its line is.
3. ``Pairs`` hands the outputs out in name order, reading each line back when asked.

The ledger files stay open from the first pass to the last, so a ledger replaced in
between (``wsbatch repair --drop``) cannot move a line from under its offset.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from batch.errors import UsageError
from batch.events import RunStarted
from batch.ledger import iter_ledger_events, ledger_paths
from batch.state import LedgerState, RowState, RowStatus, apply

METADATA_NAME = "metadata.jsonl"
# A sort key is the output's UTF-8 name, a NUL (never in a file name: such a name fails
# the existence check), then fixed-width big-endian fields: the row's first-seen
# position (equal names keep the reducer's row order, as a stable sort of its rows
# would), the output's index, the ledger and the line's offset. UTF-8 bytes sort as
# their code points do, so the keys sort as the names do.
_KEY_TAIL = struct.Struct(">QIHQ")
# The scratch state of the first pass is renewed this often: the reducer's folder-wide
# bookkeeping (doubts, prediction ids) is not wanted here and must not grow with rows.
_SCRATCH_EVENTS = 4096
_NOT_LAST: Mapping[str, Any] = {}
# Packs (ledger, offset) into one int: no ledger reaches a terabyte.
_SPAN = 1 << 40


@dataclass(frozen=True, slots=True)
class Pair:
    """One completed output file and what produced it."""

    file_name: str  # relative to OUT_DIR (outputs sit at its top level)
    index: int  # position among its row's outputs
    row: str
    prompt: str | None
    seed: int | None
    model: str | None
    prediction_id: str | None
    inference_ms: int | None
    nsfw: bool | None
    sha256: str | None
    image: str | None  # the manifest's reference: a path relative to it, or a URL
    image_path: str | None  # absolute local path of the input; None for URL inputs
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_url(self) -> bool:
        return self.image_path is None and self.image is not None and "://" in self.image


def _is_regular_file(path: str | os.PathLike[str], *, follow: bool) -> bool:
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode)


def _safe_output_name(name: Any) -> bool:
    # Output names come from validated ids; a hand-edited ledger must still not be able
    # to pull "../secret" or "/etc/passwd" into a dataset.
    return (
        isinstance(name, str)
        and bool(name)
        and name == os.path.basename(name)
        and "\\" not in name
        and not name.startswith(".")
        and name not in (METADATA_NAME,)
    )


def _item(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, list) and index < len(values) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number_or_none(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return int(value)  # one JSON type per column for the loaders
    return value


def _milliseconds(value: Any) -> int | None:
    # One integer column: a fraction of a millisecond says nothing a loader needs.
    number = _number_or_none(value)
    return None if number is None else round(number)


def _pair(record: Mapping[str, Any], index: int, run_model: str | None) -> Pair:
    """The ``index``-th output of a ``completed`` line."""
    meta = record.get("meta")
    seed = record.get("seed")
    nsfw = _item(record.get("nsfw"), index)
    return Pair(
        file_name=record["outputs"][index],
        index=index,
        row=record["row"],
        prompt=_str_or_none(record.get("prompt")),
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        # Completed events written before they carried the model fall back to the run's.
        model=_str_or_none(record.get("model")) or run_model,
        prediction_id=_str_or_none(record.get("prediction_id")),
        inference_ms=_milliseconds(record.get("inference_ms")),
        nsfw=nsfw if isinstance(nsfw, bool) else None,
        sha256=_str_or_none(_item(record.get("sha256"), index)),
        image=_str_or_none(record.get("image")),
        image_path=_str_or_none(record.get("image_path")),
        meta={str(k): v for k, v in meta.items()} if isinstance(meta, dict) else {},
    )


# -- pass 1: which line decides each row -------------------------------------------


@dataclass(slots=True)
class _Scan:
    """One ledger's rows: the offset of each completed row's deciding line (-1 for a row
    whose base status is not completed), its open intents, and, when several ledgers
    are merged, the time of each row's last event."""

    decided: dict[str, int] = field(default_factory=dict)
    intents: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, str] | None = None
    run_model: str | None = None


def _scan(fh: BinaryIO, *, stamped: bool) -> _Scan:
    found = _Scan(stamps={} if stamped else None)
    decided, intents, stamps = found.decided, found.intents, found.stamps
    scratch = LedgerState()
    for n, (offset, record, event) in enumerate(iter_ledger_events(fh)):
        row_id = getattr(event, "row", None)
        if not isinstance(row_id, str):  # run, uploaded, finished: about no row
            model = record.get("model")
            if isinstance(event, RunStarted) and isinstance(model, str):
                found.run_model = model
            continue
        if n % _SCRATCH_EVENTS == 0:
            scratch = LedgerState()
        known = decided.get(row_id, -1)
        row = RowState(
            base=RowStatus.COMPLETED if known >= 0 else RowStatus.NOT_STARTED,
            intent=intents.get(row_id),
            last=_NOT_LAST,
        )
        scratch.rows = {row_id: row}
        apply(scratch, event, record)
        if row.last is record:  # the reducer took this line for the row's last event
            known = offset
        decided[row_id] = known if row.base is RowStatus.COMPLETED else -1
        if row.intent is None:
            intents.pop(row_id, None)
        else:
            intents[row_id] = row.intent
        if stamps is not None:
            stamps[row_id] = row.ts or ""
    for row_id, intent in intents.items():
        # A row whose last submit has no recorded outcome is in doubt, not completed.
        done = RowState(base=RowStatus.COMPLETED, intent=intent).status is RowStatus.COMPLETED
        if decided[row_id] >= 0 and not done:
            decided[row_id] = -1
    return found


def _deciding_lines(handles: Sequence[BinaryIO]) -> tuple[list[int], int, str | None]:
    """Pass 1 over every ledger: the deciding line of each completed row, packed as one
    int that sorts by (ledger, offset) and carries the row's first-seen position:
    ``(ledger * _SPAN + offset) * rows + position``. Return them sorted, with ``rows``
    to unpack them and the model of the last run that names one."""
    if len(handles) == 1:
        scan = _scan(handles[0], stamped=False)
        merged, run_model = scan.decided, scan.run_model  # one ledger: its rows as they are
    else:
        stamps: dict[str, str] = {}
        merged, run_model = {}, None
        for number, fh in enumerate(handles):
            scan = _scan(fh, stamped=True)
            run_model = scan.run_model or run_model
            assert scan.stamps is not None
            for row_id, offset in scan.decided.items():
                # merge_states' rule: a row in several ledgers keeps its latest event by time.
                stamp = scan.stamps[row_id]
                if row_id not in stamps or stamp >= stamps[row_id]:
                    merged[row_id] = number * _SPAN + offset if offset >= 0 else -1
                    stamps[row_id] = stamp
        del stamps
    del scan
    rows = len(merged)
    lines = [at * rows + seq for seq, at in enumerate(merged.values()) if at >= 0]
    del merged
    lines.sort()
    return lines, rows, run_model


# -- pass 2: one sort key per output file ---------------------------------------------


def _read_line(fh: BinaryIO, offset: int) -> dict[str, Any]:
    fh.seek(offset)
    record: dict[str, Any] = json.loads(fh.readline())  # pass 1 read it as an object
    return record


def _sort_keys(
    out_dir: Path, handles: Sequence[BinaryIO], visit: Callable[[Pair], object] | None
) -> tuple[list[bytes], str | None]:
    lines, rows, run_model = _deciding_lines(handles)
    folder = str(out_dir)
    keys: list[bytes] = []
    for packed in lines:
        at, seq = divmod(packed, rows)
        number, offset = divmod(at, _SPAN)
        record = _read_line(handles[number], offset)
        outputs = record.get("outputs")
        if not isinstance(outputs, list):
            continue
        for index, name in enumerate(outputs):
            if not _safe_output_name(name):
                continue
            # lstat: the runner never writes a symlink, so one here was planted.
            # os.path, not pathlib: a Path interns each name it is given.
            if not _is_regular_file(os.path.join(folder, name), follow=False):
                continue  # deleted since: the next run fetches it again
            tail = _KEY_TAIL.pack(seq, index, number, offset)
            keys.append(name.encode("utf-8", "surrogatepass") + b"\0" + tail)
            if visit is not None:
                visit(_pair(record, index, run_model))
    keys.sort()
    return keys, run_model


# -- pass 3: the pairs, in name order ------------------------------------------------------


class Pairs:
    """The completed output files of a folder, sorted by name, each read from its ledger
    line when iterated. ``select`` gives a subset sharing the open ledgers."""

    def __init__(self, handles: Sequence[BinaryIO], keys: list[bytes], run_model: str | None):
        self._handles = handles
        self.keys = keys
        self._run_model = run_model

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Pair]:
        for _, pair in self.items():
            yield pair

    def items(self) -> Iterator[tuple[bytes, Pair]]:
        """(sort key, pair) in name order; the key is what ``select`` takes."""
        cached: tuple[int, int, dict[str, Any]] | None = None
        for key in self.keys:
            _, index, number, offset = _KEY_TAIL.unpack_from(key, len(key) - _KEY_TAIL.size)
            if cached is None or cached[:2] != (number, offset):
                # A row's outputs usually sort next to each other: read its line once.
                cached = (number, offset, _read_line(self._handles[number], offset))
            yield key, _pair(cached[2], index, self._run_model)

    def select(self, keys: list[bytes]) -> Pairs:
        return Pairs(self._handles, keys, self._run_model)


@contextlib.contextmanager
def read_pairs(out_dir: Path, visit: Callable[[Pair], object] | None = None) -> Iterator[Pairs]:
    """Every completed output file of ``out_dir`` that exists, in name order. ``visit``
    sees each of them once on the way (in ledger order), for what needs no order:
    it saves a pass."""
    paths = ledger_paths(out_dir)
    if not paths:
        raise UsageError(f"{out_dir} has no ledger.jsonl: not a wsbatch output folder")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(path, "rb")) for path in paths]
        keys, run_model = _sort_keys(out_dir, handles, visit)
        yield Pairs(handles, keys, run_model)
