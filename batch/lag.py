"""The event loop's lag, measured on request: ``WSBATCH_LAG_PROBE=FILE`` makes a run
write how late a ticker woke (p50, p99, max, in seconds) to FILE as JSON at its end.

A coroutine that holds the loop delays every poll and every ledger line behind it;
this is how the benchmark sees that at 10,000 tasks in flight. Off by default: it
costs a wake-up every ``STEP`` seconds. The request gate (``batch.gate``) runs the same
ticker, keeping no samples, while a run is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

LAG_PROBE_ENV = "WSBATCH_LAG_PROBE"
STEP = 0.05


class LagProbe:
    """A ticker sleeping ``step`` seconds at a time; each wake-up's lateness is a sample,
    kept for ``figures`` (``keep``) and handed to ``on_sample`` (the request gate's)."""

    def __init__(
        self,
        step: float = STEP,
        *,
        on_sample: Callable[[float], None] | None = None,
        keep: bool = True,
    ) -> None:
        self.step = step
        self.samples: list[float] = []
        self.at: list[float] = []  # when each sample was taken, seconds from the start
        self._on_sample = on_sample
        self._keep = keep
        self._task: asyncio.Task[None] | None = None
        self._halted: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="lag-probe")

    def halt(self) -> None:
        """Stop ticking without waiting for it (its own ``on_sample`` may call this)."""
        if self._task is not None:
            self._task.cancel()
            self._halted = self._task  # referenced until it ends
            self._task = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            before = loop.time()
            await asyncio.sleep(self.step)
            late = max(loop.time() - before - self.step, 0.0)
            if self._keep:
                self.samples.append(late)
                self.at.append(before - start)
            if self._on_sample is not None:
                self._on_sample(late)

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"samples": 0, "step_s": self.step}

        def at(q: float) -> float:
            return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 4)

        return {
            "samples": len(ordered),
            "step_s": self.step,
            "p50_s": at(0.5),
            "p99_s": at(0.99),
            "max_s": round(ordered[-1], 4),
            "mean_s": round(sum(ordered) / len(ordered), 4),
            # The ten worst wake-ups, (seconds into the run, lag): where the lag comes from.
            "worst": sorted(
                (round(t, 2), round(lag, 4))
                for lag, t in sorted(zip(self.samples, self.at, strict=True))[-10:]
            ),
        }


@contextlib.asynccontextmanager
async def lag_probe_from_env() -> AsyncIterator[LagProbe | None]:
    """A running probe when ``WSBATCH_LAG_PROBE`` names a file, its figures written there
    when the block ends; else nothing."""
    target = os.environ.get(LAG_PROBE_ENV, "").strip()
    if not target:
        yield None
        return
    probe = LagProbe()
    probe.start()
    try:
        yield probe
    finally:
        await probe.stop()
        text = json.dumps(probe.figures(), sort_keys=True) + "\n"
        await asyncio.to_thread(Path(target).write_text, text)
