"""The ledger's fast read of row facts (no record kept) agrees with the full read."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from batch import events, ledger
from batch.events import Completed, Submitted, Submitting
from batch.events import encode as encode_event
from batch.ledger import encode, read_ledger
from batch.state import LedgerState

ODD: list[Any] = [None, True, False, 0, -1, -0.0, 1.5, 10**30, 2**70, "", "x", 'q"uote',
                  "back\\slash", "tab\there", "é", "\u202e", "\ud83c", [], ["a"], ["a", 1],
                  [True], {}, {"k": 1}, 1e300]  # fmt: skip
TEXT_SWAPS = [("1,", "1e999,"), ("1,", "01,"), ("1,", "-0,"), (":[", ": ["), ('",', '" ,'),
              ("false", "null"), ("}", "}}"), ('"seed"', '"Seed"'), ("p", "\\u0070"),
              ("0.024", "1e999"), ("0.024", "2E-3"), ("0.024", "-0.024"), ("0.024", "null"),
              ('"m/x"', "null"), ('"i', '"\\u0069')]  # fmt: skip


def _completed(n: int) -> dict[str, Any]:
    event = Completed(
        f"r{n}", f"p{n}", (f"r{n}.jpg",), ("ab",), (False,), 7, n, f"f{n}", "m/x", "a prompt"
    )
    return {"ts": f"2026-01-01T00:00:{n % 60:02d}.000Z", **encode_event(event)}


def _submitting(n: int) -> dict[str, Any]:
    sha = (f"s{n}", ("prompt", "image", "seed")) if n % 3 else (None, ())
    event = Submitting(f"r{n}", n, f"i{n}", 0.024, f"f{n}", *sha, "m/x" if n % 2 else None)
    return {"ts": f"2026-01-01T00:00:{n % 60:02d}.000Z", **encode_event(event)}


def _submitted(n: int) -> dict[str, Any]:
    event = Submitted(f"r{n}", f"p{n}", n, 1, f"i{n}", 0.024, f"f{n}", n % 2)
    return {"ts": f"2026-01-01T00:00:{n % 60:02d}.500Z", **encode_event(event)}


def _facts(state: LedgerState) -> Any:
    rows = {
        k: (r.status, r.fingerprint, r.prediction_id, r.seed, r.outputs, r.ts, r.damaged,
            r.submits, r.unknown, r.submitted_at, r.intent, r.intent_price)
        for k, r in state.rows.items()
    }  # fmt: skip
    damage = [(d.line, d.row, d.reason) for d in state.damage]
    doubts = {k: (d.row, d.price, d.ts, d.request_sha, d.request_keys, d.model, d.seed,
                  d.fingerprint, d.counted) for k, d in state.doubts.items()}  # fmt: skip
    money = (state.submits, state.possible_duplicates, state.billed_spend, state.unknown_spend)
    return rows, damage, doubts, state.predictions, money, state.spend, state.open_spend


def _mutated(rng: random.Random, n: int) -> bytes:
    record = rng.choice((_completed, _completed, _submitting, _submitted))(n)
    roll = rng.random()
    if roll < 0.35:
        record[rng.choice([*record, "extra"])] = rng.choice(ODD)
    elif roll < 0.45:
        record.pop(rng.choice(list(record)))
    # As the writer lays a line out (a lone surrogate written as its escape).
    line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode(
        "utf-8", "backslashreplace"
    )
    if 0.45 <= roll < 0.7:
        old, new = rng.choice(TEXT_SWAPS)
        line = line.replace(old.encode(), new.encode(), 1)
    elif 0.7 <= roll < 0.75:
        pos = rng.randrange(len(line) - 1)
        line = line[:pos] + bytes([rng.randrange(256)]) + line[pos + 1 :]
    return line


def test_fast_read_gives_the_full_reads_row_facts(tmp_path: Path):
    """Seeded mutations of compact ``submitting``, ``submitted`` and ``completed`` lines:
    reading without records (the fast path) gives the same rows, doubts, damage and spend
    as the full read, line for line."""
    path = tmp_path / "ledger.jsonl"
    rng = random.Random(18)
    for case in range(400):
        lines = [_mutated(rng, rng.randrange(6)) for _ in range(rng.randrange(1, 12))]
        if rng.random() < 0.3:
            lines.insert(0, b'{"ts":"t","event":"submitting","row":"r1","intent":"i","seed":1}\n')
        path.write_bytes(b"".join(lines))
        full = _facts(read_ledger(path, keep_last=True)[0])
        assert _facts(read_ledger(path, keep_last=False)[0]) == full, case


def test_compact_lines_are_read_without_json(tmp_path: Path, monkeypatch):
    """A finished run's lines (intent, answer, result), as the writer lays them out, are
    read by the line patterns: no JSON parse, no shape check, no event object, and the
    same facts."""
    path = tmp_path / "ledger.jsonl"
    made = (make(n) for n in range(50) for make in (_submitting, _submitted, _completed))
    path.write_bytes(b"".join(map(encode, made)))
    expected = _facts(read_ledger(path, keep_last=True)[0])

    def refuse(*_: Any) -> Any:
        raise AssertionError("fell back to the full decode")

    monkeypatch.setattr(ledger, "_parse", refuse)
    monkeypatch.setattr(ledger, "decode", refuse)
    monkeypatch.setattr(ledger, "check_shape", refuse)
    assert _facts(read_ledger(path, keep_last=False)[0]) == expected


@pytest.mark.parametrize(
    "bad",
    [b'"seed":"1"', b'"nsfw":[1]', b'"inference_ms":-1', b'"sha256":null', b'"outputs":[2]'],
)
def test_a_damaged_compact_line_still_holds_its_row(tmp_path: Path, bad: bytes):
    """A compact ``completed`` line with one mistyped field is damage on the fast read too."""
    line = encode(_completed(3))
    key = bad.split(b":")[0]
    start = line.index(key)
    end = line.index(b',"', start + len(key))
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(line[:start] + bad + line[end:])
    state, _ = read_ledger(path, keep_last=False)
    assert state.rows["r3"].damaged and state.corrupt_lines == 1
    assert events.COMPLETED_LINE.fullmatch(path.read_text().strip()) is None
