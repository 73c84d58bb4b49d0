"""The run as a person sees it on a terminal (tmux): one bar, the plan line on its own,
a rate and ETA from this run's rows, and a Ctrl-C that ends cleanly and says how to
resume."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import simple_rows, subprocess_env, wsbatch_cmd

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Pane:
    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.name = f"wsbatch-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith(
            ("WSBATCH_", "WAVESPEED_", "PYTHONPATH")))  # fmt: skip
        script = f"env {exports} {shlex.join(command)}; echo EXIT=$?; sleep 60"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", script],
            check=True,
        )

    def text(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        ).stdout

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if re.search(pattern, text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared:\n{self.text()}")

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def bar_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "row/s" in line or "s/row" in line]


def test_a_resumed_run_shows_one_bar_after_the_plan_and_this_runs_rate(
    run, images, write_manifest, emulator, tmp_path: Path
):
    """On a resume the bar starts at the rows already done, so its rate counts this
    run's rows only; the plan line stands on its own line above one bar."""
    emulator.config.latency = (0.3, 0.5)
    path = write_manifest(simple_rows(images, 12))
    out = tmp_path / "out"
    assert run(path, "--max-tasks", "6").summary["completed"] == 6
    pane = Pane(
        wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out,
                    "--concurrency", "2"),
        subprocess_env(),
    )  # fmt: skip
    try:
        text = pane.wait_for(r"EXIT=\d+")
    finally:
        pane.close()
    assert "EXIT=0" in text
    lines = text.splitlines()
    plan = [n for n, line in enumerate(lines) if line.startswith("wsbatch: 12 rows: 6 done")]
    assert len(plan) == 1 and "|" not in lines[plan[0]]  # nothing glued to the plan line
    bars = bar_lines(text)
    assert len(bars) == 1 and "12/12" in bars[0], text
    rate = float(re.search(r"([\d.]+)row/s", bars[0]).group(1))
    minutes, seconds = map(int, re.search(r"\[(\d+):(\d+)<", bars[0]).groups())
    elapsed = max(minutes * 60 + seconds, 1)
    # Six rows this run: a rate counting the first run's six too would be about twice.
    assert rate * elapsed < 9, bars[0]


def test_ctrl_c_leaves_one_closed_bar_and_says_how_to_resume(
    images, write_manifest, emulator, tmp_path: Path
):
    """Ctrl-C on a terminal: the stopping message, one bar, exit 130, and the summary
    names the command that resumes."""
    emulator.config.latency = (1.5, 2.0)
    path = write_manifest(simple_rows(images, 8))
    out = tmp_path / "out"
    pane = Pane(
        wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out,
                    "--concurrency", "2", "--grace", "10"),
        subprocess_env(),
    )  # fmt: skip
    try:
        pane.wait_for(r"row/s|s/row")
        time.sleep(0.5)
        pane.keys("C-c")
        text = pane.wait_for(r"EXIT=\d+")
    finally:
        pane.close()
    assert "EXIT=130" in text
    assert "stopping (SIGINT received)" in text
    assert len(bar_lines(text)) == 1, text
    assert "to resume: wsbatch run" in text
