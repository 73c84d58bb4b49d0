"""A manifest runs end to end against the emulator over real sockets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from batch.emulator import Emulator
from batch.manifest import sniff_image
from tests.conftest import API_KEY, make_image, read_ledger_lines, simple_rows


def completed_events(out: Path) -> dict[str, dict]:
    return {e["row"]: e for e in read_ledger_lines(out) if e["event"] == "completed"}


def assert_outputs_match_emulator(out: Path, emulator: Emulator) -> int:
    """Every output file is byte-identical to what the emulator served for its prediction."""
    checked = 0
    for event in completed_events(out).values():
        served = emulator.output_bytes(event["prediction_id"])
        assert len(served) == len(event["outputs"])
        for name, want, digest in zip(event["outputs"], served, event["sha256"], strict=True):
            data = (out / name).read_bytes()
            assert data == want
            assert hashlib.sha256(data).hexdigest() == digest
            checked += 1
    return checked


@pytest.mark.parametrize("kind", ["yaml", "csv", "jsonl"])
def test_each_manifest_format_runs_to_completion(
    kind, emulator, images, write_manifest, cli, tmp_path
):
    """YAML, CSV and JSONL manifests all run every row and write its output."""
    path = write_manifest(simple_rows(images, 6), kind=kind)
    out = tmp_path / "out"
    result = cli("run", path, "--base-url", emulator.base_url, "--out", out, "--no-progress")
    assert result.code == 0, result.err
    assert "6 completed" in result.out
    assert sorted(p.name for p in out.glob("row-*")) == [f"row-{i:04d}.jpg" for i in range(6)]
    assert assert_outputs_match_emulator(out, emulator) == 6


def test_two_hundred_rows_at_concurrency_fifty_are_byte_identical(
    emulator, images, write_manifest, cli, tmp_path
):
    """A 200-row batch at --concurrency 50 completes every row with the exact served bytes."""
    emulator.config.latency = (0.0, 0.05)
    rows = simple_rows(images, 200)
    for i, row in enumerate(rows):
        row["output_format"] = ("png", "jpeg", "webp")[i % 3]
    path = write_manifest(rows)
    out = tmp_path / "out"
    result = cli(
        "run",
        path,
        "--base-url",
        emulator.base_url,
        "--out",
        out,
        "--concurrency",
        "50",
        "--no-progress",
        "--json",
    )
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["completed"] == 200 and summary["submitted"] == 200
    assert emulator.stats.submits_accepted == 200
    assert assert_outputs_match_emulator(out, emulator) == 200
    assert emulator.stats.uploads == len(images)


def test_output_formats_match_extension_and_magic(emulator, images, write_manifest, cli, tmp_path):
    """png, jpeg and webp outputs are saved under the right extension with the right bytes."""
    rows = [
        {"id": f"f-{fmt}", "image": "images/a.png", "prompt": "p", "output_format": fmt}
        for fmt in ("png", "jpeg", "webp")
    ]
    out = tmp_path / "out"
    result = cli("run", write_manifest(rows), "--base-url", emulator.base_url, "--out", out)
    assert result.code == 0, result.err
    for fmt, ext in (("png", "png"), ("jpeg", "jpg"), ("webp", "webp")):
        assert sniff_image((out / f"f-{fmt}.{ext}").read_bytes()[:16]) == fmt


@pytest.mark.parametrize("style", ["bare", "data_uri"])
def test_base64_outputs_are_decoded(style, emulator, images, write_manifest, cli, tmp_path):
    """With enable_base64_output the outputs arrive inline, bare or as data: URIs, and decode."""
    emulator.config.base64_style = style
    rows = simple_rows(images, 3, params={"enable_base64_output": True}, output_format="png")
    out = tmp_path / "out"
    result = cli("run", write_manifest(rows), "--base-url", emulator.base_url, "--out", out)
    assert result.code == 0, result.err
    assert emulator.stats.downloads == 0
    assert assert_outputs_match_emulator(out, emulator) == 3


def test_several_outputs_per_task_get_numbered_names(
    emulator, images, write_manifest, cli, tmp_path
):
    """A task that returns several images writes <id>-1, <id>-2, ... and records them all."""
    emulator.config.outputs_per_task = 2
    out = tmp_path / "out"
    rows = [{"id": "multi", "image": "images/a.png", "prompt": "p", "output_format": "png"}]
    result = cli("run", write_manifest(rows), "--base-url", emulator.base_url, "--out", out)
    assert result.code == 0, result.err
    assert completed_events(out)["multi"]["outputs"] == ["multi-1.png", "multi-2.png"]
    assert assert_outputs_match_emulator(out, emulator) == 2


def test_ledger_records_every_field_of_the_contract(
    emulator, images, write_manifest, cli, tmp_path
):
    """The ledger has run, submitted, completed and finished lines with the SPEC's fields."""
    rows = [
        {"id": "r1", "image": "images/a.png", "prompt": "p", "seed": -1},
        {"id": "r2", "image": "images/b.jpg", "prompt": "q", "seed": 5},
    ]
    out = tmp_path / "out"
    assert cli("run", write_manifest(rows), "--base-url", emulator.base_url, "--out", out).code == 0
    events = read_ledger_lines(out)
    assert all("ts" in e and "event" in e for e in events)
    assert events[0]["event"] == "run" and events[-1]["event"] == "finished"
    assert {"run_id", "manifest", "model", "base_url", "version"} <= events[0].keys()
    submitted = {e["row"]: e for e in events if e["event"] == "submitted"}
    completed = completed_events(out)
    for row in ("r1", "r2"):
        assert {"prediction_id", "seed", "attempt"} <= submitted[row].keys()
        assert {"prediction_id", "outputs", "sha256", "nsfw", "inference_ms", "seed"} <= (
            completed[row].keys()
        )
        assert completed[row]["seed"] == submitted[row]["seed"]
    # seed -1 is resolved to a concrete seed, recorded, and sent
    assert 0 <= submitted["r1"]["seed"] <= 2_147_483_647
    sent = emulator.predictions[submitted["r1"]["prediction_id"]]
    assert sent.body["seed"] == submitted["r1"]["seed"]
    assert submitted["r2"]["seed"] == 5
    assert events[-1]["summary"]["completed"] == 2
    text = (out / "ledger.jsonl").read_text()
    assert API_KEY not in text and "base64" not in text


def test_cdn_and_upload_urls_never_receive_the_key(emulator, images, write_manifest, cli, tmp_path):
    """The key goes to the API origin only: not to output downloads nor upload PUTs."""
    out = tmp_path / "out"
    result = cli(
        "run", write_manifest(simple_rows(images, 4)), "--base-url", emulator.base_url, "--out", out
    )
    assert result.code == 0
    cdn = [r for r in emulator.requests if r.origin == "cdn"]
    assert any(r.method == "PUT" for r in cdn) and any(r.method == "GET" for r in cdn)
    assert all("Authorization" not in r.headers for r in cdn)
    assert emulator.stats.key_leaks == 0
    api = [r for r in emulator.requests if r.origin == "api"]
    assert api and all(r.headers.get("Authorization") == f"Bearer {API_KEY}" for r in api)
    assert all(r.headers.get("X-Client-Name") == "wsbatch" for r in api)


def test_url_images_are_passed_through_without_upload(
    emulator, images, write_manifest, cli, tmp_path
):
    """An http(s) image is sent as is; nothing is uploaded for it."""
    ticket = tmp_path / "hosted.png"
    make_image(ticket, (10, 20, 30))
    # Host an input on the emulator's CDN by uploading it once out of band.
    out = tmp_path / "first"
    cli(
        "run",
        write_manifest([{"id": "x", "image": "images/a.png", "prompt": "p"}], name="one"),
        "--base-url",
        emulator.base_url,
        "--out",
        out,
    )
    url = json.loads((out / "ledger.jsonl").read_text().splitlines()[1])["download_url"]
    emulator.reset_stats()
    rows = [{"id": "u1", "image": url, "prompt": "p"}]
    out2 = tmp_path / "second"
    result = cli(
        "run", write_manifest(rows, name="two"), "--base-url", emulator.base_url, "--out", out2
    )
    assert result.code == 0, result.err
    assert emulator.stats.uploads == 0 and emulator.stats.upload_tickets == 0
    pid = completed_events(out2)["u1"]["prediction_id"]
    assert emulator.predictions[pid].body["image"] == url


def test_same_image_is_uploaded_once_per_run(emulator, images, write_manifest, cli, tmp_path):
    """Rows naming the same image share one upload, even when they run concurrently."""
    rows = [{"image": "images/a.png", "prompt": f"p{i}"} for i in range(12)]
    out = tmp_path / "out"
    result = cli(
        "run",
        write_manifest(rows),
        "--base-url",
        emulator.base_url,
        "--out",
        out,
        "--concurrency",
        "12",
    )
    assert result.code == 0, result.err
    assert emulator.stats.uploads == 1
    assert emulator.stats.submits_accepted == 12


def test_legacy_single_step_upload_flow_works(emulator, images, write_manifest, tmp_path):
    """The older single-step binary upload (still in the vendor docs) uploads and runs."""
    import asyncio

    from batch.client import Client
    from batch.manifest import load_manifest
    from batch.runner import Runner, RunOptions

    async def go() -> None:
        async with Client(emulator.base_url, API_KEY, upload_flow="binary") as client:
            manifest = load_manifest(write_manifest(simple_rows(images, 2)))
            runner = Runner(
                manifest, client, RunOptions(out_dir=tmp_path / "out", handle_signals=False)
            )
            summary = await runner.run()
            assert summary.completed == 2

    asyncio.run(go())
    assert emulator.stats.uploads == 2
    assert emulator.stats.upload_tickets == 0


def test_validate_prints_plan_and_cost_without_network(images, write_manifest, cli, tmp_path):
    """`wsbatch validate` checks the manifest and prints rows to do and the estimated cost."""
    path = write_manifest(simple_rows(images, 5))
    result = cli("validate", path, "--out", tmp_path / "out", "--price", "0.05")
    assert result.code == 0
    assert "5 to submit" in result.out and "$0.25" in result.out


def test_status_reports_counts_from_the_ledger(emulator, images, write_manifest, cli, tmp_path):
    """`wsbatch status OUT_DIR --json` reports completed rows from the ledger alone."""
    out = tmp_path / "out"
    cli(
        "run", write_manifest(simple_rows(images, 3)), "--base-url", emulator.base_url, "--out", out
    )
    result = cli("status", out, "--json")
    info = json.loads(result.out)
    assert info["completed"] == 3 and info["rows"] == 3 and info["running"] is False
    human = cli("status", out)
    assert "3 completed" in human.out


def test_python_dash_m_batch_is_the_same_program():
    """`python -m batch --version` works like the console script."""
    from tests.conftest import run_subprocess

    result = run_subprocess("--version")
    assert result.returncode == 0 and "wsbatch" in result.stdout


def test_uploads_are_reused_by_the_next_run(emulator, images, write_manifest, cli, tmp_path):
    """An image uploaded by one run is not uploaded again by the next run on that folder."""
    rows = [{"image": "images/a.png", "prompt": f"p{i}"} for i in range(4)]
    path = write_manifest(rows)
    out = tmp_path / "out"
    args = ("run", path, "--base-url", emulator.base_url, "--out", out, "--json")
    first = cli(*args, "--max-tasks", "1")
    assert json.loads(first.out)["uploads"] == 1
    second = json.loads(cli(*args).out)
    assert second["uploads"] == 0 and second["uploads_reused"] == 1
    assert second["completed"] == 4 and emulator.stats.uploads == 1


def test_internal_error_prints_one_line_and_a_hint(cli, monkeypatch, images, write_manifest):
    """A bug shows one line and the --debug hint, not a traceback; --debug shows it."""
    import batch.cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(batch.cli, "_cmd_validate", broken)
    path = write_manifest(simple_rows(images, 1))
    result = cli("validate", path)
    assert result.code == 1
    assert result.err.strip().count("\n") == 0 and "--debug" in result.err
    assert "Traceback" not in result.err
    assert "Traceback" in cli("--debug", "validate", path).err
