"""The worker pool: plan from the ledger, run each row's job once, stop cleanly.

Rows stream through a fixed set of workers (``concurrency`` of them), so a
100k-row manifest never becomes 100k coroutines. Everything a row needs is in
``batch.job``; everything the run reports is a view over the ledger state that
the jobs' events build.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batch import __version__
from batch.account import Estimate, Prices, estimate, live_prices
from batch.bulk import gc_paused
from batch.client import Client
from batch.errors import AuthError
from batch.events import Failed, Finished, RunStarted
from batch.files import TEMP_PREFIX, list_folder, remove_temp_files
from batch.folder import check_owner, manifest_file
from batch.job import Job, Resources, request_fields
from batch.ledger import (
    LEDGER_NAME,
    LedgerWriter,
    OtherLedgers,
    cut_torn_tail,
    ledger_paths,
    read_ledger,
)
from batch.limits import SubmitLimiter
from batch.lock import HOLDER_PREFIX, sweep_holders
from batch.manifest import Manifest, Row, RowTable, ids_and_fingerprints, row_ids, shard_of
from batch.metrics import JsonLog
from batch.models import known as known_models
from batch.options import RunOptions
from batch.outputs import existing_files
from batch.plan import Planned, plan_rows
from batch.polling import TAIL_LAG_WEIGHT, PollSchedule
from batch.refresh import refresh_snapshot
from batch.settle import Settler
from batch.slots import Slots
from batch.spend import SpendGuard
from batch.state import Action, LedgerState, Plan, RowStatus, merge_states, plan_row, retire
from batch.stop import Stopped, StopSignal
from batch.uploads import UploadCache

SPAWN_BATCH = 200
GC_QUIET_ABOVE = 1000

__all__ = ["PlanCallback", "Progress", "ProgressCallback", "RunOptions", "Runner", "Summary"]


@dataclass(slots=True)
class Progress:
    """Counts over the run's rows, handed to the progress callback."""

    total: int
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    queued: int = 0  # of those in flight, waiting on the server behind its cap
    skipped: int = 0
    submitted: int = 0
    stopping: bool = False
    stop_reason: str | None = None
    by_signal: bool = False


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
    possible_duplicates_total: int
    unsettled: int  # submits of the folder whose outcome the listing has not settled
    held: int  # rows not submitted because a damaged ledger line may concern them
    damaged_lines: list[str]  # "ledger.jsonl:12", for the message
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


ProgressCallback = Callable[[Progress], None]
# Called once the ledger is read and the rows are priced, before the first submit.
PlanCallback = Callable[[Estimate], None]


@dataclass(frozen=True, slots=True)
class _Baseline:
    """The folder's totals when the run started: the run's own figures are the growth."""

    submits: int
    possible_duplicates: int
    spend: float


def _shard_rows(rows: Sequence[Row], shard: tuple[int, int]) -> Sequence[Row]:
    """The rows of one shard, picked by id (a table's rows stay columns)."""
    index, count = shard
    if isinstance(rows, RowTable):
        return rows.take(n for n, row_id in enumerate(rows.ids) if shard_of(row_id, count) == index)
    return tuple(r for r in rows if shard_of(r.id, count) == index)


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
        self.rows = manifest.rows if shard is None else _shard_rows(manifest.rows, shard)
        self.client = client
        self.metrics = client.metrics
        self.options = options
        self.out_dir = options.out_dir
        self.ledger_path = self.out_dir / ledger_name
        self._progress_cb = progress
        self._on_plan = on_plan
        self.run_id = uuid.uuid4().hex[:12]
        self.state = LedgerState()
        self.stop = StopSignal()
        self.progress = Progress(total=len(self.rows))
        self._others: dict[Path, int] = {}
        self._baseline = _Baseline(0, 0, 0.0)
        self._fatal: BaseException | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._grace_task: asyncio.Task[None] | None = None
        self._slots: Slots | None = None
        self._started = time.monotonic()
        self.prices = Prices(options.price)
        self.held = 0  # rows a damaged ledger line keeps from being submitted
        self._files: set[str] = set()  # OUT_DIR's files when the rows were planned
        self._listed = False  # _files holds a listing taken as the run prepared

    # -- planning ------------------------------------------------------------

    def load_state(self, ledgers: list[Path] | None = None) -> LedgerState:
        """Read every ledger of OUT_DIR once (``ledgers``, when listed already); cut a torn
        tail off our own before appending."""
        own, good_end = read_ledger(self.ledger_path, keep_last=False)
        cut_torn_tail(self.ledger_path, good_end)
        states = []
        for path in ledger_paths(self.out_dir) if ledgers is None else ledgers:
            if path != self.ledger_path:
                state, end = read_ledger(path, keep_last=False)
                states.append(state)
                self._others[path] = end  # the spend guard reads on from here
        self.state = merge_states([*states, own])
        self._baseline = _Baseline(
            self.state.submits, self.state.possible_duplicates, self.state.spend
        )
        return self.state

    def plans(self) -> Iterator[tuple[Row, Plan]]:
        files = existing_files(self.out_dir)
        for row in self.rows:
            yield row, self._plan_of(row, files)

    def _plan_of(self, row: Row, files: set[str]) -> Plan:
        state = self.state
        return plan_row(
            state.rows.get(row.id),
            row.fingerprint,
            files,
            self.options.retry_failed,
            state.damage_unattributed,
        )

    def _plan_all(self) -> Planned:
        if not self._listed:
            self._files = existing_files(self.out_dir)
        return plan_rows(self.rows, self.state, self._files, self.options.retry_failed)

    def _work(self, planned: Planned) -> Iterator[tuple[Row, Plan]]:
        """Rows to poll, then rows to submit, each row's plan made as a worker takes it:
        rows not yet begun are a byte each, and a row's plan is gone once it ends.

        Known predictions go first: they are already paid for and the server may expire
        them. A row is handed out only if its plan is still what was counted: one the
        run already took (a poll that failed) is never taken again."""
        for action in (Action.POLL, Action.SUBMIT):
            for n in planned.indices(action):
                row = self.rows[n]
                plan = self._plan_of(row, self._files)
                if plan.action is action:
                    yield row, plan

    def _prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # One listing for the ledgers, the temporary files and the outputs on disk: each
        # takes most of a second beside a million outputs.
        self._files, names = list_folder(self.out_dir, ("ledger.", TEMP_PREFIX, HOLDER_PREFIX))
        self._listed = True
        sweep_holders(self.out_dir, names)  # the lock left it to this listing
        ledgers = ledger_paths(self.out_dir, names)
        check_owner(self.out_dir, self.manifest, ledgers)
        remove_temp_files(self.out_dir, names)
        self.load_state(ledgers)
        # Every id this run is given stays known to its end: a million as strings would
        # be most of a fresh run's memory.
        self.state.predictions.keep_small()

    # -- the run -------------------------------------------------------------

    async def run(self) -> Summary:
        # Reading 100k ledger lines and listing the folder take seconds: off the loop,
        # which may be a notebook's with other work on it.
        await asyncio.to_thread(self._prepare)
        if self.options.log_file is None:
            return await self._run()
        with JsonLog(self.options.log_file) as log:
            self.metrics.log = log.logger
            try:
                return await self._run()
            finally:
                self.metrics.log = None

    async def _run(self) -> Summary:
        opts = self.options
        writer = LedgerWriter(self.ledger_path, self.state)
        await writer.start()
        others = OtherLedgers(self.ledger_path, self._others)
        settler = Settler(
            self.client, writer, self.state, self.metrics, delay=opts.settle_delay, others=others
        )
        guard: SpendGuard | None = None
        self.stop.listeners.append(self._on_stop)
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        try:
            if opts.handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self.request_stop, sig.name)
                    installed.append(sig)
            await writer.write(self._run_event())
            planned, prices, balance = await self._plan(settler)
            guard = SpendGuard(
                writer,
                self.state,
                self.stop,
                budget=opts.budget,
                balance=balance,
                max_tasks=opts.max_tasks,
                others=others,
            )
            slots = self._slots = Slots(opts.concurrency, opts.queue_ahead)
            res = Resources(
                client=self.client,
                writer=writer,
                state=self.state,
                guard=guard,
                settler=settler,
                prices=prices,
                catalogue=await asyncio.to_thread(known_models),
                limiter=SubmitLimiter(opts.rate),
                uploads=UploadCache(self.client, writer, self.state),
                schedule=PollSchedule(floor=opts.poll_floor),
                slots=slots,
                metrics=self.metrics,
                stop=self.stop,
                options=opts,
            )
            work = self._work(planned)
            self._emit()
            started = await self._spawn(res, work, slots.workers)
            while self._workers:
                await asyncio.wait(set(self._workers))
            for task in started:
                # A worker only dies of something no row can absorb (the disk under the
                # ledger, a bug in failure recording): stop the run rather than lose it.
                if not task.cancelled() and task.exception() is not None and self._fatal is None:
                    self._fatal = task.exception()
            if self.stop.by is None:
                # Lost answers waiting for the listing to catch up: the last submits
                # prove it soon; what stays open is counted and left to the next run.
                await settler.finish(wait=3 * opts.settle_delay + 2.0)
            summary = self.summary()
            await writer.write(Finished(self.run_id, summary.as_dict()))
        except AuthError as exc:
            # The key or the account, found before any row began (settling, pricing).
            self._fatal = exc
            summary = self.summary()
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
            await settler.finish(wait=0.0)
            await writer.close()
            if guard is not None:
                guard.close()
        if self._fatal is not None:
            raise self._fatal
        if self.stop.by is None:  # a signal asked to stop now, not to tidy up
            # The next resume or status then reads this run's lines from a snapshot.
            await refresh_snapshot(self.ledger_path, writer.lines_written)
        return summary

    async def _spawn(
        self, res: Resources, work: Iterator[tuple[Row, Plan]], count: int
    ) -> list[asyncio.Task[None]]:
        """Start the workers, a batch at a time: 10,000 workers taking their first steps
        in one turn of the loop would hold it for a second."""
        # A large pool's tasks live as long as the run: full collections while they are
        # made would walk them all again and again (pauses of 0.3 s at 10,000 workers),
        # so collection waits, and they are set aside from it once made.
        quiet = count > GC_QUIET_ABOVE
        started = []
        with gc_paused() if quiet else contextlib.nullcontext():
            try:
                for n in range(count):
                    task = asyncio.create_task(self._worker(res, work), name=f"worker-{n}")
                    started.append(task)
                    self._workers.add(task)
                    task.add_done_callback(self._workers.discard)
                    if n % SPAWN_BATCH == SPAWN_BATCH - 1:
                        await asyncio.sleep(0)
            finally:
                if quiet:
                    gc.freeze()
        return started

    async def _plan(self, settler: Settler) -> tuple[Planned, Prices, float | None]:
        """Settle what earlier runs left in doubt, plan every row, price what is to submit."""
        if self.state.doubts:
            doubted = {d.row for d in self.state.doubts.values()}
            fingerprints = {
                row_id: fingerprint
                for row_id, fingerprint in ids_and_fingerprints(self.rows)
                if row_id in doubted
            }
            adoptable = {
                d.row: d.fingerprint is not None and fingerprints.get(d.row) == d.fingerprint
                for d in self.state.doubts.values()
            }
            with contextlib.suppress(Stopped), self.stop.interruptible():
                await settler.doubts(adoptable)
        planned = await asyncio.to_thread(self._plan_all)
        counts = planned.counts
        self.progress.skipped += counts[Action.DONE.value]
        self.progress.completed += counts[Action.DONE.value]
        self.progress.failed += counts[Action.FAILED.value]
        self.held += counts[Action.HELD.value]
        rows = self.rows

        def to_submit() -> Iterable[Row]:
            if isinstance(rows, RowTable):  # counted and priced without making the rows
                return rows.take(planned.indices(Action.SUBMIT))
            return (rows[n] for n in planned.indices(Action.SUBMIT))

        prices, balance = Prices(self.options.price), None
        if counts[Action.SUBMIT.value] and not self.stop.stopping:
            # Only a run that will pay asks: a resume of finished rows sends nothing.
            prices, balance = await asyncio.gather(
                live_prices(self.client, to_submit(), self.options.price), self.client.balance()
            )
        self.prices = prices
        if self._on_plan is not None:
            self._on_plan(estimate(counts, self.state.spend, to_submit(), prices, balance))
        return planned, prices, balance

    def _run_event(self) -> RunStarted:
        opts = self.options
        return RunStarted(
            run_id=self.run_id,
            manifest=str(self.manifest.path),
            model=self.manifest.model,
            base_url=self.client.base_url,
            version=__version__,
            price=self.prices.of(self.manifest.model),
            rows=len(self.rows),
            manifest_rows=len(self.manifest.rows),
            shard=f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else None,
            pid=os.getpid(),
            concurrency=opts.concurrency,
            rate=opts.rate,
            budget=opts.budget,
            manifest_path=manifest_file(self.manifest),
        )

    def request_stop(self, reason: str = "SIGINT") -> None:
        """First call: finish what is in flight within the grace period. Second: stop now."""
        if not self.stop.request(f"{reason} received", by=reason):
            self._cancel_workers()
            return
        self._grace_task = asyncio.get_running_loop().create_task(self._grace())

    def _on_stop(self) -> None:
        self.metrics.note("stop", reason=self.stop.reason)
        self.progress.stopping = True
        self.progress.stop_reason = self.stop.reason
        self.progress.by_signal = self.stop.by is not None
        self._emit()

    async def _grace(self) -> None:
        await asyncio.sleep(self.options.grace)
        self._cancel_workers()

    def _cancel_workers(self) -> None:
        for task in list(self._workers):
            task.cancel()

    async def _worker(self, res: Resources, work: Iterator[tuple[Row, Plan]]) -> None:
        await self._rows(res, work)
        # Nothing left to start: the lag of the tasks still out now adds to the run's end.
        res.schedule.set_lag_weight(TAIL_LAG_WEIGHT)

    async def _rows(self, res: Resources, work: Iterator[tuple[Row, Plan]]) -> None:
        for row, plan in work:
            if self.stop.stopping and (self.stop.by is not None or plan.action is Action.SUBMIT):
                return  # a signal ends everything not yet begun; a budget ends paying
            self.progress.in_flight += 1
            self._emit()
            job = Job(res, row, plan)
            try:
                await job.run()
            except AuthError as exc:
                if self._fatal is None:
                    self._fatal = exc
                self.stop.request(str(exc))
                self._cancel_workers()
                return
            except Exception as exc:  # a bug outside any row's attempt: record, go on
                await res.writer.write(
                    Failed(
                        row=row.id,
                        error=f"internal error: {exc!r}",
                        retryable=True,
                        prediction_id=job.pid,
                        code="internal",
                        live=job.pid is not None,
                        **request_fields(row),
                    )
                )
            finally:
                self.progress.in_flight -= 1
                self._count(row.id)
                retire(self.state, row.id)  # a fresh run's memory stays flat in its rows
                self._emit()

    def _count(self, row_id: str) -> None:
        known = self.state.rows.get(row_id)
        status = known.status if known is not None else RowStatus.NOT_STARTED
        if status is RowStatus.COMPLETED:
            self.progress.completed += 1
        elif status is RowStatus.FAILED:
            self.progress.failed += 1
        self.progress.submitted = self.state.submits - self._baseline.submits

    def _emit(self) -> None:
        if self._slots is not None:
            self.progress.queued = self._slots.queued
        if self._progress_cb is not None:
            self._progress_cb(self.progress)

    # -- the end -------------------------------------------------------------

    def summary(self) -> Summary:
        """The run's outcome, read from the ledger state like every other view."""
        counts = self.state.counts(row_ids(self.rows))
        completed = counts[RowStatus.COMPLETED]
        failed = counts[RowStatus.FAILED]
        in_flight = counts[RowStatus.IN_FLIGHT] + counts[RowStatus.IN_DOUBT]
        stop = self.stop
        if self._fatal is not None:
            exit_code = getattr(self._fatal, "exit_code", 1)
        elif stop.by == "SIGINT":
            exit_code = 130
        elif stop.by == "SIGTERM":
            exit_code = 143
        elif completed == len(self.rows):
            exit_code = 0
        elif stop.exit_code is not None:
            exit_code = stop.exit_code
        else:
            exit_code = 1
        m, base, state = self.metrics, self._baseline, self.state
        return Summary(
            run_id=self.run_id,
            out_dir=str(self.out_dir),
            rows=len(self.rows),
            completed=completed,
            failed=failed,
            not_started=counts[RowStatus.NOT_STARTED],
            in_flight=in_flight,
            already_done=self.progress.skipped,
            submitted=state.submits - base.submits,
            possible_duplicates=state.possible_duplicates - base.possible_duplicates,
            possible_duplicates_total=state.possible_duplicates,
            unsettled=len(state.doubts),
            held=self.held,
            damaged_lines=[f"{d.path}:{d.line}" for d in state.damage[:20]],
            reconciled=m.reconciled,
            retries=m.retries,
            rate_limited=m.rate_limited,
            uploads=m.uploads,
            uploads_reused=m.uploads_reused,
            polls=m.polls,
            elapsed_s=round(time.monotonic() - self._started, 3),
            spend_usd=round(state.spend - base.spend, 4),
            spend_total_usd=round(state.spend, 4),
            failures=dict(m.failures.most_common()),
            stopped_by=stop.by,
            stop_reason=stop.reason,
            exit_code=exit_code,
        )
