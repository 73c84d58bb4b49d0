"""``make bench``: wsbatch against the vendor's Python SDK in a thread pool, then at scale.

Each contender runs as its own process against its own fresh emulator process (task
latency uniform in ``--latency``, the same seeded draw for both contenders), doing the same
work per row: the one input image is uploaded once, then every row is submitted, polled
until done, its output downloaded and written, and a ledger line appended. CPU time and
peak RSS come from ``wait4`` on the contender's process; polls and completion lag come from
the emulator's own records. With ``--repeat N`` the figures are medians of N rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.harness import (
    EmulatorProcess,
    child_env,
    make_image,
    raise_nofile_limit,
    run_measured,
    table,
    timing,
    verdict,
    write_results,
    wsbatch_cmd,
)

TARGET_WALL = 1.05
TARGET_CPU = 0.5
TARGET_POLLS = 0.6
MEDIAN_KEYS = (
    "wall_s",
    "ideal_s",
    "wall_over_ideal",
    "cpu_s",
    "cpu_per_task_s",
    "polls_per_task",
    "mean_latency_s",
    "mean_lag_s",
    "peak_rss_mb",
    "emulator_cpu_s",
)

Build = Callable[[str, Path], list[str]]


def ensure_sdk() -> str:
    """Install the vendor's SDK into this environment when missing (the bench's own need)."""
    if importlib.util.find_spec("wavespeed") is None:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "wavespeed"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"cannot install the wavespeed SDK:\n{done.stderr[-2000:]}")
        importlib.invalidate_caches()
    from importlib.metadata import version

    return version("wavespeed")


def write_manifest(path: Path, rows: int, image: Path) -> Path:
    """A CSV manifest of ``rows`` edits of one local image, explicit ids and seeds."""
    rel = image.relative_to(path.parent)
    lines = ["id,image,prompt,seed"]
    lines += [
        f"row-{n:05d},{rel},make it look like painting number {n % 7},{n}" for n in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def count_outputs(out_dir: Path) -> tuple[int, int]:
    """(non-empty output files, completed ledger lines) in ``out_dir``."""
    files = sum(1 for p in out_dir.glob("*.jpg") if p.stat().st_size > 0)
    completed = 0
    ledger = out_dir / "ledger.jsonl"
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            try:
                completed += json.loads(line).get("event") == "completed"
            except ValueError:
                continue
    return files, completed


def run_contender(
    name: str,
    build: Build,
    out_dir: Path,
    *,
    rows: int,
    concurrency: int,
    latency: tuple[float, float],
    seed: int,
) -> dict[str, Any]:
    """Run one contender against a fresh emulator; return its measured figures."""
    with EmulatorProcess(latency, ["--seed", str(seed)]) as emu:
        result = run_measured(
            build(emu.base_url, out_dir), env=child_env(), timeout=600, abort_if=emu.exited
        )
        state = emu.state()
    t = timing(state)
    files, completed = count_outputs(out_dir)
    ideal = rows / concurrency * (t["mean_latency_s"] or sum(latency) / 2)
    ok = result.returncode == 0 and files == rows and completed == rows
    return {
        "contender": name,
        "seed": seed,
        "ok": ok,
        "exit_code": result.returncode,
        "outputs": files,
        "ledger_completed": completed,
        "tasks_submitted": int(t["tasks"]),
        "wall_s": result.wall_s,
        "ideal_s": ideal,
        "wall_over_ideal": result.wall_s / ideal if ideal else math.nan,
        "cpu_s": result.cpu_s,
        "cpu_per_task_s": result.cpu_s / rows,
        "polls_per_task": t["polls_per_task"],
        "mean_latency_s": t["mean_latency_s"],
        "mean_lag_s": t["mean_lag_s"],
        "max_lag_s": t["max_lag_s"],
        "peak_rss_mb": result.maxrss_mb,
        "emulator_cpu_s": emu.cpu_s,
        "aborted": result.aborted,
        "stderr_tail": "" if ok else result.stderr[-800:] or result.stdout[-400:],
    }


def summarize(name: str, runs: list[dict[str, Any]], rows: int, concurrency: int) -> dict[str, Any]:
    """Medians over rounds, plus every round as measured."""
    merged: dict[str, Any] = {"contender": name, "rows": rows, "concurrency": concurrency}
    merged.update({k: statistics.median(r[k] for r in runs) for k in MEDIAN_KEYS})
    merged["ok"] = all(r["ok"] for r in runs)
    merged["runs"] = runs
    return merged


def compare(
    rows: int, concurrency: int, latency: tuple[float, float], repeat: int, seed: int
) -> dict[str, Any]:
    """Run both contenders ``repeat`` times; return their figures and wsbatch/SDK ratios."""
    sdk_version = ensure_sdk()
    sdk_name = f"SDK {sdk_version}"
    runs: dict[str, list[dict[str, Any]]] = {"wsbatch": [], sdk_name: []}
    with tempfile.TemporaryDirectory(prefix="wsbatch-bench-") as tmp:
        work = Path(tmp)
        image = make_image(work / "images" / "input.png", (180, 90, 40))
        manifest = write_manifest(work / "bench.csv", rows, image)

        def flags(base_url: str, out: Path) -> list[str]:
            return ["--base-url", base_url, "--out", str(out), "--concurrency", str(concurrency)]

        def wsbatch(base_url: str, out: Path) -> list[str]:
            run = [*wsbatch_cmd(), "run", str(manifest)]
            return [*run, *flags(base_url, out), "--no-progress", "--json"]

        def sdk(base_url: str, out: Path) -> list[str]:
            worker = [sys.executable, "-m", "tests.bench.sdk_worker", str(manifest)]
            return [*worker, *flags(base_url, out)]

        builds: list[tuple[str, Build]] = [("wsbatch", wsbatch), (sdk_name, sdk)]
        for n in range(repeat):
            # Alternate who goes first so drift in the machine's load favours neither.
            for name, build in builds if n % 2 == 0 else builds[::-1]:
                out = work / f"out-{n}-{name.split()[0].lower()}"
                runs[name].append(
                    run_contender(
                        name,
                        build,
                        out,
                        rows=rows,
                        concurrency=concurrency,
                        latency=latency,
                        seed=seed + n,
                    )
                )
    ours = summarize("wsbatch", runs["wsbatch"], rows, concurrency)
    theirs = summarize(sdk_name, runs[sdk_name], rows, concurrency)

    def ratio(key: str) -> float:
        return float(ours[key] / theirs[key]) if theirs[key] else math.inf

    ratios: dict[str, dict[str, Any]] = {
        "wall": {"value": ratio("wall_s"), "target": TARGET_WALL},
        "cpu_per_task": {"value": ratio("cpu_per_task_s"), "target": TARGET_CPU},
        "polls_per_task": {"value": ratio("polls_per_task"), "target": TARGET_POLLS},
    }
    for entry in ratios.values():
        entry["pass"] = bool(entry["value"] <= entry["target"])
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "latency_s": list(latency),
        "repeat": repeat,
        "sdk_version": sdk_version,
        "contenders": [ours, theirs],
        "ratios": ratios,
    }


def report(result: dict[str, Any]) -> str:
    lo, hi = result["latency_s"]
    headers = [
        "contender",
        "rows",
        "conc",
        "ok",
        "wall s",
        "wall/ideal",
        "CPU s/task",
        "polls/task",
        "lag s",
        "peak RSS MB",
        "emu CPU s",
    ]
    body = [
        [
            c["contender"],
            str(c["rows"]),
            str(c["concurrency"]),
            "yes" if c["ok"] else "NO",
            f"{c['wall_s']:.2f}",
            f"{c['wall_over_ideal']:.2f}",
            f"{c['cpu_per_task_s']:.4f}",
            f"{c['polls_per_task']:.2f}",
            f"{c['mean_lag_s']:.3f}",
            f"{c['peak_rss_mb']:.1f}",
            f"{c['emulator_cpu_s']:.1f}",
        ]
        for c in result["contenders"]
    ]
    ideal = result["contenders"][0]["ideal_s"]
    rounds = result["repeat"]
    lines = [
        f"wsbatch vs the vendor SDK: task latency uniform {lo:g}-{hi:g} s, ideal = rows / "
        f"concurrency x mean latency = {ideal:.2f} s; "
        + (f"medians of {rounds} rounds" if rounds > 1 else "one round"),
        table(headers, body),
        "",
        table(
            ["wsbatch / SDK", "ratio", "target", "result"],
            [
                [name, f"{r['value']:.2f}x", f"<= {r['target']:g}x", verdict(r["pass"])]
                for name, r in result["ratios"].items()
            ],
        ),
    ]
    for c in result["contenders"]:
        for run in c["runs"]:
            if not run["ok"]:
                why = run["aborted"] or run["stderr_tail"]
                lines.append(f"{c['contender']} (seed {run['seed']}) failed: {why}")
    return "\n".join(lines)


def _latency(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    try:
        pair = (float(lo), float(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI seconds, got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=200, help="rows per contender (200)")
    parser.add_argument("--concurrency", type=int, default=50, help="tasks in flight (50)")
    parser.add_argument("--latency", type=_latency, default=(1.0, 3.0), metavar="LO,HI")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians reported (3)")
    parser.add_argument("--seed", type=int, default=1, help="emulator seed of the first round")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale checks")
    parser.add_argument("--no-compare", action="store_true", help="skip the SDK comparison")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    raise_nofile_limit()

    status = 0
    if not args.no_compare:
        result = compare(args.rows, args.concurrency, args.latency, max(args.repeat, 1), args.seed)
        write_results("comparison", result)
        print(report(result), flush=True)
        if not all(c["ok"] for c in result["contenders"]):
            status = 2  # a contender did not do the work: the figures mean nothing
        elif args.strict and not all(r["pass"] for r in result["ratios"].values()):
            status = 1
    if not args.no_scale:
        from tests.bench import scale

        if not args.no_compare:
            print(flush=True)
        scale_args = [f"--latency={args.latency[0]},{args.latency[1]}"]
        scale_status = scale.main(scale_args + (["--strict"] if args.strict else []))
        status = status or scale_status
    return status


if __name__ == "__main__":
    sys.exit(main())
