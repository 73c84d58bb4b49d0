"""A count of permits whose number may change while tasks wait for one."""

from __future__ import annotations

import asyncio
from collections import deque


class Permits:
    """Like ``asyncio.Semaphore``, but ``capacity`` is whatever the subclass says it is
    now: waiters are woken in order as room appears, and a wake-up handed to a waiter
    that was cancelled meanwhile is passed on, never lost."""

    def __init__(self) -> None:
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def capacity(self) -> int:
        raise NotImplementedError

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        while self.held >= self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()
                raise
        self.held += 1

    def release(self) -> None:
        self.held -= 1
        self._wake()

    def widened(self, room: int) -> None:
        """``capacity`` grew by ``room``: wake as many waiters."""
        for _ in range(room):
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
