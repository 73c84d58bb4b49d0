"""Random fault sequences against the money rules, checked after every run.

Each seeded scenario draws faults (answers lost before and after a task exists,
5xx, 429s, tasks not yet visible) and how each run ends (on its own, Ctrl-C,
kill -9). After every run the server's billed tasks must all be in the ledger,
by id or as a possible duplicate, and the summary, ``status --json`` and the
Python ``Ledger`` must say the same of every row.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest

from batch.api import Ledger
from batch.emulator import EmulatorConfig, serve_in_thread
from batch.snapshot import SNAPSHOT_LINES_ENV
from tests.conftest import API_KEY, simple_rows, snapshot_left, subprocess_env, wsbatch_cmd

ROWS = 24


def one_run(emu, path, out, ending: str, rng: random.Random, **env: str) -> dict | None:
    proc = subprocess.Popen(
        wsbatch_cmd("run", path, "--base-url", emu.base_url, "--out", out, "--json",
                    "--no-progress", "--concurrency", "6", "--grace", "5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(**env),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if ending != "finish":
        time.sleep(rng.uniform(0.2, 0.9))
        proc.send_signal(signal.SIGKILL if ending == "kill" else signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    return json.loads(stdout) if stdout.strip().startswith("{") else None


def check(emu, out, summary: dict | None, **env: str) -> None:
    if not (out / "ledger.jsonl").exists():
        assert emu.stats.submits_accepted == 0  # killed before it could send anything
        return
    status = json.loads(
        subprocess.run(
            wsbatch_cmd("status", out, "--json"), capture_output=True, text=True,
            env=subprocess_env(**env), check=True,
        ).stdout
    )  # fmt: skip
    billed = emu.stats.submits_accepted
    recorded = status["submits"]
    possible = status["possible_duplicates"] + status["in_doubt"]
    assert recorded <= billed <= recorded + possible, (billed, status)
    assert status["spend_usd"] == pytest.approx((recorded + possible) * 0.024, abs=1e-6)
    ledger = Ledger(out)
    assert status["completed"] == len(ledger.completed())
    assert status["failed"] == len(ledger.failed())
    assert status["in_flight"] == len(ledger.in_flight())
    if summary is not None:
        for key in ("completed", "failed", "in_flight", "not_started"):
            assert summary[key] == status[key], key
    # No prediction is given to two rows.
    pids = [s.prediction_id for s in ledger.rows.values() if s.prediction_id]
    assert len(pids) == len(set(pids))


@pytest.mark.parametrize("seed", range(4))
def test_random_faults_and_endings_never_hide_a_billed_task(seed, tmp_path, images, write_manifest):
    """Whatever faults and stops come, every billed task is recorded and views agree;
    odd seeds write and read a ledger snapshot at every read and every run's end (the
    Python ``Ledger`` reads the whole ledger, so it checks them)."""
    rng = random.Random(seed)
    env = {SNAPSHOT_LINES_ENV: "1"} if seed % 2 else {}
    config = EmulatorConfig(
        api_key=API_KEY,
        seed=seed,
        latency=(0.05, 0.4),
        p_5xx=rng.choice([0.0, 0.05, 0.1]),
        p_drop=rng.choice([0.0, 0.05, 0.1]),
        p_429=rng.choice([0.0, 0.1]),
        send_retry_after=rng.random() < 0.5,
        retry_after=0,
        visibility_delay=rng.choice([0.0, 0.3]),
        listing_inputs=rng.random() < 0.5,
        response_delay=0.01,
    )
    path = write_manifest(simple_rows(images, ROWS))
    out = tmp_path / "out"
    with serve_in_thread(config) as emu:
        emu.script("submit", *rng.choices(["drop_after", "500_after", "html_after"], k=3))
        for _ in range(3):
            ending = rng.choice(["finish", "interrupt", "kill", "kill"])
            check(emu, out, one_run(emu, path, out, ending, rng, **env), **env)
        # Faults off: the last run must finish every row, each with its own task.
        emu.config.p_5xx = emu.config.p_drop = emu.config.p_429 = 0.0
        summary = one_run(emu, path, out, "finish", rng, **env)
        assert summary is not None and summary["completed"] == ROWS, summary
        check(emu, out, summary, **env)
        if env:  # left by the last run's detached refresh
            assert snapshot_left(out / "ledger.jsonl") is not None
