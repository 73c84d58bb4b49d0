"""Resume and crash safety: every row exactly once across kills, signals and reruns."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from batch.lock import OutDirLock
from tests.conftest import (
    age_submits,
    last_events,
    read_ledger_lines,
    simple_rows,
    subprocess_env,
    wsbatch_cmd,
)


def run(cli, path, emulator, out, *extra):
    return cli("run", path, "--base-url", emulator.base_url, "--out", out, "--no-progress", *extra)


def drop_events_after_submit(out: Path, rows: set[str] | None = None) -> None:
    """Rewrite the ledger as if the run died right after its submits were recorded."""
    kept = [
        e
        for e in read_ledger_lines(out)
        if e["event"] not in ("completed", "finished")
        or (rows is not None and e.get("row", "") not in rows and e["event"] != "finished")
    ]
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))


@pytest.fixture
def done_run(emulator, images, write_manifest, cli, tmp_path):
    """A finished 4-row run: (manifest path, out dir)."""
    path = write_manifest(simple_rows(images, 4))
    out = tmp_path / "out"
    assert run(cli, path, emulator, out).code == 0
    return path, out


def test_rerun_of_a_finished_run_sends_nothing(done_run, emulator, cli):
    """Completed rows whose outputs exist are skipped: no upload, submit or poll."""
    path, out = done_run
    emulator.reset_stats()
    result = run(cli, path, emulator, out)
    assert result.code == 0
    assert "4 already done" in result.out
    assert [r for r in emulator.requests if r.origin == "api"] == []


def test_rows_left_submitted_are_polled_not_resubmitted(done_run, emulator, cli):
    """A row whose last event is `submitted` is polled by its prediction id, never re-sent."""
    path, out = done_run
    for f in out.glob("row-*"):
        f.unlink()
    drop_events_after_submit(out)
    emulator.reset_stats()
    result = run(cli, path, emulator, out)
    assert result.code == 0, result.err
    assert emulator.stats.submits_accepted == 0
    assert emulator.stats.polls >= 4
    assert len(list(out.glob("row-*.jpg"))) == 4


def test_forgotten_prediction_is_submitted_again_with_the_same_seed(
    emulator, images, write_manifest, cli, tmp_path
):
    """If the server no longer knows an old prediction (404), the row is resubmitted, same seed."""
    path = write_manifest([{"id": "s", "image": "images/a.png", "prompt": "p", "seed": -1}])
    out = tmp_path / "out"
    assert run(cli, path, emulator, out).code == 0
    first = last_events(out)["s"]
    drop_events_after_submit(out)
    age_submits(out, 3600)  # a 404 for a task minutes old is the store lagging, not gone
    (out / "s.jpg").unlink()
    emulator.delete_prediction(first["prediction_id"])
    emulator.reset_stats()
    assert run(cli, path, emulator, out).code == 0
    again = last_events(out)["s"]
    assert emulator.stats.submits_accepted == 1
    assert again["prediction_id"] != first["prediction_id"]
    assert again["seed"] == first["seed"]
    assert emulator.predictions[again["prediction_id"]].body["seed"] == first["seed"]


def test_missing_output_file_is_fetched_again(done_run, emulator, cli):
    """Deleting an output makes the next run restore it (from the server while it has it)."""
    path, out = done_run
    victim = out / "row-0001.jpg"
    original = victim.read_bytes()
    victim.unlink()
    emulator.reset_stats()
    assert run(cli, path, emulator, out).code == 0
    assert victim.read_bytes() == original
    assert emulator.stats.submits_accepted == 0


def test_changed_request_under_the_same_id_is_redone(done_run, emulator, images, cli):
    """A row whose prompt changed under the same explicit id is submitted again, not skipped."""
    path, out = done_run
    path.write_text(path.read_text().replace("edit number 2", "a different edit"))
    emulator.reset_stats()
    result = run(cli, path, emulator, out)
    assert result.code == 0
    assert emulator.stats.submits_accepted == 1
    pid = last_events(out)["row-0002"]["prediction_id"]
    assert emulator.predictions[pid].body["prompt"] == "a different edit"


def test_torn_last_ledger_line_is_cut_before_appending(done_run, emulator, cli):
    """A half-written last line (kill -9 mid-write) is removed; the ledger stays valid JSONL."""
    path, out = done_run
    drop_events_after_submit(out, rows={"row-0000", "row-0001"})
    with open(out / "ledger.jsonl", "ab") as fh:
        fh.write(b'{"ts":"2026-01-01T00:00:00Z","event":"compl')
    assert run(cli, path, emulator, out).code == 0
    lines = (out / "ledger.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert all(s["event"] == "completed" for s in last_events(out).values())


def test_leftover_temp_files_are_removed(done_run, emulator, cli):
    """Temporary files a killed run left behind are deleted by the next run."""
    path, out = done_run
    stale = out / ".wsbatch-row-0000.jpg.1234abcd.part"
    stale.write_bytes(b"half")
    assert run(cli, path, emulator, out).code == 0
    assert not stale.exists()


def test_second_run_on_a_locked_folder_exits_3(done_run, emulator, cli):
    """While another run holds OUT_DIR, `run` exits 3 at once and names the holder's pid."""
    path, out = done_run
    with OutDirLock(out):
        result = run(cli, path, emulator, out)
    assert result.code == 3
    assert "pid" in result.err
    assert run(cli, path, emulator, out).code == 0  # released: runs again


# -- real processes ------------------------------------------------------------


def start_run(path: Path, out: Path, base_url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        wsbatch_cmd("run", path, "--base-url", base_url, "--out", out, "--no-progress", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
    )


def wait_for_events(out: Path, event: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = (out / "ledger.jsonl").read_text()
        except FileNotFoundError:
            text = ""
        if text.count(f'"event":"{event}"') >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"never saw {count} {event} events")


def test_kill_9_at_random_moments_loses_nothing(emulator, images, write_manifest, tmp_path):
    """SIGKILL at random instants, then resume: every row once, exact bytes, few duplicates."""
    emulator.config.latency = (0.1, 0.5)
    rows = simple_rows(images, 60)
    path = write_manifest(rows)
    out = tmp_path / "out"
    rng = random.Random(7)
    kills = 0
    for _ in range(6):
        proc = start_run(path, out, emulator.base_url, "--concurrency", "8")
        try:
            proc.wait(timeout=rng.uniform(0.4, 1.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = start_run(path, out, emulator.base_url, "--concurrency", "8")
    _, stderr = final.communicate(timeout=60)
    assert final.returncode == 0, stderr
    assert kills >= 3
    # The ledger is whole JSON from top to bottom.
    events = read_ledger_lines(out)
    states = last_events(out)
    assert set(states) == {r["id"] for r in rows}
    assert all(s["event"] == "completed" for s in states.values())
    for state in states.values():
        [name] = state["outputs"]
        assert (out / name).read_bytes() == emulator.output_bytes(state["prediction_id"])[0]
    assert not list(out.glob(".wsbatch-*"))
    completed_per_row = {r["id"]: 0 for r in rows}
    for e in events:
        if e["event"] == "completed":
            completed_per_row[e["row"]] += 1
    duplicates = emulator.stats.submits_accepted - len(rows)
    assert 0 <= duplicates <= kills
    assert sum(1 for e in events if e["event"] == "submitted") <= emulator.stats.submits_accepted


def test_sigint_finishes_in_flight_tasks_and_exits_130(emulator, images, write_manifest, tmp_path):
    """First Ctrl-C stops new submissions, lets in-flight tasks finish, exits 130."""
    emulator.config.latency = (0.6, 0.8)
    path = write_manifest(simple_rows(images, 12))
    out = tmp_path / "out"
    proc = start_run(path, out, emulator.base_url, "--concurrency", "4")
    wait_for_events(out, "submitted", 4)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr
    states = last_events(out)
    assert all(s["event"] != "submitted" for s in states.values())
    assert sum(1 for s in states.values() if s["event"] == "completed") >= 4
    assert len(states) < 12  # submitting stopped
    assert "stopping" in stderr
    assert read_ledger_lines(out)[-1]["event"] == "finished"


def test_sigterm_exits_143(emulator, images, write_manifest, tmp_path):
    """SIGTERM stops the run like Ctrl-C but exits 143."""
    emulator.config.latency = (0.3, 0.4)
    path = write_manifest(simple_rows(images, 8))
    out = tmp_path / "out"
    proc = start_run(path, out, emulator.base_url, "--concurrency", "2")
    wait_for_events(out, "submitted", 2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 143


def test_second_sigint_stops_at_once_and_resume_polls(emulator, images, write_manifest, tmp_path):
    """A second Ctrl-C exits at once; the rows left in flight are polled on resume, not re-sent."""
    emulator.config.latency = (30.0, 30.0)
    path = write_manifest(simple_rows(images, 4))
    out = tmp_path / "out"
    proc = start_run(path, out, emulator.base_url, "--concurrency", "4")
    wait_for_events(out, "submitted", 4)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)
    assert time.monotonic() - started < 5
    assert proc.returncode == 130
    assert all(s["event"] == "submitted" for s in last_events(out).values())
    emulator.config.latency = (0.0, 0.0)
    for pred in emulator.predictions.values():
        pred.finish_mono = pred.start_mono = time.monotonic()
    finished = subprocess.run(
        wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out, "--no-progress"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=30,
    )
    assert finished.returncode == 0, finished.stderr
    assert emulator.stats.submits_accepted == 4


def test_lock_names_the_live_holder(emulator, images, write_manifest, tmp_path):
    """A second `run` while a real run is alive exits 3 and names that run's pid."""
    emulator.config.latency = (5.0, 5.0)
    path = write_manifest(simple_rows(images, 2))
    out = tmp_path / "out"
    proc = start_run(path, out, emulator.base_url)
    try:
        wait_for_events(out, "submitted", 1)
        second = subprocess.run(
            wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out),
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=20,
        )
        assert second.returncode == 3
        assert f"pid {proc.pid}" in second.stderr
        status = subprocess.run(
            wsbatch_cmd("status", out, "--json"),
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=20,
        )
        info = json.loads(status.stdout)
        assert info["running"] is True and info["pid"] == proc.pid
        assert info["in_flight"] >= 1
    finally:
        proc.kill()
        proc.wait()
