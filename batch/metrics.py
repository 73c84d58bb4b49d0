"""Counters that are not row facts (requests, retries, 429s, reuse), and the JSON log.

Row facts (what was billed, completed or failed) live in the ledger only. What
is here explains a run: why a night was slow, how often the API pushed back.
With ``--log-file`` every notable moment is one JSON line, written by a thread
so the event loop never waits for the disk.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.ledger import utc_now
from batch.redact import redact_text

LOGGER_NAME = "wsbatch.run"


@dataclass(slots=True)
class Metrics:
    requests: int = 0
    submits: int = 0
    polls: int = 0
    uploads: int = 0
    uploads_reused: int = 0
    downloads: int = 0
    bytes_downloaded: int = 0
    retries: int = 0
    rate_limited: int = 0
    reconciled: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    log: logging.Logger | None = None

    def note(self, what: str, **fields: Any) -> None:
        """One JSON log line, when a log is configured."""
        if self.log is not None and self.log.isEnabledFor(logging.INFO):
            line = json.dumps({"ts": utc_now(), "what": what, **fields}, default=str)
            self.log.info(redact_text(line))

    def retry(self, what: str, reason: str, wait: float) -> None:
        self.retries += 1
        self.note("retry", op=what, reason=reason, wait_s=round(wait, 3))

    def count_failure(self, code: int | str | None, message: str | None) -> None:
        cause = f"{code}: {message}" if code is not None else (message or "unknown")
        self.failures[cause[:120]] += 1


class JsonLog:
    """A JSON-lines log (a file, or stderr for ``-``) fed through a queue, so writing
    never blocks the loop."""

    def __init__(self, target: str) -> None:
        handler: logging.Handler = (
            logging.StreamHandler(sys.stderr)
            if target == "-"
            else logging.FileHandler(Path(target), encoding="utf-8")
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self.logger = logging.getLogger(f"{LOGGER_NAME}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._handler = handler

    def __enter__(self) -> JsonLog:
        self._listener.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.stop()
        self._handler.close()
        self.logger.handlers.clear()
