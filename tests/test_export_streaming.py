"""Streamed dataset files (issue 18): the ledger is read in passes that keep about a hundred
bytes a row, never its events, and each row is decided by the reducer's own rules, however
many runs (and shards) wrote about it. Output folders are fabricated: fast."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batch import ledger
from batch.completed import read_pairs
from batch.export import export_dataset, write_metadata
from batch.ledger import iter_ledger_events, ledger_paths, read_ledgers
from batch.state import RowStatus
from tests.conftest import make_image

TS = "2026-01-01T00:00:{:02d}.000Z"
SMALL, LARGE = 500, 2000  # rows of the two folders whose peaks the memory tests compare


def _completed(row: str, pid: str, outputs: list[str], ts: int = 1, **extra: Any) -> dict:
    return {
        "ts": TS.format(ts),
        "event": "completed",
        "row": row,
        "prediction_id": pid,
        "outputs": outputs,
        "sha256": ["0" * 64] * len(outputs),
        "nsfw": [False] * len(outputs),
        "inference_ms": 10,
        "seed": 1,
        "prompt": f"prompt of {pid}",
        **extra,
    }


def _write(path: Path, lines: list[dict | str], tail: str = "") -> None:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text + tail)


def test_iter_ledger_events_gives_each_readable_line_at_its_offset(tmp_path, monkeypatch):
    """Offsets point at each readable line, across read blocks; blank, garbled, damaged,
    unknown and torn lines are skipped."""
    monkeypatch.setattr(ledger, "CHUNK_BYTES", 64)  # many blocks, lines across their edges
    path = tmp_path / "ledger.jsonl"
    lines: list[dict | str] = [
        {"ts": TS.format(0), "event": "run", "model": "m/a"},
        "",
        '{"event": "completed", "row": "a", "outputs": nul',
        {"ts": TS.format(1), "event": "completed", "row": "a", "outputs": None},
        {"ts": TS.format(2), "event": "from_the_future", "row": "a"},
        _completed("a", "p1", ["a.png"]),
        _completed("b", "p2", ["b.png"], meta={"long": "x" * 200}),
    ]
    _write(path, lines, tail='{"ts": "torn')
    data = path.read_bytes()
    found = list(iter_ledger_events(path))
    assert [record.get("prediction_id") or record["event"] for _, record, _ in found] == [
        "run",
        "p1",
        "p2",
    ]
    for offset, record, event in found:
        assert json.loads(data[offset:].split(b"\n", 1)[0]) == record
        assert event.kind == record["event"]


# -- each row as the reducer decides it ----------------------------------------------


def _history(rng: random.Random, rows: int, ledgers: list[list[dict | str]]) -> None:
    """Random events for each row, spread over the ledgers: retries, intents with and
    without outcomes, failures after completions, damaged and blank lines."""
    pid = 0
    for r in range(rows):
        row = f"r{r}"
        for _ in range(rng.randrange(1, 7)):
            lines = rng.choice(ledgers)
            ts, intent = TS.format(rng.randrange(20)), rng.choice(["i1", "i2"])
            kind = rng.randrange(9)
            pid += 1
            event: dict | str
            if kind == 0:
                event = {"event": "submitting", "row": row, "seed": 1, "intent": intent}
            elif kind == 1:
                event = {"event": "submitted", "row": row, "prediction_id": f"s{pid}", "seed": 1}
            elif kind in (2, 3):
                outputs = [f"{row}.png", f"{row}-2.png"][: rng.randrange(1, 3)]
                event = _completed(row, f"p{pid}", outputs)
            elif kind == 4:
                event = {"event": "failed", "row": row, "error": "x", "retryable": False}
            elif kind == 5:
                event = {"event": "submit_refused", "row": row, "intent": intent, "error": "no"}
            elif kind == 6:
                event = {"event": "submit_unknown", "row": row, "intent": intent, "error": "?"}
            elif kind == 7:
                event = {"event": "submit_settled", "row": row, "intent": intent}
                event["outcome"] = rng.choice(["absent", "orphan"])
            else:
                garbled = '{"event": "completed", "row": "' + row + '", "outp'
                lines.append(rng.choice(["", garbled]))
                continue
            lines.append({"ts": ts, **event})


def _expected(out: Path) -> list[tuple[str, str, str]]:
    """(output, row, prediction id) of every completed row, by the reducer."""
    state = read_ledgers(ledger_paths(out), keep_last=False)
    found = [
        (name, row_id, str(row.prediction_id))
        for row_id, row in state.rows.items()
        if row.status is RowStatus.COMPLETED
        for name in row.outputs
        if (out / name).is_file()
    ]
    return sorted(found)


def test_streamed_pairs_match_the_reducer_on_random_histories(tmp_path):
    """Over random multi-run histories in one to three ledgers (shards merged by time),
    the streamed pairs are exactly the reducer's completed rows, each with its last
    completed event."""
    rng = random.Random(18)
    for case in range(100):
        out = tmp_path / f"c{case}"
        out.mkdir()
        ledgers: list[list[dict | str]] = [[] for _ in range(rng.randrange(1, 4))]
        _history(rng, 6, ledgers)
        for n, lines in enumerate(ledgers):
            name = "ledger.jsonl" if n == 0 else f"ledger.shard-{n}-of-2.jsonl"
            _write(out / name, lines, tail=rng.choice(["", '{"torn']))
        for r in range(6):
            for name in (f"r{r}.png", f"r{r}-2.png"):
                if rng.random() < 0.9:
                    (out / name).touch()
        with read_pairs(out) as pairs:
            got = [(p.file_name, p.row, str(p.prediction_id)) for p in pairs]
        assert got == _expected(out), case


def test_every_dataset_file_takes_each_rows_last_decision(tmp_path):
    """Failed then completed: exported with its completion. Completed twice: the second.
    Completed then resubmitted with no answer, or then in flight: left out. A refused
    resubmit leaves the completion standing."""
    out = tmp_path / "out"
    out.mkdir()
    photo = make_image(tmp_path / "in.png", (10, 20, 30))
    common = {"image": "in.png", "image_path": str(photo)}
    lines: list[dict | str] = [
        {"ts": TS.format(0), "event": "failed", "row": "a", "error": "x", "retryable": True},
        _completed("a", "pa", ["a.png"], 2, **common),
        _completed("b", "pb1", ["b.png"], 1, **common),
        _completed("b", "pb2", ["b.png"], 3, **common),
        _completed("c", "pc", ["c.png"], 1, **common),
        {"ts": TS.format(4), "event": "submitting", "row": "c", "seed": 1, "intent": "i"},
        _completed("d", "pd", ["d.png"], 1, **common),
        {"ts": TS.format(4), "event": "submitting", "row": "d", "seed": 1, "intent": "j"},
        {"ts": TS.format(5), "event": "submit_refused", "row": "d", "intent": "j", "error": "no"},
        _completed("e", "pe", ["e.png"], 1, **common),
        {"ts": TS.format(6), "event": "submitted", "row": "e", "prediction_id": "pe2", "seed": 1},
    ]
    _write(out / "ledger.jsonl", lines)
    for row in "abcde":
        make_image(out / f"{row}.png", (1, 2, 3))
    want = [("a", "pa"), ("b", "pb2"), ("d", "pd")]
    metadata = [json.loads(x) for x in write_metadata(out).read_text().splitlines()]
    assert [(m["row"], m["prediction_id"]) for m in metadata] == want
    assert [m["edit_prompt"] for m in metadata] == ["prompt of pa", "prompt of pb2", "prompt of pd"]
    pq = pytest.importorskip("pyarrow.parquet")
    (shard,) = export_dataset(out, "parquet", to=str(tmp_path / "pq"))
    table = pq.read_table(shard).to_pydict()
    assert list(zip(table["row"], table["prediction_id"], strict=True)) == want


# -- memory does not follow the rows ------------------------------------------------------


def _folder(root: Path, rows: int) -> Path:
    """A finished OUT_DIR of ``rows`` rows, each retried once (a failure, then its
    completion), with one shared input and empty outputs."""
    out = root / f"out{rows}"
    out.mkdir()
    photo = make_image(root / "in.png", (10, 20, 30))
    with (out / "ledger.jsonl").open("w") as fh:
        fh.write(json.dumps({"ts": TS.format(0), "event": "run", "model": "m/a"}) + "\n")
        for n in range(rows):
            row = f"row-{n:06d}"
            fail = {"ts": TS.format(1), "event": "failed", "row": row, "error": "busy"}
            fh.write(json.dumps({**fail, "retryable": True}) + "\n")
            done = _completed(row, f"pred-{n:08d}", [f"{row}.jpg"], 2, seed=n)
            done.update(image="in.png", image_path=str(photo), meta={"k": n % 7, "tag": "x" * 40})
            fh.write(json.dumps(done) + "\n")
            (out / f"{row}.jpg").touch()
    return out


def _peak_per_row(tmp_path: Path, work: Callable[[Path], object]) -> float:
    """Bytes of Python memory at peak that each extra row adds: the slope between two
    folders' peaks (what stays the same, imports and read buffers, cancels out)."""
    small, large = _folder(tmp_path, SMALL), _folder(tmp_path, LARGE)
    work(small)  # imports, first-use caches
    peaks = []
    for out in (small, large):
        tracemalloc.start()
        try:
            work(out)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return (peaks[1] - peaks[0]) / (LARGE - SMALL)


@pytest.fixture(autouse=True)
def _small_reads(monkeypatch):
    """Ledger reads of 64 KB: their fixed share of the peak is reached at a few hundred
    rows, so two small folders show the part that grows with rows."""
    monkeypatch.setattr(ledger, "STREAM_BYTES", 1 << 16)


def test_metadata_jsonl_memory_grows_by_bytes_not_events_per_row(tmp_path):
    """write_metadata holds about a hundred bytes a row (its sort key and row offsets), far
    below one event's ~1 KB: from 500 to 2,000 rows its peak grows < 400 B a row."""
    assert _peak_per_row(tmp_path, write_metadata) < 400


def test_parquet_export_memory_grows_by_bytes_not_events_per_row(tmp_path):
    """The Parquet export (metadata.jsonl included) streams row groups: its Python
    memory at peak grows < 400 B a row from 500 to 2,000 rows."""
    pytest.importorskip("pyarrow")
    slope = _peak_per_row(
        tmp_path, lambda out: export_dataset(out, "parquet", to=str(out.parent / "pq"))
    )
    assert slope < 400
