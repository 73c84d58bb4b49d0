"""No wait exceeds what the user allowed: long Retry-After, trickling bodies, stuck reads."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest
from aiohttp import web

from batch.client import Client, Timeouts
from batch.errors import ApiError
from tests.conftest import API_KEY, ROOT, simple_rows


@pytest.mark.parametrize("retry_after", [86400, float("inf")], ids=["a-day", "inf"])
def test_a_retry_after_past_the_timeout_stops_submitting_at_once(
    run, images, write_manifest, emulator, retry_after
):
    """A 429 asking for a day (or forever) ends the run's submitting now, saying why."""
    emulator.config.send_retry_after = True
    emulator.config.retry_after = retry_after
    emulator.script("submit", "429")
    started = time.monotonic()
    rows = write_manifest(simple_rows(images, 4))
    result = run(rows, "--concurrency", "1", "--queue-ahead", "0", "--timeout", "30")
    assert time.monotonic() - started < 10
    assert result.code == 1
    assert "longer than --timeout 30" in result.summary["stop_reason"]
    assert emulator.stats.submits_accepted == 0


def test_a_retry_after_past_the_deadline_while_polling_ends_the_attempt(
    run, images, write_manifest, emulator
):
    """A poll told to wait a day ends that row's attempt at its deadline, id kept."""
    emulator.config.send_retry_after = True
    emulator.config.retry_after = 86400
    emulator.script("result", "429")
    started = time.monotonic()
    result = run(write_manifest(simple_rows(images, 1)), "--timeout", "2")
    assert time.monotonic() - started < 10
    assert result.summary["in_flight"] == 1  # the next run polls it


async def test_a_trickling_answer_cannot_outlast_the_request_limit(unused_tcp_port_factory):
    """A body sent a byte at a time still ends at connect + read limit, not never."""

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(100):
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    app = web.Application()
    app.router.add_get("/api/v3/predictions/{id}/result", trickle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = unused_tcp_port_factory()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        client = Client(
            f"http://127.0.0.1:{port}", API_KEY, timeouts=Timeouts(connect=0.3, poll=0.5)
        )
        async with client:
            started = time.monotonic()
            with pytest.raises(ApiError, match="no answer in time"):
                await client.result("p1")
            assert time.monotonic() - started < 2.0
    finally:
        await runner.cleanup()


def test_a_read_that_never_returns_does_not_hold_the_process(tmp_path):
    """An input that blocks its reader (a FIFO, a hung mount) cannot keep wsbatch alive."""
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from batch.files import read_bytes

        async def main():
            task = asyncio.create_task(read_bytes(Path({str(fifo)!r})))
            await asyncio.sleep(0.2)
            task.cancel()

        asyncio.run(main())
        """
    )
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=10, check=True)
    assert time.monotonic() - started < 5
