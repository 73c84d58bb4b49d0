"""The append-only JSONL ledger: one writer task, batched fsyncs, tolerant reads.

The ledger is the source of truth for resume. Lines are written whole with a
single ``os.write`` on an ``O_APPEND`` descriptor, so a crash can only tear
the last line, which the next run cuts off before appending.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import zlib
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from batch import snapshot
from batch.bulk import gc_paused
from batch.events import (
    COMPLETED_LINE,
    SUBMITTED_LINE,
    SUBMITTING_LINE,
    DamagedLine,
    Event,
    check_shape,
    completed_facts,
    completed_line_facts,
    decode,
    submitted_line_facts,
    submitting_line_facts,
)
from batch.events import encode as encode_event
from batch.files import matching
from batch.state import (
    NO_RECORD,
    LedgerState,
    apply,
    apply_completed,
    apply_submitted,
    apply_submitting,
    merge_states,
)

LEDGER_NAME = "ledger.jsonl"
SHARD_LEDGER_GLOB = "ledger.shard-*.jsonl"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_ROW_FIELD = re.compile(rb'"row"\s*:\s*("(?:[^"\\\n]|\\.)*")')


def _row_in(line: bytes) -> str | None:
    """The row a garbled line names, when that much of it is still readable."""
    match = _ROW_FIELD.search(line)
    if match is None:
        return None
    try:
        row = json.loads(match.group(1))
    except ValueError:
        return None
    return row if isinstance(row, str) else None


def _apply_record(state: LedgerState, record: dict[str, Any], keep_last: bool, line: int) -> None:
    try:
        if record.get("event") == "completed":  # most lines of a finished run's ledger
            check_shape(record)
            ts = record.get("ts")
            stamp = ts if isinstance(ts, str) else None
            apply_completed(state, completed_facts(record), stamp, record, keep_last)
            return
        event = decode(record)
    except DamagedLine as exc:
        row = record.get("row")
        state.damaged(line, row if isinstance(row, str) else None, str(exc))
        return
    if event is not None:  # unknown events are skipped so older readers survive newer writers
        apply(state, event, record, keep_last)


CHUNK_BYTES = 1 << 20
# What iter_ledger_events reads at a time: its memory is a few times this.
STREAM_BYTES = 1 << 18


def _lines(data: bytes, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """Yield (end offset, line) for every newline-terminated line in data[start:stop]."""
    while True:
        end = data.find(b"\n", start, stop)
        if end < 0:
            return
        yield end + 1, data[start:end]
        start = end + 1


def _chunks(data: bytes) -> Iterator[tuple[int, int, list[dict[str, Any]] | None]]:
    """Yield (start, end, events) for ~1 MB runs of whole lines, parsed in one call.

    A run that does not parse as a whole (a blank, torn or garbled line in it) yields
    None, and the caller goes through it line by line. Lines never hold a raw newline
    (JSON escapes it), so joining them with commas makes one JSON array.
    """
    start = 0
    while start < len(data):
        end = data.find(b"\n", min(start + CHUNK_BYTES, len(data) - 1))
        if end < 0:
            end = data.rfind(b"\n", start)
            if end < start:
                return  # only a torn last line is left
        body = data[start:end]
        events: list[dict[str, Any]] | None
        try:
            parsed = json.loads(b"[" + body.replace(b"\n", b",") + b"]")
        except (ValueError, RecursionError):  # RecursionError: a line of [[[[[...
            parsed = None
        # One object a line: a raw newline inside a string (a torn write's bytes, never
        # the writer's) would otherwise join two lines into one object.
        events = (
            parsed
            if isinstance(parsed, list)
            and len(parsed) == body.count(b"\n") + 1
            and all(isinstance(e, dict) for e in parsed)
            else None
        )
        yield start, end + 1, events
        start = end + 1


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _whole_end(data: bytes, complete: bool) -> int | None:
    """Where whole lines end in ``data``, the file's last bytes (all of it if
    ``complete``); None when that cannot be told without reading further back."""
    good_end = data.rfind(b"\n") + 1
    if not good_end and not complete:
        return None
    while good_end:
        start = data.rfind(b"\n", 0, good_end - 1) + 1
        if start == 0 and not complete:
            return None  # this line may begin before the bytes read
        if data[start : good_end - 1].strip(b"\0") or start == good_end - 1:
            break
        good_end = start
    return good_end


def _tail(fh: BinaryIO, size: int) -> tuple[int, bool]:
    """The offset where whole lines end, and whether a torn line follows: read from the
    end, as far back as that takes (a few KB, unless a crash left many zero blocks)."""
    window = 1 << 16
    while True:
        base = max(size - window, 0)
        fh.seek(base)
        data = fh.read(size - base)
        end = _whole_end(data, complete=base == 0)
        if end is not None:
            return base + end, bool(data[end:].strip())
        window *= 4


def _blocks(fh: BinaryIO, start: int, stop: int) -> Iterator[bytes]:
    """The file's bytes from ``start`` to ``stop`` (line ends) in ~1 MB runs of whole
    lines: a million-line ledger is never in memory at once."""
    fh.seek(start)
    pos, carry = start, b""
    while pos < stop:
        block = fh.read(min(CHUNK_BYTES, stop - pos))
        if not block:
            break  # cut shorter while being read
        pos += len(block)
        data = carry + block if carry else block
        cut = data.rfind(b"\n") + 1
        yield data[:cut]
        carry = data[cut:]


def _text(data: bytes) -> str | None:
    """A block of whole lines as text, or None when it is not valid UTF-8 (its lines are
    then read as bytes, and what does not parse is damage, as always)."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


_NAME_AT = len('{"ts":"2026-01-01T00:00:00.000Z","event":"')


def _read_facts(state: LedgerState, text: str, line_no: int) -> int:
    """Apply a block of whole lines when only row facts are wanted (no record is kept):
    a ``submitting``, ``submitted`` or ``completed`` line as wsbatch writes it (a finished
    run's three lines a row) is read by its pattern without parsing it as JSON or making
    an event, any other line as a JSON object, damage checks and all. Lines written
    together share one stamp: one string for them. Returns the block's last line."""
    completed, intent, answer = (
        COMPLETED_LINE.fullmatch,
        SUBMITTING_LINE.fullmatch,
        SUBMITTED_LINE.fullmatch,
    )
    lines = text.split("\n")
    lines.pop()  # after the block's last newline
    stamp: str | None = None
    for line in lines:
        line_no += 1
        # The event's name where the writer puts it (after a 24-character stamp) says
        # which pattern to try: a failed match costs a third of a good one.
        named = line.startswith("s", _NAME_AT)
        found = None if named else completed(line)
        if found is not None:
            ts, facts = completed_line_facts(found)
            ts = stamp = stamp if ts == stamp else ts
            apply_completed(state, facts, ts, NO_RECORD, False)
            continue
        found = intent(line) if not named or line.startswith("submitting", _NAME_AT) else None
        intent_read = submitting_line_facts(found) if found is not None else None
        if intent_read is not None:
            ts, intent_facts = intent_read
            ts = stamp = stamp if ts == stamp else ts
            apply_submitting(state, intent_facts, ts)
            continue
        found = answer(line) if found is None else None
        answer_read = submitted_line_facts(found) if found is not None else None
        if answer_read is not None:
            ts, answer_facts = answer_read
            ts = stamp = stamp if ts == stamp else ts
            apply_submitted(state, answer_facts, ts, NO_RECORD, False)
            continue
        raw = line.encode()
        if not raw.strip():
            continue
        parsed = _parse(raw)
        if parsed is None:
            state.damaged(line_no, _row_in(raw), "not a JSON object")
            continue
        written = parsed.get("ts")
        if written is not None and written == stamp:
            parsed["ts"] = stamp
        elif isinstance(written, str):
            stamp = written
        _apply_record(state, parsed, False, line_no)
    return line_no


def read_ledger(
    path: Path, *, keep_last: bool = True, from_snapshot: bool = True
) -> tuple[LedgerState, int]:
    """Read a ledger once; return its state and the offset where whole lines end.

    Only bytes after the last newline are a torn tail (a write cut by a crash: every
    line is written whole, newline included). A whole line that is not what it claims
    (garbled JSON, a known event with broken fields) is damage: recorded with its line
    number and the row it names, and never cut away. ``keep_last=False`` drops each
    row's last event dict: a 100k-row resume needs only the row states. Such a read
    starts from the ledger's snapshot when it matches (``batch.snapshot``) unless
    ``from_snapshot`` is off (a repair reads every line itself), and leaves a new one
    when it read many lines past it.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after a read of many blocks
    except FileNotFoundError:
        return LedgerState(), 0
    stamp: Any = None
    with fh, gc_paused():
        # Bytes after the last newline are a write cut short; so are whole lines of NUL
        # bytes at the end (some filesystems show a crash's unwritten blocks as zeros).
        good_end, torn = _tail(fh, os.fstat(fh.fileno()).st_size)
        start = snapshot.load(path, fh, good_end) if from_snapshot and not keep_last else None
        begun = start or snapshot.Start(LedgerState())
        state, line_no, crc = begun.state, begun.lines, begun.crc
        for data in _blocks(fh, begun.offset, good_end):
            if not keep_last:
                crc = zlib.crc32(data, crc)
                text = _text(data)
                if text is not None:
                    line_no = _read_facts(state, text, line_no)
                    continue
            for chunk_start, chunk_end, events in _chunks(data):
                if events is not None:  # the whole chunk parsed at once: the common case
                    for record in events:
                        line_no += 1
                        # Lines written together share one stamp: one string for them all.
                        ts = record.get("ts")
                        if ts is None:
                            pass  # no stamp: nothing to share, and none is added
                        elif ts == stamp:
                            record["ts"] = stamp
                        else:
                            stamp = ts
                        _apply_record(state, record, keep_last, line_no)
                    continue
                for _, line in _lines(data, chunk_start, chunk_end):
                    line_no += 1
                    if not line.strip():
                        continue
                    parsed = _parse(line)
                    if parsed is None:
                        state.damaged(line_no, _row_in(line), "not a JSON object")
                        continue
                    _apply_record(state, parsed, keep_last, line_no)
        read = line_no - begun.lines
        if not keep_last and read and read >= snapshot.snapshot_lines():
            snapshot.save(path, snapshot.Start(state, good_end, line_no, crc))
    state.torn_tail = torn
    for damage in state.damage:
        damage.path = path.name
    return state, good_end


def iter_ledger_events(source: Path | BinaryIO) -> Iterator[tuple[int, dict[str, Any], Event]]:
    """Each readable event of a ledger, in file order: (offset of its line, the line's
    record as written, the event). No state is built and STREAM_BYTES are read at a time,
    so memory does not grow with the ledger. What ``read_ledger`` counts as damage,
    unknown events and a torn last line are skipped. ``source`` may be a file opened
    for binary reading (read from where it stands): a reader that seeks back to the
    offsets later then sees the very file it scanned, even if it has been replaced."""
    if not isinstance(source, Path):
        yield from _iter_events(source)
        return
    try:
        fh = open(source, "rb")  # noqa: SIM115 - closed below; a generator holds it
    except FileNotFoundError:
        return
    with fh:
        yield from _iter_events(fh)


def _iter_events(fh: BinaryIO) -> Iterator[tuple[int, dict[str, Any], Event]]:
    base = fh.tell()
    carry = b""
    while True:
        block = fh.read(STREAM_BYTES)
        if not block:
            return  # what is left in carry has no newline: a torn last line
        data = carry + block
        end = data.rfind(b"\n") + 1
        data, carry = data[:end], data[end:]
        for start, stop, records in _chunks(data):
            line_start = start
            if records is None:  # a blank or damaged line in this run: one line at a time
                for line_end, line in _lines(data, start, stop):
                    record = _parse(line) if line.strip() else None
                    event = _decoded(record) if record is not None else None
                    if event is not None and record is not None:
                        yield base + line_start, record, event
                    line_start = line_end
                continue
            for record in records:  # every line of a run that parsed whole is one record
                event = _decoded(record)
                if event is not None:
                    yield base + line_start, record, event
                line_start = data.index(b"\n", line_start) + 1
        base += end


def _decoded(record: dict[str, Any]) -> Event | None:
    try:
        return decode(record)
    except DamagedLine:
        return None


def first_manifest(path: Path) -> str | None:
    """The manifest file the ledger's first run named (``manifest_path``), read from
    the first lines only: a 100k-row ledger is not read twice for this."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except FileNotFoundError:
        return None
    for line in head.split(b"\n")[:50]:
        record = _parse(line) if line.strip() else None
        if record is not None and record.get("event") == "run":
            found = record.get("manifest_path")
            if isinstance(found, str):
                return found
    return None


def ledger_name(shard: tuple[int, int] | None) -> str:
    """``ledger.jsonl``, or ``ledger.shard-K-of-N.jsonl`` for one shard of a cluster job."""
    return LEDGER_NAME if shard is None else f"ledger.shard-{shard[0]}-of-{shard[1]}.jsonl"


def ledger_paths(out_dir: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Every ledger of an output folder: the main one first, then shard ledgers. ``names``
    are the folder's entries (those starting with ``ledger.`` will do), when the caller
    has listed it already."""
    paths = [out_dir / LEDGER_NAME] if (out_dir / LEDGER_NAME).exists() else []
    return paths + [p for p in matching(out_dir, SHARD_LEDGER_GLOB, names) if p.is_file()]


def read_ledgers(paths: list[Path], *, keep_last: bool = True) -> LedgerState:
    """Merge several ledgers (shards) read-only, in file order."""
    return merge_states([read_ledger(path, keep_last=keep_last)[0] for path in paths])


def cut_torn_tail(path: Path, good_end: int) -> bool:
    """Truncate what follows the last good line, so appends start on a clean line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= good_end:
        return False
    with open(path, "r+b") as fh:
        fh.truncate(good_end)
        os.fsync(fh.fileno())
    return True


def encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


class LedgerTail:
    """Another process's ledger, read as it grows: only whole new lines, each once."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self.state = LedgerState()
        self.lines = 0  # lines read since ``offset``

    def refresh(self) -> LedgerState:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return self.state
        end = data.rfind(b"\n") + 1
        for _, line in _lines(data, 0, end):
            self.lines += 1
            parsed = _parse(line) if line.strip() else None
            if parsed is not None:
                _apply_record(self.state, parsed, False, self.lines)
        self.offset += end
        return self.state


class OtherLedgers:
    """The folder's other ledgers (shards running beside this one), read as they grow:
    what they have spent and which task ids they know since this run read them.

    ``refresh`` reads files: call it off the event loop. A lock keeps two threads from
    applying the same new lines twice.
    """

    def __init__(self, own: Path, offsets: dict[Path, int] | None = None) -> None:
        self.own = own
        self._tails = {path: LedgerTail(path, off) for path, off in (offsets or {}).items()}
        self._lock = threading.Lock()

    def refresh(self, *, scan: bool = True) -> list[LedgerState]:
        """Read on in every other ledger; ``scan`` first lists the folder for ledgers that
        appeared since (a listing costs as much as the folder has files)."""
        with self._lock:
            if scan:
                for path in ledger_paths(self.own.parent):
                    if path != self.own and path not in self._tails:
                        self._tails[path] = LedgerTail(path, 0)  # a shard that started after us
            return [tail.refresh() for tail in self._tails.values()]

    @property
    def known(self) -> bool:
        """Whether any other ledger has been found (then each check reads on in it)."""
        return bool(self._tails)

    def spend(self, *, scan: bool = True) -> float:
        return sum(state.spend for state in self.refresh(scan=scan))

    def known_ids(self) -> list[Container[str]]:
        """The task ids the other ledgers know, each of their sets as it is (a union of
        a million ids would be copied at every look)."""
        return [ids for state in self.refresh() for ids in (state.predictions, state.orphans)]


@dataclass(slots=True)
class _Pending:
    data: bytes
    durable: bool
    done: asyncio.Future[None]


WAKE_BATCH = 256


class LedgerWriter:
    """Owns the ledger file; every other task hands it events.

    With a ``state``, each event is applied to it the moment it is handed over, so
    the run's view never lags behind what it has committed to write.

    ``write`` returns once the line is in the OS (survives kill -9);
    ``write(durable=True)`` also waits for fsync (survives power loss). Lines that
    arrive together share one write and at most one fsync.
    """

    def __init__(self, path: Path, state: LedgerState | None = None) -> None:
        self.path = path
        self.state = state
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._fd = -1
        self.lines_written = 0
        self.fsyncs = 0

    async def start(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def write(self, event: Event, *, durable: bool = False) -> dict[str, Any]:
        """Write one event; return its record (the JSON object as written, with ``ts``).

        Shielded: once handed over, the line is written even if the caller is cancelled.
        """
        if self._task is None or self._task.done():
            raise RuntimeError("ledger writer is not running")
        record = {"ts": utc_now(), **encode_event(event)}
        if self.state is not None:
            # The state is the run's row facts: the line itself is on disk, and keeping
            # every finished row's record would grow the run with each row it ends.
            apply(self.state, event, record, keep_last=False)
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(encode(record), durable, done))
        await asyncio.shield(done)
        return record

    async def _run(self) -> None:
        closing = False
        while not closing:
            first = await self._queue.get()
            batch: list[_Pending] = []
            if first is None:
                closing = True
            else:
                batch.append(first)
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    closing = True
                else:
                    batch.append(item)
            if not batch:
                continue
            durable = any(p.durable for p in batch) or closing
            try:
                await asyncio.shield(
                    asyncio.to_thread(self._flush, b"".join(p.data for p in batch), durable)
                )
            except BaseException as exc:
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("ledger closed")
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            self.lines_written += len(batch)
            for n, p in enumerate(batch, 1):
                if not p.done.done():
                    p.done.set_result(None)
                if n % WAKE_BATCH == 0 and n < len(batch):
                    # Thousands of writers woken in one turn of the loop would hold it
                    # for a tenth of a second: let each share go on before the next.
                    await asyncio.sleep(0)

    def _flush(self, data: bytes, durable: bool) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if durable:
            os.fsync(self._fd)
            self.fsyncs += 1

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
