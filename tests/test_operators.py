"""Operators' features: spend control, sharding, cron output, the Python API, --images."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from batch import Ledger, load_manifest, run_manifest, run_manifest_async
from batch.api import parse_shard
from batch.errors import LockedError, UsageError
from batch.lock import OutDirLock
from batch.manifest import shard_of
from tests.conftest import simple_rows


@pytest.fixture
def run(cli, emulator, tmp_path):
    """Run the CLI against the emulator with a JSON summary on stdout."""

    def go(*args, out=None):
        out = out or tmp_path / "out"
        result = cli(
            "run", *args, "--base-url", emulator.base_url, "--out", out, "--no-progress", "--json"
        )
        result.summary = json.loads(result.out) if result.out.startswith("{") else None
        return result

    return go


# -- spend control ---------------------------------------------------------------


def test_budget_stops_before_the_task_that_would_exceed_it(run, images, write_manifest, emulator):
    """--budget never submits a task that would take spend past it; the rest wait, exit 1."""
    path = write_manifest(simple_rows(images, 10))
    result = run(path, "--budget", "0.10", "--price", "0.024", "--concurrency", "3")
    assert result.code == 1
    assert emulator.stats.submits_accepted == 4  # 4 x 0.024 = 0.096; a 5th would be 0.12
    s = result.summary
    assert s["completed"] == 4 and s["not_started"] == 6
    assert "budget" in s["stop_reason"]
    assert s["spend_total_usd"] == pytest.approx(0.096)


def test_budget_counts_what_the_folder_already_spent(run, images, write_manifest, emulator):
    """A resumed job's budget includes earlier runs' spend in the same output folder."""
    path = write_manifest(simple_rows(images, 10))
    run(path, "--max-tasks", "3")
    result = run(path, "--budget", "0.12", "--price", "0.024")
    assert emulator.stats.submits_accepted == 5
    assert result.summary["spend_total_usd"] == pytest.approx(0.12)


def test_max_tasks_caps_submissions(run, images, write_manifest, emulator, cli, tmp_path):
    """--max-tasks N submits at most N tasks; status shows the rest as not started."""
    path = write_manifest(simple_rows(images, 6))
    result = run(path, "--max-tasks", "2")
    assert result.code == 1 and emulator.stats.submits_accepted == 2
    status = json.loads(cli("status", tmp_path / "out", "--json").out)
    assert status["completed"] == 2 and status["not_started"] == 4
    assert status["spend_usd"] == pytest.approx(0.048)


def test_validate_prints_estimate_for_rows_still_to_do(run, images, write_manifest, cli, tmp_path):
    """validate's estimate covers only the rows a rerun would submit."""
    path = write_manifest(simple_rows(images, 5))
    run(path, "--max-tasks", "2")
    result = cli("validate", path, "--out", tmp_path / "out")
    assert "3 to submit" in result.out and "$0.07" in result.out


# -- cron ----------------------------------------------------------------------


def test_quiet_prints_nothing_on_success(cli, emulator, images, write_manifest, tmp_path):
    """--quiet keeps a successful cron run silent."""
    path = write_manifest(simple_rows(images, 2))
    result = cli("run", path, "--base-url", emulator.base_url, "--out", tmp_path / "o", "--quiet")
    assert result.code == 0 and result.out == "" and result.err == ""


def test_quiet_still_reports_failures(cli, emulator, images, write_manifest, tmp_path):
    """--quiet prints a one-line summary on stderr when rows failed."""
    emulator.fail_next_tasks(1200, "flagged")
    path = write_manifest(simple_rows(images, 2))
    result = cli("run", path, "--base-url", emulator.base_url, "--out", tmp_path / "o", "--quiet")
    assert result.code == 1 and "1 failed" in result.err and result.out == ""


# -- sharding --------------------------------------------------------------------


def test_shards_cover_every_row_exactly_once(run, images, write_manifest, emulator, cli, tmp_path):
    """N shard runs into one folder submit every row once; merged status equals one run's."""
    path = write_manifest(simple_rows(images, 30))
    out = tmp_path / "sharded"
    codes = [run(path, "--shard", f"{k}/3", out=out).code for k in range(3)]
    assert codes == [0, 0, 0]
    assert emulator.stats.submits_accepted == 30
    assert sorted(p.name for p in out.glob("ledger*.jsonl")) == [
        f"ledger.shard-{k}-of-3.jsonl" for k in range(3)
    ]
    rows_per_shard = [
        {
            e["row"]
            for e in read_ledger_lines_named(out / f"ledger.shard-{k}-of-3.jsonl")
            if e["event"] == "completed"
        }
        for k in range(3)
    ]
    assert sum(len(r) for r in rows_per_shard) == 30
    assert set().union(*rows_per_shard) == {f"row-{i:04d}" for i in range(30)}
    single = tmp_path / "single"
    run(path, out=single)
    merged = json.loads(cli("status", out, "--json").out)
    alone = json.loads(cli("status", single, "--json").out)
    for key in ("rows", "completed", "failed", "in_flight", "not_started", "submits"):
        assert merged[key] == alone[key], key
    # a whole run after the shards finds everything done
    emulator.reset_stats()
    assert run(path, out=out).summary["submitted"] == 0


def read_ledger_lines_named(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shard_membership_is_stable_and_balanced():
    """A row's shard depends only on its id, and shards are roughly even."""
    ids = [f"row-{i}" for i in range(3000)]
    counts = [0, 0, 0]
    for i in ids:
        counts[shard_of(i, 3)] += 1
    assert min(counts) > 900
    assert shard_of("row-7", 3) == shard_of("row-7", 3)


@pytest.mark.parametrize(
    ("env", "shards", "expected"),
    [
        ({"JOB_COMPLETION_INDEX": "2"}, 4, (2, 4)),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "0"}, 3, (0, 3)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "8",
            },
            None,
            (4, 8),
        ),
    ],
)
def test_shard_auto_reads_the_schedulers_array_index(env, shards, expected):
    """--shard auto takes the index from Kubernetes, AWS Batch or Slurm."""
    assert parse_shard("auto", shards, env) == expected


@pytest.mark.parametrize("value", ["3/3", "x", "1/0", "-1/2"])
def test_bad_shard_values_are_usage_errors(value):
    """A shard that does not exist is refused before anything runs."""
    with pytest.raises(UsageError):
        parse_shard(value, None, {})


def test_whole_run_and_shard_runs_exclude_each_other(tmp_path):
    """Shards share the folder with each other but never with a whole run."""
    with OutDirLock(tmp_path, shard=(0, 2)), OutDirLock(tmp_path, shard=(1, 2)):
        with pytest.raises(LockedError):
            OutDirLock(tmp_path).acquire()
        with pytest.raises(LockedError):
            OutDirLock(tmp_path, shard=(0, 2)).acquire()
    with OutDirLock(tmp_path), pytest.raises(LockedError):
        OutDirLock(tmp_path, shard=(0, 2)).acquire()


# -- the Python API ----------------------------------------------------------------


def test_python_api_sync(emulator, images, write_manifest, tmp_path):
    """run_manifest runs a manifest from a script; Ledger reads the result back."""
    manifest = load_manifest(write_manifest(simple_rows(images, 3)))
    summary = run_manifest(
        manifest, out_dir=tmp_path / "out", base_url=emulator.base_url, concurrency=2
    )
    assert summary.completed == 3 and summary.exit_code == 0
    ledger = Ledger(tmp_path / "out")
    assert ledger.completed() == ["row-0000", "row-0001", "row-0002"]
    assert ledger.failed() == [] and ledger.spend == pytest.approx(0.072)


def test_python_api_async(emulator, images, write_manifest, tmp_path):
    """run_manifest_async runs inside an existing event loop (notebooks)."""

    async def go():
        return await run_manifest_async(
            write_manifest(simple_rows(images, 2)),
            out_dir=tmp_path / "out",
            base_url=emulator.base_url,
        )

    assert asyncio.run(go()).completed == 2


# -- a folder and prompts, no manifest ------------------------------------------------


def test_images_and_prompts_without_manifest_resume(cli, emulator, images, tmp_path, monkeypatch):
    """`run --images DIR --prompt A --prompt B --seeds 1,2` needs no manifest and resumes."""
    monkeypatch.chdir(tmp_path)
    args = (
        "run",
        "--images",
        "images",
        "--prompt",
        "make it red",
        "--prompt",
        "make it blue",
        "--seeds",
        "1,2",
        "--base-url",
        emulator.base_url,
        "--no-progress",
        "--json",
    )
    first = cli(*args)
    assert first.code == 0, first.err
    summary = json.loads(first.out)
    assert summary["completed"] == len(images) * 2 * 2
    again = json.loads(cli(*args).out)
    assert again["submitted"] == 0 and again["already_done"] == summary["completed"]
    assert Path(summary["out_dir"]).parent.name == "output"


def test_images_without_prompt_is_a_usage_error(cli, tmp_path):
    """--images alone exits 2 with a message."""
    result = cli("run", "--images", str(tmp_path))
    assert result.code == 2 and "--prompt" in result.err


def test_status_sees_running_shards(cli, tmp_path):
    """`status` reports a folder as running while only shard runs hold it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.shard-0-of-2.jsonl").write_text('{"ts":"t","event":"run","rows":1}\n')
    with OutDirLock(out, shard=(0, 2)):
        info = json.loads(cli("status", out, "--json").out)
    assert info["running"] is True and info["pids"] == [os.getpid()]
    assert json.loads(cli("status", out, "--json").out)["running"] is False
