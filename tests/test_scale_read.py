"""Mechanisms that keep a million-row manifest cheap, each checked at a small scale."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

from batch.client import Client
from batch.events import Completed, Event, Submitted, encode
from batch.ledger import LedgerWriter, ledger_paths, read_ledger
from batch.manifest import _request_hash, _text_lines, canonical_params, load_manifest
from batch.options import RunOptions
from batch.plan import plan_rows
from batch.runner import Runner
from batch.state import NO_RECORD, Action, LedgerState, RowStatus, apply
from tests.conftest import make_image


def _csv_manifest(tmp_path: Path, rows: int) -> Path:
    make_image(tmp_path / "images" / "a.png")
    lines = ["id,image,prompt,seed"]
    lines += [f"r{n:06d},images/a.png,edit number {n % 7},{n}" for n in range(rows)]
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _ledger_line(event: Event, ts: str = "2026-01-01T00:00:00.000Z") -> str:
    return json.dumps({"ts": ts, **encode(event)}) + "\n"


def test_row_hash_is_the_canonical_json_it_always_was() -> None:
    """The fingerprint (and so every derived id) is unchanged by building its JSON by hand."""
    cases = [
        ("m/x", "a.png", 'make it "bright" \\ é ☃ \u2028', 7, "jpeg", {}),
        ("m/x", "https://h/i.jpg", "p", -1, "png", {"z": 1, "a": [1.5, None, True], "b": "ü"}),
        ("m/x", '["a.png", "b.png"]', "p\nq", 2_147_483_647, "webp", {"n": {"y": 2, "x": 1}}),
    ]
    for model, image, prompt, seed, fmt, params in cases:
        expected = json.dumps(
            [model, image, prompt, seed, fmt, params],
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        )
        got = _request_hash(model, image, prompt, seed, fmt, canonical_params(params))
        assert got == hashlib.sha256(expected.encode()).hexdigest()


def test_manifest_lines_read_as_stringio_reads_them() -> None:
    """Manifest lines are split as io.StringIO split them, CR, LF and CRLF alike."""
    for text in ["a\nb\r\nc", "a\n\nb\n", "x", "a\rb\r\nc\n", "a\r\n\r\n", "\n", "é\n☃"]:
        for newline in ("", None):
            assert list(_text_lines(text, newline)) == list(io.StringIO(text, newline=newline))


def test_ledger_is_read_in_runs_not_whole(tmp_path: Path) -> None:
    """Reading a 24 MB ledger holds a few MB of it at a time, not the whole file."""
    path = tmp_path / "ledger.jsonl"
    pad = "x" * 8000  # a field this version does not know: read past, never kept
    with open(path, "w") as fh:
        for n in range(3000):
            fh.write(
                _ledger_line(Submitted(f"r{n}", f"p{n}", 1, 1, intent=f"i{n}"))[:-2]
                + f',"note":"{pad}"}}\n'
            )
    size = path.stat().st_size
    tracemalloc.start()
    try:
        state, end = read_ledger(path, keep_last=False)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end == size and len(state.rows) == 3000
    assert peak - kept < size / 3, (
        f"{(peak - kept) / 1e6:.1f} MB held for a {size / 1e6:.0f} MB file"
    )


def test_planning_keeps_one_byte_per_row(tmp_path: Path) -> None:
    """Planning 20k rows keeps a byte per row: no list of (row, plan) pairs."""
    manifest = load_manifest(_csv_manifest(tmp_path, 20_000))
    state = LedgerState()
    tracemalloc.start()
    try:
        planned = plan_rows(manifest.rows, state, set(), retry_failed=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert planned.counts[Action.SUBMIT.value] == 20_000
    assert peak < 20_000 * 4, f"{peak} bytes to plan 20k rows"


def test_workers_take_polls_first_and_never_a_row_the_run_took(tmp_path: Path) -> None:
    """Rows to poll go before rows to submit, and a row whose state moved on is not handed out."""
    manifest = load_manifest(_csv_manifest(tmp_path, 4))
    a, b, c, d = (row.id for row in manifest.rows)
    fingerprints = [row.fingerprint for row in manifest.rows]
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").write_text(
        _ledger_line(Submitted(b, "pb", 1, 1, intent="ib", fingerprint=fingerprints[1]))
        + _ledger_line(Submitted(d, "pd", 1, 1, intent="id", fingerprint=fingerprints[3]))
    )
    runner = Runner(manifest, Client("http://127.0.0.1:9", "k"), RunOptions(out_dir=out))
    runner.load_state()
    planned = runner._plan_all()
    work = runner._work(planned)
    assert [next(work)[0].id for _ in range(2)] == [b, d]  # the known predictions first
    row, plan = next(work)
    assert (row.id, plan.action) == (a, Action.SUBMIT)
    # Row c ends (elsewhere in the run) before a worker reaches it: it is not taken again.
    done = Completed(c, "pc", (f"{c}.jpeg",), fingerprint=fingerprints[2])
    apply(runner.state, done, {})
    (out / f"{c}.jpeg").write_bytes(b"x")
    assert list(work) == []


def test_a_run_keeps_no_record_of_the_rows_it_writes(tmp_path: Path) -> None:
    """The writer's state keeps row facts, not each written line: a run does not grow per row."""

    async def go() -> LedgerState:
        state = LedgerState()
        writer = LedgerWriter(tmp_path / "ledger.jsonl", state)
        await writer.start()
        for n in range(3):
            await writer.write(Completed(f"r{n}", f"p{n}", (f"r{n}.jpeg",), sha256=("s",)))
        await writer.close()
        return state

    state = asyncio.run(go())
    assert [r.status for r in state.rows.values()] == [RowStatus.COMPLETED] * 3
    assert all(r.last is NO_RECORD for r in state.rows.values())
    assert read_ledger(tmp_path / "ledger.jsonl")[0].rows["r1"].last["sha256"] == ["s"]


def test_ledger_paths_one_listing(tmp_path: Path) -> None:
    """The folder's ledgers are the main one, then shard ledgers in order, nothing else."""
    for name in [
        "ledger.jsonl",
        "ledger.shard-1-of-2.jsonl",
        "ledger.shard-0-of-2.jsonl",
        "ledger.shard-x.json",
        "r1.jpeg",
        "xledger.shard-0-of-2.jsonl",
    ]:
        (tmp_path / name).write_text("")
    (tmp_path / "ledger.shard-9-of-9.jsonl").mkdir()
    names = [p.name for p in ledger_paths(tmp_path)]
    assert names == ["ledger.jsonl", "ledger.shard-0-of-2.jsonl", "ledger.shard-1-of-2.jsonl"]


def _rows_and_problems(path: Path) -> tuple[list[tuple[object, ...]], list[str]]:
    from batch.errors import ManifestError

    try:
        rows = load_manifest(path).rows
    except ManifestError as exc:
        return [], [str(p) for p in exc.problems]
    seen = [(r.id, r.fingerprint, r.image, r.image_path, r.prompt, r.seed, r.line) for r in rows]
    return seen, []


def test_plain_csv_cells_read_as_the_general_path_reads_them(tmp_path: Path, monkeypatch) -> None:
    """CSV records taken from their cells (no dict) give the rows, ids and problems the
    general path gives, including the cells it must trim, skip or refuse."""
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", (0, 200, 0))
    cases = {
        "plain": ["id,image,prompt,seed", "r1,a.png,p1,1", "r2,b.png,p2,2", "r3,a.png,p1,3"],
        "derived ids, blank and spaced cells": [
            "image,prompt,seed,output_format,id",
            "a.png,p,,,",
            " a.png ,  spaced prompt , 7 , png ,",
            "a.png,p,1,webp, r9 ",
            ",,,,",
            "a.png,p,1,jpeg,",  # the same request again: a second derived id
            "a.png|b.png,p,1,jpeg,",
        ],
        "problems": [
            "id,image,prompt,seed",
            "r1,a.png,p,1",
            "r1,a.png,p,2",  # an id twice
            "r2,a.png,   ,2",  # a blank prompt
            "r3,a.png,p,x",  # not a seed
            "r4,missing.png,p,1",
            "r5,a.png,p,99999999999999999999",
            "r6,a.png",  # too few cells
            "../x,a.png,p,1",
            "r7,a.png,p,5",
        ],
        "no seed column": ["image,prompt", "a.png,p", "b.png,p", "a.png,q"],
    }
    from batch.manifest import _Builder

    taken: list[bool] = []
    real = _Builder.add_values

    def spy(*args: Any, **kwargs: Any) -> bool:
        taken.append(real(*args, **kwargs))
        return taken[-1]

    for name, lines in cases.items():
        path = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.csv"
        path.write_text("\n".join(lines) + "\n")
        taken.clear()
        with monkeypatch.context() as patched:
            patched.setattr(_Builder, "add_values", spy)
            fast = _rows_and_problems(path)
        assert any(taken), f"{name}: no record took the fast path"
        with monkeypatch.context() as patched:  # every record down the general path
            patched.setattr("batch.manifest._Builder.add_values", lambda *a, **k: False)
            general = _rows_and_problems(path)
        assert fast == general, name
        assert fast[0] or fast[1], name


def test_a_csv_duplicate_id_names_the_first_rows_line_without_keeping_lines(
    tmp_path: Path,
) -> None:
    """Plain CSV rows keep no line number beside their id (a million ints); a duplicate
    or a colliding id still names the line the table has for the first row."""
    import pytest

    from batch.errors import ManifestError

    make_image(tmp_path / "a.png")
    rows = ["id,image,prompt,seed", "x,a.png,p,1", "z,a.png,p,2", "", "q,a.png,p,3"]
    rows += ["x,a.png,q,4", "z-1,a.png,p,5"]
    path = tmp_path / "m.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    found = [(p.line, p.field, p.reason) for p in caught.value.problems]
    assert found == [
        (6, "id", "duplicate id 'x' (first at line 2)"),
        (7, "id", "'z-1' could collide with output 1 of row 'z'; pick another id"),
    ]
