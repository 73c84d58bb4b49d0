"""Backoff with full jitter, Retry-After parsing, and a switch that zeroes waits in tests."""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from batch.metrics import Metrics

T = TypeVar("T")

ZERO_BACKOFF_ENV = "WSBATCH_ZERO_BACKOFF"
MAX_RETRY_AFTER = 600.0


def zero_backoff() -> bool:
    """True under the test switch: computed backoff is 0 (Retry-After still counts)."""
    return os.environ.get(ZERO_BACKOFF_ENV, "") not in ("", "0")


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try number ``attempt + 1`` (attempt counts from 0)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER)
        if zero_backoff():
            return 0.0
        return random.uniform(0.0, min(self.cap, self.base * 2.0 ** min(attempt, 30)))


DEFAULT_BACKOFF = Backoff()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        # "inf" means never: the caller compares it with what the user allowed.
        return None if math.isnan(seconds) else max(seconds, 0.0)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class DeadlinePassed(Exception):
    """The next try would start after the task's deadline."""


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    tries: int,
    metrics: Metrics,
    backoff: Backoff = DEFAULT_BACKOFF,
    deadline: float | None = None,
    retry_on: Callable[[Exception], bool] = lambda exc: bool(getattr(exc, "retryable", False)),
    budgeted: Callable[[Exception], bool] = lambda exc: True,
    wait_for: Callable[[Exception, int], float | None] = lambda exc, n: None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await ``op()`` until it succeeds; the one retry loop every request goes through.

    An error that ``retry_on`` refuses is raised at once. ``budgeted`` errors count
    against ``tries`` (retries after the first call); the others (a flaky network
    while polling) only against ``deadline``. The wait is ``wait_for``'s when it
    names one, else exponential backoff with full jitter that honours Retry-After.
    A wait that would end past ``deadline`` raises ``DeadlinePassed`` instead.
    """
    failures = 0
    streak = 0
    while True:
        try:
            return await op()
        except Exception as exc:
            if not retry_on(exc):
                raise
            streak += 1
            if budgeted(exc):
                failures += 1
                if failures > tries:
                    raise
            wait = wait_for(exc, streak)
            if wait is None:
                wait = backoff.delay(min(streak, 6) - 1, getattr(exc, "retry_after", None))
            if deadline is not None and time.monotonic() + wait > deadline:
                raise DeadlinePassed(f"{what}: {exc}") from exc
            metrics.retry(what, str(exc)[:200], wait)
            await sleep(wait)
