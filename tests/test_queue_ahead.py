"""Tasks kept queued on the server beyond --concurrency (batch/slots.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from batch.emulator import Emulator
from batch.polling import PollSchedule
from batch.slots import Slots, default_ahead
from tests.conftest import simple_rows


def peak_outstanding(emulator: Emulator) -> tuple[int, int]:
    """(most tasks the client held at once, most of them queued at once), server side.

    A task is held from its creation until the poll that saw it finished, which is
    before the client lets its permit go."""
    events: list[tuple[float, int, int]] = []
    for pred in emulator.predictions.values():
        seen = pred.first_completed_poll_mono
        assert seen is not None, "every task is polled to its end"
        events += [(pred.created_mono, 1, 0), (seen, -1, 0)]
        if pred.start_mono > pred.created_mono:
            events += [(pred.created_mono, 0, 1), (pred.start_mono, 0, -1)]
    events.sort(key=lambda e: (e[0], min(e[1], e[2])))
    held = queued = most_held = most_queued = 0
    for _, dh, dq in events:
        held, queued = held + dh, queued + dq
        most_held, most_queued = max(most_held, held), max(most_queued, queued)
    return most_held, most_queued


def notes(path: Any, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("what") == name]


def test_a_server_that_queues_is_kept_a_few_tasks_ahead(
    run, images, write_manifest, emulator, tmp_path
):
    """Once the server shows it queues, the run keeps --queue-ahead more tasks there, no more."""
    emulator.config.max_concurrent = 2
    emulator.config.latency = (0.3, 0.5)
    log = tmp_path / "log.jsonl"
    rows = write_manifest(simple_rows(images, 16))
    result = run(rows, "--concurrency", "2", "--queue-ahead", "3", "--log-file", log)
    assert result.code == 0, result.err
    assert emulator.stats.submits_accepted == 16 and result.summary["completed"] == 16
    held, queued = peak_outstanding(emulator)
    assert held == 5 and queued == 3
    assert len(notes(log, "server queues")) == 1


def test_queue_ahead_zero_never_exceeds_concurrency(run, images, write_manifest, emulator):
    """--queue-ahead 0: never more tasks on the server than --concurrency."""
    emulator.config.max_concurrent = 2
    emulator.config.latency = (0.2, 0.3)
    result = run(
        write_manifest(simple_rows(images, 10)), "--concurrency", "2", "--queue-ahead", "0"
    )
    assert result.code == 0, result.err
    held, queued = peak_outstanding(emulator)
    assert held == 2 and queued == 0


def test_a_server_with_room_gets_one_task_more_at_most(
    run, images, write_manifest, emulator, tmp_path
):
    """Where nothing queues, the run goes past --concurrency by its one probe, never more."""
    emulator.config.latency = (0.2, 0.4)
    log = tmp_path / "log.jsonl"
    result = run(write_manifest(simple_rows(images, 16)), "--concurrency", "4", "--log-file", log)
    assert result.code == 0, result.err
    held, queued = peak_outstanding(emulator)
    assert held <= 5 and queued == 0
    assert notes(log, "server queues") == []


def test_default_ahead_is_a_fifth_of_concurrency_and_at_least_one() -> None:
    """The automatic depth: one task for small pools, a quarter of large ones, capped."""
    assert [default_ahead(n) for n in (1, 2, 5, 10, 20, 1000, 5000)] == [1, 1, 2, 3, 5, 200, 200]


def test_slots_grow_only_while_the_probe_is_out() -> None:
    """A queued sighting with no task beyond --concurrency out says nothing of the cap."""

    async def scenario() -> tuple[bool, bool, int]:
        slots = Slots(4, ahead=2)
        for _ in range(4):
            await slots.acquire()
        early = slots.saw_queued()  # 4 out: the user's own limit, not the server's
        await slots.acquire()  # the probe
        late = slots.saw_queued()
        return early, late, slots.capacity

    early, late, capacity = asyncio.run(scenario())
    assert (early, late, capacity) == (False, True, 6)


def test_a_cancelled_waiter_passes_its_wake_up_on() -> None:
    """A permit released to a waiter that was cancelled meanwhile reaches the next one."""

    async def scenario() -> int:
        slots = Slots(1, ahead=0)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1.0)
        return slots.held

    assert asyncio.run(scenario()) == 1


@pytest.mark.parametrize("seed", [1, 2])
def test_a_lower_lag_weight_polls_later_and_less(seed: int) -> None:
    """Once lag costs little (the server holds queued work), the grid starts no earlier."""
    import random

    rng = random.Random(seed)
    starts = []
    for weight in (6.0, 2.0):
        schedule = PollSchedule(floor=1.0)
        for _ in range(200):
            schedule.observe(rng.lognormvariate(1.79, 0.3))
        schedule.set_lag_weight(weight)
        grid = schedule.grid(now=1000.0)
        assert grid is not None
        starts.append(grid[0])
    assert starts[1] > starts[0]
