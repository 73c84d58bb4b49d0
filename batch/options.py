"""What a run was asked to do: flags, settings and defaults, resolved once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from batch.errors import UsageError

DEFAULT_PRICE = 0.024
POLL_FLOOR_ENV = "WSBATCH_POLL_FLOOR"
DEFAULT_POLL_FLOOR = 1.0  # the vendor asks image clients to poll no more often


def default_poll_floor() -> float:
    """The poll floor from WSBATCH_POLL_FLOOR (tests make it small), else 1 s."""
    text = os.environ.get(POLL_FLOOR_ENV, "").strip()
    if not text:
        return DEFAULT_POLL_FLOOR
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{POLL_FLOOR_ENV}={text!r}: give a number of seconds above 0")
    return value


@dataclass(frozen=True, slots=True)
class RunOptions:
    out_dir: Path
    concurrency: int = 4
    rate: float | None = None
    timeout: float = 600.0
    retries: int = 5
    retry_failed: bool = False
    max_tasks: int | None = None
    budget: float | None = None
    price: float = DEFAULT_PRICE
    grace: float = 60.0
    poll_floor: float = 1.0
    handle_signals: bool = True
    shard: tuple[int, int] | None = None
    log_file: str | None = None  # JSON lines; "-" is stderr
