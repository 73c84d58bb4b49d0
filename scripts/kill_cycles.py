"""Measure duplicate submissions across repeated kill -9 cycles against the emulator.

    .venv/bin/python scripts/kill_cycles.py [--cycles 20] [--rows 300]

Starts a real `wsbatch run` subprocess, SIGKILLs it at a random moment, and repeats;
then lets a last run finish and checks every row completed exactly once.
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
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "WAVESPEED_API_KEY": KEY}
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve_in_thread(EmulatorConfig(api_key=KEY, latency=(0.2, 1.0), seed=args.seed)) as emu,
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
        last = {e["row"]: e for e in events if "row" in e}
        completed = sum(1 for e in last.values() if e["event"] == "completed")
        ok_bytes = all(
            (out / e["outputs"][0]).read_bytes() == emu.output_bytes(e["prediction_id"])[0]
            for e in last.values()
            if e["event"] == "completed"
        )
        duplicates = emu.stats.submits_accepted - args.rows
        print(
            f"kills: {kills}, final exit: {final.returncode}, rows: {args.rows}, "
            f"completed: {completed}, outputs byte-exact: {ok_bytes}, "
            f"ledger lines: {len(events)} (all parsed), submits accepted: "
            f"{emu.stats.submits_accepted}, duplicate submissions: {duplicates}"
        )
        return 0 if completed == args.rows and ok_bytes and duplicates <= kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
