"""What a run was asked to do: flags, settings and defaults, resolved once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PRICE = 0.024


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
