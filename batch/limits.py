"""Submission pacing shared by the whole pool: a --rate cap and a 429 slow-down."""

from __future__ import annotations

import asyncio
import time

from batch.retry import zero_backoff

MAX_PENALTY = 60.0
MIN_PENALTY = 0.25


class SubmitLimiter:
    """Spaces submissions evenly and slows every worker down after a 429.

    ``rate`` (per minute) is a hard cap with no bursts: submissions are at
    least 60/rate seconds apart. A 429 pauses all submissions (for its
    Retry-After when given) and doubles a penalty gap between submissions;
    each success shrinks that gap again, so the pool speeds back up once the
    429s stop.
    """

    def __init__(self, rate_per_minute: float | None = None) -> None:
        self.interval = 60.0 / rate_per_minute if rate_per_minute else 0.0
        self.penalty = 0.0
        self._next_at = 0.0
        self._pause_until = 0.0
        self._lock = asyncio.Lock()
        self.rate_limited = 0

    def _gap(self) -> float:
        return max(self.interval, 0.0 if zero_backoff() else self.penalty)

    async def acquire(self) -> None:
        """Wait for this submission's turn (FIFO across the pool)."""
        async with self._lock:
            while True:
                now = time.monotonic()
                wait = max(self._next_at, self._pause_until) - now
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self._next_at = now + self._gap()

    def on_rate_limited(self, retry_after: float | None) -> None:
        self.rate_limited += 1
        self.penalty = min(max(self.penalty * 2.0, MIN_PENALTY), MAX_PENALTY)
        pause = retry_after if retry_after is not None else self.penalty
        self._pause_until = max(self._pause_until, time.monotonic() + pause)

    def on_success(self) -> None:
        if self.penalty:
            self.penalty *= 0.9
            if self.penalty < MIN_PENALTY / 4:
                self.penalty = 0.0
