"""Seeded fuzz of the ledger reader: whatever bytes a ledger holds, reading it gives a
state (with damage recorded) and never raises; no damaged line ever unlocks a payment."""

from __future__ import annotations

import json
import random
from pathlib import Path

from batch.ledger import read_ledger
from batch.state import Action, plan_row

CASES = 600

BASE = [
    {"ts": "2026-01-01T00:00:00.000Z", "event": "run", "run_id": "r", "manifest": "m.yaml",
     "model": "a/b", "base_url": "http://x", "version": "0", "price": 0.024, "schema": 2},
    {"ts": "2026-01-01T00:00:01.000Z", "event": "uploaded", "sha256": "ab" * 32,
     "download_url": "http://x/in.png", "file": "in.png", "base_url": "http://x"},
    {"ts": "2026-01-01T00:00:02.000Z", "event": "submitting", "row": "r1", "seed": 1,
     "intent": "i1", "price": 0.024, "fingerprint": "f1", "request_sha": "00" * 32,
     "request_keys": ["prompt", "image", "seed"], "model": "a/b"},
    {"ts": "2026-01-01T00:00:03.000Z", "event": "submitted", "row": "r1",
     "prediction_id": "p1", "seed": 1, "attempt": 1, "intent": "i1", "price": 0.024},
    {"ts": "2026-01-01T00:00:04.000Z", "event": "submitting", "row": "r2", "seed": 2,
     "intent": "i2", "price": 0.024},
    {"ts": "2026-01-01T00:00:05.000Z", "event": "submit_unknown", "row": "r2", "intent": "i2",
     "error": "dropped", "status": None},
    {"ts": "2026-01-01T00:00:06.000Z", "event": "submit_settled", "row": "r2", "intent": "i2",
     "outcome": "orphan", "prediction_id": "p9"},
    {"ts": "2026-01-01T00:00:07.000Z", "event": "completed", "row": "r1", "prediction_id": "p1",
     "outputs": ["r1.png"], "sha256": ["00" * 32], "nsfw": [False], "inference_ms": 10,
     "seed": 1, "meta": {"k": [1, 2]}},
    {"ts": "2026-01-01T00:00:08.000Z", "event": "failed", "row": "r3", "error": "x",
     "retryable": True, "prediction_id": None, "code": 1200, "live": False, "attempt": 1},
    {"ts": "2026-01-01T00:00:09.000Z", "event": "finished", "run_id": "r", "summary": {"a": 1}},
]  # fmt: skip
ODD = [None, True, 0, -1, 1.5, float("inf"), "", "x" * 300, [], {}, [None], {"a": None},
       "\u202e", "\ud83c", 2**70]  # fmt: skip


def _mutate_record(rng: random.Random, record: dict) -> dict:
    record = dict(record)
    key = rng.choice([*record.keys(), "extra", "row", "event"])
    choice = rng.random()
    if choice < 0.4:
        record[key] = rng.choice(ODD)
    elif choice < 0.6:
        record.pop(key, None)
    elif choice < 0.8:
        record["event"] = rng.choice(["completed", "submitted", "failed", "nope", None, 3])
    else:
        record[key] = [record.get(key)]
    return record


def _line(rng: random.Random, record: dict) -> bytes:
    text = json.dumps(record)  # NaN/Infinity as Python writes them: not JSON
    data = text.encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.1:
        data = data[: rng.randrange(len(data))]
    elif roll < 0.2:
        pos = rng.randrange(len(data))
        data = data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :]
    elif roll < 0.25:
        data = b"\0" * rng.randrange(1, 20)
    return data + (b"\n" if rng.random() < 0.97 else b"")


def _ledger(rng: random.Random) -> bytes:
    lines = []
    for record in BASE:
        if rng.random() < 0.3:
            record = _mutate_record(rng, record)
        lines.append(
            _line(rng, record) if rng.random() < 0.5 else json.dumps(record).encode() + b"\n"
        )
    if rng.random() < 0.3:
        rng.shuffle(lines)
    if rng.random() < 0.2:
        lines.insert(rng.randrange(len(lines) + 1), rng.randbytes(rng.randrange(1, 80)) + b"\n")
    return b"".join(lines)


def test_the_reader_survives_every_mutated_ledger(tmp_path: Path):
    """600 seeded mutations: every one reads without raising, and a row that a damaged
    line names is never planned for a submit."""
    path = tmp_path / "ledger.jsonl"
    rng = random.Random(1234)
    damaged_seen = 0
    for _ in range(CASES):
        path.write_bytes(_ledger(rng))
        state, good_end = read_ledger(path)
        assert 0 <= good_end <= path.stat().st_size
        assert state.spend >= 0 and state.possible_duplicates >= 0
        damaged_seen += bool(state.damage)
        hold_all = state.damage_unattributed
        for row_id, row in state.rows.items():
            plan = plan_row(row, row.fingerprint or "f", set(), False, hold_all)
            if row.damaged or hold_all:
                assert plan.action is not Action.SUBMIT, (row_id, state.damage)
    assert damaged_seen > CASES // 4  # the mutator really damages ledgers
