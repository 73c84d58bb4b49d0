"""Shared fixtures: a live emulator over real sockets, images, manifests, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from batch.emulator import Emulator, EmulatorConfig, serve_in_thread

API_KEY = "test-key-3f9a1c-do-not-leak"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _test_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no user's model cache
    monkeypatch.setenv("WSBATCH_ZERO_BACKOFF", "1")
    monkeypatch.setenv("WSBATCH_POLL_FLOOR", "0.05")
    monkeypatch.setenv("WSBATCH_SETTLE_DELAY", "0.05")
    monkeypatch.setenv("WAVESPEED_API_KEY", API_KEY)
    monkeypatch.delenv("WAVESPEED_BASE_URL", raising=False)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with serve_in_thread(EmulatorConfig(api_key=API_KEY, seed=1)) as emu:
        yield emu


def make_image(path: Path, color: tuple[int, int, int] = (200, 80, 40), size: int = 32) -> Path:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, fmt)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Four small distinct images in tmp_path/images."""
    colors = [(200, 80, 40), (40, 160, 90), (30, 60, 200), (220, 200, 30)]
    names = ["a.png", "b.jpg", "c.webp", "d.png"]
    return [make_image(tmp_path / "images" / n, c) for n, c in zip(names, colors, strict=True)]


WriteManifest = Callable[..., Path]


@pytest.fixture
def write_manifest(tmp_path: Path) -> WriteManifest:
    """Write rows as a YAML, CSV or JSONL manifest next to tmp_path/images."""

    def write(rows: list[dict[str, Any]], kind: str = "yaml", name: str = "m", **top: Any) -> Path:
        path = tmp_path / f"{name}.{kind}"
        if kind == "yaml":
            doc: Any = {**top, "rows": rows} if top else rows
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
        elif kind == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif kind == "csv":
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
            path.write_text("\n".join(lines) + "\n")
        else:
            raise ValueError(kind)
        return path

    return write


def simple_rows(images: list[Path], n: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": f"row-{i:04d}",
            "image": f"images/{images[i % len(images)].name}",
            "prompt": f"edit number {i}",
            "seed": i,
            **extra,
        }
        for i in range(n)
    ]


def read_ledger_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


class CLIResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err
        self.summary: dict[str, Any] | None = None


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CLIResult]:
    """Run `wsbatch ...` in-process and capture its exit code and streams."""
    from batch.cli import main

    def run(*args: str) -> CLIResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CLIResult(code, captured.out, captured.err)

    return run


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    return env


def wsbatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batch", *[str(a) for a in args]]


def run_subprocess(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wsbatch_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(**env),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def run(cli: Callable[..., CLIResult], emulator: Emulator, tmp_path: Path) -> Callable[..., Any]:
    """Run a manifest into tmp_path/out against the emulator; JSON summary parsed."""

    def go(path: Path, *extra: str) -> CLIResult:
        result = cli(
            "run",
            path,
            "--base-url",
            emulator.base_url,
            "--out",
            tmp_path / "out",
            "--no-progress",
            "--json",
            *extra,
        )
        result.summary = json.loads(result.out) if result.out.strip().startswith("{") else None
        return result

    return go


def status_json(cli: Callable[..., CLIResult], out: Path) -> dict[str, Any]:
    """`wsbatch status OUT --json`, which must succeed."""
    result = cli("status", out, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)  # type: ignore[no-any-return]


def last_events(out: Path) -> dict[str, dict[str, Any]]:
    """Each row's last ledger line that decides its state (intents and refusals aside)."""
    states = {}
    for e in read_ledger_lines(out):
        if "row" in e and e["event"] in ("submitted", "completed", "failed"):
            states[e["row"]] = e
    return states


def age_submits(out: Path, seconds: float) -> None:
    """Rewrite the ledger as if every submit was answered ``seconds`` ago."""
    lines = read_ledger_lines(out)
    old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - seconds))
    for e in lines:
        if e["event"] in ("submitted", "submitting"):
            e["ts"] = old
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def snapshot_left(ledger: Path, timeout: float = 20.0) -> dict[str, Any] | None:
    """The header of the snapshot a run's detached refresh leaves beside ``ledger``, once
    it covers the whole ledger; None if none does within ``timeout``."""
    from batch.snapshot import covers, snapshot_path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if covers(ledger):
            with open(snapshot_path(ledger), "rb") as fh:
                head: dict[str, Any] = json.loads(fh.readline())
            return head
        time.sleep(0.05)
    return None
