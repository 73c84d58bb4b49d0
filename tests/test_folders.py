"""One output folder, one set of rows: manifests never share a folder by accident, and
the same command spelled differently resumes instead of paying again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.conftest import make_image, subprocess_env, wsbatch_cmd


def wsbatch(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wsbatch_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=60,
        env=subprocess_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip


def job(folder: Path, prompt: str) -> Path:
    make_image(folder / "in.png")
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump([{"id": "r1", "image": "in.png", "prompt": prompt}]))
    return path


def test_two_manifests_of_one_name_never_share_the_default_folder(tmp_path, emulator):
    """jobs/a/batch.yaml and jobs/b/batch.yaml both default to output/batch: the second
    is refused (exit 2, naming the first) before anything is sent; A's output stays."""
    a, b = job(tmp_path / "jobs" / "a", "snow"), job(tmp_path / "jobs" / "b", "rain")
    url = emulator.base_url
    first = wsbatch(tmp_path, "run", a, "--base-url", url, "--no-progress")
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "output" / "batch" / "r1.jpg").read_bytes()
    paid = emulator.stats.submits_accepted
    second = wsbatch(tmp_path, "run", b, "--base-url", url, "--no-progress")
    assert second.returncode == 2 and str(a) in second.stderr and "--out" in second.stderr
    assert wsbatch(tmp_path, "validate", b).returncode == 2
    assert emulator.stats.submits_accepted == paid
    assert (tmp_path / "output" / "batch" / "r1.jpg").read_bytes() == before
    again = wsbatch(tmp_path, "run", a, "--base-url", url, "--no-progress", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["submitted"] == 0


def test_a_moved_manifest_keeps_its_folder(tmp_path, emulator):
    """A manifest renamed or moved (its old path gone) resumes in the folder it made."""
    a = job(tmp_path / "jobs" / "a", "snow")
    out = tmp_path / "out"
    url = emulator.base_url
    assert wsbatch(tmp_path, "run", a, "--out", out, "--base-url", url).returncode == 0
    moved = a.rename(a.with_name("renamed.yaml"))
    again = wsbatch(tmp_path, "run", moved, "--out", out, "--base-url", url, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["submitted"] == 0


def test_the_same_images_command_spelled_differently_resumes(tmp_path, emulator):
    """--images photos vs ./photos/, prompts and seeds in another order: one folder,
    nothing paid twice."""
    for n in range(2):
        make_image(tmp_path / "photos" / f"p{n}.png", (n * 90, 40, 40))
    url = emulator.base_url
    first = wsbatch(tmp_path, "run", "--images", "photos", "--prompt", "a", "--prompt", "b",
                    "--seeds", "1,2", "--base-url", url, "--json", "--no-progress")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["submitted"] == 8
    again = wsbatch(tmp_path, "run", "--images", "./photos/", "--prompt", "b", "--prompt", "a",
                    "--seeds", "2,1", "--base-url", url, "--json", "--no-progress")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["submitted"] == 0
    assert len(list((tmp_path / "output").iterdir())) == 1
