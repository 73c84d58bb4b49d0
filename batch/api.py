"""The Python API, for notebooks and scripts; the CLI is a thin layer over it.

    from batch import load_manifest, run_manifest, Ledger

    summary = run_manifest("manifests/example.yaml", out_dir="output/example")
    print(summary.completed, Ledger("output/example").completed())

``run_manifest`` blocks; ``run_manifest_async`` is the same for a running event loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import unicodedata
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from batch.account import Estimate, estimate, live_prices
from batch.audit import Audit, audit
from batch.client import Client
from batch.errors import AuthError, UsageError
from batch.export import METADATA_NAME, write_metadata
from batch.folder import default_out_dir
from batch.lag import lag_probe_from_env
from batch.ledger import ledger_name, ledger_paths, read_ledgers
from batch.lock import OutDirLock
from batch.manifest import Manifest, load_manifest, shard_of
from batch.options import check_zero_backoff, default_poll_floor, default_settle_delay
from batch.plan import check_schemas, plan_manifest
from batch.runner import (
    PlanCallback,
    ProgressCallback,
    Runner,
    RunOptions,
    Summary,
)
from batch.slots import Slots
from batch.state import LedgerState, RowState, RowStatus
from batch.transport import connection_pool
from batch.urls import DEFAULT_BASE_URL, check_base_url, resolve_base_url

P = ParamSpec("P")
T = TypeVar("T")
SHARD_INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX")
KEY_ENV = "WAVESPEED_API_KEY"

__all__ = [
    "Audit",
    "Estimate",
    "Ledger",
    "Manifest",
    "RowStatus",
    "Summary",
    "audit_async",
    "estimate_manifest_async",
    "load_manifest",
    "parse_shard",
    "run_manifest",
    "run_manifest_async",
    "shard_of",
]


def _env_count(env: Mapping[str, str], name: str, least: int) -> int | None:
    """A whole number from a scheduler's variable; unset or empty is None, and any
    other value that is not a number of at least ``least`` is a usage error naming it."""
    text = env.get(name, "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < least:
        raise UsageError(f"{name}={text!r}: --shard auto needs a whole number, {least} or more")
    return int(text)


def parse_shard(
    value: str | None, shards: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """``K/N`` (K from 0), or ``auto``: the array index its scheduler gave this process.

    ``auto`` reads Kubernetes Indexed Jobs (JOB_COMPLETION_INDEX), AWS Batch array jobs
    (AWS_BATCH_JOB_ARRAY_INDEX) or Slurm job arrays (SLURM_ARRAY_TASK_ID, counted from
    SLURM_ARRAY_TASK_MIN); the count comes from ``shards`` or SLURM_ARRAY_TASK_COUNT.
    The first of those variables that is set must be a whole number: a bad one is a
    usage error naming it, never a silent fall through to the next.
    """
    if value is None:
        if shards is not None:
            raise UsageError("--shards goes with --shard auto")
        return None
    env = os.environ if env is None else env
    if value == "auto":
        index: int | None = None
        source = ""
        for name in SHARD_INDEX_VARIABLES:
            index = _env_count(env, name, 0)
            if index is not None:
                source = f"{name}={index}"
                break
        task_id = None if index is not None else _env_count(env, "SLURM_ARRAY_TASK_ID", 0)
        if task_id is not None:
            low = _env_count(env, "SLURM_ARRAY_TASK_MIN", 0) or 0
            if task_id < low:
                raise UsageError(
                    f"SLURM_ARRAY_TASK_ID={task_id} is below SLURM_ARRAY_TASK_MIN={low}"
                )
            index = task_id - low
            source = f"SLURM_ARRAY_TASK_ID={task_id} (from SLURM_ARRAY_TASK_MIN={low})"
            if shards is None:
                shards = _env_count(env, "SLURM_ARRAY_TASK_COUNT", 1)
        if index is None:
            raise UsageError(
                "--shard auto found no array index (JOB_COMPLETION_INDEX, "
                "AWS_BATCH_JOB_ARRAY_INDEX or SLURM_ARRAY_TASK_ID)"
            )
        if shards is None:
            raise UsageError("--shard auto needs the number of shards: --shards N")
        if index >= shards:
            raise UsageError(
                f"--shard auto: {source} is shard {index}, but there are {shards} "
                "(K runs from 0 to N-1)"
            )
        return index, shards
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", value.strip())
    if not match:
        raise UsageError(f"--shard {value!r}: use K/N (K from 0 to N-1) or auto")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard {index} of {count} does not exist (K runs from 0 to N-1)")
    if shards is not None and shards != count:
        raise UsageError(
            f"--shard {value} and --shards {shards} disagree: --shards goes with --shard auto"
        )
    return index, count


class Ledger:
    """A read-only view of an output folder's ledgers (all shards merged)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.paths = ledger_paths(self.out_dir)
        self.state: LedgerState = read_ledgers(self.paths)

    @property
    def rows(self) -> dict[str, RowState]:
        return self.state.rows

    def with_status(self, *statuses: RowStatus) -> list[str]:
        return sorted(r for r, s in self.rows.items() if s.status in statuses)

    def completed(self) -> list[str]:
        return self.with_status(RowStatus.COMPLETED)

    def failed(self) -> list[str]:
        return self.with_status(RowStatus.FAILED)

    def in_flight(self) -> list[str]:
        """Rows whose task may be running: a known prediction, or a submit in doubt."""
        return self.with_status(RowStatus.IN_FLIGHT, RowStatus.IN_DOUBT)

    @property
    def possible_duplicates(self) -> int:
        return self.state.possible_duplicates

    @property
    def spend(self) -> float:
        return self.state.spend


@dataclass(frozen=True, slots=True)
class _Key:
    value: str

    def __repr__(self) -> str:  # never show the key, even in a traceback's locals
        return "_Key(***)"


def check_api_key(key: str, source: str) -> None:
    """A key is printable ASCII without spaces. Anything else (a control character, a
    space inside, a curly quote from a copy) would fail every request, or be refused by
    the HTTP library, row after row: stop at the start instead. The key is not shown."""
    for position, char in enumerate(key, 1):
        if char.isspace():
            what = "whitespace"
        elif unicodedata.category(char) == "Cc":
            what = "a control character"
        elif not char.isascii():
            what = "a non-ASCII character"
        else:
            continue
        raise AuthError(
            f"the API key from {source} has {what} at position {position} of {len(key)}; "
            "a key is printable ASCII with no spaces: check how it was copied"
        )


def _resolve_key(api_key: str | None) -> _Key:
    source = "the api_key argument" if api_key else KEY_ENV
    key = (api_key or os.environ.get(KEY_ENV, "")).strip()
    if not key:
        raise UsageError(
            f"no API key: set {KEY_ENV} (or pass --api-key-file PATH); "
            "to try wsbatch without an account, run `make demo`"
        )
    check_api_key(key, source)
    return _Key(key)


async def run_manifest_async(
    manifest: Manifest | str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    concurrency: int = 4,
    queue_ahead: int | None = None,
    rate: float | None = None,
    timeout: float = 600.0,
    retries: int = 5,
    retry_failed: bool = False,
    max_tasks: int | None = None,
    budget: float | None = None,
    price: float = 0.024,
    grace: float = 60.0,
    poll_floor: float | None = None,
    log_file: str | None = None,
    shard: tuple[int, int] | None = None,
    progress: ProgressCallback | None = None,
    on_plan: PlanCallback | None = None,
    handle_signals: bool = False,
) -> Summary:
    """Run (or resume) a manifest into ``out_dir`` and return the summary.

    Takes the output folder's lock (raises ``LockedError`` if another run holds it),
    and rewrites ``metadata.jsonl`` from the ledger when done. The key defaults to
    ``WAVESPEED_API_KEY``; the base URL to ``WAVESPEED_BASE_URL`` or the vendor's.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    check_zero_backoff()
    url = resolve_base_url(base_url)
    key = _resolve_key(api_key)
    target = Path(out_dir) if out_dir is not None else default_out_dir(manifest)
    await asyncio.to_thread(check_schemas, manifest)
    options = RunOptions(
        out_dir=target,
        concurrency=concurrency,
        queue_ahead=queue_ahead,
        rate=rate,
        timeout=timeout,
        retries=retries,
        retry_failed=retry_failed,
        max_tasks=max_tasks,
        budget=budget,
        price=price,
        grace=grace,
        poll_floor=poll_floor if poll_floor is not None else default_poll_floor(),
        settle_delay=default_settle_delay(),
        log_file=log_file,
        handle_signals=handle_signals,
        shard=shard,
    )
    target.mkdir(parents=True, exist_ok=True)
    lock = OutDirLock(target, shard=shard)
    # It may wait out a reader's probe; the runner sweeps dead holders with its listing.
    await asyncio.to_thread(lock.acquire, sweep=False)
    with lock:
        workers = Slots(concurrency, queue_ahead).workers
        async with Client(url, key.value, connections=connection_pool(workers)) as client:
            runner = Runner(
                manifest,
                client,
                options,
                progress=progress,
                on_plan=on_plan,
                ledger_name=ledger_name(shard),
            )
            async with lag_probe_from_env():
                summary = await runner.run()
        # The ledger is the truth; metadata.jsonl only changes when rows completed.
        if summary.completed > summary.already_done or not (target / METADATA_NAME).exists():
            await asyncio.to_thread(write_metadata, target)
    return summary


async def estimate_manifest_async(
    manifest: Manifest,
    *,
    out_dir: Path,
    api_key: str | None = None,
    base_url: str | None = None,
    retry_failed: bool = False,
    price: float = 0.024,
) -> Estimate:
    """The plan, priced live, with the account's balance; it submits nothing."""
    check_zero_backoff()
    url = resolve_base_url(base_url)
    key = _resolve_key(api_key)
    counts, spent, to_submit = await asyncio.to_thread(
        plan_manifest, manifest, out_dir, retry_failed
    )
    async with Client(url, key.value, connections=4) as client:
        prices, balance = await asyncio.gather(
            live_prices(client, to_submit, price), client.balance()
        )
    return estimate(counts, spent, to_submit, prices, balance)


async def fetch_models_async(
    *, api_key: str | None = None, base_url: str | None = None
) -> list[Any]:
    """The API's model catalogue, raw (``GET /api/v3/models``)."""
    url = check_base_url(base_url or os.environ.get("WAVESPEED_BASE_URL") or DEFAULT_BASE_URL)
    key = _resolve_key(api_key)
    async with Client(url, key.value, connections=2) as client:
        return await client.models()


async def audit_async(
    out_dir: str | os.PathLike[str],
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    adopt: bool = False,
) -> Audit:
    """Compare the folder's ledgers with the account's listing and billing; it never
    submits. ``adopt`` settles what the ledgers left in doubt, under the folder's lock."""
    check_zero_backoff()
    url = resolve_base_url(base_url)
    key = _resolve_key(api_key)
    async with Client(url, key.value, connections=4) as client:
        return await audit(Path(out_dir), client, adopt=adopt)


def _blocking(
    function: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, T]:
    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(function(*args, **kwargs))

    return wrapper


run_manifest = _blocking(run_manifest_async)
run_manifest.__doc__ = "Blocking form of run_manifest_async: same arguments, same summary."
