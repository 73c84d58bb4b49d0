"""One row's way through the API: upload, submit, poll, fetch, write.

Every way out of ``Job.run`` leaves the row's facts in the ledger: a submit
that was sent is settled (``submitted``, ``submit_refused`` or
``submit_unknown``) before anything else happens to the row, and the attempt
ends in ``completed`` or ``failed``, except when a stop comes before anything
was sent or while a known prediction is still running (its ``submitted`` line
already says where to pick up).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from batch.account import Prices
from batch.client import Client, Prediction
from batch.errors import ApiError, AuthError, BatchError, OutputError, PredictionGone, TaskFailed
from batch.events import (
    Completed,
    Failed,
    SubmitRefused,
    Submitted,
    Submitting,
    SubmitUnknown,
)
from batch.images import sniff_image
from batch.ledger import LedgerWriter
from batch.limits import SubmitLimiter
from batch.manifest import SEED_MAX, Row
from batch.metrics import Metrics
from batch.models import Catalogue, ModelInfo
from batch.options import RunOptions
from batch.outputs import output_names, write_atomic
from batch.polling import QUEUED_LAG_WEIGHT, PollSchedule, latency_sample
from batch.redact import redact_text, redact_url
from batch.retry import DEFAULT_BACKOFF, DeadlinePassed, retrying
from batch.settle import Settler, request_digest
from batch.slots import Slots
from batch.spend import SpendGuard, new_intent
from batch.state import GONE_CODE, LedgerState, Plan, parse_ts
from batch.stop import Stopped, StopSignal
from batch.uploads import UploadCache

T = TypeVar("T")

UPLOAD_EXPIRED_CODE = 1402
# The vendor's store may not know a task for a moment after answering its submit: a
# 404 for a prediction younger than this means "not yet", never "gone".
GONE_GRACE_S = 300.0
# 429s refuse without creating anything, so they do not use up --retries; this many
# in a row for one submit means the account's limit is far below what the run asks.
MAX_RATE_LIMITED = 50


class WriteFailed(BatchError):
    """An output could not be written to the output folder."""


@dataclass(slots=True)
class Resources:
    """What every job shares; each piece has one owner and one job."""

    client: Client
    writer: LedgerWriter
    state: LedgerState
    guard: SpendGuard
    settler: Settler
    prices: Prices
    catalogue: Catalogue
    limiter: SubmitLimiter
    uploads: UploadCache
    schedule: PollSchedule
    slots: Slots
    metrics: Metrics
    stop: StopSignal
    options: RunOptions


def request_payload(
    row: Row, images: list[str], seed: int, model: ModelInfo | None = None
) -> dict[str, Any]:
    """What is sent. The model's schema, where known, says where the images go
    (``image``, or ``images`` as a list) and whether it takes a seed and a format."""
    payload: dict[str, Any] = {**row.params, "prompt": row.prompt}
    if model is not None and model.image_field == "images":
        payload["images"] = images
    else:
        payload["image"] = images[0]
    if takes(model, "seed"):
        payload["seed"] = seed
    if takes(model, "output_format"):
        payload["output_format"] = row.output_format
    return payload


def takes(model: ModelInfo | None, field: str) -> bool:
    """A model the catalogue does not know is sent what HiDream-E1 takes."""
    return model is None or field in model.properties


def request_fields(row: Row) -> dict[str, Any]:
    """What the report and the dataset files need to know of a row's request,
    so that they can read the ledger alone."""
    return {
        "fingerprint": row.fingerprint,
        "model": row.model,
        "prompt": row.prompt,
        "image": redact_url(row.image),
        "image_path": str(row.image_path) if row.image_path is not None else None,
    }


class Job:
    def __init__(self, res: Resources, row: Row, plan: Plan) -> None:
        self.res = res
        self.row = row
        self.plan = plan
        seed = plan.seed if plan.seed is not None and plan.seed >= 0 else row.seed
        # -1 asks for a random seed: draw it here, so that every output can be reproduced.
        self.seed = seed if seed >= 0 else random.randint(0, SEED_MAX)
        self.pid = plan.prediction_id
        known = res.state.rows.get(row.id)
        self.gone = known.gone if known is not None else 0
        submitted_wall = parse_ts(known.submitted_at) if known is not None else None
        self.submitted_wall = submitted_wall if submitted_wall is not None else time.time()
        self.submitted_mono = time.monotonic() - max(time.time() - self.submitted_wall, 0.0)
        self.resubmits = 0
        self.rate_limited = 0
        self.holds_slot = False
        self.started_mono = self.submitted_mono
        self.model = res.catalogue.get(row.model)
        # A model without an output_format field answers in its own format.
        self.format = row.output_format if takes(self.model, "output_format") else None

    # -- the row -----------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Stopped:
            return  # stopped before sending: the row stays as the ledger has it
        except WriteFailed as exc:
            # The prediction is kept (the next run fetches it by id); paying for more
            # tasks that cannot be stored would be money lost.
            await self._fail(exc, retryable=True)
            self.res.stop.request(f"{exc}; no more submissions until that is fixed")
        except AuthError:
            raise
        except BatchError as exc:
            await self._fail(exc, retryable=bool(getattr(exc, "retryable", False)))
        except DeadlinePassed:
            await self._fail(
                TimeoutError(f"no result within {self.res.options.timeout:g} s"),
                retryable=True,
                code="timeout",
                live=True,
            )
        except Exception as exc:  # a bug must cost one row's attempt, never the run
            await self._fail(
                RuntimeError(f"internal error: {exc!r}"),
                retryable=True,
                code="internal",
                live=self.pid is not None,
            )

    async def _run(self) -> None:
        try:
            await self._attempts()
        finally:
            self._let_go()

    async def _attempts(self) -> None:
        resumed = self.pid is not None
        while True:
            if self.pid is None:
                self.pid = await self._submit()
                self.submitted_wall, self.submitted_mono = time.time(), time.monotonic()
                resumed = False
            else:
                await self._hold()
            # The task's deadline starts once the server has it, not while it waits its turn.
            deadline = time.monotonic() + self.res.options.timeout
            try:
                prediction = await self._poll(self.pid, deadline, resumed)
                # The server's slot is free: the next task may go while this one downloads.
                self._let_go()
                await self._finish(self.pid, prediction, deadline)
                return
            except PredictionGone as exc:
                if not await self._resubmit_gone(exc):
                    return
            except TaskFailed as exc:
                if not await self._resubmit_failed(exc):
                    return
            self.pid = None
            resumed = False

    async def _resubmit_gone(self, exc: PredictionGone) -> bool:
        """A known task the server no longer has: pay again once, never twice."""
        first = self.gone == 0
        again = first and not self.res.stop.stopping
        self.gone += 1
        # A first loss stays retryable even when stopping: the next run pays again, once.
        await self._fail(exc, retryable=first, code=GONE_CODE, quiet=again)
        return again

    async def _resubmit_failed(self, exc: TaskFailed) -> bool:
        opts = self.res.options
        if self.res.stop.stopping or self.resubmits >= opts.retries:
            await self._fail(exc, retryable=exc.retryable)
            return False
        expired = (
            exc.code == UPLOAD_EXPIRED_CODE
            and self.row.image_path is not None
            and self.res.uploads.forget_reused(self.row.image_path)
        )
        if not (exc.retryable or expired):
            await self._fail(exc, retryable=False)
            return False
        self.resubmits += 1
        await self._fail(exc, retryable=True, quiet=True)
        wait = 0.0 if expired else DEFAULT_BACKOFF.delay(self.resubmits - 1)
        self.res.metrics.retry("task", str(exc)[:200], wait)
        await self._pause(wait)
        return True

    # -- submit ------------------------------------------------------------

    async def _submit(self) -> str:
        res, row = self.res, self.row
        images: list[str] = []
        with res.stop.interruptible():
            for ref, path in row.inputs:
                if path is None:
                    images.append(ref)
                else:
                    retry = self._retry("upload", res.options.retries)
                    images.append(await res.uploads.url_for(path, ref, retry))
        payload = request_payload(row, images, self.seed, self.model)
        with res.stop.interruptible():
            await self._hold()
        return await retrying(
            lambda: self._send(payload),
            what="submit",
            tries=res.options.retries,
            metrics=res.metrics,
            retry_on=lambda exc: isinstance(exc, ApiError) and exc.retryable,
            budgeted=self._counts_against_retries,
            wait_for=lambda exc, n: 0.0 if _is_429(exc) else None,
            sleep=self._pause,
        )

    async def _hold(self) -> None:
        """A place on the server for this row's task, held until its result is known."""
        if not self.holds_slot:
            await self.res.slots.acquire()
            self.holds_slot = True

    def _let_go(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.res.slots.release()

    def _counts_against_retries(self, exc: Exception) -> bool:
        if not _is_429(exc):
            return True
        self.rate_limited += 1
        return self.rate_limited > MAX_RATE_LIMITED

    async def _send(self, payload: dict[str, Any]) -> str:
        """One submit: reserve, send, and settle the intent whatever happens."""
        res, row = self.res, self.row
        with res.stop.interruptible():
            slot = await res.limiter.acquire()
        intent = Submitting(
            row=row.id,
            seed=self.seed,
            intent=new_intent(),
            price=res.prices.of(row.model),
            fingerprint=row.fingerprint,
            request_sha=request_digest(payload),
            request_keys=tuple(payload),
            model=row.model,
        )
        try:
            await res.guard.reserve(intent)
        except BaseException:
            res.limiter.on_other(slot)  # never sent: a probe slot must not stay taken
            raise
        send = None
        try:
            with res.settler.sending() as send:
                pid = await res.client.submit(row.model, payload)
                send.pid = pid
        except ApiError as exc:
            if _is_429(exc):
                res.limiter.on_rate_limited(slot, exc.retry_after)
                res.metrics.rate_limited += 1
                res.metrics.note("rate limited", row=row.id, retry_after=exc.retry_after)
            else:
                res.limiter.on_other(slot)
            if not exc.outcome_unknown:
                res.guard.release()
                await res.writer.write(
                    SubmitRefused(row.id, intent.intent, exc.message, exc.status)
                )
                self._stop_if_told_to_wait_too_long(exc)
                raise
            # Counted as a possible duplicate first, whatever the look-up below finds.
            await res.writer.write(SubmitUnknown(row.id, intent.intent, exc.message, exc.status))
            res.metrics.note("submit answer lost", row=row.id, error=exc.message)
            adopted = await self._settle_lost(intent.intent, send.end if send else math.inf)
            if adopted is None:
                raise
            self.pid = adopted
            return adopted
        except AuthError as exc:
            res.limiter.on_other(slot)
            res.guard.release()  # 401/403 create nothing
            await res.writer.write(SubmitRefused(row.id, intent.intent, str(exc)))
            raise
        except BaseException as exc:
            res.limiter.on_other(slot)
            # Cancelled mid-request (a second Ctrl-C), or a bug: the request may be out.
            # The line is queued before the await, so it is written even if we are cancelled.
            await res.writer.write(SubmitUnknown(row.id, intent.intent, f"interrupted: {exc!r}"))
            raise
        res.limiter.on_success(slot)
        self.pid = pid  # known from here on, whatever happens to the line below
        await res.writer.write(
            Submitted(
                row=row.id,
                prediction_id=pid,
                seed=self.seed,
                attempt=self._attempt(),
                intent=intent.intent,
                price=intent.price,
                fingerprint=row.fingerprint,
            ),
            durable=True,
        )
        return pid

    def _attempt(self) -> int:
        known = self.res.state.rows.get(self.row.id)
        return (known.submits if known is not None else 0) + 1

    async def _settle_lost(self, intent: str, sent_end: float) -> str | None:
        """The task a lost answer created, when the listing proves which one it is; else
        the lost answer is settled (nothing created, or an unattributed task) or stays
        counted, and the row is submitted again."""
        doubt = self.res.state.doubts.get(intent)
        if doubt is None:
            return None
        outcome = await self.res.settler.lost(doubt, self.row.model, self._attempt(), sent_end)
        return outcome.adopted

    def _stop_if_told_to_wait_too_long(self, exc: ApiError) -> None:
        """A Retry-After longer than a task may take ends the run's submitting: no wait
        exceeds what the user allowed. Rows not sent stay for the next run."""
        wait, allowed = exc.retry_after, self.res.options.timeout
        if not _is_429(exc) or wait is None or wait <= allowed:
            return
        lifts = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + wait))
            if math.isfinite(wait)
            else "no time given"
        )
        self.res.stop.request(
            f"the API asks to wait {wait:g} s before the next submit (until {lifts}), "
            f"longer than --timeout {allowed:g} s; run again after that"
        )
        raise Stopped

    # -- poll --------------------------------------------------------------

    async def _poll(self, pid: str, deadline: float, resumed: bool) -> Prediction:
        schedule = self.res.schedule
        # When the server last had the task unstarted (submitted, or seen queued): its
        # run time, which the schedule learns and polls by, counts from there.
        self.started_mono = self.submitted_mono
        if not resumed:
            schedule.begin(pid, self.started_mono)
        try:
            return await self._poll_until_done(pid, deadline, resumed)
        finally:
            schedule.end(pid)

    def _seen_queued(self, pid: str, sent: float) -> None:
        """The server had not started the task when the poll sent at ``sent`` reached it."""
        res = self.res
        self.started_mono = sent
        res.schedule.begin(pid, sent)
        if res.slots.saw_queued():
            res.metrics.note("server queues", ahead=res.slots.ahead)
            # A queued task starts the moment a slot frees, so a late look at a finished
            # one no longer idles the server: fewer polls buy more than less lag.
            res.schedule.set_lag_weight(QUEUED_LAG_WEIGHT)

    async def _poll_until_done(self, pid: str, deadline: float, resumed: bool) -> Prediction:
        res = self.res
        last_poll: float | None = None
        last_pending = 0.0
        while True:
            now = time.monotonic()
            if resumed and last_poll is None:
                delay = 0.0
            else:
                since = None if last_poll is None else now - last_poll
                delay = res.schedule.next_delay(now - self.started_mono, since, now)
            if now + delay > deadline:
                if now >= deadline:
                    raise DeadlinePassed(pid)
                delay = deadline - now
            await asyncio.sleep(delay)
            sent = time.monotonic()
            try:
                prediction = await retrying(
                    lambda: res.client.result(pid),
                    what="poll",
                    tries=0,
                    metrics=res.metrics,
                    deadline=deadline,
                    retry_on=_transient_not_gone,
                    budgeted=lambda exc: False,
                    # A retried poll is still a poll: never within the floor of the last.
                    wait_for=lambda exc, n: max(
                        DEFAULT_BACKOFF.delay(min(n, 6) - 1, getattr(exc, "retry_after", None)),
                        res.schedule.floor,
                    ),
                )
            except PredictionGone:
                if time.time() - self.submitted_wall >= GONE_GRACE_S:
                    raise
                res.metrics.note("not yet visible", prediction_id=pid)
                prediction = Prediction(pid, "not yet visible")
            last_poll = time.monotonic()
            if prediction.done:
                if not resumed:
                    reported = prediction.inference_ms / 1000 if prediction.inference_ms else None
                    res.schedule.observe(
                        latency_sample(last_pending, sent - self.started_mono, reported)
                    )
                return prediction
            if prediction.status == "created" and not resumed:
                self._seen_queued(pid, sent)
            last_pending = sent - self.started_mono

    # -- outputs -----------------------------------------------------------

    async def _finish(self, pid: str, prediction: Prediction, deadline: float) -> None:
        res, row = self.res, self.row
        count = len(prediction.outputs)
        names: list[str] = []
        digests: list[str] = []
        for n, value in enumerate(prediction.outputs):
            data = await self._fetch(value, deadline)
            fmt = self.format or sniff_image(data[:16]) or row.output_format
            name = output_names(row.id, fmt, count)[n]
            names.append(name)
            try:
                await write_atomic(res.options.out_dir, name, data)
            except OSError as exc:
                raise WriteFailed(
                    f"cannot write {name} in {res.options.out_dir}: {exc.strerror or exc}"
                ) from None
            digests.append(hashlib.sha256(data).hexdigest())
        await res.writer.write(
            Completed(
                row=row.id,
                prediction_id=pid,
                outputs=tuple(names),
                sha256=tuple(digests),
                nsfw=prediction.nsfw,
                inference_ms=prediction.inference_ms,
                seed=self.seed,
                meta=dict(row.meta),
                **request_fields(row),
            )
        )

    async def _fetch(self, value: str, deadline: float) -> bytes:
        """Bad bytes count against --retries, a flaky network only against the deadline."""
        res = self.res
        return await retrying(
            lambda: res.client.fetch_output(value, self.format),
            what="download",
            tries=res.options.retries,
            metrics=res.metrics,
            deadline=deadline,
            budgeted=lambda exc: isinstance(exc, OutputError),
        )

    # -- helpers -----------------------------------------------------------

    def _retry(self, what: str, tries: int) -> Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]:
        def run(op: Callable[[], Awaitable[T]]) -> Awaitable[T]:
            return retrying(op, what=what, tries=tries, metrics=self.res.metrics, sleep=self._pause)

        return run

    async def _pause(self, seconds: float) -> None:
        with self.res.stop.interruptible():
            await asyncio.sleep(seconds)

    async def _fail(
        self,
        exc: BaseException,
        *,
        retryable: bool,
        code: int | str | None = None,
        live: bool = False,
        quiet: bool = False,
    ) -> None:
        """Record this attempt's failure; ``live`` keeps the prediction for the next run."""
        res, row = self.res, self.row
        task_status: str | None = None
        if isinstance(exc, TaskFailed):
            code = exc.code if exc.code is not None else exc.status
            task_status = exc.status
        elif isinstance(exc, WriteFailed):
            code, task_status, live = "write", "completed", True
        elif isinstance(exc, OutputError):
            code, task_status, live = "output", "completed", exc.retryable
        elif isinstance(exc, ApiError) and code is None:
            code = exc.code if exc.code is not None else exc.cause
            live = self.pid is not None and not isinstance(exc, PredictionGone)
        message = redact_text(getattr(exc, "message", None) or str(exc))
        known = res.state.rows.get(row.id)
        await res.writer.write(
            Failed(
                row=row.id,
                error=message,
                retryable=retryable,
                prediction_id=self.pid,
                code=code,
                task_status=task_status,
                live=live and self.pid is not None,
                attempt=known.submits if known is not None else 0,
                seed=self.seed,
                **request_fields(row),
            )
        )
        if not quiet:
            res.metrics.count_failure(code, message)


def _is_429(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.status == 429


def _transient_not_gone(exc: Exception) -> bool:
    return isinstance(exc, ApiError) and exc.retryable and not isinstance(exc, PredictionGone)
