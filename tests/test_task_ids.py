"""The prediction ids a run keeps known to its end, kept small: moved ids stay known, and
a fresh run's memory for them stops growing as strings."""

from __future__ import annotations

import json
import pickle
import tracemalloc

import pytest

import batch.taskids as taskids
from batch.state import LedgerState, merge_states
from batch.taskids import MOVE, TaskIds
from tests.conftest import simple_rows

IDS = [f"{n:032x}" for n in range(5 * MOVE)]


def test_a_run_keeps_few_ids_as_strings_and_knows_them_all() -> None:
    """Past ``MOVE`` strings, ids move to their hashes, and every one is still known."""
    ids = TaskIds()
    ids.keep_small()
    for pid in IDS:
        ids.add(pid)
    assert len(ids._ids) <= MOVE
    assert all(pid in ids for pid in IDS)
    assert f"{len(IDS):032x}" not in ids and "" not in ids and None not in ids
    ids.add(IDS[0])  # added again after it moved: one id, not two
    assert len(ids) == len(IDS)


def test_moved_ids_take_a_tenth_of_a_set_of_strings() -> None:
    """40k ids a run was given hold under 16 bytes each once moved (as strings in a set
    about 125): what keeps a fresh run's memory from growing with its rows."""
    ids = [f"{n:032x}" for n in range(40_000)]  # made before measuring: the API's answers
    tracemalloc.start()
    try:
        kept = TaskIds()
        kept.keep_small()
        for pid in ids:
            kept.add(pid)
        del ids  # what the run had of them goes with the rows it let go of
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert size < 16 * 40_000 + 45 * MOVE * 2, f"{size / 40_000:.1f} bytes an id"


def test_a_read_keeps_strings_and_a_run_moves_them_a_step_at_a_time() -> None:
    """A ledger read never pays for hashing; the run that follows moves what it read in
    steps as it adds, never all at once."""
    ids = TaskIds(IDS)
    assert len(ids._ids) == len(IDS)
    ids.keep_small()
    ids.add("new-0")
    assert len(ids._ids) == len(IDS) + 1  # nothing moved yet
    for n in range(1, MOVE):
        ids.add(f"new-{n}")
    moved_once = len(IDS) + MOVE - len(ids._ids)
    assert moved_once == 2 * MOVE
    assert all(pid in ids for pid in IDS)


def test_merged_states_know_every_ledgers_ids() -> None:
    """Shards merged: each ledger's ids, moved or not, are known to the merged view."""
    a, b = LedgerState(), LedgerState()
    b.predictions.keep_small()
    for pid in IDS[:MOVE]:
        a.predictions.add(pid)
    for pid in IDS[MOVE:]:
        b.predictions.add(pid)
    merged = merge_states([a, b])
    assert all(pid in merged.predictions for pid in IDS) and len(merged.predictions) == len(IDS)
    assert merged.predictions == TaskIds(IDS)


def test_moved_ids_are_never_pickled() -> None:
    """Hashes are this process's: another process would read them as other ids."""
    plain = TaskIds(IDS[:3])
    assert pickle.loads(pickle.dumps(plain)) == plain
    moved = TaskIds()
    moved.keep_small()
    for pid in IDS:
        moved.add(pid)
    with pytest.raises(TypeError):
        pickle.dumps(moved)


def test_a_moved_id_is_no_lost_answers_task(
    monkeypatch, run, cli, images, write_manifest, emulator, tmp_path
) -> None:
    """With every known id moved to its hash, the settler still tells the folder's own
    task apart from what a lost submit made: it settles the loss as nothing created."""
    real = TaskIds.keep_small

    def keep_none(self: TaskIds) -> None:
        real(self)
        self._move(len(self._ids))

    monkeypatch.setattr(TaskIds, "keep_small", keep_none)
    monkeypatch.setattr(taskids, "MOVE", 1)
    path = write_manifest(simple_rows(images, 2))
    first = run(path, "--max-tasks", "1")
    assert first.summary["submitted"] == 1
    emulator.script("submit", "drop")  # the next submit is lost before it creates anything
    second = run(path)
    assert second.code == 0, second.err
    assert emulator.stats.submits_accepted == 2
    info = json.loads(cli("status", tmp_path / "out", "--json").out)
    assert info["possible_duplicates"] == 0 and info["submits"] == 2


def test_a_row_read_back_keeps_one_string_of_its_id(tmp_path) -> None:
    """Reading a finished row's ``submitted`` and ``completed`` lines keeps one string of
    its prediction id, not one a line: 80 MB on a million-row resume."""
    from batch.events import Completed, Submitted, Submitting
    from batch.events import encode as encode_event
    from batch.ledger import encode, read_ledger

    events = [
        Submitting("r1", 1, "i1", 0.024, "f1"),
        Submitted("r1", "p" * 32, 1, 1, "i1", 0.024, "f1"),
        Completed("r1", "p" * 32, ("r1.jpg",), ("ab",), (False,), 7, 1, "f1"),
    ]
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"".join(encode({"ts": "t", **encode_event(e)}) for e in events))
    for keep_last in (False, True):
        state = read_ledger(path, keep_last=keep_last)[0]
        pid = state.rows["r1"].prediction_id
        assert pid == "p" * 32
        assert next(s for s in state.predictions._ids if s == pid) is pid
