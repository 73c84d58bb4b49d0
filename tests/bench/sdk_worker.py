"""The baseline: what a user writes with the vendor's SDK (``wavespeed``) and a thread pool.

Reads the same CSV manifest as ``wsbatch run``, uploads each distinct input image once with
the SDK, then per row in a ``ThreadPoolExecutor``: ``Client.run`` (submit, then the SDK's
own fixed 1 s polling), download every output URL with ``requests``, write the file and
append a JSON line to a ledger. Prints one JSON summary line on stdout.

The SDK retries result polls on 429/5xx but never re-sends a submit, and its upload and
the output download are single requests, so the loop a user adds is here too: an upload, a
submit or a download answered 429 or 5xx is tried again after ``retry_interval`` x attempt
seconds (the SDK's own schedule for polls, 1, 2, 3 ... s), up to ``--retries`` times. The
SDK hides the response headers, so a Retry-After cannot be honoured. A submit answered 429
or with a random 5xx of the emulator created nothing, so this makes no duplicates. Without
429s and 5xx the loop never runs.

Run: ``python -m tests.bench.sdk_worker MANIFEST.csv --base-url URL --out DIR --concurrency N``
(the key comes from ``WAVESPEED_API_KEY``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import requests
import wavespeed  # type: ignore[import-untyped]

MODEL = "wavespeed-ai/hidream-e1-full"
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# The SDK's messages for an upload or a submit the server answered with an error status.
_REFUSED = re.compile(r"Failed to (?:submit prediction|create upload|upload file): HTTP (\d{3})")
T = TypeVar("T")


def _retryable_status(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


class Retrier:
    """Tries a call again when the server answered 429 or 5xx, and counts the retries."""

    def __init__(self, retries: int, interval: float) -> None:
        self.retries = retries
        self.interval = interval
        self.count = 0
        self._lock = threading.Lock()

    def _wait(self, attempt: int) -> None:
        with self._lock:
            self.count += 1
        time.sleep(self.interval * attempt)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, again while it raises an SDK error that carries a 429 or 5xx status."""
        attempt = 0
        while True:
            try:
                return fn()
            except RuntimeError as exc:
                match = _REFUSED.search(str(exc))
                if attempt >= self.retries or not match:
                    raise
                if not _retryable_status(int(match.group(1))):
                    raise
            attempt += 1
            self._wait(attempt)

    def download(self, url: str) -> bytes:
        attempt = 0
        while True:
            resp = requests.get(url, timeout=(10, 120))
            if attempt >= self.retries or not _retryable_status(resp.status_code):
                resp.raise_for_status()
                return resp.content
            attempt += 1
            self._wait(attempt)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Job:
    """One row's work, sharing a client, a ledger and a lock with the other threads."""

    def __init__(
        self, client: wavespeed.Client, out_dir: Path, ledger: Any, retrier: Retrier
    ) -> None:
        self.client = client
        self.retrier = retrier
        self.out_dir = out_dir
        self.ledger = ledger
        self.lock = threading.Lock()

    def __call__(self, row: dict[str, str], image_url: str) -> None:
        fmt = row.get("output_format") or "jpeg"
        seed = int(row.get("seed") or -1)
        body = {"prompt": row["prompt"], "image": image_url, "seed": seed, "output_format": fmt}
        result = self.retrier.call(lambda: self.client.run(MODEL, body))
        urls = result["outputs"]
        ext = EXTENSIONS[fmt]
        names = (
            [f"{row['id']}.{ext}"]
            if len(urls) == 1
            else [f"{row['id']}-{n}.{ext}" for n in range(1, len(urls) + 1)]
        )
        for url, name in zip(urls, names, strict=True):
            (self.out_dir / name).write_bytes(self.retrier.download(url))
        line = {"ts": _now(), "event": "completed", "row": row["id"], "outputs": names}
        with self.lock:
            self.ledger.write(json.dumps(line) + "\n")
            self.ledger.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--retries", type=int, default=10, help="tries again on 429/5xx, 1, 2, 3 ... s apart"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    with args.manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    args.out.mkdir(parents=True, exist_ok=True)
    client = wavespeed.Client(api_key=os.environ["WAVESPEED_API_KEY"], base_url=args.base_url)
    retrier = Retrier(args.retries, client.retry_interval)
    base = args.manifest.parent

    def upload(path: Path) -> str:
        url: str = retrier.call(lambda: client.upload(str(path)))
        return url

    uploads = {img: upload(base / img) for img in dict.fromkeys(r["image"] for r in rows)}

    completed = failed = 0
    errors: dict[str, int] = {}
    with (args.out / "ledger.jsonl").open("a") as ledger:
        job = Job(client, args.out, ledger, retrier)
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            futures = [pool.submit(job, row, uploads[row["image"]]) for row in rows]
            for future in as_completed(futures):
                exc = future.exception()
                if exc is None:
                    completed += 1
                else:
                    failed += 1
                    key = f"{type(exc).__name__}: {str(exc)[:100]}"
                    errors[key] = errors.get(key, 0) + 1
    summary = {
        "rows": len(rows),
        "completed": completed,
        "failed": failed,
        "errors": errors,
        "uploads": len(uploads),
        "retries": retrier.count,
        "elapsed_s": round(time.monotonic() - started, 3),
        "sdk_version": wavespeed.__version__,
    }
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
