"""How many HTTP requests a run keeps open at once, fitted to how late its loop runs.

A run with thousands of tasks in flight on a busy CPU gets its answers in bursts: every
open request's answer arrives together and is handled in one pass of the event loop,
which then wakes every timer, poll and ledger write late (p99 150-400 ms at 10,000 in
flight and 512 connections, on 2 cores). Open requests are what the process can be
handed at once, so the gate lets fewer be open while the loop runs late (halving on a
late wake-up) and more again while it keeps time (an eighth more), between ``least``
and the connection pool's size. Across a real network the loop keeps time and the gate
stays wide open: it narrows only when the CPU, not the network, is what requests wait
for.

A request waits at the gate before anything is sent: a wait that a stop cuts short
sends nothing.
"""

from __future__ import annotations

from batch.lag import STEP, LagProbe
from batch.permits import Permits

LATE = 0.04  # a wake-up this late narrows the gate
ON_TIME = 0.01  # one this punctual lets it widen again, while requests wait
LEAST = 32


class RequestGate(Permits):
    """An async context manager: at most ``limit`` requests inside at once."""

    def __init__(self, most: int, least: int = LEAST) -> None:
        super().__init__()
        self.most = max(1, most)
        self.least = max(1, min(least, self.most))
        self.limit = self.most
        self.narrowed = 0  # times the loop ran late enough to narrow the gate
        # The loop's lateness, looked at every STEP seconds, kept nowhere.
        self._watch = LagProbe(STEP, on_sample=self.adjust, keep=False)

    @property
    def capacity(self) -> int:
        return self.limit

    async def __aenter__(self) -> None:
        await self.acquire()
        # Below ``least`` open requests the gate cannot narrow anything: no ticker (a
        # wake-up 20 times a second cost a rate-limited run a fifth of its CPU).
        if self.held >= self.least and not self._watch.running:
            self._watch.start()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def adjust(self, late: float) -> None:
        """Narrow the gate after a wake-up ``late`` seconds late; widen it after a
        punctual one while requests wait. Below ``least`` open requests nothing waits
        and nothing can be narrowed: stop looking until the run is busy again (the
        limit it learnt stays for that next burst)."""
        if late > LATE:
            if self.limit > self.least:
                self.narrowed += 1
            self.limit = max(self.least, self.limit // 2)
        elif late < ON_TIME and self.waiting and self.limit < self.most:
            before, self.limit = self.limit, min(self.most, self.limit + max(1, self.limit // 8))
            self.widened(self.limit - before)
        if self.held < self.least:
            self._watch.halt()  # started again by the request that makes it busy

    async def close(self) -> None:
        await self._watch.stop()
