"""The vendor's Python SDK (``wavespeed``) works against the emulator with only a new base URL."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from batch.emulator import Emulator, EmulatorConfig, render_edit, serve_in_thread

wavespeed: Any = pytest.importorskip("wavespeed")

KEY = "sdk-test-key"
MODEL = "wavespeed-ai/hidream-e1-full"
PROMPT = "add a red hat"


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with serve_in_thread(EmulatorConfig(api_key=KEY, seed=5, latency=(0.02, 0.05))) as emu:
        yield emu


@pytest.fixture
def client(emulator: Emulator) -> Any:
    return wavespeed.Client(api_key=KEY, base_url=emulator.base_url, max_connection_retries=0)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "cat.png"
    Image.new("RGB", (40, 24), (30, 140, 90)).save(path, "PNG")
    return path, path.read_bytes()


def test_sdk_upload_round_trips_the_file(
    client: Any, emulator: Emulator, source: tuple[Path, bytes]
) -> None:
    """The SDK's ticket + PUT upload stores the exact bytes and returns a CDN download_url."""
    path, data = source
    url = client.upload(str(path))
    assert url.startswith(emulator.cdn_url + "/inputs/")
    assert emulator.uploaded_bytes(url) == data
    assert requests.get(url, timeout=5).content == data
    put = [r for r in emulator.requests if r.method == "PUT"]
    assert len(put) == 1 and "Authorization" not in put[0].headers


def test_sdk_run_submits_and_polls_to_the_output(
    client: Any, emulator: Emulator, source: tuple[Path, bytes]
) -> None:
    """Client.run (submit, then fixed-interval polling) yields the emulator's output URL."""
    path, data = source
    image = client.upload(str(path))
    result = client.run(
        MODEL,
        {"prompt": PROMPT, "image": image, "seed": 9, "output_format": "png"},
        poll_interval=0.02,
    )
    [url] = result["outputs"]
    assert requests.get(url, timeout=5).content == render_edit(data, PROMPT, 9, "png")
    submits = [r for r in emulator.requests if r.path == f"/api/v3/{MODEL}"]
    assert len(submits) == 1 and submits[0].headers["X-Client-Name"] == "wavespeed-python"
    assert emulator.stats.polls >= 1


def test_sdk_sync_mode_and_its_timeout(
    client: Any, emulator: Emulator, source: tuple[Path, bytes]
) -> None:
    """Sync mode answers outputs in one request; a server-side timeout reads as "processing"."""
    path, data = source
    image = client.upload(str(path))
    body = {"prompt": PROMPT, "image": image, "seed": 3, "output_format": "webp"}
    result = client.run(MODEL, body, enable_sync_mode=True)
    [url] = result["outputs"]
    assert requests.get(url, timeout=5).content == render_edit(data, PROMPT, 3, "webp")
    assert emulator.stats.polls == 0 and emulator.stats.sync_submits == 1
    emulator.config.sync_timeout = 0.05
    emulator.config.latency = (5.0, 5.0)
    outcome = client.run_no_throw(MODEL, body, enable_sync_mode=True)
    assert outcome["status"] == "processing" and outcome["outputs"] is None
    assert outcome["task_id"] in emulator.predictions
    state = client.get_result(outcome["task_id"])
    assert state["data"]["status"] == "processing"


@pytest.mark.parametrize("style", ["bare", "data_uri"])
def test_sdk_base64_output(
    client: Any, emulator: Emulator, source: tuple[Path, bytes], style: str
) -> None:
    """enable_base64_output reaches the SDK's caller as base64 of the exact output image."""
    emulator.config.base64_style = style  # type: ignore[assignment]
    path, data = source
    image = client.upload(str(path))
    body = {"prompt": PROMPT, "image": image, "seed": 4, "enable_base64_output": True}
    [out] = client.run(MODEL, body, poll_interval=0.02)["outputs"]
    if style == "data_uri":
        prefix, _, out = out.partition(",")
        assert prefix == "data:image/jpeg;base64"
    raw = base64.b64decode(out, validate=True)
    assert raw == render_edit(data, PROMPT, 4, "jpeg")
    with Image.open(io.BytesIO(raw)) as img:
        assert img.size == (40, 24)


def test_sdk_sees_a_failed_task_as_an_error_and_never_resubmits(
    client: Any, emulator: Emulator
) -> None:
    """A failed task raises in Client.run, and the SDK sends its submit exactly once."""
    emulator.fail_next_tasks(1200, "content flagged by moderation")
    with pytest.raises(RuntimeError, match="content flagged"):
        client.run(
            MODEL, {"prompt": PROMPT, "image": "http://127.0.0.1:1/x.png"}, poll_interval=0.02
        )
    assert emulator.stats.submits_accepted == 1
