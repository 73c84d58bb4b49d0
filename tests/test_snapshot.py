"""The ledger's snapshot: a read that starts from it gives what a read of the whole
ledger gives, and a snapshot that does not match the ledger is never used."""

from __future__ import annotations

import fcntl
import json
import random
import subprocess
import sys
import zlib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from batch import refresh, snapshot
from batch.api import run_manifest
from batch.ledger import read_ledger
from batch.manifest import load_manifest
from batch.snapshot import snapshot_path
from batch.state import LedgerState
from tests.conftest import run_subprocess, simple_rows, snapshot_left, subprocess_env
from tests.test_fuzz_ledger import _ledger
from tests.test_ledger_fast import _mutated


def _everything(state: LedgerState) -> dict[str, Any]:
    """Every field of a read's state, rows field by field (a row's ``last`` is empty)."""
    return {f.name: getattr(state, f.name) for f in fields(state)}


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> list[snapshot.Start]:
    """Every read leaves a snapshot; the list holds the ones reads started from."""
    monkeypatch.setattr(snapshot, "SNAPSHOT_LINES", 0)
    used: list[snapshot.Start] = []
    load = snapshot.load

    def spy(*args: Any) -> snapshot.Start | None:
        start = load(*args)
        if start is not None:
            used.append(start)
        return start

    monkeypatch.setattr(snapshot, "load", spy)
    return used


def _whole(path: Path) -> dict[str, Any]:
    """The ledger read from its first byte, any snapshot set aside."""
    snap = snapshot_path(path)
    kept = snap.read_bytes() if snap.is_file() else None
    if kept is not None:
        snap.unlink()
    try:
        saved, snapshot.SNAPSHOT_LINES = snapshot.SNAPSHOT_LINES, 1 << 60
        try:
            return _everything(read_ledger(path, keep_last=False)[0])
        finally:
            snapshot.SNAPSHOT_LINES = saved
    finally:
        if kept is not None:
            snap.write_bytes(kept)


def _cut(data: bytes, rng: random.Random) -> bytes:
    ends = [i + 1 for i, b in enumerate(data) if b == 0x0A]
    return data[: rng.choice(ends)] if ends else b""


def test_a_read_from_a_snapshot_is_the_read_of_the_whole_ledger(tmp_path: Path, snapshots):
    """Seeded ledgers (damaged, torn, NUL-filled, open intents, lost answers), each cut
    at a random line: the snapshot of the first part, then the lines after it, give
    every field of the state a read from the first byte gives."""
    path = tmp_path / "ledger.jsonl"
    rng = random.Random(23)
    for case in range(300):
        if case % 2:
            data = _ledger(rng)
        else:
            lines = [_mutated(rng, rng.randrange(8)) for _ in range(rng.randrange(2, 30))]
            data = b"".join(lines)
        path.write_bytes(_cut(data, rng))
        read_ledger(path, keep_last=False)  # leaves the first part's snapshot
        path.write_bytes(data)
        before = len(snapshots)
        got = _everything(read_ledger(path, keep_last=False)[0])
        assert got == _whole(path), case
        if snapshot_path(path).exists() and data.count(b"\n"):
            assert len(snapshots) in (before, before + 1)
    assert len(snapshots) > 200  # most reads really started from a snapshot


def _run_folder(tmp_path: Path) -> Path:
    """A ledger with rows completed, failed, in flight and in doubt, and an upload."""
    path = tmp_path / "ledger.jsonl"
    rng = random.Random(5)
    path.write_bytes(
        b"".join(_ledger(rng) for _ in range(3)) + b"".join(_mutated(rng, n) for n in range(40))
    )
    # Nothing torn at the end: every line whole.
    path.write_bytes(path.read_bytes()[: path.read_bytes().rfind(b"\n") + 1])
    return path


@pytest.mark.parametrize(
    "change",
    ["edit in place", "cut short", "another ledger", "a line put before", "renamed"],
)
def test_a_snapshot_that_does_not_match_the_ledger_is_not_used(
    tmp_path: Path, snapshots, change: str
):
    """A ledger edited under the same length, cut, replaced, or a snapshot beside a
    ledger of another name: the read is the whole ledger's, not the snapshot's."""
    path = _run_folder(tmp_path)
    read_ledger(path, keep_last=False)
    data = path.read_bytes()
    if change == "edit in place":
        at = data.index(b'"r1"')
        path.write_bytes(data[:at] + b'"r8"' + data[at + 4 :])
    elif change == "cut short":
        path.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1])
    elif change == "another ledger":
        path.write_bytes(data.replace(b"p1", b"p7"))
    elif change == "a line put before":
        path.write_bytes(b'{"ts":"x","event":"nope"}\n' + data)
    else:
        other = tmp_path / "ledger.shard-1-of-2.jsonl"
        other.write_bytes(data)
        snapshot_path(path).rename(snapshot_path(other))
        path = other
    snapshots.clear()
    got = _everything(read_ledger(path, keep_last=False)[0])
    assert snapshots == []
    assert got == _whole(path)


def _rewrite(path: Path, edit: Any, *, reseal: bool = True) -> None:
    """Edit a snapshot's lines; ``reseal`` gives the trailer the CRC of what the edit
    left, as a forger would (else the CRC alone would set every edit aside)."""
    lines = edit(path.read_bytes().splitlines(keepends=True))
    if reseal and lines and lines[-1].startswith(b'{"end"'):
        trailer = json.loads(lines[-1])
        trailer["crc32"] = zlib.crc32(b"".join(lines[:-1]))
        lines[-1] = json.dumps(trailer).encode() + b"\n"
    path.write_bytes(b"".join(lines))


def _chunk_edit(key: str, value: Any) -> Any:
    def edit(lines: list[bytes]) -> list[bytes]:
        chunk = json.loads(lines[1])
        chunk["cols"][key] = value
        return [lines[0], json.dumps(chunk).encode() + b"\n", *lines[2:]]

    return edit


def _head_edit(change: Any) -> Any:
    def edit(lines: list[bytes]) -> list[bytes]:
        head = json.loads(lines[0])
        change(head)
        return [json.dumps(head).encode() + b"\n", *lines[1:]]

    return edit


def _mid_line(head: dict[str, Any]) -> None:
    """The offset one byte back, with the CRC and line count of that prefix."""
    data = Path(head.pop("_ledger")).read_bytes()[: head["offset"] - 1]
    head.update(offset=len(data), crc32=zlib.crc32(data), lines=data.count(b"\n"))


PLANTED = {
    "torn": lambda lines: [*lines[:-1], lines[-1][:5]],
    "no trailer": lambda lines: lines[:-1],
    "not JSON": lambda lines: [lines[0], b"{nope\n", *lines[2:]],
    "nested past recursion": lambda lines: [lines[0], b"[" * 100_000 + b"\n", *lines[2:]],
    "other format": _head_edit(lambda h: h.update(format=9)),
    "another reducer": _head_edit(lambda h: h.update(reducer="0" * 32)),
    "output not a name": _chunk_edit("outputs", [[7]] * 99),
    "unknown status": _chunk_edit("base", {"all": "paid"}),
    "index out of range": _chunk_edit("ts", {"t": ["x"], "i": [5] * 99}),
    "negative index": _chunk_edit("ts", {"t": ["x"], "i": [-1] * 99}),
    "wrong type": _chunk_edit("submits", {"all": "9"}),
    "negative submits": _chunk_edit("submits", {"all": -1}),
    "negative intent price": _chunk_edit("intent_price", {"all": -0.024}),
    "NaN intent price": _chunk_edit("intent_price", {"t": [0.0, float("nan")], "i": [1] * 99}),
    "short column": _chunk_edit("fingerprint", []),
    "spend NaN": _head_edit(lambda h: h["state"].update(billed_spend=float("nan"))),
    "spend negative": _head_edit(lambda h: h["state"].update(billed_spend=-1.0)),
    "spend of 400 digits": _head_edit(lambda h: h["state"].update(billed_spend=10**400)),
    "price negative": _head_edit(lambda h: h["state"].update(price=-0.024)),
    "count a float": _head_edit(lambda h: h["state"].update(possible_duplicates=1.5)),
    "chunks infinite": _head_edit(lambda h: h.update(chunks=float("inf"))),
    "offset true": _head_edit(lambda h: h.update(offset=True)),
    "offset inside a line": _head_edit(_mid_line),
    "lines one short": _head_edit(lambda h: h.update(lines=h["lines"] - 1)),
    "damage past its lines": _head_edit(lambda h: h["state"].update(damage=[[10**6, None, "x"]])),
    "rows lie": _head_edit(lambda h: h.update(rows=h["rows"] + 1)),
    "doubt flag a string": _head_edit(
        lambda h: h["state"].update(
            doubts=[["r1", "i", 0.024, None, None, [], None, 1, None, "no"]]
        )
    ),
    "upload forever": _head_edit(
        lambda h: h["state"].update(uploads=[["ab", "http://x/i.png", float("inf"), "http://x"]])
    ),
    "a byte flipped, not resealed": lambda lines: [
        lines[0],
        lines[1].replace(b'"all":0', b'"all":1', 1),
        *lines[2:],
    ],
}


@pytest.mark.parametrize("damage", list(PLANTED))
def test_a_damaged_or_planted_snapshot_is_not_used(tmp_path: Path, snapshots, damage: str):
    """A torn, garbled or mistyped snapshot (or one planted with values no ledger line
    could give) is set aside and the ledger is read whole."""
    path = tmp_path / "ledger.jsonl"
    lines = [_mutated(random.Random(n), n) for n in range(99)]
    path.write_bytes(b"".join(line for line in lines if line.endswith(b"\n")))
    read_ledger(path, keep_last=False)
    snapshot.SNAPSHOT_LINES = 1 << 60  # the damaged snapshot stays as it is
    if damage == "offset inside a line":
        _rewrite(
            snapshot_path(path), _head_edit(lambda h: h.update(_ledger=str(path))), reseal=False
        )
    _rewrite(snapshot_path(path), PLANTED[damage], reseal="not resealed" not in damage)
    snapshots.clear()
    got = _everything(read_ledger(path, keep_last=False)[0])
    assert snapshots == []
    assert got == _whole(path)


def test_a_folder_that_refuses_the_snapshot_still_reads(tmp_path: Path, snapshots):
    """The snapshot cannot be written (its name is taken by a folder, as a full or
    read-only disk refuses it): the read is whole and raises nothing."""
    path = _run_folder(tmp_path)
    (snapshot_path(path) / "x").mkdir(parents=True)
    got = _everything(read_ledger(path, keep_last=False)[0])
    assert snapshot_path(path).is_dir() and snapshots == []
    # No temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, snapshot_path(path).name]
    )
    assert got == _whole(path)


def test_a_run_leaves_a_snapshot_of_its_whole_ledger(
    tmp_path: Path, images, write_manifest, emulator
):
    """A run that wrote many lines has a detached process refresh the snapshot as it
    ends: it covers the whole ledger, and a resume from it sends nothing."""
    manifest = write_manifest(simple_rows(images, 6))
    out = tmp_path / "out"
    args = ("run", manifest, "--base-url", emulator.base_url, "--out", out, "--json",
            "--no-progress")  # fmt: skip
    first = run_subprocess(*args, WSBATCH_SNAPSHOT_LINES="10")
    assert first.returncode == 0, first.stderr
    head = snapshot_left(out / "ledger.jsonl")
    assert head is not None and head["rows"] == 6
    submits = emulator.stats.submits_accepted
    second = run_subprocess(*args, WSBATCH_SNAPSHOT_LINES="10")
    summary = json.loads(second.stdout)
    assert summary["already_done"] == 6, summary
    assert emulator.stats.submits_accepted == submits == 6


def test_a_short_run_leaves_no_snapshot(tmp_path: Path, images, write_manifest, emulator):
    """A run of fewer lines than the threshold starts no refresh (its ledger reads fast)."""
    manifest = write_manifest(simple_rows(images, 3))
    out = tmp_path / "out"
    done = run_subprocess("run", manifest, "--base-url", emulator.base_url, "--out", out,
                          "--no-progress", WSBATCH_SNAPSHOT_LINES="100")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert snapshot_left(out / "ledger.jsonl", timeout=1.0) is None


def test_a_refresh_that_cannot_start_never_fails_the_run(
    tmp_path: Path, images, write_manifest, emulator, monkeypatch
):
    """No interpreter to start the refresh with (an embedding host, no processes left):
    the run ends as it would, and the next long read leaves the snapshot instead."""
    monkeypatch.setenv(snapshot.SNAPSHOT_LINES_ENV, "5")
    monkeypatch.setattr(refresh.sys, "executable", str(tmp_path / "no-python"))
    manifest = load_manifest(write_manifest(simple_rows(images, 4)))
    summary = run_manifest(manifest, out_dir=tmp_path / "out", base_url=emulator.base_url)
    assert summary.completed == 4 and summary.exit_code == 0
    ledger = tmp_path / "out" / "ledger.jsonl"
    assert not snapshot_path(ledger).exists()
    read_ledger(ledger, keep_last=False)
    assert snapshot_left(ledger, timeout=0.1) is not None


def test_a_resealed_snapshot_is_used_when_its_values_hold(tmp_path: Path, snapshots):
    """The control for the planted cases: a snapshot re-encoded and resealed with the
    same values is used (so each of them is set aside for its value, not its CRC)."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"".join(_mutated(random.Random(n), n) for n in range(99)).rsplit(b"\n", 1)[0])
    path.write_bytes(path.read_bytes() + b"\n")
    read_ledger(path, keep_last=False)
    snapshot.SNAPSHOT_LINES = 1 << 60
    _rewrite(snapshot_path(path), _head_edit(lambda h: None))
    snapshots.clear()
    got = _everything(read_ledger(path, keep_last=False)[0])
    assert len(snapshots) == 1 and got == _whole(path)


def test_repair_reads_every_line_itself(tmp_path: Path, snapshots):
    """`wsbatch repair` moves lines by their numbers: it never starts from a snapshot."""
    from batch import repair

    path = _run_folder(tmp_path)
    read_ledger(path, keep_last=False)
    assert snapshot_path(path).exists()
    snapshots.clear()
    found = repair.inspect(tmp_path)
    assert snapshots == [] and found.damage


def test_a_record_too_deep_to_encode_leaves_no_snapshot(tmp_path: Path):
    """A run record nested past the encoder's recursion limit: saving is refused and
    leaves nothing behind; the read itself is unharmed."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"x\n")
    state = LedgerState()
    deep: dict[str, Any] = {}
    for _ in range(100_000):
        deep = {"k": deep}
    state.runs.append(deep)
    assert not snapshot.save(path, snapshot.Start(state, 2, 1, zlib.crc32(b"x\n")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl"]


def test_a_line_without_a_stamp_is_read_as_written(tmp_path: Path):
    """A record with no ``ts`` is kept without one, whichever line a read starts on."""
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"event":"run","run_id":"a","price":0.024}\n')
    for keep_last in (True, False):
        assert "ts" not in read_ledger(path, keep_last=keep_last)[0].runs[0]


def test_one_refresh_of_a_ledger_at_a_time(tmp_path: Path):
    """A refresh while another holds the ledger's refresh lock leaves at once."""
    path = _run_folder(tmp_path)
    with open(path, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert refresh.refresh(path) is False
    assert not snapshot_path(path).exists()
    assert refresh.refresh(path) is True


@pytest.mark.parametrize("value", ["\u00b2", "-1", "1e3", " 5"])
def test_an_odd_threshold_setting_keeps_the_default(monkeypatch, value: str):
    """WSBATCH_SNAPSHOT_LINES that is not plain ASCII digits is ignored, never a crash."""
    monkeypatch.setenv(snapshot.SNAPSHOT_LINES_ENV, value)
    assert snapshot.snapshot_lines() == snapshot.SNAPSHOT_LINES


def test_the_refresh_never_imports_a_batch_from_the_current_folder(
    tmp_path: Path, images, write_manifest, emulator
):
    """Started from a folder holding a ``batch.py``, the refresh still imports wsbatch
    (the interpreter's ``-P``) and leaves the snapshot; that file never runs."""
    manifest = write_manifest(simple_rows(images, 4))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "ran"
    (cwd / "batch.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-P", "-m", "batch", "run", str(manifest), "--base-url",
         emulator.base_url, "--out", str(out), "--no-progress"],
        cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=subprocess_env(WSBATCH_SNAPSHOT_LINES="5"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert snapshot_left(out / "ledger.jsonl") is not None
    assert not marker.exists()
