"""Shared pieces of the benchmarks: the emulator as a process, measured child processes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "tests" / "launch.py"
API_KEY = "bench-key-not-secret"
RESULTS_DIR = ROOT / "output" / "bench"
# Settings that would change wsbatch's defaults (tests set them); the bench uses the defaults.
_SCRUBBED_ENV = ("WAVESPEED_BASE_URL", "WSBATCH_POLL_FLOOR", "WSBATCH_ZERO_BACKOFF")
_LISTENING = re.compile(r"listening on (http://\S+) \(cdn (http://\S+)\)")


def wsbatch_cmd() -> list[str]:
    """The ``wsbatch`` console script next to this interpreter, else ``python -m batch``."""
    script = Path(sys.executable).with_name("wsbatch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "batch"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["WAVESPEED_API_KEY"] = API_KEY
    env["PYTHONUNBUFFERED"] = "1"
    return env


def raise_nofile_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def nofile_limiter(soft: int) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child a soft open-files limit of ``soft`` (capped by hard)."""

    def apply() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))

    return apply


def make_image(path: Path, color: tuple[int, int, int], size: int = 64) -> Path:
    """A small solid image with a stripe (format from the suffix)."""
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), color)
    img.paste((255 - color[0], 255 - color[1], 255 - color[2]), (0, size // 3, size, size // 2))
    img.save(path, fmt)
    return path


@dataclass
class Measured:
    """A finished child process: exit code, wall time and its own resource usage."""

    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    stdout: str
    stderr: str
    aborted: str | None = None

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600.0,
    preexec_fn: Callable[[], None] | None = None,
    abort_if: Callable[[], str | None] | None = None,
    own_rss: bool = False,
) -> Measured:
    """Run ``cmd`` to completion; CPU and peak RSS come from ``wait4`` on exactly that child.

    ``own_rss`` starts it through a small launcher (``tests/launch.py``): a child forked
    from this process, once grown by the figures it parsed, reports this one's peak RSS
    as its own. Off for the SDK's thread pool, which ran several times slower now and
    then under the launcher (not understood; noted in the README).

    The child is killed after ``timeout`` seconds, or as soon as ``abort_if`` returns a
    reason (checked every half second), e.g. because the server it talks to died.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".json") as usage_file,
    ):
        start = time.perf_counter()
        launch = [sys.executable, str(LAUNCHER), usage_file.name] if own_rss else []
        proc = subprocess.Popen(
            [*launch, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env if env is not None else child_env(),
            cwd=cwd,
            preexec_fn=preexec_fn,
            process_group=0,  # a group of its own to kill, in our session (and its CPU share)
        )
        reason: list[str] = []
        finished = threading.Event()

        def watchdog() -> None:
            deadline = start + timeout
            while not finished.wait(0.5):
                why = abort_if() if abort_if is not None else None
                if why is None and time.perf_counter() > deadline:
                    why = f"timed out after {timeout:g} s"
                if why is not None:
                    reason.append(why)
                    # The launcher and the command (os.killpg, not proc.kill: Popen
                    # would reap the child behind wait4's back).
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    return

        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            finished.set()
            guard.join()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        try:  # the command's own figures, as the launcher had them from wait4
            own = json.loads(Path(usage_file.name).read_text())
            user_s, sys_s, maxrss_kb = own["user_s"], own["sys_s"], own["maxrss_kb"]
        except (ValueError, KeyError):  # killed before it could write them
            user_s, sys_s, maxrss_kb = usage.ru_utime, usage.ru_stime, usage.ru_maxrss
        return Measured(
            returncode=proc.returncode,
            wall_s=wall,
            user_s=user_s,
            sys_s=sys_s,
            maxrss_mb=maxrss_kb / 1024.0,  # kilobytes on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            aborted=reason[0] if reason else None,
        )


class EmulatorProcess:
    """``wsbatch emulator`` in its own process, with its timing state read over HTTP."""

    def __init__(self, latency: tuple[float, float], extra: Sequence[str] = ()) -> None:
        # ``extra`` may override the latency (``--latency-lognormal``) and add limits or faults.
        self.latency = latency
        self.extra = list(extra)
        self.base_url = ""
        self.cdn_url = ""
        self.cpu_s = 0.0
        self.maxrss_mb = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaped: tuple[int, resource.struct_rusage] | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()

    def __enter__(self) -> EmulatorProcess:
        lo, hi = self.latency
        cmd = [*wsbatch_cmd(), "emulator", "--port", "0", "--latency", f"{lo},{hi}", *self.extra]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env(),
        )
        try:
            line = self._first_line(timeout=30.0)
        except BaseException:
            self.stop()
            raise
        match = _LISTENING.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r} {self._stderr_text()}")
        self.base_url, self.cdn_url = match.group(1), match.group(2)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _first_line(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"emulator gave no address in {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"emulator exited: {self._stderr_text()}")
                buf += chunk
        return buf.decode(errors="replace")

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def state(self) -> dict[str, Any]:
        """``GET /_emulator/state``: counters and per-prediction timings."""
        request = urllib.request.Request(
            f"{self.base_url}/_emulator/state", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            payload: dict[str, Any] = json.load(resp)
        return dict(payload["data"])

    def exited(self) -> str | None:
        """None while the emulator runs; else how it ended and the tail of its stderr."""
        proc = self._proc
        if proc is None:
            return "stopped"
        if self._reaped is None:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if not pid:
                return None
            self._reaped = (status, usage)
        code = os.waitstatus_to_exitcode(self._reaped[0])
        return f"emulator exited ({code}): {self._stderr_text().strip()[-1500:]}"

    def stop(self) -> None:
        """Stop the emulator (SIGTERM, then SIGKILL) and keep its CPU time and peak RSS."""
        proc = self._proc
        if proc is None:
            return
        # os.kill, not Popen's methods: those reap the child, and wait4 needs to.
        if self.exited() is None:
            os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10.0
            while self.exited() is None:
                if time.monotonic() > deadline:
                    os.kill(proc.pid, signal.SIGKILL)
                    self._reaped = os.wait4(proc.pid, 0)[1:]
                    break
                time.sleep(0.02)
        assert self._reaped is not None
        status, usage = self._reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
        self._proc = None
        if proc.stdout is not None:
            proc.stdout.close()
        self._stderr.close()
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.maxrss_mb = usage.ru_maxrss / 1024.0


def timing(state: dict[str, Any]) -> dict[str, float]:
    """Mean task latency, mean completion lag and polls per task from an emulator state."""
    preds = state["predictions"]
    stats = state["stats"]
    latencies = [p["finish_mono"] - p["start_mono"] for p in preds]
    lags = [
        p["first_completed_poll_mono"] - p["finish_mono"]
        for p in preds
        if p["first_completed_poll_mono"] is not None
    ]
    tasks = max(int(stats["submits_accepted"]), 1)
    return {
        "tasks": float(stats["submits_accepted"]),
        "mean_latency_s": sum(latencies) / len(latencies) if latencies else 0.0,
        "mean_lag_s": sum(lags) / len(lags) if lags else float("nan"),
        "max_lag_s": max(lags) if lags else float("nan"),
        "polls": float(stats["polls"]),
        "polls_per_task": stats["polls"] / tasks,
    }


# Submit faults the emulator raises before creating anything (``_inject``): the request is
# not counted in submits_accepted or submits_rejected, only in ``faults``.
_PRE_CREATION_FAULTS = ("429", "500", "502", "503", "drop", "401", "403", "404")


def poll_times(state: dict[str, Any]) -> dict[str, list[float]] | None:
    """Every result poll's arrival time (monotonic s) per prediction id, if the emulator
    records them: ``stats.poll_monos_by_id``, or ``poll_monos`` on each prediction."""
    by_id = state["stats"].get("poll_monos_by_id")
    if isinstance(by_id, dict):
        return {str(k): [float(t) for t in v] for k, v in by_id.items()}
    found = {p["id"]: p["poll_monos"] for p in state["predictions"] if "poll_monos" in p}
    return {k: [float(t) for t in v] for k, v in found.items()} if found else None


def close_polls(state: dict[str, Any], gap_s: float = 1.0) -> int | None:
    """Polls of one task that came under ``gap_s`` after that task's previous poll
    (None when the emulator does not record poll times)."""
    times = poll_times(state)
    if times is None:
        return None
    close = 0
    for stamps in times.values():
        ordered = sorted(stamps)
        close += sum(1 for a, b in itertools.pairwise(ordered) if b - a < gap_s)
    return close


def submit_figures(state: dict[str, Any]) -> dict[str, int]:
    """Submit requests the emulator received, and how many of them it answered 429."""
    stats = state["stats"]
    faults: dict[str, int] = stats.get("faults", {})
    early = sum(int(faults.get(f"submit:{f}", 0)) for f in _PRE_CREATION_FAULTS)
    submits = int(stats["submits_accepted"]) + int(stats["submits_rejected"]) + early
    # Window-limit refusals (rate_limited) plus injected random 429s on submit.
    refused = int(stats.get("rate_limited", 0)) + int(faults.get("submit:429", 0))
    all_429 = int(stats.get("rate_limited", 0)) + sum(
        int(n) for key, n in faults.items() if key.endswith(":429")
    )
    return {"submit_requests": submits, "submit_429s": refused, "all_429s": all_429}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Merge ``data`` under ``name`` into ``output/bench/results.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "results.json"
    try:
        current = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        current = {}
    if not isinstance(current, dict):
        current = {}
    current[name] = data
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    return path


_NUMBER = re.compile(r"[<>]?-?[0-9][0-9.,]*[x%]?(/[0-9]+)?")
# Cells that say "no figure"; they do not make a numeric column textual.
_BLANKS = frozenset({"", "-", "n/a"})


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table: numeric columns right-aligned, text left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    numeric = [
        all(_NUMBER.fullmatch(r[i]) for r in rows if r[i] not in _BLANKS)
        and any(r[i] not in _BLANKS for r in rows)
        for i in range(len(headers))
    ]

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in rows)])
