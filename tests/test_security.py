"""The key never leaves home; outputs never escape OUT_DIR; limits hold."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web

from batch.client import Client, check_base_url
from batch.errors import ApiError, OutputError, UsageError
from batch.manifest import load_manifest
from batch.runner import Runner, RunOptions
from tests.conftest import API_KEY, run_subprocess, simple_rows


def test_key_appears_nowhere_but_api_requests(emulator, images, write_manifest, tmp_path):
    """Across a faulty run the key is in no stream, ledger, output, or non-API request."""
    cfg = emulator.config
    cfg.p_429, cfg.p_5xx, cfg.p_drop, cfg.p_fail_task = 0.1, 0.1, 0.05, 0.1
    cfg.retry_after = 0
    cfg.send_retry_after = True
    emulator.fail_next_tasks(1401, f"invalid parameter: {API_KEY}")
    path = write_manifest(simple_rows(images, 30))
    out = tmp_path / "out"
    result = run_subprocess("run", path, "--base-url", emulator.base_url, "--out", out, "--json")
    assert result.returncode in (0, 1), result.stderr
    assert API_KEY not in result.stdout + result.stderr
    for file in out.iterdir():
        assert API_KEY.encode() not in file.read_bytes(), file.name
    for request in emulator.requests:
        carries = any(API_KEY in value for value in request.headers.values())
        assert carries == (request.origin == "api"), request
        assert API_KEY not in request.path + request.query
    assert emulator.stats.key_leaks == 0


def test_key_from_file_is_used(emulator, images, write_manifest, tmp_path):
    """--api-key-file supplies the key when the environment has none."""
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    path = write_manifest(simple_rows(images, 1))
    result = run_subprocess(
        "run",
        path,
        "--base-url",
        emulator.base_url,
        "--out",
        tmp_path / "out",
        "--api-key-file",
        key_file,
        WAVESPEED_API_KEY="",
    )
    assert result.returncode == 0, result.stderr


def test_missing_key_is_a_usage_error(images, write_manifest, tmp_path, emulator):
    """Without a key, `run` exits 2 with advice and sends nothing."""
    path = write_manifest(simple_rows(images, 1))
    result = run_subprocess(
        "run", path, "--base-url", emulator.base_url, "--out", tmp_path / "o", WAVESPEED_API_KEY=""
    )
    assert result.returncode == 2 and "WAVESPEED_API_KEY" in result.stderr
    assert emulator.requests == []


@pytest.mark.parametrize(
    "url",
    ["http://example.com", "http://10.0.0.5:8080", "ftp://127.0.0.1", "http://user:pw@127.0.0.1"],
)
def test_unsafe_base_urls_are_refused(url):
    """Plain http is for loopback only; other schemes and embedded credentials are refused."""
    with pytest.raises(UsageError):
        check_base_url(url)


def test_loopback_and_https_base_urls_are_accepted():
    """https anywhere and http on loopback (the emulator) are fine."""
    assert check_base_url("https://api.wavespeed.ai/") == "https://api.wavespeed.ai"
    assert check_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert check_base_url("http://[::1]:8000") == "http://[::1]:8000"
    assert check_base_url("http://localhost:1") == "http://localhost:1"


def test_http_base_url_off_loopback_exits_2_before_connecting(images, write_manifest, tmp_path):
    """`run --base-url http://remote` exits 2 and creates no ledger."""
    path = write_manifest(simple_rows(images, 1))
    out = tmp_path / "out"
    result = run_subprocess("run", path, "--base-url", "http://api.example.com", "--out", out)
    assert result.returncode == 2 and "loopback" in result.stderr
    assert not (out / "ledger.jsonl").exists()


def test_symlink_in_out_dir_is_replaced_not_followed(emulator, images, write_manifest, tmp_path):
    """An output name that is a symlink is replaced by the file; its target is untouched."""
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, out / "row-0000.jpg")
    path = write_manifest(simple_rows(images, 1))
    result = run_subprocess("run", path, "--base-url", emulator.base_url, "--out", out)
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "keep me"
    assert not (out / "row-0000.jpg").is_symlink()


async def _redirecting_server(target: str) -> web.AppRunner:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound(target)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def test_api_redirect_to_another_origin_is_not_followed(emulator):
    """A redirect from the API is refused, so the key never follows it to another origin."""

    async def go() -> None:
        server = await _redirecting_server(emulator.cdn_url + "/steal")
        port = server.addresses[0][1]
        try:
            async with Client(f"http://127.0.0.1:{port}", API_KEY) as client:
                with pytest.raises(ApiError, match="redirect"):
                    await client.submit("m/x", {"prompt": "p", "image": "http://x/y.png"})
        finally:
            await server.cleanup()

    asyncio.run(go())
    assert not any(r.path == "/steal" for r in emulator.requests)


def test_download_size_cap_is_enforced(emulator, images, write_manifest, tmp_path):
    """An output larger than the download cap fails the row instead of filling memory."""

    async def go() -> None:
        async with Client(emulator.base_url, API_KEY, max_download_bytes=64) as client:
            manifest = load_manifest(write_manifest(simple_rows(images, 1)))
            runner = Runner(
                manifest, client, RunOptions(out_dir=tmp_path / "out", handle_signals=False)
            )
            summary = await runner.run()
            assert summary.failed == 1
            assert any("limit" in cause for cause in summary.failures)

    asyncio.run(go())


def test_download_cap_applies_to_base64_outputs(emulator):
    """Inline base64 outputs obey the same size cap as downloads."""

    async def go() -> None:
        async with Client(emulator.base_url, API_KEY, max_download_bytes=16) as client:
            with pytest.raises(OutputError):
                await client.fetch_output("A" * 400, "png")

    asyncio.run(go())


def test_unwritable_names_are_refused():
    """Output names that could escape OUT_DIR are refused at the lowest level too."""
    from batch.outputs import write_atomic

    for name in ("../x.png", ".hidden.png", "a/b.png", ""):
        with pytest.raises(ValueError):
            asyncio.run(write_atomic(Path("/tmp"), name, b"x"))


def test_output_redirect_loop_ends_and_carries_no_key():
    """An output URL that redirects to itself fails the download after a few hops, keyless."""
    seen: list[str] = []

    async def go() -> None:
        async def handler(request: web.Request) -> web.Response:
            seen.append(request.headers.get("Authorization", ""))
            raise web.HTTPFound("/loop.png")

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        try:
            async with Client("http://127.0.0.1:9", API_KEY) as client:
                with pytest.raises(OutputError, match="redirects"):
                    await client.fetch_output(f"http://127.0.0.1:{port}/loop.png", "png")
        finally:
            await runner.cleanup()

    asyncio.run(go())
    assert 1 < len(seen) <= 6 and not any(seen)
