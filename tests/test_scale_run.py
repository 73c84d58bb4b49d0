"""The mechanisms that let one process keep 10,000 tasks in flight: a capped connection
pool, the fd limit fitted to it, the loop-lag probe, the budget lock's signature."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from pathlib import Path

import aiohttp
import pytest

from batch.cli import _fit_open_file_limit
from batch.events import Submitting
from batch.lag import LAG_PROBE_ENV, lag_probe_from_env
from batch.ledger import LedgerWriter, OtherLedgers
from batch.spend import SpendGuard
from batch.state import LedgerState
from batch.stop import Stopped, StopSignal
from batch.transport import MAX_CONNECTIONS, connection_pool, transport_error


def test_run_with_more_tasks_than_connections_completes(
    run, images, write_manifest, emulator, monkeypatch
):
    """Workers beyond the connection cap wait for a connection; every row still finishes once."""
    monkeypatch.setattr("batch.transport.MAX_CONNECTIONS", 2)
    assert connection_pool(50) == 2
    rows = [{"id": f"r{n}", "image": str(images[n % 4]), "prompt": "p"} for n in range(12)]
    result = run(write_manifest(rows), "--concurrency", "12")
    assert result.code == 0, result.err
    assert result.summary["completed"] == 12 and emulator.stats.submits_accepted == 12


def test_open_file_limit_fits_the_pool_not_the_concurrency():
    """10,000 workers need descriptors for the capped pool only, so none is clamped away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < MAX_CONNECTIONS + 100:
        pytest.skip("hard open-files limit below the pool")  # pragma: no cover
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert _fit_open_file_limit(10_000) == 10_000
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= connection_pool(10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_connection_in_time_means_nothing_was_sent():
    """A full pool's wait running out is retried as a refusal, never a possible duplicate."""
    error = transport_error(aiohttp.ConnectionTimeoutError("pool"), "submit")
    assert error.retryable and not error.outcome_unknown


def test_lag_probe_reports_a_blocked_loop(tmp_path, monkeypatch):
    """WSBATCH_LAG_PROBE writes the loop's lag, and a 150 ms block shows in its max."""
    target = tmp_path / "lag.json"
    monkeypatch.setenv(LAG_PROBE_ENV, str(target))

    async def main() -> None:
        async with lag_probe_from_env() as probe:
            assert probe is not None
            await asyncio.sleep(0.12)
            time.sleep(0.15)  # noqa: ASYNC251 - the block the probe must see
            await asyncio.sleep(0.06)

    asyncio.run(main())
    figures = json.loads(target.read_text())
    assert figures["samples"] >= 2 and figures["max_s"] >= 0.1 > figures["p50_s"]


def _intent(row: str) -> Submitting:
    return Submitting(row=row, seed=1, intent=row, price=1.0)


def test_budget_guard_finds_a_shard_that_started_after_it(tmp_path: Path):
    """A shard's ledger created after the first submit is still counted against --budget."""

    async def main() -> None:
        guards = []
        for name in ("ledger.jsonl", "ledger.shard-1-of-2.jsonl"):
            state = LedgerState()
            writer = LedgerWriter(tmp_path / name, state)
            await writer.start()
            others = OtherLedgers(writer.path)
            guards.append(SpendGuard(writer, state, StopSignal(), budget=2.0, others=others))
        first, second = guards
        await first.reserve(_intent("a"))  # lists the folder: no other ledger yet
        await second.reserve(_intent("b"))  # a shard that started since
        with pytest.raises(Stopped):
            await first.reserve(_intent("c"))  # $1 + $1 already committed in the folder
        for guard in guards:
            await guard.writer.close()
            guard.close()

    asyncio.run(main())


def test_rows_starting_together_read_their_input_once(
    run, images, write_manifest, emulator, monkeypatch
):
    """Workers that start on one file together share one read and hash of it, and one upload."""
    import batch.uploads

    reads: list[Path] = []
    real = batch.uploads.read_bytes

    async def counted(path: Path) -> bytes:
        reads.append(path)
        return await real(path)

    monkeypatch.setattr(batch.uploads, "read_bytes", counted)
    rows = [{"id": f"r{n}", "image": str(images[0]), "prompt": f"p{n}"} for n in range(10)]
    result = run(write_manifest(rows), "--concurrency", "10")
    assert result.code == 0, result.err
    assert len(reads) == 1 and emulator.stats.uploads == 1


def test_a_large_pool_starts_in_batches_with_collection_held_off(
    images, write_manifest, emulator, monkeypatch, tmp_path
):
    """Workers past the threshold are made a batch at a time, set aside from collection,
    and the collector is on again for the run."""
    import gc

    from batch import run_manifest

    monkeypatch.setattr("batch.runner.SPAWN_BATCH", 3)
    monkeypatch.setattr("batch.runner.GC_QUIET_ABOVE", 4)
    frozen = gc.get_freeze_count()
    rows = [{"id": f"r{n}", "image": str(images[n % 4]), "prompt": "p"} for n in range(10)]
    try:
        summary = run_manifest(
            write_manifest(rows), out_dir=tmp_path / "out", base_url=emulator.base_url,
            concurrency=10,
        )  # fmt: skip
        assert summary.completed == 10 and gc.isenabled()
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


def test_progress_lines_are_throttled():
    """Thousands of progress reports in a second print one line, not one each."""
    import io

    from batch.cli import _ProgressView
    from batch.runner import Progress

    stream = io.StringIO()
    view = _ProgressView(enabled=True, stream=stream)
    for n in range(5000):
        view(Progress(total=10_000, completed=n, in_flight=100))
    assert len(stream.getvalue().splitlines()) == 1


def test_ledger_writers_of_one_batch_wake_a_share_at_a_time(tmp_path: Path):
    """A thousand lines written together: their writers go on over several loop turns."""
    from batch.events import Failed
    from batch.ledger import WAKE_BATCH

    async def main() -> list[int]:
        writer = LedgerWriter(tmp_path / "ledger.jsonl", LedgerState())
        await writer.start()
        turns = 0

        async def ticker() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        tick = asyncio.create_task(ticker())
        resumed: list[int] = []

        async def write(n: int) -> None:
            await writer.write(Failed(row=f"r{n}", error="x", retryable=True))
            resumed.append(turns)

        await asyncio.gather(*(write(n) for n in range(4 * WAKE_BATCH)))
        tick.cancel()
        await writer.close()
        return resumed

    resumed = asyncio.run(main())
    assert len(resumed) == 4 * WAKE_BATCH and len(set(resumed)) >= 4
