"""The request gate: fewer requests open at once while the event loop runs late."""

from __future__ import annotations

import asyncio
import time

from batch.client import Client
from batch.gate import LATE, ON_TIME, RequestGate
from tests.conftest import API_KEY


def test_a_late_loop_halves_the_gate_down_to_its_least() -> None:
    """Each late wake-up halves the limit; it never goes below ``least``."""
    gate = RequestGate(512, least=32)
    limits = []
    for _ in range(6):
        gate.adjust(LATE * 2)
        limits.append(gate.limit)
    assert limits == [256, 128, 64, 32, 32, 32]
    assert gate.narrowed == 4


def test_the_gate_widens_an_eighth_at_a_time_and_wakes_waiters() -> None:
    """A punctual loop widens the gate an eighth at a time up to the pool's size, and the
    room it adds wakes that many waiting requests."""

    async def scenario() -> tuple[int, int, int, int]:
        gate = RequestGate(40, least=8)
        gate.limit = 8
        gate.adjust((LATE + ON_TIME) / 2)  # neither late nor punctual: left as it is
        idle = gate.limit
        holders = [asyncio.create_task(gate.acquire()) for _ in range(60)]
        await asyncio.sleep(0)
        admitted = gate.held
        gate.adjust(ON_TIME / 2)  # 8 + 8 // 8
        await asyncio.sleep(0)
        widened = gate.held
        for _ in range(40):
            gate.adjust(ON_TIME / 2)
        await asyncio.sleep(0)
        most = gate.held
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        return idle, admitted, widened, most

    idle, admitted, widened, most = asyncio.run(scenario())
    assert (idle, admitted, widened, most) == (8, 8, 9, 40)


def test_a_quiet_gate_stops_looking_and_keeps_what_it_learnt() -> None:
    """Narrowed, then quiet (fewer than ``least`` open): the ticker stops, so an idle
    stretch after a burst costs no wake-ups, and the next burst meets the narrowed gate."""

    async def scenario() -> tuple[int, bool]:
        gate = RequestGate(64, least=8)
        for _ in range(8):  # ``least`` open: busy enough to look
            await gate.__aenter__()
        assert gate._watch.running
        gate.adjust(LATE * 2)
        for _ in range(gate.held):
            await gate.__aexit__()
        gate.adjust(0.0)
        await asyncio.sleep(0)
        limit, running = gate.limit, gate._watch.running
        await gate.close()
        return limit, running

    assert asyncio.run(scenario()) == (32, False)


async def test_a_blocked_loop_narrows_the_gate_and_every_request_is_answered(
    emulator,
) -> None:
    """Requests made while something holds the loop in turns still all get answers, and
    the gate narrows instead of letting every one of them be open at once."""
    async with Client(emulator.base_url, API_KEY, connections=128) as client:
        gate = client.transport.gate
        busy = True

        async def hog() -> None:
            while busy:
                time.sleep(3 * LATE)  # noqa: ASYNC251 - holds the loop, on purpose
                await asyncio.sleep(0.01)

        hogging = asyncio.create_task(hog())
        try:
            answers = await asyncio.gather(*(client.balance() for _ in range(600)))
        finally:
            busy = False
            await hogging
        assert all(a is not None for a in answers)
        assert gate.narrowed >= 1
        assert gate.limit < 128
        assert gate.held == 0 and gate.waiting == 0


async def test_a_few_requests_at_a_time_run_no_ticker(emulator) -> None:
    """Below ``least`` open requests the gate cannot narrow, so nothing wakes the loop
    twenty times a second for it (a slow, rate-limited run pays for every wake-up)."""
    async with Client(emulator.base_url, API_KEY, connections=128) as client:
        gate = client.transport.gate
        for _ in range(3):
            await asyncio.gather(*(client.balance() for _ in range(gate.least - 1)))
        assert not gate._watch.running
