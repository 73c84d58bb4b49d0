"""The worker pool: plan from the ledger, run each row once, stop cleanly.

Rows stream through a fixed set of workers (``concurrency`` of them), so a
100k-row manifest never becomes 100k coroutines. The ledger says what each
row needs: nothing, a poll of a known prediction, or a submit. A submit's
answer is made durable before the task is polled, so a crash can cost at
most the submits answered in its last instant.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from batch import __version__
from batch.client import Client, Prediction
from batch.errors import ApiError, AuthError, OutputError, PredictionGone, TaskFailed
from batch.ledger import (
    LEDGER_NAME,
    LedgerState,
    LedgerWriter,
    RowState,
    cut_torn_tail,
    ledger_paths,
    merge_states,
    read_ledger,
)
from batch.limits import SubmitLimiter
from batch.manifest import SEED_MAX, Manifest, Row, shard_of
from batch.outputs import existing_files, output_names, remove_temp_files, write_atomic
from batch.polling import PollSchedule, latency_sample
from batch.retry import Backoff

UPLOAD_EXPIRED_CODE = 1402


class Action(Enum):
    DONE = "done"
    FAILED = "failed"
    POLL = "poll"
    SUBMIT = "submit"


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    prediction_id: str | None = None
    seed: int | None = None


def plan_row(row: Row, state: RowState | None, files: set[str], retry_failed: bool) -> Plan:
    """Decide what a row needs, from its last ledger state alone."""
    if state is None:
        return Plan(Action.SUBMIT)
    if state.fingerprint is not None and state.fingerprint != row.fingerprint:
        return Plan(Action.SUBMIT)  # the request changed under the same id: a new task
    seed = state.seed
    pid = state.prediction_id
    if state.event == "completed":
        if state.outputs and all(name in files for name in state.outputs):
            return Plan(Action.DONE)
        # An output went missing: fetch it again while the server still has it.
        return Plan(Action.POLL, pid, seed) if pid else Plan(Action.SUBMIT, None, seed)
    if state.event == "submitted":
        return Plan(Action.POLL, pid, seed) if pid else Plan(Action.SUBMIT, None, seed)
    if state.awaits_poll:
        return Plan(Action.POLL, pid, seed)
    if state.retryable:
        return Plan(Action.SUBMIT, None, seed)
    if retry_failed:
        return Plan(Action.SUBMIT, None, seed)
    return Plan(Action.FAILED)


def count_actions(plans: Iterable[Plan]) -> dict[str, int]:
    """Rows per action: what `validate` and the start of a run announce."""
    counts = {a.value: 0 for a in Action}
    for plan in plans:
        counts[plan.action.value] += 1
    return counts


@dataclass(frozen=True, slots=True)
class RunOptions:
    out_dir: Path
    concurrency: int = 4
    rate: float | None = None
    timeout: float = 600.0
    retries: int = 5
    retry_failed: bool = False
    max_tasks: int | None = None
    budget: float | None = None
    price: float = 0.024
    grace: float = 60.0
    poll_floor: float = 0.5
    handle_signals: bool = True
    shard: tuple[int, int] | None = None


@dataclass(slots=True)
class Progress:
    """Counts over the whole manifest, handed to the progress callback."""

    total: int
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    skipped: int = 0
    submitted: int = 0
    stopping: bool = False


@dataclass(slots=True)
class Summary:
    run_id: str
    out_dir: str
    rows: int
    completed: int
    failed: int
    not_started: int
    in_flight: int
    already_done: int
    submitted: int
    spend_total_usd: float
    possible_duplicates: int
    reconciled: int
    retries: int
    rate_limited: int
    uploads: int
    uploads_reused: int
    polls: int
    elapsed_s: float
    spend_usd: float
    failures: dict[str, int]
    stopped_by: str | None
    stop_reason: str | None
    exit_code: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stopped(Exception):
    """The run is stopping: leave the row as the ledger has it."""


class _DeadlineExceeded(Exception):
    pass


@dataclass(slots=True)
class _RunCounters:
    submitted: int = 0
    possible_duplicates: int = 0
    retries: int = 0
    uploads: int = 0
    uploads_reused: int = 0
    reconciled: int = 0
    failures: Counter[str] = field(default_factory=Counter)


ProgressCallback = Callable[[Progress], None]
# Called once the ledger is read: rows per action, and what the folder already spent.
PlanCallback = Callable[[dict[str, int], float], None]


class Runner:
    def __init__(
        self,
        manifest: Manifest,
        client: Client,
        options: RunOptions,
        *,
        progress: ProgressCallback | None = None,
        on_plan: PlanCallback | None = None,
        ledger_name: str = LEDGER_NAME,
    ) -> None:
        self.manifest = manifest
        shard = options.shard
        self.rows = (
            manifest.rows
            if shard is None
            else tuple(r for r in manifest.rows if shard_of(r.id, shard[1]) == shard[0])
        )
        self.client = client
        self.options = options
        self.out_dir = options.out_dir
        self.ledger_path = self.out_dir / ledger_name
        self._progress_cb = progress
        self._on_plan = on_plan
        self.run_id = uuid.uuid4().hex[:12]
        self.limiter = SubmitLimiter(options.rate)
        self.schedule = PollSchedule(floor=options.poll_floor)
        self.backoff = Backoff()
        self.counters = _RunCounters()
        self.ledger: LedgerWriter | None = None
        self.state = LedgerState()
        self.progress = Progress(total=len(self.rows))
        self._prior_spend = 0.0
        # submits sent or answered this run, including lost answers that may have billed
        self._committed = 0
        self._unknown_by_row: dict[str, int] = {}
        self._final: dict[str, str] = {}
        self._stopping = False
        self._stop_reason: str | None = None
        self._stopped_by: str | None = None
        self._fatal: BaseException | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._grace_task: asyncio.Task[None] | None = None
        self._path_sha: dict[Path, tuple[str, bytes]] = {}
        self._uploads: dict[str, asyncio.Future[str]] = {}
        self._reused_uploads: set[str] = set()
        self._known_pid: set[str] = set()
        self._attempts: Counter[str] = Counter()
        self._interruptible: set[asyncio.Task[Any]] = set()
        self._started = time.monotonic()

    # -- planning ------------------------------------------------------------

    def load_state(self) -> LedgerState:
        """Read every ledger of OUT_DIR once; cut a torn tail off our own before appending."""
        own, good_end = read_ledger(self.ledger_path, keep_last=False)
        cut_torn_tail(self.ledger_path, good_end)
        others = [p for p in ledger_paths(self.out_dir) if p != self.ledger_path]
        self.state = merge_states([read_ledger(p, keep_last=False)[0] for p in others] + [own])
        self._prior_spend = self.state.spend
        return self.state

    def _prepare(self) -> list[tuple[Row, Plan]]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.out_dir)
        self.load_state()
        return list(self.plans())

    def plans(self) -> Iterator[tuple[Row, Plan]]:
        files = existing_files(self.out_dir)
        for row in self.rows:
            yield row, plan_row(row, self.state.rows.get(row.id), files, self.options.retry_failed)

    def _work(self, plans: list[tuple[Row, Plan]]) -> Iterator[tuple[Row, Plan]]:
        # Known predictions first: they are already paid for and the server may expire them.
        yield from (p for p in plans if p[1].action is Action.POLL)
        yield from (p for p in plans if p[1].action is Action.SUBMIT)

    # -- the run -------------------------------------------------------------

    async def run(self) -> Summary:
        # Reading 100k ledger lines and listing the folder take seconds: off the loop,
        # which may be a notebook's with other work on it.
        planned = await asyncio.to_thread(self._prepare)
        if self._on_plan is not None:
            self._on_plan(count_actions(plan for _, plan in planned), self._prior_spend)
        for row, plan in planned:
            if plan.action is Action.DONE:
                self._final[row.id] = "completed"
                self.progress.skipped += 1
                self.progress.completed += 1
            elif plan.action is Action.POLL:
                self._known_pid.add(row.id)
            elif plan.action is Action.FAILED:
                self._final[row.id] = "failed"
                self.progress.failed += 1
                self._count_failure(self.state.rows[row.id].code, self.state.rows[row.id].error)
        self.ledger = LedgerWriter(self.ledger_path)
        await self.ledger.start()
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        try:
            if self.options.handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self.request_stop, sig.name)
                    installed.append(sig)
            await self.ledger.write(self._run_event())
            self._emit()
            work = self._work(planned)
            started = []
            for n in range(max(1, self.options.concurrency)):
                task = asyncio.create_task(self._worker(work), name=f"worker-{n}")
                started.append(task)
                self._workers.add(task)
                task.add_done_callback(self._workers.discard)
            while self._workers:
                await asyncio.wait(set(self._workers))
            for task in started:
                # A worker only dies of something no row can absorb (the disk, a bug
                # in failure recording): stop the run rather than lose it silently.
                if not task.cancelled() and task.exception() is not None and self._fatal is None:
                    self._fatal = task.exception()
            summary = self.summary()
            await self.ledger.write(
                {"event": "finished", "run_id": self.run_id, "summary": summary.as_dict()}
            )
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            if self._grace_task is not None:
                self._grace_task.cancel()
            stragglers = list(self._workers)
            for task in stragglers:
                task.cancel()
            # Let cancelled workers finish their shielded ledger writes before closing it.
            await asyncio.gather(*stragglers, return_exceptions=True)
            await self.ledger.close()
        if self._fatal is not None:
            raise self._fatal
        return summary

    def _run_event(self) -> dict[str, Any]:
        return {
            "event": "run",
            "run_id": self.run_id,
            "manifest": str(self.manifest.path),
            "model": self.manifest.model,
            "base_url": self.client.base_url,
            "version": __version__,
            "rows": len(self.rows),
            "manifest_rows": len(self.manifest.rows),
            "shard": f"{self.options.shard[0]}/{self.options.shard[1]}"
            if self.options.shard
            else None,
            "pid": os.getpid(),
            "concurrency": self.options.concurrency,
            "rate": self.options.rate,
            "price": self.options.price,
        }

    def request_stop(self, reason: str = "SIGINT") -> None:
        """First call: finish what is in flight within the grace period. Second: stop now."""
        if self._stopping:
            self._cancel_workers()
            return
        self._stopping = True
        self._stopped_by = reason
        self._stop_reason = f"{reason} received"
        self.progress.stopping = True
        for task in list(self._interruptible):
            task.cancel()  # waiting to upload or for a submit slot: nothing to lose
        self._emit()
        self._grace_task = asyncio.get_running_loop().create_task(self._grace())

    async def _grace(self) -> None:
        await asyncio.sleep(self.options.grace)
        self._cancel_workers()

    def _cancel_workers(self) -> None:
        for task in list(self._workers):
            task.cancel()

    def _stop_submitting(self, reason: str) -> None:
        if not self._stopping:
            self._stopping = True
            self._stop_reason = reason

    async def _worker(self, work: Iterator[tuple[Row, Plan]]) -> None:
        for row, plan in work:
            if self._stopping:
                return
            try:
                await self._process(row, plan)
            except Exception as exc:  # a bug must cost one row's attempt, never the run
                await self._record_failure(
                    row,
                    None,
                    row.seed,
                    RuntimeError(f"internal error: {exc!r}"),
                    retryable=True,
                    code="internal",
                )

    # -- one row -------------------------------------------------------------

    async def _process(self, row: Row, plan: Plan) -> None:
        seed = plan.seed if plan.seed is not None and plan.seed >= 0 else row.seed
        if seed < 0:
            seed = random.randint(0, SEED_MAX)
        pid = plan.prediction_id
        submitted_at = time.monotonic()
        resumed = pid is not None
        resubmits = 0
        deadline = time.monotonic() + self.options.timeout
        self.progress.in_flight += 1
        self._emit()
        try:
            while True:
                if pid is None:
                    pid = await self._submit(row, seed, deadline)
                    submitted_at = time.monotonic()
                    resumed = False
                try:
                    prediction = await self._poll(pid, submitted_at, deadline, poll_now=resumed)
                    await self._finish(row, pid, seed, prediction, deadline)
                    return
                except PredictionGone:
                    pid = None  # expired or unknown: the only case where a known row is resubmitted
                    resumed = False
                except TaskFailed as exc:
                    if self._should_resubmit(row, exc, resubmits):
                        resubmits += 1
                        self.counters.retries += 1
                        await self._record_failure(row, pid, seed, exc, retryable=True)
                        pid = None
                        await asyncio.sleep(self.backoff.delay(resubmits))
                        continue
                    await self._record_failure(row, pid, seed, exc, retryable=exc.retryable)
                    return
        except _Stopped:
            return
        except asyncio.CancelledError:
            if self._stopping and pid is None:
                return  # stopped before submitting: the row stays as the ledger has it
            raise
        except _DeadlineExceeded:
            await self._record_failure(
                row,
                pid,
                seed,
                TimeoutError(f"no result within {self.options.timeout:g} s"),
                retryable=True,
                code="timeout",
            )
        except OutputError as exc:
            await self._record_failure(
                row, pid, seed, exc, retryable=exc.retryable, code="output", task_status="completed"
            )
        except ApiError as exc:
            code: int | str | None = exc.code if exc.code is not None else exc.cause
            await self._record_failure(row, pid, seed, exc, retryable=exc.retryable, code=code)
        except AuthError as exc:
            if self._fatal is None:
                self._fatal = exc
            self._stop_submitting(str(exc))
            self._cancel_workers()
        finally:
            self.progress.in_flight -= 1
            self._emit()

    def _should_resubmit(self, row: Row, exc: TaskFailed, resubmits: int) -> bool:
        if self._stopping or resubmits >= self.options.retries:
            return False
        if exc.code == UPLOAD_EXPIRED_CODE and row.image_path is not None:
            # An upload reused from an earlier run may have expired: upload afresh once.
            sha = self._path_sha.get(row.image_path, ("", b""))[0]
            if sha in self._reused_uploads:
                self._reused_uploads.discard(sha)
                self._uploads.pop(sha, None)
                self.state.uploads.pop(sha, None)
                return True
        return exc.retryable

    async def _submit(self, row: Row, seed: int, deadline: float) -> str:
        assert self.ledger is not None
        task = asyncio.current_task()
        assert task is not None
        self._interruptible.add(task)
        try:
            image = await self._image_url(row, deadline)
            pid, unknown = await self._send_submit(row, seed, image, deadline)
        finally:
            self._interruptible.discard(task)
        self.counters.submitted += 1
        self.counters.possible_duplicates += unknown
        self.progress.submitted += 1
        self._known_pid.add(row.id)
        self._attempts[row.id] += 1
        prior = self.state.rows[row.id].submits if row.id in self.state.rows else 0
        event: dict[str, Any] = {
            "event": "submitted",
            "row": row.id,
            "prediction_id": pid,
            "seed": seed,
            "fingerprint": row.fingerprint,
            "attempt": prior + self._attempts[row.id],
        }
        if unknown:
            event["possible_duplicates"] = unknown
        await self.ledger.write_durable(event)
        return pid

    async def _send_submit(
        self, row: Row, seed: int, image: str, deadline: float
    ) -> tuple[str, int]:
        """Submit with retries; return the prediction id and how many tries had no answer."""
        task = asyncio.current_task()
        assert task is not None
        payload: dict[str, Any] = {
            **row.params,
            "prompt": row.prompt,
            "image": image,
            "seed": seed,
            "output_format": row.output_format,
        }
        unknown = 0
        failures = 0
        while True:
            self._interruptible.add(task)
            await self.limiter.acquire()
            self._check_may_submit()
            # From here the request may reach the server: a stop must wait for its answer.
            self._interruptible.discard(task)
            self._committed += 1  # counted before sending, so parallel workers cannot overshoot
            sent_at = time.time()
            try:
                pid = await self.client.submit(row.model, payload)
                self.limiter.on_success()
                return pid, unknown
            except ApiError as exc:
                if not exc.outcome_unknown:
                    self._committed -= 1  # refused: nothing was created, nothing billed
                if exc.status == 429:
                    # Nothing was created; the limiter holds back the whole pool.
                    self.limiter.on_rate_limited(exc.retry_after)
                    self.counters.retries += 1
                    if time.monotonic() > deadline:
                        raise
                    continue
                if exc.outcome_unknown:
                    found = await self.client.find_prediction(row.model, payload, sent_at)
                    if found is not None:
                        self.counters.reconciled += 1
                        return found, unknown
                    unknown += 1
                failures += 1
                if not exc.retryable or failures > self.options.retries:
                    if unknown:
                        self.counters.possible_duplicates += unknown
                        self._unknown_by_row[row.id] = unknown
                    raise
                self.counters.retries += 1
                self._interruptible.add(task)
                await asyncio.sleep(self.backoff.delay(failures - 1, exc.retry_after))

    def _check_may_submit(self) -> None:
        if self._stopping:
            raise _Stopped
        opts = self.options
        if opts.max_tasks is not None and self._committed >= opts.max_tasks:
            self._stop_submitting(f"--max-tasks {opts.max_tasks} reached")
            raise _Stopped
        committed = self._prior_spend + (self._committed + 1) * opts.price
        if opts.budget is not None and committed > opts.budget + 1e-9:
            spent = self._prior_spend + self._committed * opts.price
            self._stop_submitting(
                f"budget ${opts.budget:.2f} reached (${spent:.2f} committed in this folder; "
                f"one more task costs ${opts.price:g})"
            )
            raise _Stopped

    async def _image_url(self, row: Row, deadline: float) -> str:
        if row.image_path is None:
            return row.image
        path = row.image_path
        if path not in self._path_sha:
            self._path_sha[path] = await asyncio.to_thread(_read_and_hash, path)
        sha, data = self._path_sha[path]
        future = self._uploads.get(sha)
        if future is None:
            reused = self.state.fresh_upload(sha, time.time(), self.client.base_url)
            future = asyncio.get_running_loop().create_future()
            self._uploads[sha] = future
            if reused is not None:
                self._reused_uploads.add(sha)
                self.counters.uploads_reused += 1
                future.set_result(reused)
            else:
                try:
                    url = await self._upload(row, path, sha, data, deadline)
                except BaseException as exc:
                    # Let the next row that needs this image try again.
                    self._uploads.pop(sha, None)
                    future.set_exception(exc if isinstance(exc, Exception) else _Stopped())
                    future.exception()  # mark retrieved: waiters may be none
                    raise
                future.set_result(url)
        return await asyncio.shield(future)

    async def _upload(self, row: Row, path: Path, sha: str, data: bytes, deadline: float) -> str:
        assert self.ledger is not None
        failures = 0
        while True:
            if self._stopping:
                raise _Stopped
            try:
                url = await self.client.upload(path, data)
                break
            except ApiError as exc:
                failures += 1
                if not exc.retryable or failures > self.options.retries:
                    raise
                self.counters.retries += 1
                await asyncio.sleep(self.backoff.delay(failures - 1, exc.retry_after))
        self.counters.uploads += 1
        # Release the bytes: rows that share the image reuse the URL, not the data.
        self._path_sha[path] = (sha, b"")
        await self.ledger.write(
            {
                "event": "uploaded",
                "sha256": sha,
                "download_url": url,
                "file": row.image,
                "base_url": self.client.base_url,
            }
        )
        return url

    async def _poll(
        self, pid: str, submitted_at: float, deadline: float, *, poll_now: bool
    ) -> Prediction:
        if not poll_now:
            self.schedule.begin(pid, submitted_at)
        try:
            return await self._poll_until_done(pid, submitted_at, deadline, poll_now=poll_now)
        finally:
            self.schedule.end(pid)

    async def _poll_until_done(
        self, pid: str, submitted_at: float, deadline: float, *, poll_now: bool
    ) -> Prediction:
        last_poll: float | None = None
        last_pending = 0.0
        errors = 0
        while True:
            now = time.monotonic()
            if poll_now and last_poll is None:
                delay = 0.0
            else:
                since = None if last_poll is None else now - last_poll
                delay = self.schedule.next_delay(now - submitted_at, since, now)
            if now + delay > deadline:
                if now >= deadline:
                    raise _DeadlineExceeded
                delay = deadline - now
            await asyncio.sleep(delay)
            sent = time.monotonic()
            try:
                prediction = await self.client.result(pid)
            except PredictionGone:
                raise
            except ApiError as exc:
                if not exc.retryable:
                    raise
                errors += 1
                self.counters.retries += 1
                last_poll = time.monotonic()
                wait = self.backoff.delay(min(errors, 5), exc.retry_after)
                if time.monotonic() + wait > deadline:
                    raise _DeadlineExceeded from None
                await asyncio.sleep(wait)
                continue
            if prediction.done:
                if not poll_now:
                    reported = prediction.inference_ms / 1000 if prediction.inference_ms else None
                    self.schedule.observe(
                        latency_sample(last_pending, sent - submitted_at, reported)
                    )
                return prediction
            last_poll = sent
            last_pending = sent - submitted_at
            seen = time.monotonic()
            if seen >= deadline:
                raise _DeadlineExceeded

    async def _finish(
        self, row: Row, pid: str, seed: int, prediction: Prediction, deadline: float
    ) -> None:
        assert self.ledger is not None
        names = output_names(row.id, row.output_format, len(prediction.outputs))
        digests: list[str] = []
        for name, value in zip(names, prediction.outputs, strict=True):
            data = await self._fetch(value, row.output_format, deadline)
            await write_atomic(self.out_dir, name, data)
            digests.append(hashlib.sha256(data).hexdigest())
        event: dict[str, Any] = {
            "event": "completed",
            "row": row.id,
            "prediction_id": pid,
            "outputs": names,
            "sha256": digests,
            "nsfw": list(prediction.nsfw),
            "inference_ms": prediction.inference_ms,
            "seed": seed,
            **_request_fields(row),
        }
        if row.meta:
            event["meta"] = dict(row.meta)
        await self.ledger.write(event)
        self._final[row.id] = "completed"
        self._known_pid.discard(row.id)
        self.progress.completed += 1

    async def _fetch(self, value: str, fmt: str, deadline: float) -> bytes:
        """Download one output: bad bytes count against --retries, a flaky network only
        against the task deadline."""
        bad = 0
        errors = 0
        while True:
            try:
                return await self.client.fetch_output(value, fmt)
            except OutputError as exc:
                bad += 1
                if not exc.retryable or bad > self.options.retries:
                    raise
                wait = self.backoff.delay(bad - 1)
            except ApiError as exc:
                if not exc.retryable:
                    raise
                errors += 1
                wait = self.backoff.delay(min(errors, 5), exc.retry_after)
            if time.monotonic() + wait > deadline:
                raise _DeadlineExceeded
            self.counters.retries += 1
            await asyncio.sleep(wait)

    async def _record_failure(
        self,
        row: Row,
        pid: str | None,
        seed: int,
        exc: BaseException,
        *,
        retryable: bool,
        code: int | str | None = None,
        task_status: str | None = None,
    ) -> None:
        assert self.ledger is not None
        if isinstance(exc, TaskFailed):
            code = exc.code if exc.code is not None else exc.status
            task_status = exc.status
            message = exc.message
        elif isinstance(exc, ApiError):
            message = exc.message
        else:
            message = str(exc)
        event: dict[str, Any] = {}
        if row.id in self._unknown_by_row:
            event["possible_duplicates"] = self._unknown_by_row.pop(row.id)
        await self.ledger.write(
            {
                **event,
                "event": "failed",
                "row": row.id,
                "prediction_id": pid,
                "error": message,
                "code": code,
                "retryable": retryable,
                "task_status": task_status,
                "seed": seed,
                **_request_fields(row),
                "attempt": self._attempts[row.id]
                + (self.state.rows[row.id].submits if row.id in self.state.rows else 0),
            }
        )
        if isinstance(exc, TaskFailed) and retryable and not self._stopping:
            return  # about to be resubmitted within this run
        self._final[row.id] = "failed"
        self._known_pid.discard(row.id)
        self.progress.failed += 1
        self._count_failure(code, message)

    def _count_failure(self, code: int | str | None, message: str | None) -> None:
        cause = f"{code}: {message}" if code is not None else (message or "unknown")
        self.counters.failures[cause[:120]] += 1

    def _emit(self) -> None:
        if self._progress_cb is not None:
            self._progress_cb(self.progress)

    # -- the end -------------------------------------------------------------

    def summary(self) -> Summary:
        rows = self.rows
        completed = sum(1 for r in rows if self._final.get(r.id) == "completed")
        failed = sum(1 for r in rows if self._final.get(r.id) == "failed")
        # Rows with a live prediction that this run did not finish: the next run polls them.
        in_flight = sum(1 for r in rows if r.id in self._known_pid and r.id not in self._final)
        not_started = len(rows) - completed - failed - in_flight
        if self._fatal is not None:
            exit_code = getattr(self._fatal, "exit_code", 1)
        elif self._stopped_by == "SIGINT":
            exit_code = 130
        elif self._stopped_by == "SIGTERM":
            exit_code = 143
        elif completed == len(rows):
            exit_code = 0
        else:
            exit_code = 1
        return Summary(
            run_id=self.run_id,
            out_dir=str(self.out_dir),
            rows=len(rows),
            completed=completed,
            failed=failed,
            not_started=not_started,
            in_flight=in_flight,
            already_done=self.progress.skipped,
            submitted=self.counters.submitted,
            possible_duplicates=self.counters.possible_duplicates,
            reconciled=self.counters.reconciled,
            retries=self.counters.retries,
            rate_limited=self.limiter.rate_limited,
            uploads=self.counters.uploads,
            uploads_reused=self.counters.uploads_reused,
            polls=self.client.stats.polls,
            elapsed_s=round(time.monotonic() - self._started, 3),
            spend_usd=round(self.counters.submitted * self.options.price, 4),
            spend_total_usd=round(
                self._prior_spend + self.counters.submitted * self.options.price, 4
            ),
            failures=dict(self.counters.failures.most_common()),
            stopped_by=self._stopped_by,
            stop_reason=self._stop_reason,
            exit_code=exit_code,
        )


def _request_fields(row: Row) -> dict[str, Any]:
    """What the report and the dataset files need to know of a row's request,
    so that they can read the ledger alone."""
    return {
        "fingerprint": row.fingerprint,
        "model": row.model,
        "prompt": row.prompt,
        "image": row.image,
        "image_path": str(row.image_path) if row.image_path is not None else None,
    }


def _read_and_hash(path: Path) -> tuple[str, bytes]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), data
