"""Backoff with full jitter, Retry-After parsing, and a switch that zeroes waits in tests."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
