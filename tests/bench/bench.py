"""``make bench``: wsbatch against the vendor's Python SDK in a thread pool, scenario by
scenario, then at scale.

Each contender runs as its own process against its own fresh emulator process started with
the scenario's flags and the same seed, doing the same work per row: the one input image is
uploaded once, then every row is submitted, polled until done, its output downloaded and
written, and a ledger line appended. CPU time and peak RSS come from ``wait4`` on the
contender's process; submits, 429s, polls and completion lag come from the emulator's own
records. One table shows every scenario x contender, a second one the verdicts against
issue 13's targets. Scenario e's rounds default to 3 (medians), the others' to 1.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.harness import (
    EmulatorProcess,
    child_env,
    close_polls,
    make_image,
    raise_nofile_limit,
    run_measured,
    submit_figures,
    table,
    timing,
    verdict,
    write_results,
    wsbatch_cmd,
)

BASELINE = Path(__file__).with_name("baseline.json")
# Issue 13's targets.
RATE_WALL_OVER_IDEAL = 1.2  # a, b: wall <= 1.2x ideal
RATE_429_SHARE = 0.10  # a, b: 429s <= 10 % of submits
FAULT_SLOWDOWN = 2.0  # c: wall < 2x the fault-free twin's
REAL_WALL_VS_SDK = 0.95  # d: wall <= 0.95x the SDK's
REAL_POLLS_VS_SDK = 0.4  # d: polls/task <= 0.4x the SDK's
REAL_LAG_VS_SDK = 1.0  # d: lag <= the SDK's
# e: the targets this bench had before issue 13 (wsbatch / SDK).
UNIFORM_RATIOS = {"wall_s": 1.05, "cpu_per_task_s": 0.5, "polls_per_task": 0.6}
# e: "no worse than before on any column": (key, label, format, absolute slack on top of
# --tolerance for figures near zero).
BASELINE_COLUMNS: tuple[tuple[str, str, str, float], ...] = (
    ("wall_s", "wall s", ".2f", 0.0),
    ("submit_429s", "429s", ".0f", 0.0),
    ("polls_per_task", "polls/task", ".2f", 0.0),
    ("close_polls", "polls <1 s apart", ".0f", 0.0),
    ("mean_lag_s", "lag s", ".3f", 0.02),
    ("cpu_per_task_s", "CPU s/task", ".4f", 0.0005),
    ("peak_rss_mb", "peak RSS MB", ".1f", 0.0),
)
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
    "rows_done",
    "submit_requests",
    "submit_429s",
    "share_429",
    "all_429s",
    "close_polls",
)

Build = Callable[[Path, int, str, Path], list[str]]


@dataclass(frozen=True)
class Scenario:
    """One emulator setup and one batch, run by every contender."""

    key: str
    title: str
    rows: int
    concurrency: int
    latency: tuple[float, float] = (1.0, 3.0)  # uniform, unless lognormal is set
    lognormal: tuple[float, float] | None = None  # (median s, sigma)
    rate: tuple[int, float] | None = None  # (submits, per fixed window of s)
    server_cap: int | None = None  # the server runs this many at once, queues the rest
    faults: tuple[str, ...] = ()  # more emulator flags
    rounds: int = 1
    twin: str | None = None  # key of the same scenario without faults

    def emulator_flags(self, seed: int) -> list[str]:
        flags = ["--seed", str(seed)]
        if self.lognormal is not None:
            flags += ["--latency-lognormal", f"{self.lognormal[0]:g},{self.lognormal[1]:g}"]
        if self.rate is not None:
            flags += ["--rate-limit", str(self.rate[0]), "--rate-window", f"{self.rate[1]:g}"]
        if self.server_cap is not None:
            flags += ["--max-concurrent", str(self.server_cap)]
        return flags + list(self.faults)

    def nominal_latency(self) -> float:
        """Mean task run time of the distribution drawn from."""
        if self.lognormal is not None:
            median, sigma = self.lognormal
            return median * math.exp(sigma * sigma / 2)
        return sum(self.latency) / 2

    def ideal(self, mean_latency: float) -> float:
        """Best wall time: every slot always busy, every submit at the rate limit, no lag."""
        slots = min(self.concurrency, self.server_cap or self.concurrency)
        best = self.rows / slots * mean_latency
        if self.rate is not None:
            limit, window = self.rate
            # The last rows go out at the start of the last window they need.
            best = max(best, (math.ceil(self.rows / limit) - 1) * window + mean_latency)
        return best

    def describe(self) -> str:
        if self.lognormal is not None:
            lat = f"lognormal median {self.lognormal[0]:g} s sigma {self.lognormal[1]:g}"
        else:
            lat = f"uniform {self.latency[0]:g}-{self.latency[1]:g} s"
        parts = [f"{self.rows} rows", f"--concurrency {self.concurrency}", f"latency {lat}"]
        if self.server_cap is not None:
            parts.append(f"server runs {self.server_cap} at once, queues the rest")
        return f"{self.key}: {self.title}; " + ", ".join(parts)


def scenarios(
    rows: int = 200, concurrency: int = 50, latency: tuple[float, float] = (1.0, 3.0)
) -> dict[str, Scenario]:
    """Issue 13's scenarios; ``rows``, ``concurrency`` and ``latency`` shape scenario e."""
    faults = ("--p-429", "0.12", "--send-retry-after", "--retry-after", "1", "--p-5xx", "0.03")
    fault_latency = (1.0, 3.0)
    all_ = [
        Scenario(
            "a",
            "limit 20 submits per 5 s window, 429 without Retry-After",
            rows=120,
            concurrency=20,
            latency=(0.5, 1.5),
            rate=(20, 5.0),
        ),
        Scenario(
            "b",
            "limit 10 submits per 6 s window, 429 without Retry-After",
            rows=60,
            concurrency=4,
            latency=(0.5, 1.5),
            rate=(10, 6.0),
        ),
        Scenario("c0", "c without faults", rows=60, concurrency=8, latency=fault_latency),
        Scenario(
            "c",
            "12% random 429 with Retry-After: 1, 3% random 5xx",
            rows=60,
            concurrency=8,
            latency=fault_latency,
            faults=faults,
            twin="c0",
        ),
        Scenario(
            "d",
            "realistic latency, server-side concurrency cap",
            rows=160,
            concurrency=20,
            lognormal=(6.0, 0.3),
            server_cap=20,
        ),
        Scenario(
            "e",
            "uniform latency (the bench before issue 13)",
            rows=rows,
            concurrency=concurrency,
            latency=latency,
            rounds=3,
        ),
    ]
    return {s.key: s for s in all_}


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


def wsbatch_build(manifest: Path, concurrency: int, base_url: str, out: Path) -> list[str]:
    flags = ["--base-url", base_url, "--out", str(out), "--concurrency", str(concurrency)]
    return [*wsbatch_cmd(), "run", str(manifest), *flags, "--no-progress", "--json"]


def sdk_build(manifest: Path, concurrency: int, base_url: str, out: Path) -> list[str]:
    worker = [sys.executable, "-m", "tests.bench.sdk_worker", str(manifest)]
    flags = ["--base-url", base_url, "--out", str(out), "--concurrency", str(concurrency)]
    return [*worker, *flags]


def run_contender(
    name: str,
    build: Build,
    scenario: Scenario,
    manifest: Path,
    out_dir: Path,
    *,
    seed: int,
    timeout: float,
) -> dict[str, Any]:
    """Run one contender against a fresh emulator; return its measured figures."""
    flags = scenario.emulator_flags(seed)
    with EmulatorProcess(scenario.latency, flags) as emu:
        result = run_measured(
            build(manifest, scenario.concurrency, emu.base_url, out_dir),
            env=child_env(),
            timeout=timeout,
            abort_if=emu.exited,
        )
        state = emu.state()
    t = timing(state)
    subs = submit_figures(state)
    files, completed = count_outputs(out_dir)
    rows = scenario.rows
    ideal = scenario.ideal(t["mean_latency_s"] or scenario.nominal_latency())
    done = min(files, completed)
    complete = result.returncode == 0 and files == rows and completed == rows
    timed_out = result.aborted is not None and result.aborted.startswith("timed out")
    return {
        "contender": name,
        "seed": seed,
        "ok": complete,
        # Not done, and not because the bench stopped it: a crash or a lost emulator.
        "failed": not complete and not timed_out,
        "timed_out": timed_out,
        "timeout_s": timeout,
        "exit_code": result.returncode,
        "outputs": files,
        "ledger_completed": completed,
        "rows_done": done,
        "tasks_submitted": int(t["tasks"]),
        "wall_s": result.wall_s,
        "ideal_s": ideal,
        "wall_over_ideal": result.wall_s / ideal if ideal else math.nan,
        "cpu_s": result.cpu_s,
        "cpu_per_task_s": result.cpu_s / max(done, 1),
        "polls_per_task": t["polls_per_task"],
        "close_polls": close_polls(state),
        "mean_latency_s": t["mean_latency_s"],
        "mean_lag_s": t["mean_lag_s"],
        "max_lag_s": t["max_lag_s"],
        "peak_rss_mb": result.maxrss_mb,
        "emulator_cpu_s": emu.cpu_s,
        **subs,
        "share_429": subs["submit_429s"] / max(subs["submit_requests"], 1),
        "aborted": result.aborted,
        "stderr_tail": "" if complete else result.stderr[-800:] or result.stdout[-400:],
    }


def _median(values: Sequence[Any]) -> Any:
    if any(v is None for v in values):
        return None
    return statistics.median(values)


def summarize(name: str, scenario: Scenario, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds, plus every round as measured."""
    merged: dict[str, Any] = {
        "contender": name,
        "scenario": scenario.key,
        "rows": scenario.rows,
        "concurrency": scenario.concurrency,
    }
    merged.update({k: _median([r[k] for r in runs]) for k in MEDIAN_KEYS})
    merged["ok"] = all(r["ok"] for r in runs)
    merged["failed"] = any(r["failed"] for r in runs)
    merged["timed_out"] = any(r["timed_out"] for r in runs)
    merged["timeout_s"] = max(r["timeout_s"] for r in runs)
    merged["runs"] = runs
    return merged


def run_scenarios(
    chosen: list[Scenario],
    *,
    repeat: int | None,
    seed: int,
    cap_factor: float,
    contenders: list[tuple[str, Build]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every chosen scenario, every contender, ``repeat`` (or the scenario's) rounds."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="wsbatch-bench-") as tmp:
        work = Path(tmp)
        image = make_image(work / "images" / "input.png", (180, 90, 40))
        for scenario in chosen:
            manifest = write_manifest(work / f"bench-{scenario.key}.csv", scenario.rows, image)
            rounds = max(repeat or scenario.rounds, 1)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
            for n in range(rounds):
                # Alternate who goes first so drift in the machine's load favours neither.
                order = contenders if n % 2 == 0 else contenders[::-1]
                for name, build in order:
                    timeout = max(60.0, cap_factor * scenario.ideal(scenario.nominal_latency()))
                    twin = results.get(scenario.twin or "", {}).get(name)
                    if twin is not None:
                        timeout = max(timeout, cap_factor * twin["wall_s"])
                    tag = name.split()[0].lower()
                    out = work / f"out-{scenario.key}-{n}-{tag}"
                    run = run_contender(
                        name, build, scenario, manifest, out, seed=seed + n, timeout=timeout
                    )
                    runs[name].append(run)
                    state = "done" if run["ok"] else f"{run['rows_done']}/{scenario.rows} rows"
                    print(
                        f"  [{scenario.key} round {n + 1}/{rounds}] {name}: "
                        f"{run['wall_s']:.1f} s, {state}",
                        file=sys.stderr,
                        flush=True,
                    )
            results[scenario.key] = {name: summarize(name, scenario, r) for name, r in runs.items()}
    return results


def _f(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def _wall(c: dict[str, Any]) -> str:
    # A run the bench stopped at its cap: the wall time is a lower bound.
    return (">" if c["timed_out"] else "") + f"{c['wall_s']:.1f}"


def results_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    headers = [
        "scenario",
        "contender",
        "rows done",
        "wall s",
        "ideal s",
        "wall/ideal",
        "429s",
        "429s/submits",
        "polls/task",
        "polls <1 s apart",
        "lag s",
        "CPU s/task",
        "peak RSS MB",
    ]
    body = []
    for key, by_name in results.items():
        for name, c in by_name.items():
            body.append(
                [
                    key,
                    name,
                    f"{int(c['rows_done'])}/{c['rows']}",
                    _wall(c),
                    f"{c['ideal_s']:.1f}",
                    (">" if c["timed_out"] else "") + f"{c['wall_over_ideal']:.2f}",
                    str(int(c["submit_429s"])),
                    f"{100 * c['share_429']:.1f}%",
                    f"{c['polls_per_task']:.2f}",
                    _f(c["close_polls"], ".0f"),
                    _f(c["mean_lag_s"], ".2f"),
                    f"{c['cpu_per_task_s']:.4f}",
                    f"{c['peak_rss_mb']:.1f}",
                ]
            )
    return table(headers, body)


@dataclass
class Check:
    scenario: str
    what: str
    ours: str
    sdk: str
    target: str
    passed: bool | None  # None: cannot be judged (no figure, no baseline)


def _sdk_of(by_name: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    return next((c for name, c in by_name.items() if name != "wsbatch"), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return a / b if b else math.inf


def checks(
    results: dict[str, dict[str, dict[str, Any]]],
    baseline: dict[str, Any] | None,
    tolerance: float,
) -> list[Check]:
    """Issue 13's targets, judged on wsbatch's figures (the SDK's shown beside them)."""
    out: list[Check] = []
    for key in ("a", "b"):
        if key not in results:
            continue
        ours, sdk_ab = results[key]["wsbatch"], _sdk_of(results[key]) or {}
        done = ours["ok"]
        out.append(
            Check(
                key,
                "wall / ideal",
                (">" if ours["timed_out"] else "") + f"{ours['wall_over_ideal']:.2f}x",
                f"{sdk_ab.get('wall_over_ideal', math.nan):.2f}x",
                f"<= {RATE_WALL_OVER_IDEAL:g}x, all rows",
                done and ours["wall_over_ideal"] <= RATE_WALL_OVER_IDEAL,
            )
        )
        out.append(
            Check(
                key,
                "429s / submits",
                f"{100 * ours['share_429']:.1f}%",
                f"{100 * sdk_ab.get('share_429', math.nan):.1f}%",
                f"<= {100 * RATE_429_SHARE:g}%",
                ours["share_429"] <= RATE_429_SHARE,
            )
        )
    if "c" in results and "c0" in results:
        rows: list[tuple[str, float | None, bool]] = []
        for name, c in results["c"].items():
            twin = results["c0"].get(name)
            rows.append((name, _ratio(c["wall_s"], twin["wall_s"] if twin else None), c["ok"]))
        ours_r = next((r for n, r, _ in rows if n == "wsbatch"), None)
        sdk_r = next((r for n, r, _ in rows if n != "wsbatch"), None)
        ok_c = results["c"]["wsbatch"]["ok"]
        prefix = ">" if results["c"]["wsbatch"]["timed_out"] else ""
        out.append(
            Check(
                "c",
                "wall / wall of c0 (no faults)",
                prefix + _f(ours_r, ".2f") + "x",
                _f(sdk_r, ".2f") + "x",
                f"< {FAULT_SLOWDOWN:g}x, all rows",
                None if ours_r is None else ok_c and ours_r < FAULT_SLOWDOWN,
            )
        )
    if "d" in results:
        ours, sdk = results["d"]["wsbatch"], _sdk_of(results["d"])
        if sdk is not None:
            for key, what, limit in (
                ("wall_s", "wall vs SDK", REAL_WALL_VS_SDK),
                ("polls_per_task", "polls/task vs SDK", REAL_POLLS_VS_SDK),
                ("mean_lag_s", "lag vs SDK", REAL_LAG_VS_SDK),
            ):
                r = _ratio(ours[key], sdk[key])
                passed = None if r is None else ours["ok"] and r <= limit
                out.append(Check("d", what, _f(r, ".2f") + "x", "", f"<= {limit:g}x", passed))
        close = ours["close_polls"]
        out.append(
            Check(
                "d",
                "polls of one task <1 s apart",
                _f(close, ".0f"),
                _f((sdk or {}).get("close_polls"), ".0f"),
                "0",
                None if close is None else close == 0,
            )
        )
    if "e" in results:
        ours, sdk = results["e"]["wsbatch"], _sdk_of(results["e"])
        before = (baseline or {}).get("e", {}).get("wsbatch")
        for key, label, fmt, slack in BASELINE_COLUMNS:
            now, then = ours.get(key), (before or {}).get(key)
            sdk_now = _f((sdk or {}).get(key), fmt)
            if now is None or then is None:
                why = "no baseline" if before is None else "n/a"
                out.append(Check("e", f"{label} vs before", _f(now, fmt), sdk_now, why, None))
                continue
            limit = then * (1 + tolerance) + slack
            out.append(
                Check(
                    "e",
                    f"{label} vs before",
                    format(now, fmt),
                    sdk_now,
                    f"<= {limit:{fmt}} (before {then:{fmt}})",
                    ours["ok"] and now <= limit,
                )
            )
        if sdk is not None:
            for key, limit in UNIFORM_RATIOS.items():
                r = _ratio(ours[key], sdk[key])
                label = {"wall_s": "wall", "cpu_per_task_s": "CPU/task"}.get(key, "polls/task")
                out.append(
                    Check(
                        "e",
                        f"{label} vs SDK (earlier target)",
                        _f(r, ".2f") + "x",
                        "",
                        f"<= {limit:g}x",
                        None if r is None else r <= limit,
                    )
                )
    return out


def checks_table(found: list[Check]) -> str:
    body = [
        [
            c.scenario,
            c.what,
            c.ours,
            c.sdk,
            c.target,
            "n/a" if c.passed is None else verdict(c.passed),
        ]
        for c in found
    ]
    return table(["scenario", "check", "wsbatch", "SDK", "target", "result"], body)


def report(
    result: dict[str, Any], chosen: list[Scenario], found: list[Check], tolerance: float
) -> str:
    runs = result["scenarios"]
    rounds = {key: next(iter(by.values()))["runs"] for key, by in runs.items()}
    lines = [
        f"wsbatch vs the vendor SDK {result['sdk_version']} in a thread pool, each against its "
        "own emulator (same seed); rounds: "
        + ", ".join(f"{k} {len(r)}" for k, r in rounds.items())
        + " (medians)",
    ]
    lines += [f"  {s.describe()}" for s in chosen]
    lines += [
        "  ideal = rows / min(concurrency, server cap) x mean latency; with a rate limit, at "
        "least (windows needed - 1) x window + mean latency. '>' = stopped at the cap.",
        "",
        results_table(runs),
        "",
        f"Targets (issue 13; e: no worse than tests/bench/baseline.json + {tolerance:.0%})",
        checks_table(found),
    ]
    for by_name in runs.values():
        for c in by_name.values():
            for run in c["runs"]:
                if not run["ok"]:
                    why = run["aborted"] or run["stderr_tail"].strip()
                    lines.append(
                        f"{c['scenario']}: {c['contender']} (seed {run['seed']}) did "
                        f"{run['rows_done']}/{c['rows']} rows: {why}"
                    )
    if any(
        c["close_polls"] is None for by in runs.values() for c in by.values()
    ):  # pragma: no cover - depends on the emulator
        lines.append(
            "polls <1 s apart: n/a, the emulator's /_emulator/state has no per-poll times "
            "(stats.poll_monos_by_id); see tests/bench/README.md"
        )
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


def _choose(text: str, known: dict[str, Scenario]) -> list[Scenario]:
    keys = {k.strip() for k in text.split(",") if k.strip()}
    unknown = keys - set(known)
    if unknown:
        raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(known)}")
    for key in list(keys):
        twin = known[key].twin
        if twin is not None:
            keys.add(twin)  # c is judged against its fault-free twin
    return [s for k, s in known.items() if k in keys]


def load_baseline(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_baseline(path: Path, result: dict[str, Any]) -> None:
    """Each scenario's medians per contender (not the rounds) as the next runs' "before"."""
    keep: dict[str, Any] = {
        "measured_at": result["measured_at"],
        "sdk_version": result["sdk_version"],
    }
    for key, by_name in result["scenarios"].items():
        keep[key] = {
            name: {k: v for k, v in c.items() if k != "runs"} for name, c in by_name.items()
        }
    old = load_baseline(path) or {}
    old.update(keep)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenarios",
        default="a,b,c,d,e",
        help="comma-separated subset of a,b,c,c0,d,e (c brings c0, its fault-free twin)",
    )
    parser.add_argument("--rows", type=int, default=200, help="scenario e: rows (200)")
    parser.add_argument("--concurrency", type=int, default=50, help="scenario e: in flight (50)")
    parser.add_argument("--latency", type=_latency, default=(1.0, 3.0), metavar="LO,HI")
    parser.add_argument(
        "--repeat", type=int, default=None, help="rounds of every scenario (default: e 3, else 1)"
    )
    parser.add_argument("--seed", type=int, default=1, help="emulator seed of the first round")
    parser.add_argument(
        "--cap-factor",
        type=float,
        default=2.5,
        help="stop a contender after this x the scenario's ideal (c: x its c0 wall), min 60 s",
    )
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="scenario e's before")
    parser.add_argument(
        "--save-baseline", action="store_true", help="write these figures to --baseline"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.10, help="e: allowed excess over before (0.10)"
    )
    parser.add_argument("--no-scale", action="store_true", help="skip the scale checks")
    parser.add_argument("--no-compare", action="store_true", help="skip the SDK comparison")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    known = scenarios(args.rows, args.concurrency, args.latency)
    chosen = _choose(args.scenarios, known)

    status = 0
    if not args.no_compare and chosen:
        started = time.monotonic()
        sdk_version = ensure_sdk()
        contenders: list[tuple[str, Build]] = [
            ("wsbatch", wsbatch_build),
            (f"SDK {sdk_version}", sdk_build),
        ]
        baseline = load_baseline(args.baseline)
        runs = run_scenarios(
            chosen,
            repeat=args.repeat,
            seed=args.seed,
            cap_factor=args.cap_factor,
            contenders=contenders,
        )
        result: dict[str, Any] = {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sdk_version": sdk_version,
            "seed": args.seed,
            "scenarios": runs,
        }
        found = checks(runs, baseline, args.tolerance)
        result["checks"] = [vars(c) for c in found]
        result["elapsed_s"] = time.monotonic() - started
        write_results("comparison", result)
        if args.save_baseline:
            save_baseline(args.baseline, result)
        print(report(result, chosen, found, args.tolerance), flush=True)
        if any(c["failed"] for by in runs.values() for c in by.values()):
            status = 2  # a contender crashed or its emulator died: those figures mean nothing
        elif args.strict and any(c.passed is False for c in found):
            status = 1
    if not args.no_scale:
        from tests.bench import scale

        if not args.no_compare:
            print(flush=True)
        scale_status = scale.main(["--strict"] if args.strict else [])
        status = status or scale_status
    return status


if __name__ == "__main__":
    sys.exit(main())
