"""Export benchmark: wall time and peak RSS of ``export_dataset`` on a 2,000-row output folder.

``python -m tests.bench.export_bench [--rows 500,2000] [--inputs 100] [--size 256]``

The output folder is fabricated, no API or emulator involved: ``--inputs`` distinct
input images and one output image per row, all random noise (so no compressor can
shrink them and the bytes on disk are what an export must move), and a ledger of
``completed`` events shaped as the runner writes them. Each export (and
``write_metadata``) runs in its own process; its peak RSS is that process's
``ru_maxrss`` from ``wait4``, next to a baseline process that imports pyarrow and
fsspec and writes a one-row Parquet table, so the difference is what the export holds.
Streaming means the peak stays flat as rows grow while the data moved grows with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "output" / "bench" / "export_bench.json"

CHILD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from batch.export import export_dataset, write_metadata
import fsspec, pyarrow, pyarrow.parquet
t1 = time.perf_counter()
what, out, dest = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if what == "baseline":
    # Imports plus one tiny Parquet write: pyarrow maps most of its code on first use.
    table = pyarrow.table({"x": [b"x"]})
    pyarrow.parquet.write_table(table, pyarrow.BufferOutputStream())
    files = []
elif what == "metadata":
    files = [str(write_metadata(out))]
else:
    files = export_dataset(out, what, to=dest, shard_size=1000)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1, "files": files}))
"""


def noise_image(path: Path, size: int, fmt: str) -> int:
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(path, fmt, quality=90)
    return path.stat().st_size


def fabricate(root: Path, rows: int, inputs: int, size: int) -> tuple[Path, int, int]:
    """An OUT_DIR of ``rows`` completed rows; return it, input bytes and output bytes."""
    photos, out = root / "photos", root / "out"
    photos.mkdir(parents=True)
    out.mkdir()
    input_sizes = [noise_image(photos / f"img{i:04d}.png", size, "PNG") for i in range(inputs)]
    # Written line by line: a parent holding 100k events would swell every child's peak
    # RSS too (a forked child's ``ru_maxrss`` counts the pages it was forked with).
    with (out / "ledger.jsonl").open("w") as ledger:
        run = {"ts": "2026-01-01T00:00:00.000Z", "event": "run", "model": "m/x", "rows": rows}
        ledger.write(json.dumps(run) + "\n")
        in_bytes = out_bytes = 0
        for n in range(rows):
            row = f"{n:012x}"
            name = f"{row}.jpg"
            out_bytes += noise_image(out / name, size, "JPEG")
            image = n % inputs
            in_bytes += input_sizes[image]
            event = {
                "ts": "2026-01-01T00:00:01.000Z",
                "event": "completed",
                "row": row,
                "prediction_id": f"pred-{n}",
                "outputs": [name],
                "sha256": ["0" * 64],
                "nsfw": [False],
                "inference_ms": 1500,
                "seed": n,
                "fingerprint": "f" * 32,
                "model": "wavespeed-ai/hidream-e1-full",
                "prompt": f"make it season {n % 4}",
                "image": f"photos/img{image:04d}.png",
                "image_path": str(photos / f"img{image:04d}.png"),
                "meta": {"batch": "bench", "k": n % 7},
            }
            ledger.write(json.dumps(event) + "\n")
    return out, in_bytes, out_bytes


def measured(what: str, out: Path, dest: Path) -> dict[str, Any]:
    """Run one export in a child process; return its timings and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, what, str(out), str(dest)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    report = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{what}: child exited {child.returncode}")
    result = json.loads(report)
    files = [Path(f) for f in result.pop("files")]
    return {
        **result,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "files": len(files),
        "written_mb": sum(f.stat().st_size for f in files) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="500,2000", help="comma-separated row counts")
    parser.add_argument("--inputs", type=int, default=100, help="distinct input images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)
    results = []
    header = (
        f"{'rows':>6} {'step':<11} {'wall s':>7} {'work s':>7} "
        f"{'peak RSS MB':>11} {'files':>5} {'written MB':>10}"
    )
    print(header)
    for rows in [int(r) for r in args.rows.split(",")]:
        with tempfile.TemporaryDirectory(prefix="wsbatch-export-bench-") as tmp:
            out, in_bytes, out_bytes = fabricate(Path(tmp), rows, args.inputs, args.size)
            data_mb = (in_bytes + out_bytes) / 2**20
            for what in ("baseline", "metadata", "parquet", "webdataset"):
                r = measured(what, out, Path(tmp) / "dest" / what)
                results.append({"rows": rows, "step": what, "pair_data_mb": data_mb, **r})
                print(
                    f"{rows:>6} {what:<11} {r['wall_s']:>7.2f} {r['work_s']:>7.2f} "
                    f"{r['peak_rss_mb']:>11.1f} {r['files']:>5} {r['written_mb']:>10.1f}"
                )
            print(f"{rows:>6} pair bytes (inputs as referenced + outputs): {data_mb:.1f} MB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
