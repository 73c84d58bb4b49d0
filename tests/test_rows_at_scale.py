"""A 1M-row resume's mechanisms at a small scale: rows kept as columns and made only when
asked for, counts told in bulk, and one folder listing where there were several."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import batch.cli as cli
import batch.files as files_module
from batch.client import Client
from batch.events import Completed, Submitting
from batch.events import encode as encode_event
from batch.ledger import encode
from batch.manifest import RowTable, load_manifest, row_ids
from batch.options import RunOptions
from batch.plan import plan_manifest
from batch.runner import Runner
from batch.state import LedgerState, RowState, RowStatus, apply
from tests.conftest import make_image


def _csv(tmp_path: Path, rows: int, extra: str = "") -> Path:
    make_image(tmp_path / "a.png")
    lines = [f"id,image,prompt,seed{extra}"]
    lines += [f"r{n},a.png,edit {n % 3},{n}{',x' if extra else ''}" for n in range(rows)]
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _finished(tmp_path: Path, rows: int) -> tuple[RowTable, Path]:
    """A manifest and an OUT_DIR where every row completed, outputs on disk."""
    manifest = load_manifest(_csv(tmp_path, rows))
    table = manifest.rows
    assert isinstance(table, RowTable)
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    for row in table:
        event = Completed(row.id, f"p-{row.id}", (f"{row.id}.jpeg",), fingerprint=row.fingerprint)
        lines.append(encode({"ts": "2026-01-01T00:00:00.000Z", **encode_event(event)}))
        (out / f"{row.id}.jpeg").write_bytes(b"x")
    (out / "ledger.jsonl").write_bytes(b"".join(lines))
    return table, out


def test_a_resume_makes_no_row_of_a_finished_row(tmp_path: Path, monkeypatch) -> None:
    """Planning and counting a resume of finished rows never makes a Row object."""
    _, out = _finished(tmp_path, 40)
    runner = Runner(load_manifest(tmp_path / "m.csv"), Client("http://127.0.0.1:9", "k"),
                    RunOptions(out_dir=out))  # fmt: skip

    def refuse(*_: Any) -> Any:
        raise AssertionError("a Row was made")

    monkeypatch.setattr(RowTable, "_row", refuse)
    runner._prepare()
    planned = runner._plan_all()
    assert planned.counts["done"] == 40
    assert list(runner._work(planned)) == []
    assert runner.state.counts(row_ids(runner.rows))[RowStatus.COMPLETED] == 40


def test_rows_made_on_demand_are_the_rows_read(tmp_path: Path) -> None:
    """A table's rows, by index, slice, iteration and ``take``, carry every field as read."""
    make_image(tmp_path / "a.png")
    records = [
        {"id": "x", "image": "a.png", "prompt": "p", "seed": 7, "meta": {"k": 1}},
        {"image": "a.png", "prompt": "q", "params": {"strength": 0.5}},
        {"id": "z", "image": ["a.png", "a.png"], "prompt": "p", "output_format": "png"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = load_manifest(path).rows
    first, second, third = rows
    assert (first.id, first.seed, dict(first.meta), first.source) == ("x", 7, {"k": 1}, f"{path}:1")
    assert dict(second.params) == {"strength": 0.5} and second.seed == -1 and len(second.id) == 12
    assert third.output_format == "png" and len(third.inputs) == 2
    assert first.image_path == tmp_path / "a.png" and len(first.fingerprint) == 32
    assert rows[-1] == third and rows[1:] == (second, third) and rows == [first, second, third]
    assert isinstance(rows, RowTable)
    assert list(rows.take([2, 0])) == [third, first]
    with pytest.raises(IndexError):
        rows[3]


def test_a_table_keeps_about_a_hundred_bytes_a_row(tmp_path: Path) -> None:
    """10k rows kept as columns cost under 160 bytes a row (Row objects took 450), and
    loading them peaks under 120 bytes a row above that: a list of raw rows or of plans
    (each 400+ bytes a row) would not fit, nor a line number kept beside each id or a
    second set of every id (180 bytes a row together)."""
    path = _csv(tmp_path, 10_000)
    tracemalloc.start()
    try:
        manifest = load_manifest(path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(manifest.rows) == 10_000
    assert kept < 160 * 10_000, f"{kept / 10_000:.0f} bytes a row"
    assert peak < kept + 120 * 10_000, f"peak {peak / 1e6:.1f} MB for {kept / 1e6:.1f} MB of rows"


def test_bulk_counts_match_each_rows_status() -> None:
    """Counts told in bulk equal the status of each row, in doubt and unknown rows too."""
    state = LedgerState()
    apply(state, Completed("a", "pa", ("a.jpg",)), {})
    apply(state, Completed("b", "pb", ("b.jpg",)), {})
    apply(state, Submitting("b", 1, "ib", 0.1), {})  # completed, then a new submit: in doubt
    state.rows["c"] = RowState(base=RowStatus.FAILED)
    ids = ["a", "b", "c", "nobody"]
    expected = {s: 0 for s in RowStatus}
    for row_id in ids:
        known = state.rows.get(row_id)
        expected[known.status if known else RowStatus.NOT_STARTED] += 1
    assert state.counts(ids) == expected
    assert expected[RowStatus.IN_DOUBT] == 1 and expected[RowStatus.NOT_STARTED] == 1
    assert state.counts() == {**expected, RowStatus.NOT_STARTED: 0}


def _count_listings(monkeypatch) -> list[str]:
    calls: list[str] = []
    real_listdir, real_scandir = os.listdir, os.scandir

    def listdir(path: Any = ".") -> list[str]:
        calls.append("listdir")
        return real_listdir(path)

    def scandir(path: Any = ".") -> Any:
        calls.append("scandir")
        return real_scandir(path)

    monkeypatch.setattr(files_module.os, "listdir", listdir)
    monkeypatch.setattr(files_module.os, "scandir", scandir)
    return calls


def test_a_run_lists_its_folder_once_to_plan(tmp_path: Path, monkeypatch) -> None:
    """Ledgers, temporary files and outputs come from one listing of OUT_DIR."""
    _, out = _finished(tmp_path, 5)
    (out / "ledger.shard-0-of-2.jsonl").write_text("")
    runner = Runner(load_manifest(tmp_path / "m.csv"), Client("http://127.0.0.1:9", "k"),
                    RunOptions(out_dir=out))  # fmt: skip
    calls = _count_listings(monkeypatch)
    runner._prepare()
    assert runner._plan_all().counts["done"] == 5
    assert calls == ["scandir"]
    assert len(runner._others) == 1  # the shard ledger was found in that listing


def test_status_lists_its_folder_once(tmp_path: Path, monkeypatch) -> None:
    """``wsbatch status`` reads the ledger once and lists the folder once."""
    _, out = _finished(tmp_path, 5)
    calls = _count_listings(monkeypatch)
    monkeypatch.setattr(cli.os, "listdir", files_module.os.listdir)
    info = cli.status_of(out)
    assert info["completed"] == 5 and info["rows"] == 5
    assert calls == ["listdir"]


def test_validate_prices_rows_to_submit_without_making_them(tmp_path: Path, monkeypatch) -> None:
    """Planning a fresh manifest makes one Row (the schema check's sample of the fields
    every row shares) and hands back its rows to submit as a table, unmade."""
    manifest = load_manifest(_csv(tmp_path, 30))
    made: list[int] = []
    real = RowTable._row

    def counted(table: RowTable, n: int) -> Any:
        made.append(n)
        return real(table, n)

    monkeypatch.setattr(RowTable, "_row", counted)
    counts, _, to_submit = plan_manifest(manifest, tmp_path / "out", retry_failed=False)
    assert counts["submit"] == 30 and len(to_submit) == 30 and made == [0]
    assert isinstance(to_submit, RowTable) and to_submit.ids == manifest.rows.ids  # type: ignore[attr-defined]


def test_a_run_lets_go_of_the_rows_it_completes(run, images, write_manifest, monkeypatch):
    """Each row a run completes ends as the one shared FINISHED state (its facts are on
    disk), so a fresh run's memory does not grow with its rows; a resume finds all done."""
    import batch.runner as runner_module
    from batch.state import FINISHED

    seen: list[LedgerState] = []
    real = runner_module.retire

    def spy(state: LedgerState, row_id: str) -> None:
        seen.append(state)
        real(state, row_id)

    monkeypatch.setattr(runner_module, "retire", spy)
    rows = [{"id": f"r{n}", "image": str(images[n % 4]), "prompt": f"p{n}"} for n in range(12)]
    manifest = write_manifest(rows)
    first = run(manifest, "--concurrency", "4")
    assert first.code == 0, first.err
    state = seen[-1]
    assert sorted(state.rows) == sorted(r["id"] for r in rows)
    assert all(row is FINISHED for row in state.rows.values())
    again = run(manifest)
    assert again.code == 0 and again.summary["already_done"] == 12
    assert again.summary["submitted"] == 0


def test_an_event_about_a_let_go_row_gives_it_its_own_state() -> None:
    """A later event about a finished row changes that row alone, never the shared state."""
    from batch.events import Failed
    from batch.state import FINISHED, retire

    state = LedgerState()
    for n in range(2):
        apply(state, Completed(f"r{n}", f"p{n}", (f"r{n}.jpeg",), sha256=("s",)), {})
        retire(state, f"r{n}")
    assert state.rows["r0"] is FINISHED and state.rows["r1"] is FINISHED
    apply(state, Failed(row="r0", error="gone", retryable=True, code="gone"), {})
    assert state.rows["r0"] is not FINISHED and state.rows["r0"].status is RowStatus.FAILED
    assert state.rows["r1"] is FINISHED
    assert FINISHED.status is RowStatus.COMPLETED and FINISHED.error is None
    # A row with an open intent or a damaged line keeps what is known of it.
    apply(state, Submitting(row="r2", seed=1, intent="i2", price=0.024), {})
    retire(state, "r2")
    assert state.rows["r2"] is not FINISHED


def test_the_command_leaves_without_freeing_and_loses_nothing(
    tmp_path: Path, images, write_manifest, emulator
) -> None:
    """`wsbatch` ends its process at once (a million rows take a second to free): the
    summary on stdout, the log file, the ledger and metadata.jsonl are all complete."""
    import subprocess

    from tests.conftest import simple_rows, subprocess_env, wsbatch_cmd

    out, log = tmp_path / "out", tmp_path / "run.log"
    path = write_manifest(simple_rows(images, 6))
    emulator.script("submit", "drop_after")  # a lost answer: the log gets notes about it
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)  # stdout a pipe, buffered as a user's would be
    done = subprocess.run(
        wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out,
                    "--no-progress", "--json", "--log-file", log),
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["completed"] == 6
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any("lost submit" in str(r) for r in records), records
    ledger = (out / "ledger.jsonl").read_text()
    assert ledger.endswith("\n") and json.loads(ledger.splitlines()[-1])["event"] == "finished"
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 6


def test_a_run_sweeps_dead_runs_pid_files_with_its_one_listing(
    run, images, write_manifest, tmp_path: Path, monkeypatch
) -> None:
    """The pid file a killed run left is removed once a new run holds the folder, and the
    lock's sweep lists nothing itself: the run's one listing serves it."""
    import batch.lock as lock_module
    from batch.lock import HOLDER_PREFIX

    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{HOLDER_PREFIX}999999-deadbeef.pid"
    stale.write_text("999999\nwhole\n")  # a killed run's: nothing holds its flock
    listed: list[Any] = []
    real = lock_module.matching

    def spy(folder: Path, pattern: str, names: Any = None) -> Any:
        listed.append(names)
        return real(folder, pattern, names)

    monkeypatch.setattr(lock_module, "matching", spy)
    from tests.conftest import simple_rows

    result = run(write_manifest(simple_rows(images, 2)))
    assert result.code == 0, result.err
    assert not stale.exists()
    assert listed and None not in listed  # every sweep was handed a listing
