"""The baseline: what a user writes with the vendor's SDK (``wavespeed``) and a thread pool.

Reads the same CSV manifest as ``wsbatch run``, uploads each distinct input image once with
the SDK, then per row in a ``ThreadPoolExecutor``: ``Client.run`` (submit, then the SDK's
own fixed 1 s polling), download every output URL with ``requests``, write the file and
append a JSON line to a ledger. Prints one JSON summary line on stdout.

Run: ``python -m tests.bench.sdk_worker MANIFEST.csv --base-url URL --out DIR --concurrency N``
(the key comes from ``WAVESPEED_API_KEY``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import wavespeed  # type: ignore[import-untyped]

MODEL = "wavespeed-ai/hidream-e1-full"
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Job:
    """One row's work, sharing a client, a ledger and a lock with the other threads."""

    def __init__(self, client: wavespeed.Client, out_dir: Path, ledger: Any) -> None:
        self.client = client
        self.out_dir = out_dir
        self.ledger = ledger
        self.lock = threading.Lock()

    def __call__(self, row: dict[str, str], image_url: str) -> None:
        fmt = row.get("output_format") or "jpeg"
        seed = int(row.get("seed") or -1)
        result = self.client.run(
            MODEL, {"prompt": row["prompt"], "image": image_url, "seed": seed, "output_format": fmt}
        )
        urls = result["outputs"]
        ext = EXTENSIONS[fmt]
        names = (
            [f"{row['id']}.{ext}"]
            if len(urls) == 1
            else [f"{row['id']}-{n}.{ext}" for n in range(1, len(urls) + 1)]
        )
        for url, name in zip(urls, names, strict=True):
            resp = requests.get(url, timeout=(10, 120))
            resp.raise_for_status()
            (self.out_dir / name).write_bytes(resp.content)
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
    args = parser.parse_args(argv)

    started = time.monotonic()
    with args.manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    args.out.mkdir(parents=True, exist_ok=True)
    client = wavespeed.Client(api_key=os.environ["WAVESPEED_API_KEY"], base_url=args.base_url)
    base = args.manifest.parent
    uploads = {
        img: client.upload(str(base / img)) for img in dict.fromkeys(r["image"] for r in rows)
    }

    completed = failed = 0
    errors: dict[str, int] = {}
    with (args.out / "ledger.jsonl").open("a") as ledger:
        job = Job(client, args.out, ledger)
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
        "elapsed_s": round(time.monotonic() - started, 3),
        "sdk_version": wavespeed.__version__,
    }
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
