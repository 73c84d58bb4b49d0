"""Wire-level tests of the WaveSpeed emulator, driven with a bare aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from PIL import Image

from batch.emulator import (
    MODELS,
    Emulator,
    EmulatorConfig,
    main,
    render_edit,
    serve_in_thread,
    start_emulator,
)

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "wavespeed-ai/hidream-e1-full"
LISTING_FIELDS = {
    "id",
    "model",
    "outputs",
    "urls",
    "has_nsfw_contents",
    "status",
    "created_at",
    "error",
    "executionTime",
    "timings",
}
MAGIC = {
    "png": lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"),
    "jpeg": lambda b: b.startswith(b"\xff\xd8\xff"),
    "webp": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP",
}


def make_png(
    size: tuple[int, int] = (48, 32), colour: tuple[int, int, int] = (20, 120, 220)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest_asyncio.fixture
async def emu() -> AsyncIterator[Emulator]:
    emulator = await start_emulator(EmulatorConfig(api_key=KEY, seed=7))
    try:
        yield emulator
    finally:
        await emulator.close()
    assert emulator.errors == []


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def upload(http: aiohttp.ClientSession, emu: Emulator, data: bytes) -> str:
    ticket_body = {"filename": "in.png", "size": len(data), "content_type": "image/png"}
    async with http.post(
        f"{emu.base_url}/api/v3/media/uploads", json=ticket_body, headers=AUTH
    ) as resp:
        assert resp.status == 200
        ticket = (await resp.json())["data"]
    put = ticket["upload"]
    async with http.put(put["url"], data=data, headers=put["headers"]) as resp:
        assert resp.status == 200
    url: str = ticket["download_url"]
    return url


async def submit(
    http: aiohttp.ClientSession, emu: Emulator, image: str, **fields: Any
) -> dict[str, Any]:
    body = {"prompt": "add a red hat", "image": image, **fields}
    async with http.post(f"{emu.base_url}/api/v3/{MODEL}", json=body, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        envelope = await resp.json()
    assert envelope["code"] == 200
    data: dict[str, Any] = envelope["data"]
    return data


async def poll(http: aiohttp.ClientSession, emu: Emulator, pid: str) -> dict[str, Any]:
    url = f"{emu.base_url}/api/v3/predictions/{pid}/result"
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status == 200
        data: dict[str, Any] = (await resp.json())["data"]
    return data


async def run_task(
    http: aiohttp.ClientSession, emu: Emulator, image: str, **fields: Any
) -> dict[str, Any]:
    pid = (await submit(http, emu, image, **fields))["id"]
    for _ in range(200):
        data = await poll(http, emu, pid)
        if data["status"] in ("completed", "failed"):
            return data
        await asyncio.sleep(0.01)
    raise AssertionError("task never finished")


async def fetch(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as resp:
        assert resp.status == 200
        body = await resp.read()
        assert resp.content_length == len(body)
        return body


@pytest.mark.asyncio
async def test_two_step_upload_serves_the_exact_bytes(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """The ticket + PUT flow stores the bytes on the CDN origin under download_url."""
    data = make_png()
    url = await upload(http, emu, data)
    assert url.startswith(emu.cdn_url + "/inputs/")
    assert await fetch(http, url) == data
    assert emu.stats.uploads == 1


@pytest.mark.asyncio
async def test_binary_upload_serves_the_exact_bytes(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """The old multipart flow answers a download_url on the CDN that serves the file."""
    data = make_png()
    form = aiohttp.FormData()
    form.add_field("file", data, filename="cat.png", content_type="image/png")
    async with http.post(
        f"{emu.base_url}/api/v3/media/upload/binary", data=form, headers=AUTH
    ) as resp:
        assert resp.status == 200
        body = (await resp.json())["data"]
    assert body["type"] == "image" and body["size"] == len(data) and body["filename"] == "cat.png"
    assert await fetch(http, body["download_url"]) == data


@pytest.mark.asyncio
async def test_upload_put_checks_signed_headers_and_size(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """A PUT without the ticket's headers, or with the wrong size, is refused."""
    data = make_png()
    ticket_body = {"filename": "in.png", "size": len(data)}
    async with http.post(
        f"{emu.base_url}/api/v3/media/uploads", json=ticket_body, headers=AUTH
    ) as resp:
        put = (await resp.json())["data"]["upload"]
    assert put["headers"]["Content-Type"] == "application/octet-stream"
    async with http.put(put["url"], data=data) as resp:
        assert resp.status == 403
    async with http.put(put["url"], data=data[:-1], headers=put["headers"]) as resp:
        assert resp.status == 400
    emu.config.max_upload_bytes = 10
    async with http.post(
        f"{emu.base_url}/api/v3/media/uploads", json=ticket_body, headers=AUTH
    ) as resp:
        assert resp.status == 413
    assert emu.stats.uploads == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_completed_task_outputs_a_deterministic_edit(
    emu: Emulator, http: aiohttp.ClientSession, fmt: str
) -> None:
    """Outputs are real images in the requested format, changed, and reproducible."""
    src = make_png()
    image = await upload(http, emu, src)
    first = await run_task(http, emu, image, seed=42, output_format=fmt)
    second = await run_task(http, emu, image, seed=42, output_format=fmt)
    other_seed = await run_task(http, emu, image, seed=43, output_format=fmt)
    assert first["status"] == "completed"
    assert first["has_nsfw_contents"] == [False]
    [url] = first["outputs"]
    assert url.startswith(emu.cdn_url + "/outputs/") and url.endswith("." + fmt)
    out = await fetch(http, url)
    assert MAGIC[fmt](out)
    assert out != src
    assert out == await fetch(http, second["outputs"][0])
    assert out != await fetch(http, other_seed["outputs"][0])
    assert out == render_edit(src, "add a red hat", 42, fmt)
    assert emu.output_bytes(first["id"]) == [out]
    with Image.open(io.BytesIO(out)) as img:
        assert img.size == (48, 32)


@pytest.mark.asyncio
@pytest.mark.parametrize("style", ["bare", "data_uri"])
async def test_base64_outputs(emu: Emulator, http: aiohttp.ClientSession, style: str) -> None:
    """enable_base64_output answers bare base64 or a data: URI of the same image bytes."""
    emu.config.base64_style = style  # type: ignore[assignment]
    image = await upload(http, emu, make_png())
    data = await run_task(http, emu, image, seed=1, output_format="webp", enable_base64_output=True)
    [out] = data["outputs"]
    if style == "data_uri":
        prefix = "data:image/webp;base64,"
        assert out.startswith(prefix)
        out = out[len(prefix) :]
    raw = base64.b64decode(out, validate=True)
    assert MAGIC["webp"](raw)
    assert emu.output_bytes(data["id"]) == [raw]


@pytest.mark.asyncio
async def test_mixed_base64_alternates_and_multiple_outputs_differ(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """ "mixed" alternates bare/data-URI per task; outputs_per_task>1 gives distinct images."""
    emu.config.base64_style = "mixed"
    emu.config.outputs_per_task = 2
    image = await upload(http, emu, make_png())
    a = await run_task(http, emu, image, enable_base64_output=True)
    b = await run_task(http, emu, image, enable_base64_output=True)
    assert [o.startswith("data:") for o in a["outputs"]] == [False, False]
    assert [o.startswith("data:image/jpeg;base64,") for o in b["outputs"]] == [True, True]
    assert len(set(emu.output_bytes(a["id"]))) == 2
    assert a["has_nsfw_contents"] == [False, False]


@pytest.mark.asyncio
async def test_failed_task_is_http_200_with_status_and_code(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """A failed task still answers 200; the failure is in data.status/error/code."""
    image = await upload(http, emu, make_png())
    emu.fail_next_tasks(1200, "flagged", n=1)
    data = await run_task(http, emu, image)
    assert (data["status"], data["error"], data["code"]) == ("failed", "flagged", 1200)
    assert data["outputs"] == []
    assert emu.stats.failed_tasks == [(data["id"], 1200)]
    assert (await run_task(http, emu, image))["status"] == "completed"


@pytest.mark.asyncio
async def test_unfetchable_or_non_image_input_fails_with_1402(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """An input URL that 404s or holds no image ends the task failed with code 1402."""
    missing = await run_task(http, emu, f"{emu.cdn_url}/inputs/nope/x.png")
    assert (missing["status"], missing["code"]) == ("failed", 1402)
    ticket_body = {"filename": "a.txt", "size": 5}
    async with http.post(
        f"{emu.base_url}/api/v3/media/uploads", json=ticket_body, headers=AUTH
    ) as resp:
        ticket = (await resp.json())["data"]
    async with http.put(
        ticket["upload"]["url"], data=b"hello", headers=ticket["upload"]["headers"]
    ):
        pass
    garbage = await run_task(http, emu, ticket["download_url"])
    assert (garbage["status"], garbage["code"]) == ("failed", 1402)


@pytest.mark.asyncio
async def test_input_fetched_over_http_from_another_origin(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """An image URL outside the emulator is fetched over HTTP like the real service does."""
    src = make_png()
    other = await start_emulator(EmulatorConfig())
    try:
        async with http.post(
            f"{other.base_url}/api/v3/media/uploads",
            json={"filename": "x.png", "size": len(src), "content_type": "image/png"},
            headers=AUTH,
        ) as resp:
            ticket = (await resp.json())["data"]
        async with http.put(ticket["upload"]["url"], data=src, headers=ticket["upload"]["headers"]):
            pass
        data = await run_task(http, emu, ticket["download_url"], seed=5, output_format="png")
    finally:
        await other.close()
    assert data["status"] == "completed"
    assert emu.output_bytes(data["id"]) == [render_edit(src, "add a red hat", 5, "png")]


@pytest.mark.asyncio
async def test_wrong_or_missing_key_is_401(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """Only the configured key is accepted; the error body uses the envelope."""
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        async with http.get(f"{emu.base_url}/api/v3/balance", headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
        assert body["code"] == 401 and "Unauthorized" in body["message"] and body["data"] is None
    emu.config.suspended = True
    async with http.get(f"{emu.base_url}/api/v3/balance", headers=AUTH) as resp:
        assert resp.status == 403


@pytest.mark.asyncio
async def test_any_key_accepted_when_none_configured(http: aiohttp.ClientSession) -> None:
    """Without a configured key, any non-empty bearer key works and an empty one does not."""
    emulator = await start_emulator()
    try:
        async with http.get(
            f"{emulator.base_url}/api/v3/balance", headers={"Authorization": "Bearer x"}
        ) as resp:
            assert resp.status == 200
        async with http.get(
            f"{emulator.base_url}/api/v3/balance", headers={"Authorization": "Bearer "}
        ) as resp:
            assert resp.status == 401
    finally:
        await emulator.close()


@pytest.mark.asyncio
async def test_cdn_rejects_authorization_and_records_the_leak(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """The CDN origin refuses any request carrying the API key and counts it as a leak."""
    url = await upload(http, emu, make_png())
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status == 403
    assert emu.stats.key_leaks == 1
    leaked = [r for r in emu.requests if r.origin == "cdn" and "Authorization" in r.headers]
    assert len(leaked) == 1 and leaked[0].method == "GET"


@pytest.mark.asyncio
async def test_submit_validation_names_the_field(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """A bad submit is a 400 whose message names the offending field; nothing is created."""
    cases = [
        ({"image": "http://x/y.png"}, "prompt"),
        ({"prompt": "p"}, "image"),
        ({"prompt": "p", "image": "http://x/y.png", "seed": 2**31}, "seed"),
        ({"prompt": "p", "image": "http://x/y.png", "output_format": "gif"}, "output_format"),
    ]
    for body, field_name in cases:
        async with http.post(f"{emu.base_url}/api/v3/{MODEL}", json=body, headers=AUTH) as resp:
            assert resp.status == 400
            envelope = await resp.json()
        assert envelope["code"] == 400 and field_name in envelope["message"]
    assert emu.predictions == {}


@pytest.mark.asyncio
async def test_scripted_429_carries_retry_after(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """A scripted 429 creates nothing; Retry-After only when send_retry_after is on."""
    emu.config.retry_after = 3
    emu.script("submit", "429", "429")
    body = {"prompt": "p", "image": "http://127.0.0.1:1/x.png"}
    async with http.post(f"{emu.base_url}/api/v3/{MODEL}", json=body, headers=AUTH) as resp:
        assert resp.status == 429
        assert "Retry-After" not in resp.headers
        assert (await resp.json())["code"] == 429
    emu.config.send_retry_after = True
    async with http.post(f"{emu.base_url}/api/v3/{MODEL}", json=body, headers=AUTH) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
    assert emu.predictions == {}
    assert emu.stats.faults == {"submit:429": 2}
    await submit(http, emu, "http://127.0.0.1:1/x.png")


@pytest.mark.asyncio
async def test_rate_per_minute_answers_429_with_retry_after(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Submits over the per-minute limit are refused with a Retry-After up to 60 s."""
    emu.config.rate_per_minute = 2
    emu.config.send_retry_after = True
    await submit(http, emu, "http://127.0.0.1:1/a.png")
    await submit(http, emu, "http://127.0.0.1:1/b.png")
    body = {"prompt": "p", "image": "http://127.0.0.1:1/c.png"}
    async with http.post(f"{emu.base_url}/api/v3/{MODEL}", json=body, headers=AUTH) as resp:
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert emu.stats.submits_accepted == 2 and emu.stats.rate_limited == 1


@pytest.mark.asyncio
async def test_max_concurrent_queues_tasks_fifo(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """Above the concurrency cap a task stays "created" until a slot frees, in order."""
    emu.config.max_concurrent = 1
    emu.config.latency = (0.15, 0.15)
    image = await upload(http, emu, make_png())
    a = (await submit(http, emu, image))["id"]
    b = (await submit(http, emu, image))["id"]
    assert (await poll(http, emu, a))["status"] == "processing"
    assert (await poll(http, emu, b))["status"] == "created"
    pa, pb = emu.predictions[a], emu.predictions[b]
    assert pb.start_mono == pytest.approx(pa.finish_mono)
    assert pb.finish_mono == pytest.approx(pa.finish_mono + 0.15)
    await asyncio.sleep(max(0.0, pa.finish_mono - time.monotonic()) + 0.01)
    assert (await poll(http, emu, a))["status"] == "completed"
    assert (await poll(http, emu, b))["status"] == "processing"
    assert pa.first_completed_poll_mono is not None
    assert pa.first_completed_poll_mono >= pa.finish_mono


@pytest.mark.asyncio
async def test_drop_closes_connection_and_drop_after_creates(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """A drop is a disconnect; a submit dropped after creation still exists and is billed."""
    emu.script("submit", "drop", "drop_after")
    body = {"prompt": "p", "image": "http://127.0.0.1:1/x.png"}
    for _ in range(2):
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(f"{emu.base_url}/api/v3/{MODEL}", json=body, headers=AUTH) as resp:
                await resp.read()
    assert emu.stats.submits_dropped_before == 1
    assert emu.stats.submits_created_then_dropped == 1
    assert len(emu.predictions) == 1
    assert emu.config.balance == pytest.approx(100.0 - 0.024)
    [pid] = emu.predictions
    # aiohttp silently retries an idempotent request once on a dropped keep-alive
    # connection, so it takes two drops for the client to see one.
    emu.script("result", "drop", "drop")
    with pytest.raises(aiohttp.ClientConnectionError):
        await poll(http, emu, pid)
    assert emu.stats.faults["result:drop"] == 2
    assert (await poll(http, emu, pid))["id"] == pid


@pytest.mark.asyncio
async def test_scripted_download_faults(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """ "truncate" cuts the body short of Content-Length; "garbage" serves non-image bytes."""
    image = await upload(http, emu, make_png())
    data = await run_task(http, emu, image, output_format="png")
    url = data["outputs"][0]
    emu.script("download", "truncate", "garbage", "503")
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as resp:
            await resp.read()
    async with http.get(url) as resp:
        assert resp.status == 200 and not MAGIC["png"](await resp.read())
    async with http.get(url) as resp:
        assert resp.status == 503
    assert MAGIC["png"](await fetch(http, url))
    assert emu.stats.downloads == 1


@pytest.mark.asyncio
async def test_unknown_and_deleted_predictions_are_404(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Result for an unknown or deleted id is 404, and a deleted task's outputs go too."""
    async with http.get(f"{emu.base_url}/api/v3/predictions/{'0' * 32}/result", headers=AUTH) as r:
        assert r.status == 404
        assert (await r.json())["code"] == 404
    image = await upload(http, emu, make_png())
    data = await run_task(http, emu, image)
    assert emu.delete_prediction(data["id"])
    async with http.get(
        f"{emu.base_url}/api/v3/predictions/{data['id']}/result", headers=AUTH
    ) as r:
        assert r.status == 404
    async with http.get(data["outputs"][0]) as r:
        assert r.status == 404


@pytest.mark.asyncio
async def test_status_5004_while_processing_quirk(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """With the quirk on, a running task reports code 5004 yet status "processing"."""
    emu.config.status_5004_while_processing = True
    emu.config.latency = (5.0, 5.0)
    pid = (await submit(http, emu, "http://127.0.0.1:1/x.png"))["id"]
    data = await poll(http, emu, pid)
    assert (data["status"], data["code"]) == ("processing", 5004)


@pytest.mark.asyncio
async def test_balance_price_and_insufficient_balance(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """balance and model/price answer the envelope; an empty balance refuses submits with 402."""
    async with http.post(
        f"{emu.base_url}/api/v3/model/price", json={"model_id": MODEL, "inputs": {}}, headers=AUTH
    ) as resp:
        price = (await resp.json())["data"]
    assert price == {"price": 0.024, "discounted_price": 0.024, "currency": "USD"}
    await submit(http, emu, await upload(http, emu, make_png()))
    async with http.get(f"{emu.base_url}/api/v3/balance", headers=AUTH) as resp:
        assert (await resp.json())["data"]["balance"] == pytest.approx(100.0 - 0.024)
    emu.config.enforce_balance = True
    emu.config.balance = 0.01
    body = {"prompt": "p", "image": "http://127.0.0.1:1/x.png"}
    async with http.post(f"{emu.base_url}/api/v3/{MODEL}", json=body, headers=AUTH) as resp:
        assert resp.status == 402
        assert "balance" in (await resp.json())["message"].lower()


@pytest.mark.asyncio
async def test_prediction_list_is_newest_first_with_inputs(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """The list endpoint pages newest first; items carry the submit body only with the flag."""
    ids = [(await submit(http, emu, f"http://127.0.0.1:1/{i}.png"))["id"] for i in range(3)]
    query = {"page": 1, "page_size": 2, "model": MODEL}
    async with http.post(f"{emu.base_url}/api/v3/predictions", json=query, headers=AUTH) as resp:
        data = (await resp.json())["data"]
    assert data["total"] == 3 and [item["id"] for item in data["items"]] == ids[::-1][:2]
    assert set(data["items"][0]) == LISTING_FIELDS
    emu.config.listing_inputs = True
    async with http.post(f"{emu.base_url}/api/v3/predictions", json=query, headers=AUTH) as resp:
        data = (await resp.json())["data"]
    assert set(data["items"][0]) == LISTING_FIELDS | {"input"}
    assert data["items"][0]["input"]["image"] == "http://127.0.0.1:1/2.png"
    query["page_size"] = 101
    async with http.post(f"{emu.base_url}/api/v3/predictions", json=query, headers=AUTH) as resp:
        assert resp.status == 400


@pytest.mark.asyncio
async def test_random_faults_are_reproducible_with_a_seed(http: aiohttp.ClientSession) -> None:
    """The same config seed gives the same sequence of injected faults."""
    seen: list[list[int]] = []
    for _ in range(2):
        emulator = await start_emulator(EmulatorConfig(seed=3, p_429=0.3, p_5xx=0.3))
        statuses = []
        try:
            for _ in range(20):
                async with http.get(
                    f"{emulator.base_url}/api/v3/predictions/{'a' * 32}/result",
                    headers={"Authorization": "Bearer k"},
                ) as resp:
                    statuses.append(resp.status)
        finally:
            await emulator.close()
        seen.append(statuses)
    assert seen[0] == seen[1]
    assert {429, 404} <= set(seen[0]) and set(seen[0]) & {500, 502, 503}


@pytest.mark.asyncio
async def test_state_endpoint_exposes_stats_and_finish_instants(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """/_emulator/state lets an out-of-process harness read counters and task timings."""
    image = await upload(http, emu, make_png())
    done = await run_task(http, emu, image)
    async with http.get(f"{emu.base_url}/_emulator/state", headers=AUTH) as resp:
        state = (await resp.json())["data"]
    assert state["stats"]["submits_accepted"] == 1
    [item] = state["predictions"]
    pred = emu.predictions[done["id"]]
    assert item["finish_mono"] == pred.finish_mono
    assert item["first_completed_poll_mono"] == pred.first_completed_poll_mono
    api = [r for r in emu.requests if r.origin == "api"]
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in api)


def test_serve_in_thread_from_sync_code() -> None:
    """serve_in_thread yields a listening emulator usable from plain blocking code."""
    with serve_in_thread(EmulatorConfig(balance=12.5)) as emulator:
        request = urllib.request.Request(
            f"{emulator.base_url}/api/v3/balance", headers={"Authorization": "Bearer k"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.load(resp)["data"] == {"balance": 12.5}
        emulator.script("account", "503")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 503
        info.value.close()
        base = emulator.base_url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/api/v3/balance", timeout=2)


def test_cli_refuses_a_non_loopback_host() -> None:
    """The CLI never binds the fake, key-accepting server to a public interface."""
    with pytest.raises(SystemExit) as info:
        main(["--host", "0.0.0.0"])
    assert info.value.code == 2


def test_cli_prints_its_url_and_stops_on_sigterm() -> None:
    """`python -m batch.emulator` announces both origins, serves, and exits 0 on SIGTERM."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "WAVESPEED_API_KEY": "cli-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch.emulator", "--port", "0", "--latency", "0,0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("wsbatch emulator listening on http://127.0.0.1:")
        base = line.split()[4]
        request = urllib.request.Request(
            f"{base}/api/v3/balance", headers={"Authorization": "Bearer cli-key"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def post_submit(
    http: aiohttp.ClientSession, emu: Emulator, body: dict[str, Any], model: str = MODEL
) -> aiohttp.ClientResponse:
    """POST a submit and read its body; the caller inspects status and payload."""
    async with http.post(f"{emu.base_url}/api/v3/{model}", json=body, headers=AUTH) as resp:
        await resp.read()
        return resp


async def api_json(
    http: aiohttp.ClientSession, emu: Emulator, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """GET (no body) or POST (JSON body) an API path; answers (HTTP status, envelope)."""
    url = f"{emu.base_url}{path}"
    method = (
        http.get(url, headers=AUTH) if body is None else http.post(url, json=body, headers=AUTH)
    )
    async with method as resp:
        return resp.status, await resp.json()


async def sleep_into_next_window(emu: Emulator, window: float) -> None:
    """Sleep until just after the next fixed rate-window boundary."""
    elapsed = time.monotonic() - emu.started_mono
    await asyncio.sleep(window - elapsed % window + 0.01)


@pytest.mark.asyncio
async def test_fixed_rate_window_counts_accepted_generations_and_resets(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """rate_limit per fixed rate_window: 429 past the limit, only accepted submits count."""
    emu.config.rate_limit = 2
    emu.config.rate_window = 0.3
    await sleep_into_next_window(emu, 0.3)
    bad = await post_submit(http, emu, {"image": "http://127.0.0.1:1/x.png"})
    assert bad.status == 400
    ok = {"prompt": "p", "image": "http://127.0.0.1:1/x.png"}
    assert [(await post_submit(http, emu, ok)).status for _ in range(3)] == [200, 200, 429]
    limited = await post_submit(http, emu, ok)
    assert limited.status == 429 and "Retry-After" not in limited.headers
    emu.config.send_retry_after = True
    limited = await post_submit(http, emu, ok)
    assert limited.status == 429 and limited.headers["Retry-After"] == "1"
    assert len(emu.predictions) == 2 and emu.stats.rate_limited == 3
    await sleep_into_next_window(emu, 0.3)
    assert (await post_submit(http, emu, ok)).status == 200
    assert emu.stats.submits_accepted == 3


@pytest.mark.asyncio
async def test_lognormal_latency_is_seeded_and_spread(http: aiohttp.ClientSession) -> None:
    """latency_lognormal draws run times from the seeded RNG: same seed, same times."""
    runs: list[list[float]] = []
    for _ in range(2):
        config = EmulatorConfig(seed=11, latency_lognormal=(0.01, 0.5))
        emulator = await start_emulator(config)
        try:
            for i in range(6):
                body = {"prompt": "p", "image": "http://127.0.0.1:1/x.png", "seed": i}
                async with http.post(
                    f"{emulator.base_url}/api/v3/{MODEL}",
                    json=body,
                    headers={"Authorization": "Bearer k"},
                ) as resp:
                    assert resp.status == 200
            runs.append([p.finish_mono - p.start_mono for p in emulator.predictions.values()])
        finally:
            await emulator.close()
    assert runs[0] == pytest.approx(runs[1])
    assert all(t > 0 for t in runs[0]) and len(set(runs[0])) == 6


@pytest.mark.asyncio
async def test_queued_task_is_created_then_processing_and_reports_run_time_only(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Past max_concurrent a task waits "created"; timings.inference excludes the queue."""
    emu.config.max_concurrent = 1
    emu.config.latency = (0.1, 0.1)
    image = await upload(http, emu, make_png())
    a = (await submit(http, emu, image))["id"]
    b = (await submit(http, emu, image))["id"]
    assert (await poll(http, emu, b))["status"] == "created"
    await asyncio.sleep(max(0.0, emu.predictions[a].finish_mono - time.monotonic()) + 0.01)
    assert (await poll(http, emu, b))["status"] == "processing"
    done = await run_task_by_id(http, emu, b)
    assert done["status"] == "completed"
    assert done["timings"]["inference"] == 100
    pred = emu.predictions[b]
    assert pred.finish_mono - pred.created_mono >= 0.19


async def run_task_by_id(http: aiohttp.ClientSession, emu: Emulator, pid: str) -> dict[str, Any]:
    """Poll an existing prediction until it is terminal."""
    for _ in range(200):
        data = await poll(http, emu, pid)
        if data["status"] in ("completed", "failed"):
            return data
        await asyncio.sleep(0.01)
    raise AssertionError("task never finished")


@pytest.mark.asyncio
async def test_visibility_delay_hides_new_tasks_from_result_and_listing(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """A task younger than visibility_delay answers 404 to a poll and is not listed."""
    emu.config.visibility_delay = 0.2
    pid = (await submit(http, emu, "http://127.0.0.1:1/x.png"))["id"]
    status, envelope = await api_json(http, emu, f"/api/v3/predictions/{pid}/result")
    assert status == 404 and envelope["code"] == 404
    _, listing = await api_json(http, emu, "/api/v3/predictions", {"page": 1})
    assert listing["data"]["total"] == 0
    assert emu.stats.invisible_polls == 1
    await asyncio.sleep(max(0.0, emu.predictions[pid].created_mono + 0.2 - time.monotonic()))
    assert (await poll(http, emu, pid))["id"] == pid


@pytest.mark.asyncio
async def test_submit_answers_without_an_id_still_create_and_bill(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """html/null/202/500 "_after" faults create and bill the task; stats and state show it."""
    emu.script("submit", "html_after", "null_after", "accepted_after", "500_after", "html_after")
    body = {"prompt": "p", "image": "http://127.0.0.1:1/x.png"}
    url = f"{emu.base_url}/api/v3/{MODEL}"
    async with http.post(url, json=body, headers=AUTH) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "<html" in await resp.text()
    async with http.post(url, json=body, headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"code": 200, "message": "success", "data": None}
    async with http.post(url, json=body, headers=AUTH) as resp:
        assert resp.status == 202 and await resp.read() == b""
    async with http.post(url, json=body, headers=AUTH) as resp:
        assert resp.status == 500 and (await resp.json())["code"] == 500
    # A refused submit is mangled the same way but creates nothing.
    async with http.post(url, json={"prompt": "p"}, headers=AUTH) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
    ids = list(emu.predictions)
    assert len(ids) == 4
    assert emu.stats.submits_created_unanswered == 4
    assert emu.stats.created_ids == ids and emu.stats.submits_accepted == 4
    assert emu.config.balance == pytest.approx(100.0 - 4 * 0.024)
    _, state = await api_json(http, emu, "/_emulator/state")
    assert state["data"]["billed"] == 4
    assert state["data"]["stats"]["created_ids"] == ids


@pytest.mark.asyncio
async def test_sync_mode_holds_the_submit_until_the_task_ends(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """enable_sync_mode answers the finished task: completed with outputs, or failed."""
    emu.config.latency = (0.05, 0.05)
    image = await upload(http, emu, make_png())
    started = time.monotonic()
    data = await submit(http, emu, image, enable_sync_mode=True, output_format="png")
    assert time.monotonic() - started >= 0.05
    assert data["status"] == "completed" and data["has_nsfw_contents"] == [False]
    assert MAGIC["png"](await fetch(http, data["outputs"][0]))
    emu.fail_next_tasks(1200, "flagged")
    failed = await submit(http, emu, image, enable_sync_mode=True)
    assert (failed["status"], failed["code"], failed["error"]) == ("failed", 1200, "flagged")
    bad = await post_submit(http, emu, {"prompt": "p", "image": image, "enable_sync_mode": "yes"})
    assert bad.status == 400
    assert emu.stats.sync_submits == 2 and emu.stats.sync_timeouts == 0


@pytest.mark.asyncio
async def test_sync_mode_timeout_answers_processing_5004_and_the_task_goes_on(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """After sync_timeout a sync submit answers 200 "processing" with code 5004."""
    emu.config.sync_timeout = 0.05
    emu.config.latency = (1.0, 1.0)
    started = time.monotonic()
    data = await submit(http, emu, "http://127.0.0.1:1/x.png", enable_sync_mode=True)
    assert 0.05 <= time.monotonic() - started < 0.9
    assert (data["status"], data["code"]) == ("processing", 5004)
    assert "Sync mode timed out" in data["error"]
    assert (await poll(http, emu, data["id"]))["status"] == "processing"
    assert emu.stats.sync_timeouts == 1


@pytest.mark.asyncio
async def test_price_shapes_and_per_model_prices(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """model/price answers the current shape; legacy moves to model/pricing with unit_price."""
    seedream = "bytedance/seedream-v4/edit"
    emu.config.model_prices[MODEL] = 0.05
    status, envelope = await api_json(http, emu, "/api/v3/model/price", {"model_id": seedream})
    assert status == 200
    assert envelope["data"] == {"price": 0.027, "discounted_price": 0.027, "currency": "USD"}
    _, envelope = await api_json(http, emu, "/api/v3/model/price", {"model_id": MODEL})
    assert envelope["data"]["price"] == 0.05
    status, _ = await api_json(http, emu, "/api/v3/model/pricing", {"model_id": MODEL})
    assert status == 404
    emu.config.price_shape = "legacy"
    status, envelope = await api_json(http, emu, "/api/v3/model/pricing", {"model_id": MODEL})
    assert envelope["data"] == {"model_id": MODEL, "unit_price": 0.05, "currency": "USD"}
    status, _ = await api_json(http, emu, "/api/v3/model/price", {"model_id": MODEL})
    assert status == 404
    await submit_to(http, emu, seedream)
    assert emu.config.balance == pytest.approx(100.0 - 0.027)


async def submit_to(http: aiohttp.ClientSession, emu: Emulator, model: str) -> str:
    """Submit a minimal valid body to ``model``; answers the prediction id."""
    url = "http://127.0.0.1:1/x.png"
    takes_list = model in MODELS and "images" in MODELS[model].request_schema["properties"]
    body = {"prompt": "p", **({"images": [url]} if takes_list else {"image": url})}
    async with http.post(f"{emu.base_url}/api/v3/{model}", json=body, headers=AUTH) as resp:
        assert resp.status == 200
        pid: str = (await resp.json())["data"]["id"]
    return pid


@pytest.mark.asyncio
async def test_enforced_balance_refuses_what_it_cannot_cover(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """With enforce_balance a submit the balance cannot cover is 402 and creates nothing."""
    emu.config.enforce_balance = True
    emu.config.balance = 0.05
    await submit_to(http, emu, MODEL)
    emu.fail_next_tasks(1401, "invalid parameter")
    await submit_to(http, emu, MODEL)
    emu.config.refund_delay = 60.0
    refused = await post_submit(http, emu, {"prompt": "p", "image": "http://127.0.0.1:1/x.png"})
    assert refused.status == 402
    assert len(emu.predictions) == 2 and emu.stats.submits_rejected == 1
    _, envelope = await api_json(http, emu, "/api/v3/balance")
    assert envelope["data"]["balance"] == pytest.approx(0.002)
    # Once the failed task's refund is due, its charge covers the next submit.
    emu.config.refund_delay = 0.0
    await submit_to(http, emu, MODEL)
    assert emu.config.balance == pytest.approx(0.002)


@pytest.mark.asyncio
async def test_failed_tasks_are_refunded_after_refund_delay_and_billings_show_it(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """billings/search lists each charge; failed ones, polled or not, refund after the delay."""
    emu.config.refund_delay = 0.2
    image = await upload(http, emu, make_png())
    ok = (await run_task(http, emu, image))["id"]
    emu.fail_next_tasks(1200, "flagged")
    flagged = (await run_task(http, emu, image))["id"]
    unfetchable = await submit_to(http, emu, MODEL)  # fails 1402, never polled
    query: dict[str, Any] = {"prediction_uuids": [ok, flagged, unfetchable], "page_size": 10}
    _, envelope = await api_json(http, emu, "/api/v3/billings/search", query)
    items = envelope["data"]["items"]
    assert [i["prediction_id"] for i in items] == [unfetchable, flagged, ok]
    assert [(i["amount"], i["refunded"]) for i in items] == [(0.024, False)] * 3
    _, envelope = await api_json(http, emu, "/api/v3/balance")
    assert envelope["data"]["balance"] == pytest.approx(100.0 - 3 * 0.024)
    await asyncio.sleep(max(0.0, emu.predictions[unfetchable].finish_mono + 0.2 - time.monotonic()))
    _, envelope = await api_json(http, emu, "/api/v3/balance")
    assert envelope["data"]["balance"] == pytest.approx(100.0 - 0.024)
    _, envelope = await api_json(http, emu, "/api/v3/billings/search", query)
    by_id = {i["prediction_id"]: i for i in envelope["data"]["items"]}
    assert (by_id[ok]["status"], by_id[ok]["refunded"]) == ("completed", False)
    assert (by_id[flagged]["status"], by_id[flagged]["refunded"]) == ("failed", True)
    assert (by_id[unfetchable]["status"], by_id[unfetchable]["refunded"]) == ("failed", True)
    assert set(emu.stats.refunded_ids) == {flagged, unfetchable}
    _, envelope = await api_json(http, emu, "/api/v3/billings/search", {"prediction_uuids": [ok]})
    assert envelope["data"]["total"] == 1
    later = {"created_after": time.time() + 60}
    _, envelope = await api_json(http, emu, "/api/v3/billings/search", later)
    assert envelope["data"]["items"] == []


@pytest.mark.asyncio
async def test_models_catalogue_serves_prices_and_request_schemas(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """GET /models lists base_price and api_schema.api_schemas[0].request_schema per model."""
    status, envelope = await api_json(http, emu, "/api/v3/models")
    assert status == 200
    models = {m["model_id"]: m for m in envelope["data"]}
    hidream = models[MODEL]
    assert hidream["base_price"] == 0.024
    schema = hidream["api_schema"]["api_schemas"][0]["request_schema"]
    assert schema["required"] == ["prompt", "image"]
    assert {
        "prompt",
        "image",
        "seed",
        "output_format",
        "enable_base64_output",
        "enable_sync_mode",
    } <= set(schema["properties"])
    assert schema["properties"]["output_format"]["enum"] == ["jpeg", "png", "webp"]
    seedream = models["bytedance/seedream-v4/edit"]
    assert seedream["base_price"] == 0.027
    images = seedream["api_schema"]["api_schemas"][0]["request_schema"]["properties"]["images"]
    assert (images["type"], images["minItems"], images["maxItems"]) == ("array", 1, 10)
    status, _ = await api_json(http, emu, "/api/v3/models", {})
    assert status == 405 and emu.predictions == {}


@pytest.mark.asyncio
async def test_nsfw_flags_every_nth_output_or_a_marked_prompt(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """nsfw_every flags every Nth completed output; "[nsfw]" in a prompt flags all its outputs."""
    emu.config.nsfw_every = 2
    image = await upload(http, emu, make_png())
    flags = [(await run_task(http, emu, image))["has_nsfw_contents"] for _ in range(4)]
    assert flags == [[False], [True], [False], [True]]
    emu.config.nsfw_every = 0
    marked = await run_task(http, emu, image, prompt="[NSFW] a red hat")
    assert marked["has_nsfw_contents"] == [True] and len(marked["outputs"]) == 1
    assert emu.stats.nsfw_outputs == 3


@pytest.mark.asyncio
async def test_forty_concurrent_300kb_uploads_through_both_flows(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Upload bodies are read whole: 40 concurrent ~300 KB uploads per flow all round-trip."""
    blobs = [os.urandom(300_000 + i) for i in range(40)]

    async def binary(data: bytes, i: int) -> str:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=f"{i}.png", content_type="image/png")
        async with http.post(
            f"{emu.base_url}/api/v3/media/upload/binary", data=form, headers=AUTH
        ) as resp:
            assert resp.status == 200, await resp.text()
            url: str = (await resp.json())["data"]["download_url"]
        return url

    ticketed = await asyncio.gather(*(upload(http, emu, data) for data in blobs))
    multipart = await asyncio.gather(*(binary(data, i) for i, data in enumerate(blobs)))
    for urls in (ticketed, multipart):
        fetched = await asyncio.gather(*(fetch(http, url) for url in urls))
        assert fetched == blobs
    assert emu.stats.uploads == 80


def test_cli_flags_reach_the_config() -> None:
    """The new CLI flags (Retry-After, fixed windows, listing inputs) configure the server."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "WAVESPEED_API_KEY": "cli-key"}
    args = ["--port", "0", "--send-retry-after", "--retry-after", "7", "--rate-limit", "1"]
    args += ["--rate-window", "600", "--listing-inputs", "--latency-lognormal", "0.01,0.1"]
    args += ["--visibility-delay", "0", "--sync-timeout", "5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch.emulator", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().split()[4]
        auth = {"Authorization": "Bearer cli-key", "Content-Type": "application/json"}
        body = json.dumps({"prompt": "p", "image": "http://127.0.0.1:1/x.png"}).encode()
        submit_url = f"{base}/api/v3/{MODEL}"
        with urllib.request.urlopen(
            urllib.request.Request(submit_url, data=body, headers=auth), timeout=5
        ) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(submit_url, data=body, headers=auth))
        assert info.value.code == 429 and 1 <= int(info.value.headers["Retry-After"]) <= 600
        info.value.close()
        listing = urllib.request.Request(f"{base}/api/v3/predictions", data=b"{}", headers=auth)
        with urllib.request.urlopen(listing, timeout=5) as resp:
            [item] = json.load(resp)["data"]["items"]
        assert item["input"]["prompt"] == "p"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.asyncio
async def test_submits_are_checked_against_the_models_schema(emu, http):
    """Unknown fields, missing required fields, bad values and unknown models are
    refused (400/404) without creating or billing anything."""
    url = "http://127.0.0.1:1/x.png"
    bad = [
        ("wavespeed-ai/hidream-e1-full", {"prompt": "p", "image": url, "strength": 1}, 400),
        ("wavespeed-ai/hidream-e1-full", {"prompt": "p"}, 400),
        ("wavespeed-ai/hidream-e1-full", {"prompt": "p", "image": url, "seed": -5}, 400),
        ("bytedance/seedream-v4/edit", {"prompt": "p", "image": url}, 400),
        ("bytedance/seedream-v4/edit", {"prompt": "p", "images": [url] * 11}, 400),
        ("nobody/no-such-model", {"prompt": "p", "image": url}, 404),
    ]
    for model, body, status in bad:
        async with http.post(f"{emu.base_url}/api/v3/{model}", json=body, headers=AUTH) as resp:
            assert resp.status == status, (model, body, await resp.text())
    assert emu.stats.submits_accepted == 0
    await submit_to(http, emu, "bytedance/seedream-v4/edit")
    assert emu.stats.submits_accepted == 1
