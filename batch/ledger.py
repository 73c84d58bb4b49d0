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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batch.bulk import gc_paused

LEDGER_NAME = "ledger.jsonl"
TERMINAL_FAILURES = frozenset({"failed", "cancelled", "canceled", "timeout"})
SHARD_LEDGER_GLOB = "ledger.shard-*.jsonl"
DEFAULT_PRICE = 0.024
UPLOAD_REUSE_SECONDS = 24 * 3600


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(slots=True)
class RowState:
    """What the ledger knows of one row: its last event plus what resume needs."""

    event: str
    fingerprint: str | None = None
    prediction_id: str | None = None
    seed: int | None = None
    outputs: list[str] = field(default_factory=list)
    retryable: bool | None = None
    task_status: str | None = None
    error: str | None = None
    code: int | str | None = None
    submits: int = 0
    submitted_at: str | None = None
    ts: str | None = None
    # The last event whole, for the report and the dataset files; resume does without it.
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def awaits_poll(self) -> bool:
        """A live prediction the next run will poll (submitted, or failed before its end)."""
        if self.event == "submitted":
            return True
        return (
            self.event == "failed"
            and bool(self.retryable)
            and self.prediction_id is not None
            and self.task_status not in TERMINAL_FAILURES
        )

    @property
    def status(self) -> str:
        """``completed``, ``failed`` or ``in flight``: what status and the report show."""
        if self.event == "completed":
            return "completed"
        return "in flight" if self.awaits_poll else "failed"


@dataclass(slots=True)
class LedgerState:
    rows: dict[str, RowState] = field(default_factory=dict)
    # sha256 of an input -> (download_url, when, API base URL it was uploaded through)
    uploads: dict[str, tuple[str, float, str]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    finished: list[dict[str, Any]] = field(default_factory=list)
    possible_duplicates: int = 0
    submits: int = 0
    # spend: each submit at the price its run announced (the default when unknown)
    price: float = DEFAULT_PRICE
    spend: float = 0.0
    corrupt_lines: int = 0
    torn_tail: bool = False

    def fresh_upload(self, sha256: str, now: float, base_url: str) -> str | None:
        """A download_url for this input uploaded less than 24 h ago through the same API."""
        entry = self.uploads.get(sha256)
        if entry is None or now - entry[1] > UPLOAD_REUSE_SECONDS or entry[2] != base_url:
            return None
        return entry[0]


def _apply(state: LedgerState, event: dict[str, Any], keep_last: bool = True) -> None:
    kind = event.get("event")
    row_id = event.get("row")
    if kind == "run":
        state.runs.append(event)
        price = event.get("price")
        if isinstance(price, int | float) and price >= 0:
            state.price = float(price)
        return
    if kind == "finished":
        state.finished.append(event)
        return
    if kind == "uploaded":
        sha, url, ts = event.get("sha256"), event.get("download_url"), parse_ts(event.get("ts"))
        base_url = event.get("base_url")
        if isinstance(sha, str) and isinstance(url, str) and ts is not None:
            state.uploads[sha] = (url, ts, base_url if isinstance(base_url, str) else "")
        return
    if not isinstance(row_id, str) or kind not in ("submitted", "completed", "failed"):
        return  # unknown events are skipped so older readers survive newer writers
    row = state.rows.get(row_id)
    if row is None:
        row = state.rows[row_id] = RowState(event=kind)
    row.event = kind
    row.ts = event.get("ts")
    if keep_last:
        row.last = event
    if "fingerprint" in event:
        row.fingerprint = event["fingerprint"]
    if "prediction_id" in event:
        row.prediction_id = event["prediction_id"]
    if isinstance(event.get("seed"), int):
        row.seed = event["seed"]
    dupes = event.get("possible_duplicates", 0)
    if isinstance(dupes, int) and not isinstance(dupes, bool):
        state.possible_duplicates += dupes
    if kind == "submitted":
        row.submits += 1
        row.submitted_at = event.get("ts")
        state.submits += 1
        state.spend += state.price
        row.task_status = None
        row.error = row.code = row.retryable = None
    elif kind == "completed":
        row.outputs = [o for o in event.get("outputs", []) if isinstance(o, str)]
        row.task_status = "completed"
        row.error = row.code = row.retryable = None
    else:
        row.error = event.get("error")
        row.code = event.get("code")
        row.retryable = bool(event.get("retryable"))
        row.task_status = event.get("task_status")


CHUNK_BYTES = 1 << 20


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
        except ValueError:
            parsed = None
        events = (
            parsed
            if isinstance(parsed, list) and all(isinstance(e, dict) for e in parsed)
            else None
        )
        yield start, end + 1, events
        start = end + 1


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_ledger(path: Path, *, keep_last: bool = True) -> tuple[LedgerState, int]:
    """Read a ledger once; return its state and the offset where good data ends.

    A torn or garbled tail (a line without newline, or trailing lines that are
    not JSON) is left out; a bad line in the middle is skipped and counted.
    ``keep_last=False`` drops each row's last event dict: a 100k-row resume needs
    only the row states, not 100k parsed events.
    """
    state = LedgerState()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return state, 0
    good_end = 0
    pending_bad = 0
    with gc_paused():
        for chunk_start, chunk_end, events in _chunks(data):
            if events is not None:  # the whole chunk parsed at once: the common case
                for event in events:
                    _apply(state, event, keep_last)
                state.corrupt_lines += pending_bad
                pending_bad = 0
                good_end = chunk_end
                continue
            for end, line in _lines(data, chunk_start, chunk_end):
                if not line.strip():
                    continue
                parsed = _parse(line)
                if parsed is None:
                    pending_bad += 1
                    continue
                state.corrupt_lines += pending_bad
                pending_bad = 0
                _apply(state, parsed, keep_last)
                good_end = end
    state.torn_tail = good_end < len(data) and bool(data[good_end:].strip())
    return state, good_end


def ledger_name(shard: tuple[int, int] | None) -> str:
    """``ledger.jsonl``, or ``ledger.shard-K-of-N.jsonl`` for one shard of a cluster job."""
    return LEDGER_NAME if shard is None else f"ledger.shard-{shard[0]}-of-{shard[1]}.jsonl"


def ledger_paths(out_dir: Path) -> list[Path]:
    """Every ledger of an output folder: the main one first, then shard ledgers."""
    paths = [out_dir / LEDGER_NAME] if (out_dir / LEDGER_NAME).exists() else []
    return paths + sorted(out_dir.glob(SHARD_LEDGER_GLOB))


def read_ledgers(paths: list[Path], *, keep_last: bool = True) -> LedgerState:
    """Merge several ledgers (shards) read-only, in file order."""
    return merge_states([read_ledger(path, keep_last=keep_last)[0] for path in paths])


def merge_states(states: list[LedgerState]) -> LedgerState:
    """One view of several ledgers.

    Shards hold disjoint rows, so a row's state comes from the one ledger that has it;
    a row in several (an unsharded run, then shards) keeps its latest event by time.
    """
    if len(states) == 1:
        return states[0]
    merged = LedgerState()
    for state in states:
        for row_id, row in state.rows.items():
            known = merged.rows.get(row_id)
            if known is None or str(row.ts or "") >= str(known.ts or ""):
                merged.rows[row_id] = row
        merged.uploads.update(state.uploads)
        merged.runs += state.runs
        merged.finished += state.finished
        merged.possible_duplicates += state.possible_duplicates
        merged.submits += state.submits
        merged.spend += state.spend
        merged.corrupt_lines += state.corrupt_lines
        merged.torn_tail = merged.torn_tail or state.torn_tail
    return merged


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


def encode(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


@dataclass(slots=True)
class _Pending:
    data: bytes
    durable: bool
    done: asyncio.Future[None]


class LedgerWriter:
    """Owns the ledger file; every other task hands it events.

    ``write`` returns once the line is in the OS (survives kill -9);
    ``write_durable`` also waits for fsync (survives power loss). Lines that
    arrive together share one write and at most one fsync.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._fd = -1
        self.lines_written = 0
        self.fsyncs = 0

    async def start(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def _submit(self, event: dict[str, Any], durable: bool) -> asyncio.Future[None]:
        if self._task is None or self._task.done():
            raise RuntimeError("ledger writer is not running")
        event = {"ts": utc_now(), **event}
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(encode(event), durable, done))
        return done

    async def write(self, event: dict[str, Any]) -> None:
        # Shielded: once handed over, the line is written even if the caller is cancelled.
        await asyncio.shield(self._submit(event, durable=False))

    async def write_durable(self, event: dict[str, Any]) -> None:
        await asyncio.shield(self._submit(event, durable=True))

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
            for p in batch:
                if not p.done.done():
                    p.done.set_result(None)

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
