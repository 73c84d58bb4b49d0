"""The ledger: tolerant reads, torn-tail repair, one writer with batched fsyncs."""

from __future__ import annotations

import asyncio
import json

import pytest

import batch.ledger as ledger_module
from batch.events import Finished
from batch.ledger import LedgerWriter, cut_torn_tail, read_ledger
from batch.state import RowStatus


def events(n: int) -> list[dict]:
    return [
        {"ts": f"2026-01-01T00:00:{i % 60:02d}Z", "event": "submitted", "row": f"r{i % 9}",
         "prediction_id": f"p{i}", "seed": i}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def ledger_file(tmp_path):
    """A ledger with a blank line, a garbled middle line and a torn last line."""
    lines = [json.dumps(e) for e in events(60)]
    lines.insert(10, "")
    lines.insert(25, "garbage{")
    path = tmp_path / "ledger.jsonl"
    path.write_text("\n".join(lines) + "\n" + '{"ts":"x","event":"compl')
    return path


@pytest.mark.parametrize("chunk", [64, 500, 1 << 20])
def test_reads_are_the_same_whatever_the_chunking(ledger_file, chunk, monkeypatch):
    """Bulk parsing of whole runs of lines gives exactly the line-by-line result."""
    monkeypatch.setattr(ledger_module, "CHUNK_BYTES", chunk)
    state, good_end = read_ledger(ledger_file)
    assert state.submits == 60 and len(state.rows) == 9
    assert state.corrupt_lines == 1 and state.torn_tail
    assert ledger_file.read_bytes()[good_end:] == b'{"ts":"x","event":"compl'
    assert state.rows["r0"].prediction_id == "p54"


def test_torn_tail_is_cut_so_appends_start_clean(ledger_file):
    """After cutting, the file ends with a newline and every line but the bad one parses."""
    _, good_end = read_ledger(ledger_file)
    assert cut_torn_tail(ledger_file, good_end)
    data = ledger_file.read_bytes()
    assert data.endswith(b"\n") and len(data) == good_end
    assert not cut_torn_tail(ledger_file, good_end)


@pytest.mark.parametrize("keep_last", [True, False])
def test_a_deeply_nested_line_is_damage_not_a_crash(tmp_path, keep_last):
    """A line of 100,000 open brackets (JSON's parser recurses on it) is a damaged line:
    every reader of the folder (run, status, report, export) still reads the rest."""
    path = tmp_path / "ledger.jsonl"
    good = [json.dumps(e).encode() + b"\n" for e in events(3)]
    path.write_bytes(b"".join([good[0], b"[" * 100_000 + b"\n", *good[1:]]))
    state, _ = read_ledger(path, keep_last=keep_last)
    assert state.submits == 3
    assert [(d.line, d.reason) for d in state.damage] == [(2, "not a JSON object")]
    assert [line for line, _, _ in ledger_module.iter_ledger_events(path)] == [
        0,
        len(good[0]) + 100_001,
        len(good[0]) + 100_001 + len(good[1]),
    ]


def test_trailing_zeroed_line_counts_as_torn(tmp_path):
    """A last line of NUL bytes (a crash on some filesystems) is not data."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events(3)) + b"\0\0\0\n")
    state, good_end = read_ledger(path)
    assert state.submits == 3 and state.torn_tail and good_end < path.stat().st_size


def test_writer_batches_lines_and_fsyncs_only_durable_ones(tmp_path):
    """Many lines handed over together share writes; only durable lines cost an fsync."""

    async def go() -> LedgerWriter:
        writer = LedgerWriter(tmp_path / "ledger.jsonl")
        await writer.start()
        await asyncio.gather(*(writer.write(Finished(f"x{i}", {})) for i in range(50)))
        await asyncio.gather(
            *(writer.write(Finished(f"y{i}", {}), durable=True) for i in range(50))
        )
        await writer.close()
        return writer

    writer = asyncio.run(go())
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["ts"] for line in lines)
    assert writer.fsyncs < 10  # 50 durable lines, a handful of fsyncs


def test_row_status_follows_the_resume_rule(tmp_path):
    """A timed-out task is in flight (polled next run); a failed task code is failed."""
    path = tmp_path / "ledger.jsonl"
    rows = [
        {"event": "failed", "row": "a", "prediction_id": "p", "retryable": True,
         "task_status": None},
        {"event": "failed", "row": "b", "prediction_id": "q", "retryable": True,
         "task_status": "failed", "code": 5000},
        {"event": "completed", "row": "c", "prediction_id": "r", "outputs": ["c.png"]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps({"ts": "t", **r}) + "\n" for r in rows))
    state, _ = read_ledger(path)
    assert [state.rows[r].status for r in "abc"] == [
        RowStatus.IN_FLIGHT,
        RowStatus.FAILED,
        RowStatus.COMPLETED,
    ]
