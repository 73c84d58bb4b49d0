"""A deterministic simulation of the submit pacer against a fixed-window limit.

The real ``SubmitLimiter.acquire`` runs on an asyncio loop whose clock is virtual: the loop
never sleeps, it jumps to the next timer. The server accepts ``quota`` submits per window of
``window`` seconds, windows turning at multiples of ``window``; refusals are 429s without
Retry-After and count for nothing, as documented. ``workers`` loop acquire -> send -> outcome.

``python -m tests.pacing_sim`` prints the grid.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import selectors
import sys
from dataclasses import dataclass
from typing import Any

from batch.limits import SubmitLimiter

LATENCY = 0.1  # mean submit round trip, s (jittered +-50 %)
WINDOWS = 10  # run length, in windows


class _JumpingSelector(selectors.SelectSelector):
    """Instead of waiting ``timeout``, moves the clock on by it."""

    def __init__(self, now: float) -> None:
        super().__init__()
        self.now = now

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("simulation deadlocked: nothing scheduled")
        self.now += max(timeout, 0.0)
        return super().select(0)


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, now: float) -> None:
        self._jumping = _JumpingSelector(now)
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


@dataclass
class Result:
    accepted: int
    refused: int
    ideal: float  # what an omniscient client would get accepted in the same time
    pacer: SubmitLimiter
    took: float = 0.0  # from the start to the last accepted submit's answer

    @property
    def share_429(self) -> float:
        return self.refused / max(self.accepted + self.refused, 1)

    @property
    def throughput(self) -> float:
        return self.accepted / self.ideal


def simulate(
    quota: int,
    window: float,
    workers: int,
    phase: float = 0.0,
    windows: float = WINDOWS,
    latency: float = LATENCY,
    busy: float = 0.0,
    seed: int = 1,
    skip: float = 0.0,
    rows: int | None = None,
) -> Result:
    """Run for ``windows`` windows from ``phase`` (a share of a window) past a turn,
    counting the submits sent after the first ``skip`` windows. ``busy`` is how long a
    worker is away after an accepted submit (the task itself)."""
    rng = random.Random(seed)
    start = 1000 * window + phase * window
    end = start + windows * window
    loop = VirtualLoop(start)
    pacer = SubmitLimiter(clock=loop.time)
    used: dict[int, int] = {}
    counts = [0, 0]
    done = asyncio.Event()
    last = [start]

    async def worker() -> None:
        while True:
            slot = await pacer.acquire()
            trip = latency * rng.uniform(0.5, 1.5)
            arrive = rng.uniform(0.2, 0.8) * trip
            await asyncio.sleep(arrive)
            index = math.floor(loop.time() / window)
            ok = used.get(index, 0) < quota
            if ok:
                used[index] = used.get(index, 0) + 1
            await asyncio.sleep(trip - arrive)
            if start + skip * window <= slot.sent_at < end:
                counts[0 if ok else 1] += 1
            if ok:
                pacer.on_success(slot)
                last[0] = loop.time()
                if rows is not None and sum(used.values()) >= rows:
                    done.set()
                if busy:
                    await asyncio.sleep(busy)
            else:
                pacer.on_rate_limited(slot, None)

    async def main() -> None:
        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        if rows is None:
            await asyncio.sleep(end - start + 2 * latency)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), end - start)
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if not isinstance(outcome, asyncio.CancelledError):
                raise AssertionError(f"a worker failed: {outcome!r}")

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    # Workers bound the pace too: one submit per round trip (and task) each.
    counted = windows - skip
    capacity = workers * counted * window / (latency + busy)
    took = last[0] - start
    return Result(counts[0], counts[1], min(quota * counted, capacity), pacer, took)


GRID_WINDOWS = (5.0, 6.0, 60.0)
GRID_QUOTAS = (2, 10, 20, 100)
GRID_WORKERS = (1, 4, 20)
GRID_PHASES = (0.0, 0.5, 0.9)


def grid() -> list[tuple[float, int, int, float]]:
    return [
        (w, q, n, p)
        for w in GRID_WINDOWS
        for q in GRID_QUOTAS
        for n in GRID_WORKERS
        for p in GRID_PHASES
    ]


def main() -> None:
    rows = []
    print(f"{'W':>4} {'Q':>4} {'N':>3} {'ph':>4} {'acc':>5} {'429':>4} {'429%':>6} {'thru':>5}")
    for w, q, n, p in grid():
        r = simulate(q, w, n, p)
        rows.append(r)
        flag = "" if r.share_429 <= 0.10 and r.throughput >= 0.85 else "  <--"
        print(
            f"{w:4g} {q:4d} {n:3d} {p:4.1f} {r.accepted:5d} {r.refused:4d} "
            f"{100 * r.share_429:5.1f}% {r.throughput:5.2f}{flag}"
        )
    bad = sum(1 for r in rows if r.share_429 > 0.10 or r.throughput < 0.85)
    print(f"{bad} of {len(rows)} cells miss 429 <= 10 % or throughput >= 0.85", file=sys.stderr)


if __name__ == "__main__":
    main()
