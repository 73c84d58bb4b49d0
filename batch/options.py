"""What a run was asked to do: flags, settings and defaults, resolved once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from batch.errors import UsageError
from batch.retry import ZERO_BACKOFF_ENV

DEFAULT_PRICE = 0.024
POLL_FLOOR_ENV = "WSBATCH_POLL_FLOOR"
DEFAULT_POLL_FLOOR = 1.0  # the vendor asks image clients to poll no more often


SETTLE_DELAY_ENV = "WSBATCH_SETTLE_DELAY"
# A lost submit answer is looked up in the account's listing no sooner than this after
# the send: the vendor's store may not list (or answer for) a task at once.
DEFAULT_SETTLE_DELAY = 10.0


def _env_seconds(name: str, default: float, *, zero: bool = False) -> float:
    """Seconds from the environment (tests make them small), checked: a bad value is a
    usage error, never a silent default."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
        above = "0 or more" if zero else "above 0"
        raise UsageError(f"{name}={text!r}: give a number of seconds, {above}")
    return value


def default_poll_floor() -> float:
    """The poll floor from WSBATCH_POLL_FLOOR, else 1 s."""
    return _env_seconds(POLL_FLOOR_ENV, DEFAULT_POLL_FLOOR)


def default_settle_delay() -> float:
    """How long after a lost answer the listing is read, from WSBATCH_SETTLE_DELAY."""
    return _env_seconds(SETTLE_DELAY_ENV, DEFAULT_SETTLE_DELAY, zero=True)


def check_zero_backoff() -> None:
    """WSBATCH_ZERO_BACKOFF (a test switch) is unset, 0 or 1: any other value would
    silently switch backoff off, since the switch reads everything else as on."""
    text = os.environ.get(ZERO_BACKOFF_ENV, "")
    if text not in ("", "0", "1"):
        raise UsageError(
            f"{ZERO_BACKOFF_ENV}={text!r}: give 1 (no backoff between retries, for tests) or 0"
        )


@dataclass(frozen=True, slots=True)
class RunOptions:
    out_dir: Path
    concurrency: int = 4
    queue_ahead: int | None = None  # tasks queued on the server beyond it; None: automatic
    rate: float | None = None
    timeout: float = 600.0
    retries: int = 5
    retry_failed: bool = False
    max_tasks: int | None = None
    budget: float | None = None
    price: float = DEFAULT_PRICE
    grace: float = 60.0
    poll_floor: float = 1.0
    settle_delay: float = DEFAULT_SETTLE_DELAY
    handle_signals: bool = True
    shard: tuple[int, int] | None = None
    log_file: str | None = None  # JSON lines; "-" is stderr
