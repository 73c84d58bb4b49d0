"""The ``wsbatch`` command: argument parsing, progress display, exit codes.

Errors become a message and an exit code here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from batch import __version__
from batch.client import DEFAULT_BASE_URL, Client, check_base_url
from batch.errors import BatchError, UsageError
from batch.ledger import LEDGER_NAME, read_ledger, read_ledgers
from batch.lock import LOCK_NAME, OutDirLock
from batch.manifest import Manifest, load_manifest
from batch.outputs import existing_files
from batch.runner import Action, Progress, Runner, RunOptions, Summary, plan_row

DEFAULT_PRICE = 0.024
LOG_INTERVAL = 10.0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = _positive_int(text) if text != "0" else 0
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 itself; keep our prefix
        self.print_usage(sys.stderr)
        self.exit(2, f"wsbatch: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wsbatch", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"wsbatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run or resume a manifest")
    run.add_argument("manifest", type=Path)
    _add_plan_options(run)
    run.add_argument("--concurrency", type=_positive_int, help="tasks in flight (default 4)")
    run.add_argument("--rate", type=_positive_float, help="submissions per minute (default: none)")
    run.add_argument("--timeout", type=_positive_float, help="seconds per task (default 600)")
    run.add_argument("--retries", type=_non_negative_int, help="retries per request (default 5)")
    run.add_argument("--max-tasks", type=_positive_int, help="submit at most N tasks this run")
    run.add_argument("--budget", type=_positive_float, help="stop before spending more (USD)")
    run.add_argument("--grace", type=float, default=60.0, help="seconds to finish after Ctrl-C")
    run.add_argument(
        "--base-url", help=f"API base URL (env WAVESPEED_BASE_URL; {DEFAULT_BASE_URL})"
    )
    run.add_argument("--api-key-file", type=Path, help="read the key from this file")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    run.add_argument(
        "--poll-floor",
        type=_positive_float,
        default=float(os.environ.get("WSBATCH_POLL_FLOOR") or 0.5),
        help="minimum seconds between two polls of one task; the first poll comes after "
        "twice this until latencies are learned (default 0.5, env WSBATCH_POLL_FLOOR)",
    )

    validate = sub.add_parser("validate", help="check a manifest and print the plan; no network")
    validate.add_argument("manifest", type=Path)
    _add_plan_options(validate)

    status = sub.add_parser("status", help="state of a run, from its ledger")
    status.add_argument("out_dir", type=Path)
    status.add_argument("--json", action="store_true")

    emulator = sub.add_parser(
        "emulator", help="start the local WaveSpeed-compatible server", add_help=False
    )
    emulator.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="output folder (default output/<manifest stem>)")
    p.add_argument("--model", help="model id (overrides the manifest)")
    p.add_argument("--retry-failed", action="store_true", help="also redo permanent failures")
    p.add_argument("--price", type=_positive_float, help=f"USD per task (default {DEFAULT_PRICE})")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["emulator"]:
        from batch import emulator

        return emulator.main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "status":
            return _cmd_status(args)
        parser.error(f"unknown command {args.command}")
    except BatchError as exc:
        print(f"wsbatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("wsbatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"wsbatch: internal error: {type(exc).__name__}: {exc} "
                "(rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1
    return 2


# -- settings ----------------------------------------------------------------


def _setting(args: argparse.Namespace, manifest: Manifest, name: str, default: Any) -> Any:
    flag = getattr(args, name, None)
    if flag is not None:
        return flag
    return manifest.settings.get(name, default)


def _out_dir(args: argparse.Namespace, manifest: Manifest) -> Path:
    if args.out is not None:
        return Path(args.out)
    configured = manifest.settings.get("out")
    if configured:
        return (manifest.path.parent / str(configured)).resolve()
    return Path("output") / manifest.path.stem


def _api_key(args: argparse.Namespace) -> str:
    if args.api_key_file is not None:
        try:
            key: str = args.api_key_file.read_text().strip()
        except OSError as exc:
            reason = exc.strerror
            raise UsageError(f"cannot read --api-key-file {args.api_key_file}: {reason}") from None
        if not key:
            raise UsageError(f"--api-key-file {args.api_key_file} is empty")
        return key
    key = os.environ.get("WAVESPEED_API_KEY", "").strip()
    if not key:
        raise UsageError(
            "no API key: set WAVESPEED_API_KEY (or pass --api-key-file PATH); "
            "to try wsbatch without an account, run `make demo`"
        )
    return key


# -- validate ----------------------------------------------------------------


def _plan_counts(manifest: Manifest, out_dir: Path, retry_failed: bool) -> dict[str, int]:
    state, _ = read_ledger(out_dir / LEDGER_NAME)
    files = existing_files(out_dir)
    counts = {a.value: 0 for a in Action}
    for row in manifest.rows:
        counts[plan_row(row, state.rows.get(row.id), files, retry_failed).action.value] += 1
    return counts


def _plan_line(manifest: Manifest, counts: dict[str, int], price: float) -> str:
    total = len(manifest.rows)
    cost = counts["submit"] * price
    return (
        f"{total} rows: {counts['done']} done, {counts['poll']} to poll, "
        f"{counts['submit']} to submit, {counts['failed']} failed"
        f"; estimated cost ${cost:.2f} ({counts['submit']} x ${price:g})"
    )


def _cmd_validate(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest, model=args.model)
    out_dir = _out_dir(args, manifest)
    price = _setting(args, manifest, "price", DEFAULT_PRICE)
    counts = _plan_counts(manifest, out_dir, args.retry_failed)
    print(f"{manifest.path}: OK, model {manifest.model}, output to {out_dir}")
    print(_plan_line(manifest, counts, price))
    return 0


# -- run ---------------------------------------------------------------------


class _ProgressView:
    """A tqdm bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self.stream = stream
        self.enabled = enabled and total > 0
        self.bar: Any = None
        self._last = 0.0
        self._start = time.monotonic()
        self._base: int | None = None
        self._stopping_told = False
        if self.enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=stream, unit="row", dynamic_ncols=True, leave=True)

    def __call__(self, p: Progress) -> None:
        if p.stopping and not self._stopping_told:
            self._stopping_told = True
            self._write(
                f"wsbatch: stopping: no new submissions; finishing {p.in_flight} in flight "
                "(press Ctrl-C again to stop at once)"
            )
        if not self.enabled:
            return
        finished = p.completed + p.failed
        if self._base is None:
            self._base = finished
        now = time.monotonic()
        if self.bar is not None:
            if now - self._last >= 0.1 or finished == p.total:
                self._last = now
                self.bar.n = finished
                self.bar.set_postfix(failed=p.failed, in_flight=p.in_flight, refresh=False)
                self.bar.refresh()
            return
        if now - self._last >= LOG_INTERVAL or finished == p.total:
            self._last = now
            elapsed = now - self._start
            rate = (finished - self._base) / elapsed if elapsed > 0 else 0.0
            left = p.total - finished
            eta = f", ETA {left / rate:.0f} s" if rate > 0 and left else ""
            self._write(
                f"wsbatch: {finished}/{p.total} done ({p.failed} failed), "
                f"{p.in_flight} in flight, {rate:.2f} rows/s{eta}"
            )

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest, model=args.model)
    out_dir = _out_dir(args, manifest)
    base_url = check_base_url(
        args.base_url or os.environ.get("WAVESPEED_BASE_URL") or DEFAULT_BASE_URL
    )
    key = _api_key(args)
    options = RunOptions(
        out_dir=out_dir,
        concurrency=_setting(args, manifest, "concurrency", 4),
        rate=_setting(args, manifest, "rate", None),
        timeout=_setting(args, manifest, "timeout", 600.0),
        retries=_setting(args, manifest, "retries", 5),
        retry_failed=args.retry_failed,
        max_tasks=args.max_tasks,
        budget=_setting(args, manifest, "budget", None),
        price=_setting(args, manifest, "price", DEFAULT_PRICE),
        grace=args.grace,
        poll_floor=args.poll_floor,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with OutDirLock(out_dir):
        counts = _plan_counts(manifest, out_dir, args.retry_failed)
        print(f"wsbatch: {_plan_line(manifest, counts, options.price)}", file=sys.stderr)
        view = _ProgressView(len(manifest.rows), enabled=not args.no_progress)
        try:
            summary = asyncio.run(_run(manifest, base_url, key, options, view))
        finally:
            view.close()
    _print_summary(summary, args.json)
    return summary.exit_code


async def _run(
    manifest: Manifest, base_url: str, key: str, options: RunOptions, view: _ProgressView
) -> Summary:
    _raise_open_file_limit(options.concurrency)
    # Each worker holds at most one connection at a time; a few spare for keep-alive.
    connections = options.concurrency + 8
    async with Client(base_url, key, connections=connections) as client:
        runner = Runner(manifest, client, options, progress=view)
        return await runner.run()


def _raise_open_file_limit(concurrency: int) -> None:
    """Let --concurrency 1000 open its sockets: lift the soft fd limit toward the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = concurrency * 2 + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _print_summary(summary: Summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.as_dict(), sort_keys=True))
        return
    lines = [
        f"wsbatch: {summary.rows} rows: {summary.completed} completed, {summary.failed} failed, "
        f"{summary.in_flight} in flight, {summary.not_started} not started "
        f"({summary.submitted} submitted this run, {summary.already_done} already done) "
        f"in {summary.elapsed_s:.1f} s",
    ]
    extras = []
    if summary.retries:
        extras.append(f"{summary.retries} retries")
    if summary.rate_limited:
        extras.append(f"{summary.rate_limited} rate-limited")
    if summary.possible_duplicates:
        extras.append(f"{summary.possible_duplicates} possible duplicate submissions")
    if summary.uploads or summary.uploads_reused:
        extras.append(f"{summary.uploads} uploads ({summary.uploads_reused} reused)")
    if extras:
        lines.append("  " + ", ".join(extras))
    if summary.failures:
        lines.append("  failures by cause:")
        lines += [f"    {count} x {cause}" for cause, count in summary.failures.items()]
    if summary.stop_reason:
        lines.append(f"  stopped: {summary.stop_reason}")
    lines.append(f"  spend this run: ${summary.spend_usd:.2f}")
    lines.append(f"  outputs: {summary.out_dir}/")
    print("\n".join(lines))


# -- status ------------------------------------------------------------------


def _holder(out_dir: Path) -> str | None:
    """The pid of a live run holding ``out_dir``, if any."""
    path = out_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def status_of(out_dir: Path) -> dict[str, Any]:
    ledgers = sorted(out_dir.glob("ledger*.jsonl"))
    if not ledgers:
        raise UsageError(f"{out_dir} has no ledger: not a wsbatch output folder")
    state = read_ledgers(ledgers)
    counts = {"completed": 0, "failed": 0, "in_flight": 0}
    for row in state.rows.values():
        if row.event == "completed":
            counts["completed"] += 1
        elif row.event == "submitted" or (row.retryable and row.prediction_id):
            counts["in_flight"] += 1
        else:
            counts["failed"] += 1
    last_run = state.runs[-1] if state.runs else {}
    total = int(last_run.get("rows", len(state.rows)))
    holder = _holder(out_dir)
    return {
        "out_dir": str(out_dir),
        "running": holder is not None,
        "pid": int(holder) if holder and holder.isdigit() else None,
        "rows": total,
        **counts,
        "not_started": max(total - sum(counts.values()), 0),
        "submits": state.submits,
        "possible_duplicates": state.possible_duplicates,
        "runs": len(state.runs),
        "manifest": last_run.get("manifest"),
        "model": last_run.get("model"),
    }


def _cmd_status(args: argparse.Namespace) -> int:
    info = status_of(args.out_dir)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    running = f"running (pid {info['pid']})" if info["running"] else "not running"
    print(
        f"{info['out_dir']}: {running}; {info['rows']} rows: {info['completed']} completed, "
        f"{info['failed']} failed, {info['in_flight']} in flight, "
        f"{info['not_started']} not started; {info['submits']} submits over {info['runs']} runs"
    )
    return 0
