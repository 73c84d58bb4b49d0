"""Measure duplicate submissions across repeated kill -9 cycles against the emulator.

    .venv/bin/python scripts/kill_cycles.py [--cycles 25] [--rows 300] [--concurrency 12]
        [--server-cap N]

Starts a real `wsbatch run` subprocess, SIGKILLs it at a random moment, and repeats;
then lets a last run finish and checks every row completed exactly once, and that the
duplicates the server billed are no more than the ledger recorded (lost answers and
submits in doubt at a kill).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from batch.emulator import EmulatorConfig, serve_in_thread

KEY = "kill-cycles-key"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=25)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--server-cap", type=int, default=None, help="tasks the emulator runs at once; more queue"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "WAVESPEED_API_KEY": KEY}
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve_in_thread(
            # A little server time per request keeps the send-to-record window open.
            EmulatorConfig(
                api_key=KEY,
                latency=(0.2, 1.0),
                seed=args.seed,
                response_delay=0.02,
                max_concurrent=args.server_cap,
            )
        ) as emu,
    ):
        root = Path(tmp)
        Image.new("RGB", (32, 32), (120, 30, 200)).save(root / "in.png")
        rows = [
            {"id": f"r{i}", "image": "in.png", "prompt": f"p{i}", "seed": i}
            for i in range(args.rows)
        ]
        manifest = root / "m.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = root / "out"
        cmd = [
            sys.executable,
            "-m",
            "batch",
            "run",
            str(manifest),
            "--base-url",
            emu.base_url,
            "--out",
            str(out),
            "--no-progress",
            "--concurrency",
            str(args.concurrency),
        ]
        kills = 0
        for _ in range(args.cycles):
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                proc.wait(timeout=rng.uniform(0.5, 2.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        final = subprocess.run(cmd, env=env, capture_output=True, text=True)
        events = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
        last = {e["row"]: e for e in events if e["event"] in ("submitted", "completed", "failed")}
        status = subprocess.run(
            [sys.executable, "-m", "batch", "status", str(out), "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
        info = json.loads(status.stdout)
        recorded_dupes = info["possible_duplicates"] + info["in_doubt"]
        completed = sum(1 for e in last.values() if e["event"] == "completed")
        ok_bytes = all(
            (out / e["outputs"][0]).read_bytes() == emu.output_bytes(e["prediction_id"])[0]
            for e in last.values()
            if e["event"] == "completed"
        )
        billed = emu.stats.submits_accepted
        duplicates = billed - args.rows
        print(
            f"kills: {kills}, concurrency: {args.concurrency}, final exit: {final.returncode}, "
            f"rows: {args.rows}, completed: {completed}, outputs byte-exact: {ok_bytes}, "
            f"ledger lines: {len(events)} (all parsed), billed: {billed}, "
            f"recorded with an id: {info['submits']}, duplicates billed: {duplicates}, "
            f"duplicates recorded: {recorded_dupes}, "
            f"spend recorded: ${info['spend_usd']:.3f} vs billed ${billed * 0.024:.3f}"
        )
        money_ok = duplicates <= recorded_dupes and info["submits"] <= billed
        return 0 if completed == args.rows and ok_bytes and money_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
