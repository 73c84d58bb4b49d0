"""The ledger's snapshot: a read that starts from it gives what a read of the whole
ledger gives, and a snapshot that does not match the ledger is never used."""

from __future__ import annotations

import json
import random
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
from tests.conftest import run_subprocess, simple_rows, snapshot_left
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


def _rewrite(path: Path, edit: Any) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(edit(lines)))


def _chunk_edit(key: str, value: Any) -> Any:
    def edit(lines: list[bytes]) -> list[bytes]:
        chunk = json.loads(lines[1])
        chunk["cols"][key] = value
        return [lines[0], json.dumps(chunk).encode() + b"\n", *lines[2:]]

    return edit


PLANTED = {
    "torn": lambda lines: [*lines[:-1], lines[-1][:5]],
    "no trailer": lambda lines: lines[:-1],
    "not JSON": lambda lines: [lines[0], b"{nope\n", *lines[2:]],
    "nested past recursion": lambda lines: [lines[0], b"[" * 100_000 + b"\n", *lines[2:]],
    "other format": lambda lines: [lines[0].replace(b'"format":1', b'"format":9'), *lines[1:]],
    "output not a name": _chunk_edit("outputs", [[7]] * 99),
    "unknown status": _chunk_edit("base", {"all": "paid"}),
    "index out of range": _chunk_edit("ts", {"t": ["x"], "i": [5] * 99}),
    "negative index": _chunk_edit("ts", {"t": ["x"], "i": [-1] * 99}),
    "wrong type": _chunk_edit("submits", {"all": "9"}),
    "short column": _chunk_edit("fingerprint", []),
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
    _rewrite(snapshot_path(path), PLANTED[damage])
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
