"""Scale checks: a 100k-row manifest (validate, resume with everything done) and a burst
of 1,000 tasks in flight. Each ``wsbatch`` is a measured child process.

Run alone with ``python -m tests.bench.scale`` (``make bench`` runs it after the comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batch.export import write_metadata
from batch.manifest import load_manifest
from tests.bench.harness import (
    EmulatorProcess,
    Measured,
    make_image,
    nofile_limiter,
    raise_nofile_limit,
    run_measured,
    table,
    timing,
    verdict,
    write_results,
    wsbatch_cmd,
)

VALIDATE_MAX_S = 5.0
RESUME_MAX_S = 5.0
MAX_RSS_MB = 250.0
# The emulator's counters of requests that reached it; all must stay 0 on a full resume.
REQUEST_COUNTERS = (
    "submits_accepted",
    "submits_rejected",
    "rate_limited",
    "upload_tickets",
    "uploads",
    "polls",
    "downloads",
    "input_downloads",
    "auth_failures",
)
IMAGES = [
    ("png", (200, 80, 40)),
    ("jpg", (40, 160, 90)),
    ("png", (30, 60, 200)),
    ("webp", (220, 200, 30)),
    ("jpg", (120, 40, 160)),
]


def write_manifests(work: Path, rows: int, name: str) -> tuple[Path, Path]:
    """A CSV manifest and the same rows as JSON Lines, over a handful of small images."""
    images = [
        make_image(work / "images" / f"in{n}.{ext}", color) for n, (ext, color) in enumerate(IMAGES)
    ]
    refs = [str(p.relative_to(work)) for p in images]
    records = [
        {
            "id": f"r{n:06d}",
            "image": refs[n % len(refs)],
            "prompt": f"edit number {n % 97}: make it brighter",
            "seed": n,
        }
        for n in range(rows)
    ]
    csv_path = work / f"{name}.csv"
    lines = ["id,image,prompt,seed"]
    lines += [f"{r['id']},{r['image']},{r['prompt']},{r['seed']}" for r in records]
    csv_path.write_text("\n".join(lines) + "\n")
    jsonl_path = work / f"{name}.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return csv_path, jsonl_path


def wsbatch_run(manifest: Path, base_url: str, out_dir: Path, concurrency: int) -> list[str]:
    """The ``wsbatch run`` command line the checks use (JSON summary, no progress)."""
    flags = ["--base-url", base_url, "--out", str(out_dir), "--concurrency", str(concurrency)]
    return [*wsbatch_cmd(), "run", str(manifest), *flags, "--no-progress", "--json"]


def build_completed_out(manifest: Path, out_dir: Path) -> int:
    """An OUT_DIR as a finished run leaves it: a ledger with a ``completed`` event for every
    row, an (empty) file per output, and metadata.jsonl."""
    rows = load_manifest(manifest).rows
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    lines = []
    for n, row in enumerate(rows):
        name = f"{row.id}.jpg"
        event = {
            "ts": stamp,
            "event": "completed",
            "row": row.id,
            "prediction_id": f"p{n}",
            "outputs": [name],
            "sha256": ["x"],
            "nsfw": [False],
            "inference_ms": 1,
            "seed": 1,
            "fingerprint": row.fingerprint,
        }
        lines.append(json.dumps(event, separators=(",", ":")))
        (out_dir / name).touch()
    (out_dir / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    # A finished run always leaves metadata.jsonl beside its ledger; so does this one.
    write_metadata(out_dir)
    return len(rows)


def _summary(result: Measured) -> dict[str, Any]:
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            try:
                parsed: dict[str, Any] = json.loads(line)
                return parsed
            except ValueError:
                break
    return {}


def _figures(name: str, result: Measured) -> dict[str, Any]:
    return {
        "name": name,
        "exit_code": result.returncode,
        "wall_s": result.wall_s,
        "cpu_s": result.cpu_s,
        "peak_rss_mb": result.maxrss_mb,
        "aborted": result.aborted,
    }


def measure_validate(manifest: Path, rows: int) -> dict[str, Any]:
    """(a) ``wsbatch validate`` on the whole manifest, into a folder that does not exist."""
    out = manifest.parent / f"no-such-out-{manifest.suffix[1:]}"
    result = run_measured(
        [*wsbatch_cmd(), "validate", str(manifest), "--out", str(out)], timeout=300
    )
    figures = _figures(f"validate {rows // 1000}k {manifest.suffix[1:].upper()}", result)
    ok = result.returncode == 0 and f"{rows} rows" in result.stdout
    figures["detail"] = "plan printed" if ok else f"exit {result.returncode}"
    figures["targets"] = {
        "exit 0": ok,
        f"wall <= {VALIDATE_MAX_S:g} s": result.wall_s <= VALIDATE_MAX_S,
        f"peak RSS <= {MAX_RSS_MB:g} MB": result.maxrss_mb <= MAX_RSS_MB,
    }
    if not ok:
        figures["stderr_tail"] = result.stderr[-800:]
    return figures


def _build_in_child(manifest: Path, out_dir: Path) -> int:
    """Build the finished OUT_DIR in a child process. Built here, its 100k rows would swell
    this process, and a child forked from a large parent reports the parent's pages in its
    own peak RSS (``ru_maxrss`` counts the copy it was before ``exec``)."""
    code = (
        "import sys; from pathlib import Path; "
        "from tests.bench.scale import build_completed_out; "
        "print(build_completed_out(Path(sys.argv[1]), Path(sys.argv[2])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(manifest), str(out_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout.strip())


def measure_resume(manifest: Path, out_dir: Path) -> dict[str, Any]:
    """(b) ``wsbatch run`` where every row is already completed: no request may be sent."""
    rows = _build_in_child(manifest, out_dir)
    with EmulatorProcess((0.0, 0.0)) as emu:
        result = run_measured(
            wsbatch_run(manifest, emu.base_url, out_dir, 50),
            timeout=300,
            abort_if=emu.exited,
        )
        stats = emu.state()["stats"]
    requests = sum(int(stats.get(k, 0)) for k in REQUEST_COUNTERS)
    summary = _summary(result)
    figures = _figures(f"resume {rows // 1000}k all done", result)
    figures["requests_to_emulator"] = requests
    figures["already_done"] = summary.get("already_done")
    figures["detail"] = f"{summary.get('already_done')} already done, {requests} requests"
    figures["targets"] = {
        "exit 0, all rows skipped": (
            result.returncode == 0 and summary.get("already_done") == rows
        ),
        f"wall <= {RESUME_MAX_S:g} s": result.wall_s <= RESUME_MAX_S,
        f"peak RSS <= {MAX_RSS_MB:g} MB": result.maxrss_mb <= MAX_RSS_MB,
        "0 requests to the API": requests == 0,
    }
    if result.returncode != 0:
        figures["stderr_tail"] = result.aborted or result.stderr[-800:]
    return figures


def measure_burst(
    work: Path, rows: int, concurrency: int, latency: tuple[float, float], nofile: int
) -> dict[str, Any]:
    """(c) ``rows`` tasks with ``concurrency`` in flight, under a soft open-files limit."""
    manifest, _ = write_manifests(work / "burst", rows, "burst")
    out_dir = work / "burst-out"
    with EmulatorProcess(latency, ["--seed", "1"]) as emu:
        result = run_measured(
            wsbatch_run(manifest, emu.base_url, out_dir, concurrency),
            timeout=600,
            preexec_fn=nofile_limiter(nofile),
            abort_if=emu.exited,
        )
        state = emu.state()
    t = timing(state)
    summary = _summary(result)
    ideal = rows / concurrency * (t["mean_latency_s"] or sum(latency) / 2)
    emfile = "Too many open files" in result.stderr or "EMFILE" in result.stderr
    completed = summary.get("completed")
    figures = _figures(f"{rows} rows @ {concurrency} in flight", result)
    figures.update(
        {
            "rows": rows,
            "concurrency": concurrency,
            "nofile_soft_limit": nofile,
            "completed": completed,
            "failed": summary.get("failed"),
            "tasks_submitted": int(t["tasks"]),
            "ideal_s": ideal,
            "wall_over_ideal": result.wall_s / ideal if ideal else math.nan,
            "polls_per_task": t["polls_per_task"],
            "mean_lag_s": t["mean_lag_s"],
            "too_many_open_files": emfile,
            "emulator_cpu_s": emu.cpu_s,
        }
    )
    figures["detail"] = (
        f"{completed}/{rows} done, {int(t['tasks'])} submits, wall/ideal "
        f"{figures['wall_over_ideal']:.2f}, {t['polls_per_task']:.2f} polls/task, "
        f"lag {t['mean_lag_s']:.2f} s, emulator CPU {emu.cpu_s:.1f} s, soft nofile {nofile}"
    )
    figures["targets"] = {
        "exit 0, every row done once": (
            result.returncode == 0 and completed == rows and int(t["tasks"]) == rows
        ),
        'no "Too many open files"': not emfile,
    }
    if result.returncode != 0:
        figures["stderr_tail"] = result.aborted or result.stderr[-1500:]
    return figures


def report(results: list[dict[str, Any]]) -> str:
    headers = ["scale check", "wall s", "peak RSS MB", "CPU s", "target", "result"]
    body = []
    for r in results:
        figures = [r["name"], f"{r['wall_s']:.2f}", f"{r['peak_rss_mb']:.1f}", f"{r['cpu_s']:.2f}"]
        for n, (name, ok) in enumerate(r["targets"].items()):
            body.append([*(figures if n == 0 else [""] * 4), name, verdict(ok)])
    lines = ["wsbatch at scale", table(headers, body)]
    lines += [f"  {r['name']}: {r['detail']}" for r in results]
    for r in results:
        if r.get("stderr_tail"):
            lines.append(f"{r['name']}: stderr: {r['stderr_tail'].strip()}")
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="wsbatch-scale-") as tmp:
        work = Path(tmp)
        csv_path, jsonl_path = write_manifests(work, args.rows, "big")
        return [
            measure_validate(csv_path, args.rows),
            measure_validate(jsonl_path, args.rows),
            measure_resume(csv_path, work / "resume-out"),
            measure_burst(work, args.burst_rows, args.burst_concurrency, args.latency, args.nofile),
        ]


def _latency(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scale", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="manifest rows (100000)")
    parser.add_argument("--burst-rows", type=int, default=2000, help="rows of the burst (2000)")
    parser.add_argument("--burst-concurrency", type=int, default=1000, help="in flight (1000)")
    parser.add_argument("--latency", type=_latency, default=(1.0, 3.0), metavar="LO,HI")
    parser.add_argument(
        "--nofile",
        type=int,
        default=1024,
        help="soft open-files limit for wsbatch in the burst: 1024 is the usual Linux default",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    results = run_all(args)
    write_results("scale", {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checks": results})
    print(report(results), flush=True)
    missed = not all(all(r["targets"].values()) for r in results)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
