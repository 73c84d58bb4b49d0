"""The ``wsbatch`` command: argument parsing, progress display, exit codes.

Errors become a message and an exit code here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import gc
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from batch import __version__
from batch.account import Estimate, describe, shortfall
from batch.bulk import freeze_bulk_loads
from batch.errors import BatchError, UsageError
from batch.folder import default_out_dir
from batch.heap import one_malloc_arena
from batch.ledger import LEDGER_NAME, ledger_name, ledger_paths, read_ledgers
from batch.lock import HOLDER_PREFIX, LOCK_NAME, holders
from batch.manifest import (
    OUTPUT_FORMATS,
    SEED_MAX,
    SEED_MIN,
    Manifest,
    load_manifest,
    manifest_from_args,
)
from batch.plan import estimate_offline
from batch.redact import redact_text
from batch.state import RowStatus
from batch.urls import DEFAULT_BASE_URL, resolve_base_url

if TYPE_CHECKING:
    from batch.runner import Progress, Summary

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


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers") from None
    if not seeds or not all(SEED_MIN <= s <= SEED_MAX for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be in {SEED_MIN}..{SEED_MAX}")
    return seeds


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 itself; keep our prefix
        self.print_usage(sys.stderr)
        self.exit(2, f"wsbatch: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wsbatch", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"wsbatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run or resume a manifest (or --images with --prompt)")
    run.add_argument("manifest", type=Path, nargs="?")
    _add_plan_options(run)
    run.add_argument("--concurrency", type=_positive_int, help="tasks in flight (default 4)")
    run.add_argument(
        "--queue-ahead",
        type=_non_negative_int,
        help="tasks kept queued on the server beyond --concurrency once it queues them "
        "(default: a quarter of it; 0: never more than --concurrency)",
    )
    run.add_argument("--rate", type=_positive_float, help="submissions per minute (default: none)")
    run.add_argument("--timeout", type=_positive_float, help="seconds per task (default 600)")
    run.add_argument("--retries", type=_non_negative_int, help="retries per request (default 5)")
    run.add_argument("--max-tasks", type=_positive_int, help="submit at most N tasks this run")
    run.add_argument("--budget", type=_positive_float, help="stop before spending more (USD)")
    run.add_argument(
        "--grace", type=_non_negative_float, default=60.0, help="seconds to finish after Ctrl-C"
    )
    run.add_argument(
        "--base-url", help=f"API base URL (env WAVESPEED_BASE_URL; {DEFAULT_BASE_URL})"
    )
    run.add_argument("--api-key-file", type=Path, help="read the key from this file")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    run.add_argument(
        "--quiet", action="store_true", help="for cron: print only problems and the JSON summary"
    )
    run.add_argument("--shard", help="run only shard K/N of the rows (K from 0), or 'auto'")
    run.add_argument("--shards", type=_positive_int, help="number of shards for --shard auto")
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    run.add_argument(
        "--log-file",
        help="write a JSON-lines log of retries, 429s and waits: why a night was slow",
    )
    run.add_argument("--verbose", action="store_true", help="the same JSON-lines log on stderr")
    run.add_argument(
        "--poll-floor",
        type=_positive_float,
        default=None,
        help="minimum seconds between two polls of one task; the first poll comes after "
        "twice this until latencies are learned (default 1, as the vendor asks; "
        "env WSBATCH_POLL_FLOOR)",
    )

    validate = sub.add_parser(
        "validate", help="check a manifest and print the plan; no network unless --online"
    )
    validate.add_argument("manifest", type=Path, nargs="?")
    _add_plan_options(validate)
    validate.add_argument(
        "--online", action="store_true", help="also ask the API for the live price and balance"
    )
    validate.add_argument("--base-url", help="API base URL, with --online")
    validate.add_argument("--api-key-file", type=Path, help="read the key from this file")

    report = sub.add_parser(
        "report",
        help="write OUT_DIR/report.html from the ledger (a grid for a side-by-side root)",
    )
    report.add_argument("out_dir", type=Path)
    report.add_argument(
        "--self-contained",
        action="store_true",
        help="embed the thumbnails: one file that can be mailed",
    )

    export = sub.add_parser("export", help="write the completed pairs as a dataset")
    export.add_argument("out_dir", type=Path)
    export.add_argument("--format", choices=("parquet", "webdataset"), required=True)
    export.add_argument("--to", help="a folder or an fsspec URL such as s3://bucket/prefix")
    export.add_argument("--shard-size", type=_positive_int, default=1000, help="rows per file")
    export.add_argument(
        "--skip-nsfw", action="store_true", help="leave out the outputs the API flagged NSFW"
    )

    audit = sub.add_parser(
        "audit", help="compare the ledgers with what the account billed; never submits"
    )
    audit.add_argument("out_dir", type=Path)
    audit.add_argument("--json", action="store_true")
    audit.add_argument(
        "--adopt",
        action="store_true",
        help="settle submits left in doubt: adopt tasks whose listed inputs match in full",
    )
    audit.add_argument("--base-url", help="API base URL (env WAVESPEED_BASE_URL)")
    audit.add_argument("--api-key-file", type=Path, help="read the key from this file")

    models_cmd = sub.add_parser("models", help="list models, or show one's fields")
    models_cmd.add_argument("name", nargs="?", help="a model id, e.g. bytedance/seedream-v4/edit")
    models_cmd.add_argument(
        "--refresh", action="store_true", help="fetch the catalogue from the API and cache it"
    )
    models_cmd.add_argument("--base-url", help="API base URL, with --refresh")
    models_cmd.add_argument("--api-key-file", type=Path, help="read the key from this file")

    repair = sub.add_parser("repair", help="list damaged ledger lines; --drop moves them out")
    repair.add_argument("out_dir", type=Path)
    repair.add_argument(
        "--drop",
        action="store_true",
        help="move damaged lines to ledger.damaged.jsonl so held rows can run again",
    )

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
    p.add_argument("--images", help="no manifest: a folder or glob of input images")
    p.add_argument("--prompt", action="append", help="with --images: a prompt (repeatable)")
    p.add_argument("--seeds", type=_seed_list, help="with --images: seeds, e.g. 1,2,3")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, help="with --images (default jpeg)")
    p.add_argument(
        "--model",
        action="append",
        help="model id (overrides the manifest); repeat it to run every row on each model, "
        "into a subfolder per model",
    )
    p.add_argument("--retry-failed", action="store_true", help="also redo permanent failures")
    p.add_argument("--price", type=_positive_float, help=f"USD per task (default {DEFAULT_PRICE})")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # The emulator parses its own flags; global ones may come before its name.
    first = 0
    while args_list[first : first + 1] == ["--debug"]:
        first += 1
    if args_list[first : first + 1] == ["emulator"]:
        from batch import emulator

        return emulator.main(args_list[first + 1 :])
    parser = build_parser()
    args = parser.parse_args(args_list)
    args.argv = args_list  # what "run the same command again" means
    if argv is None:  # the process is this one command (not a test, not a caller's)
        freeze_bulk_loads()
        one_malloc_arena()
        _exit_now(_command(parser, args))
    return _command(parser, args)


def _exit_now(code: int) -> NoReturn:
    """End the command's process without freeing its objects one by one: after a
    million-row resume that takes most of a second. Everything that must reach the disk
    (ledger, outputs, metadata, the lock's release) is written and closed before a
    command returns; the streams are flushed here."""
    logging.shutdown()
    try:
        sys.stdout.flush()
    except OSError as exc:
        code = _output_refused(exc) or code
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


def _output_refused(exc: OSError) -> int:
    """Standard output could not be written: say so once (unless its reader went away,
    as with `| head`), and let nothing try to write it again. Returns the exit code."""
    if not isinstance(exc, BrokenPipeError):
        print(f"wsbatch: error: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 1


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "models":
            return _cmd_models(args)
        if args.command == "repair":
            return _cmd_repair(args)
        if args.command == "audit":
            return _cmd_audit(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "export":
            return _cmd_export(args)
        parser.error(f"unknown command {args.command}")
    except BatchError as exc:
        print(f"wsbatch: error: {redact_text(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("wsbatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:  # what we printed had no reader left
        return _output_refused(exc)
    except OSError as exc:
        if exc.errno is None:  # no refusal of the machine's (a timeout that got through)
            return _internal_error(exc, args.debug)
        try:
            sys.stdout.flush()  # was it standard output that refused?
        except OSError as refused:
            return _output_refused(refused)
        # The machine refused a read or a write (a full disk, a folder gone): no bug of
        # ours, and what it needs is the path and the reason.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"wsbatch: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:
        return _internal_error(exc, args.debug)
    return 2


def _internal_error(exc: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    else:
        print(
            f"wsbatch: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
    return 1


# -- settings ----------------------------------------------------------------


def _setting(args: argparse.Namespace, manifest: Manifest, name: str, default: Any) -> Any:
    flag = getattr(args, name, None)
    if flag is not None:
        return flag
    return manifest.settings.get(name, default)


def _load(args: argparse.Namespace, model: str | None = None) -> Manifest:
    """The manifest file, or the one that --images/--prompt/--seeds stand for."""
    if args.images is not None:
        if args.manifest is not None:
            raise UsageError("give a manifest or --images, not both")
        if not args.prompt:
            raise UsageError("--images needs at least one --prompt")
        return manifest_from_args(
            args.images,
            args.prompt,
            seeds=args.seeds,
            output_format=args.output_format,
            model=model,
        )
    if args.prompt or args.seeds or args.output_format:
        raise UsageError("--prompt, --seeds and --output-format go with --images")
    if args.manifest is None:
        raise UsageError("give a manifest file, or --images with --prompt")
    return load_manifest(args.manifest, model=model)


def _out_dir(args: argparse.Namespace, manifest: Manifest) -> Path:
    if args.out is not None:
        return Path(args.out)
    if args.images is not None:
        # Same command, same folder: that is what makes a rerun resume, however it is
        # spelled (photos or ./photos/, prompts or seeds in another order).
        images = os.path.normpath(args.images.rstrip("/") or "/")
        prompts = sorted(set(args.prompt or []))
        seeds = sorted(set(args.seeds or []))
        key = json.dumps([images, prompts, seeds, args.output_format, _model_key(args)])
        folder = Path("output") / f"images-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        # Folders named by earlier versions (the flags as typed) keep resuming.
        typed = json.dumps(
            [args.images, args.prompt, args.seeds, args.output_format, _model_key(args)]
        )
        older = Path("output") / f"images-{hashlib.sha256(typed.encode()).hexdigest()[:10]}"
        return older if older.is_dir() and not folder.exists() else folder
    return default_out_dir(manifest)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is None:
        return None  # the API reads WAVESPEED_API_KEY and says what to do if it is unset
    try:
        key: str = args.api_key_file.read_text().strip()
    except OSError as exc:
        reason = exc.strerror
        raise UsageError(f"cannot read --api-key-file {args.api_key_file}: {reason}") from None
    if not key:
        raise UsageError(f"--api-key-file {args.api_key_file} is empty")
    from batch.api import check_api_key  # the HTTP stack only for commands that use it

    check_api_key(key, f"--api-key-file {args.api_key_file}")
    return key


def _check_out_dir(args: argparse.Namespace, out_dir: Path, ledger: str) -> None:
    """The output folder can be made and written to, checked before any request: found
    at the first output, it would stop a run with tasks already paid for."""
    source = f"--out {out_dir}" if args.out is not None else f"output folder {out_dir}"
    if out_dir.is_symlink() and not out_dir.exists():
        raise UsageError(f"{source}: a symbolic link to nothing")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"{source}: exists and is not a folder")
        nearest = out_dir
    else:
        nearest = next(p for p in out_dir.absolute().parents if p.exists())
        if not nearest.is_dir():
            raise UsageError(f"{source}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        where = "" if nearest == out_dir else f": cannot create it in {nearest}"
        raise UsageError(f"{source}: not writable{where}")
    for name in (ledger, LOCK_NAME):
        path = out_dir / name
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"{source}: {name} is not writable")


# -- validate ----------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    models = _models(args)
    first: Manifest | None = None
    if models == [None]:
        first = _load(args, None)  # read once; again only for a model of its own list
        listed = first.settings.get("models")
        models = list(listed) if listed else models
    root: Path | None = None
    for model in models:
        reuse = first is not None and (model is None or model == first.model)
        manifest = first if reuse and first is not None else _load(args, model)
        if root is None:
            root = _out_dir(args, manifest)
        out_dir = root / model_folder(model) if len(models) > 1 and model else root
        _validate_one(args, manifest, out_dir)
    return 0


def _validate_one(args: argparse.Namespace, manifest: Manifest, out_dir: Path) -> None:
    price = _setting(args, manifest, "price", DEFAULT_PRICE)
    _check_out_dir(args, out_dir, LEDGER_NAME)
    if args.online:
        base_url = resolve_base_url(args.base_url, "--base-url")
        from batch.api import estimate_manifest_async

        plan = asyncio.run(
            estimate_manifest_async(
                manifest,
                out_dir=out_dir,
                api_key=_api_key(args),
                base_url=base_url,
                retry_failed=args.retry_failed,
                price=price,
            )
        )
    else:
        given = args.price is not None or "price" in manifest.settings
        plan = estimate_offline(manifest, out_dir, args.retry_failed, price, given=given)
    # --images stands for a manifest that has no file: say what it stands for.
    source = manifest.path if manifest.path.is_file() else "command line (--images)"
    print(f"{source}: OK, model {manifest.model}, output to {out_dir}")
    print(describe(plan))
    warning = shortfall(plan)
    if warning:
        print(f"warning: {warning}")


# -- run ---------------------------------------------------------------------


class _ProgressView:
    """A tqdm bar on a terminal, a plain line every few seconds otherwise.

    The bar is made at the first progress report, after the plan line is printed, and
    starts at the rows already finished, so its rate and ETA count this run's rows only.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar: Any = None
        self._last = 0.0
        self._start = time.monotonic()
        self._base: int | None = None
        self._stopping_told = False
        self._tty: tuple[int, list[Any]] | None = None
        self._finished = 0

    def __call__(self, p: Progress) -> None:
        if p.stopping and not self._stopping_told:
            self._stopping_told = True
            again = " (press Ctrl-C again to stop at once)" if p.by_signal else ""
            self._write(
                f"wsbatch: stopping ({p.stop_reason}): no new submissions; "
                f"finishing {p.in_flight} in flight{again}"
            )
        if not self.enabled or p.total == 0:
            return
        finished = p.completed + p.failed
        if self._base is None:
            self._base = finished
            self._start = time.monotonic()
            if self.stream.isatty():
                from tqdm import tqdm

                self._quiet_ctrl_echo()
                self.bar = tqdm(
                    total=p.total,
                    initial=finished,
                    file=self.stream,
                    unit="row",
                    dynamic_ncols=True,
                    leave=True,
                )
        now = time.monotonic()
        self._finished = finished
        if self.bar is not None:
            if now - self._last >= 0.1 or finished == p.total:
                self._last = now
                self.bar.n = finished
                shown = f"{p.in_flight} ({p.queued} queued)" if p.queued else p.in_flight
                self.bar.set_postfix(failed=p.failed, in_flight=shown, refresh=False)
                self.bar.refresh()
            return
        if now - self._last >= LOG_INTERVAL or finished == p.total:
            self._last = now
            elapsed = now - self._start
            rate = (finished - self._base) / elapsed if elapsed > 0 else 0.0
            left = p.total - finished
            eta = f", ETA {left / rate:.0f} s" if rate > 0 and left else ""
            queued = f" ({p.queued} queued on the server)" if p.queued else ""
            self._write(
                f"wsbatch: {finished}/{p.total} done ({p.failed} failed), "
                f"{p.in_flight} in flight{queued}, {rate:.2f} rows/s{eta}"
            )

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _quiet_ctrl_echo(self) -> None:
        """The terminal echoes Ctrl-C as "^C" where the cursor is, at the end of the bar,
        which pushes the bar's next redraw onto a new line and leaves a frozen copy.
        Echo of control keys is off while the bar is up, and restored after."""
        with contextlib.suppress(ImportError, OSError, ValueError):
            import termios

            fd = sys.stdin.fileno()
            if os.isatty(fd):
                attrs = termios.tcgetattr(fd)
                self._tty = (fd, list(attrs))
                attrs[3] &= ~termios.ECHOCTL
                termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self._finished  # the last report may have been throttled
            self.bar.refresh()
            self.bar.close()
            self.bar = None
        if self._tty is not None:
            with contextlib.suppress(ImportError, OSError, ValueError):
                import termios

                termios.tcsetattr(self._tty[0], termios.TCSANOW, self._tty[1])
            self._tty = None


def _model_key(args: argparse.Namespace) -> str | list[str] | None:
    """--model as it named folders before it could repeat: one model is a string."""
    chosen = list(dict.fromkeys(args.model or []))
    return chosen[0] if len(chosen) == 1 else (sorted(chosen) or None)


def _models(args: argparse.Namespace) -> list[str | None]:
    chosen: list[str] = list(dict.fromkeys(args.model or []))
    return list(chosen) if chosen else [None]


def model_folder(model: str) -> str:
    """A model's subfolder in a side-by-side run: the id with '/' as '--'."""
    return model.replace("/", "--")


def _cmd_run(args: argparse.Namespace) -> int:
    models = _models(args)
    if len(models) == 1:
        manifest = _load(args, models[0])
        listed = manifest.settings.get("models") if models[0] is None else None
        if not listed or len(listed) == 1:
            model = listed[0] if listed else None
            if model is not None and model != manifest.model:
                manifest = _load(args, model)
            summary = _run_one(args, manifest, _out_dir(args, manifest), None, "")
            return summary.exit_code
        models = list(listed)  # `models:` in the manifest: side by side
    # Side by side: every row on each model, one subfolder and one ledger per model, one
    # model after another; --budget spans them all.
    first = _load(args, models[0])
    root = _out_dir(args, first)
    summaries = []
    for n, model in enumerate(models):
        assert model is not None
        manifest = first if n == 0 else _load(args, model)
        summary = _run_one(args, manifest, root / model_folder(model), root, f" [{model}]")
        summaries.append(summary)
        if summary.stopped_by is not None or summary.exit_code in (3, 4):
            break  # a signal, a lock or the account ends the whole comparison
    return max(s.exit_code for s in summaries)


def _spent_beside(root: Path, own: Path) -> float:
    """What the other model folders of a side-by-side run have committed."""
    spent = 0.0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p != own):
        paths = ledger_paths(folder)
        if paths:
            spent += read_ledgers(paths, keep_last=False).spend
    return spent


def _run_one(
    args: argparse.Namespace,
    manifest: Manifest,
    out_dir: Path,
    root: Path | None,
    label: str,
) -> Summary:
    # The rows live until exit: keep full collections from walking them again and again.
    gc.freeze()
    from batch.api import parse_shard, run_manifest_async

    shard = parse_shard(args.shard, args.shards)
    _check_out_dir(args, out_dir, ledger_name(shard))
    price = _setting(args, manifest, "price", DEFAULT_PRICE)
    settings: dict[str, Any] = {
        "concurrency": _setting(args, manifest, "concurrency", 4),
        "rate": _setting(args, manifest, "rate", None),
        "timeout": _setting(args, manifest, "timeout", 600.0),
        "retries": _setting(args, manifest, "retries", 5),
        "budget": _setting(args, manifest, "budget", None),
    }
    if root is not None and settings["budget"] is not None and root.is_dir():
        # This folder's share: what the budget leaves after the other models' folders.
        settings["budget"] = max(settings["budget"] - _spent_beside(root, out_dir), 0.0)
    base_url = resolve_base_url(args.base_url, "--base-url")
    key = _api_key(args)
    quiet = args.quiet
    label += f" (shard {shard[0]}/{shard[1]})" if shard else ""

    def show_plan(plan: Estimate) -> None:
        warning = shortfall(plan)
        if not quiet:
            print(f"wsbatch: {describe(plan)}{label}", file=sys.stderr)
        if warning:
            print(f"wsbatch: warning: {warning}", file=sys.stderr)

    view = _ProgressView(enabled=not (args.no_progress or quiet))
    settings["concurrency"] = _fit_open_file_limit(settings["concurrency"])
    try:
        summary = asyncio.run(
            run_manifest_async(
                manifest,
                out_dir=out_dir,
                api_key=key,
                base_url=base_url,
                retry_failed=args.retry_failed,
                max_tasks=args.max_tasks,
                price=price,
                grace=args.grace,
                poll_floor=args.poll_floor,
                queue_ahead=args.queue_ahead,
                log_file=args.log_file or ("-" if args.verbose else None),
                shard=shard,
                progress=view,
                on_plan=show_plan,
                handle_signals=True,
                **settings,
            )
        )
    finally:
        view.close()
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True))
    elif not quiet:
        _print_summary(summary, args.argv)
    elif summary.exit_code != 0:
        print(_summary_lines(summary)[0], file=sys.stderr)
    return summary


def _fit_open_file_limit(concurrency: int) -> int:
    """Lift the soft fd limit toward the hard one for large pools, and clamp the pool
    to what fits: running out of descriptors mid-run would fail rows already paid for.

    A descriptor per connection (capped, whatever the concurrency) and a margin for the
    ledger, the output files in the writer threads and the loop's own."""
    import resource

    from batch.transport import connection_pool

    margin = 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connection_pool(concurrency) + margin
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return concurrency
    fits = max(1, soft - margin - 8)
    print(
        f"wsbatch: warning: the open-file limit ({soft}) fits --concurrency {fits}, "
        f"not {concurrency}; raise it with `ulimit -n` for more",
        file=sys.stderr,
    )
    return fits


def _summary_lines(summary: Summary) -> list[str]:
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
    if summary.reconciled:
        extras.append(f"{summary.reconciled} lost submit answers recovered")
    if summary.possible_duplicates:
        extras.append(f"{summary.possible_duplicates} possible duplicate submissions")
    if summary.unsettled:
        extras.append(
            f"{summary.unsettled} lost answers not yet settled (counted; "
            "`wsbatch audit` checks them)"
        )
    if summary.uploads or summary.uploads_reused:
        extras.append(f"{summary.uploads} uploads ({summary.uploads_reused} reused)")
    if extras:
        lines.append("  " + ", ".join(extras))
    if summary.failures:
        lines.append("  failures by cause:")
        lines += [f"    {count} x {cause}" for cause, count in summary.failures.items()]
    if summary.stop_reason:
        lines.append(f"  stopped: {summary.stop_reason}")
    if summary.held:
        lines.append(
            f"  held: {summary.held} rows not submitted: damaged ledger line(s) "
            f"{', '.join(summary.damaged_lines)} may concern them (they may be paid "
            f"already); see `wsbatch repair {summary.out_dir}`"
        )
    lines.append(
        f"  spend this run: ${summary.spend_usd:.2f} (folder total ${summary.spend_total_usd:.2f})"
    )
    lines.append(f"  outputs: {summary.out_dir}/")
    return lines


def _print_summary(summary: Summary, argv: list[str]) -> None:
    lines = _summary_lines(summary)
    unfinished = summary.in_flight + summary.not_started
    if summary.stopped_by is not None or (summary.stop_reason and unfinished):
        # Rows in flight are followed by id and finished rows kept: nothing is paid twice.
        lines.append(
            f"  to resume: {shlex.join(['wsbatch', *argv])}  (finished rows are kept; "
            "rows in flight are polled, not paid again)"
        )
    print("\n".join(lines))


# -- status ------------------------------------------------------------------


def status_of(out_dir: Path) -> dict[str, Any]:
    # One listing for the ledgers and the runs' pid files: beside a million outputs each
    # listing takes most of a second.
    try:
        names = [n for n in os.listdir(out_dir) if n.startswith(("ledger.", HOLDER_PREFIX))]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    ledgers = ledger_paths(out_dir, names)
    if not ledgers:
        raise UsageError(f"{out_dir} has no ledger: not a wsbatch output folder")
    state = read_ledgers(ledgers, keep_last=False)
    by_status = state.counts()
    counts = {
        "completed": by_status[RowStatus.COMPLETED],
        "failed": by_status[RowStatus.FAILED],
        "in_flight": by_status[RowStatus.IN_FLIGHT] + by_status[RowStatus.IN_DOUBT],
    }
    last_run = state.runs[-1] if state.runs else {}
    total = max([int(r.get("manifest_rows") or r.get("rows") or 0) for r in state.runs] or [0])
    total = max(total, len(state.rows))
    pids = holders(out_dir, names)
    return {
        "out_dir": str(out_dir),
        "running": bool(pids),
        "pid": int(pids[0]) if pids and pids[0].isdigit() else None,
        "pids": [int(p) for p in pids if p.isdigit()],
        "rows": total,
        **counts,
        "not_started": max(total - sum(counts.values()), 0),
        "submits": state.submits,
        "spend_usd": round(state.spend, 4),
        "shards": len([p for p in ledgers if p.name != LEDGER_NAME]),
        "possible_duplicates": state.possible_duplicates,
        # Submits sent with no outcome recorded (a kill): spend, settled by the next run.
        "in_doubt": state.in_doubt,
        # Lost answers and kills the account's listing has not settled yet: counted as
        # possible duplicates until it does (the next run, or `wsbatch audit --adopt`).
        "unsettled": len(state.doubts),
        # Ledger lines that could not be read, as "file:line": `wsbatch repair` settles them.
        "damaged_lines": [f"{d.path}:{d.line}" for d in state.damage],
        "runs": len(state.runs),
        "manifest": last_run.get("manifest"),
        "model": last_run.get("model"),
    }


def model_folders(out_dir: Path) -> list[Path]:
    """The per-model subfolders of a side-by-side run (each with its own ledger)."""
    if ledger_paths(out_dir) or not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and ledger_paths(p))


def _cmd_status(args: argparse.Namespace) -> int:
    folders = [] if (args.out_dir / LEDGER_NAME).is_file() else model_folders(args.out_dir)
    if folders:
        infos = {folder.name: status_of(folder) for folder in folders}
        if args.json:
            total = round(sum(i["spend_usd"] for i in infos.values()), 4)
            print(json.dumps({"models": infos, "spend_usd": total}, sort_keys=True))
            return 0
        for info in infos.values():
            _print_status(info)
        return 0
    info = status_of(args.out_dir)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    _print_status(info)
    return 0


def _print_status(info: dict[str, Any]) -> None:
    running = f"running (pid {info['pid']})" if info["running"] else "not running"
    print(
        f"{info['out_dir']}: {running}; {info['rows']} rows: {info['completed']} completed, "
        f"{info['failed']} failed, {info['in_flight']} in flight, "
        f"{info['not_started']} not started; {info['submits']} submits over {info['runs']} runs, "
        f"${info['spend_usd']:.2f} spent"
    )
    if info["damaged_lines"]:
        print(
            f"  {len(info['damaged_lines'])} damaged ledger line(s) "
            f"({', '.join(info['damaged_lines'][:5])}): see `wsbatch repair {info['out_dir']}`"
        )


def _cmd_models(args: argparse.Namespace) -> int:
    from batch import models

    if args.refresh:
        base_url = resolve_base_url(args.base_url, "--base-url")
        from batch.api import fetch_models_async

        fetched = asyncio.run(fetch_models_async(api_key=_api_key(args), base_url=base_url))
        if not models.parse_catalogue(fetched):
            raise UsageError("the API's model catalogue holds no model with a request schema")
        models.save(fetched)
    catalogue = models.known()
    if args.name:
        model = catalogue.get(args.name)
        if model is None:
            near = difflib.get_close_matches(args.name, list(catalogue.models), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise UsageError(
                f"no schema for {args.name}{hint}; `wsbatch models --refresh` fetches the catalogue"
            )
        print("\n".join(models.describe(model)))
        print(f"  (schema {catalogue.age()})")
        return 0
    print(f"{len(catalogue.models)} model(s), schemas {catalogue.age()}:")
    for model in sorted(catalogue.models.values(), key=lambda m: m.model_id):
        price = f"${model.base_price:g}" if model.base_price is not None else "-"
        print(f"  {model.model_id:48} {price:>8}  {model.image_field}")
    return 0


def _cmd_repair(args: argparse.Namespace) -> int:
    from batch import repair

    found = repair.drop(args.out_dir) if args.drop else repair.inspect(args.out_dir)
    print("\n".join(repair.describe(found, args.out_dir, args.drop)))
    # Damage left in place is something the user still has to decide about.
    return 1 if found.damage and not args.drop else 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from batch.audit import describe

    if not ledger_paths(args.out_dir):
        raise UsageError(f"{args.out_dir} has no ledger: not a wsbatch output folder")
    base_url = resolve_base_url(args.base_url, "--base-url")
    from batch.api import audit_async

    result = asyncio.run(
        audit_async(args.out_dir, api_key=_api_key(args), base_url=base_url, adopt=args.adopt)
    )
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        print("\n".join(describe(result)))
    # Billed tasks that no ledger accounts for: something for the user to look at.
    return 1 if result.unrecorded else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from batch.report import write_report

    folders = model_folders(args.out_dir)
    if folders:  # a side-by-side run: one grid of every model's edits
        from batch.compare import write_comparison

        path = write_comparison(args.out_dir, folders, self_contained=args.self_contained)
        print(f"wsbatch: comparison of {len(folders)} models written to {path}")
        return 0
    path = write_report(args.out_dir, self_contained=args.self_contained)
    print(f"wsbatch: report written to {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from batch.export import export_dataset, write_metadata

    if not ledger_paths(args.out_dir):
        raise UsageError(f"{args.out_dir} has no ledger: not a wsbatch output folder")
    write_metadata(args.out_dir)
    written = export_dataset(
        args.out_dir,
        args.format,
        to=args.to,
        shard_size=args.shard_size,
        skip_nsfw=args.skip_nsfw,
    )
    print(f"wsbatch: wrote {len(written)} {args.format} file(s):")
    for name in written:
        print(f"  {name}")
    return 0
