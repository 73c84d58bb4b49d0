"""Settling submits whose outcome is unknown, from the account's predictions listing.

A submit whose answer was lost (or that a kill cut off) may have created a task.
No idempotency key exists, so the listing is the only witness: list the
predictions created since the submit was sent and take away every id the
folder's ledgers know.

- A task whose listed inputs match every field we sent is ours: adopt it. The
  documented listing carries no inputs, so this only happens where the real
  service is kinder than its docs; it is tried once, soon after the loss, before
  the row is submitted again.
- Nothing left: nothing was created; the submit is no possible duplicate.
- Otherwise some task nobody can attribute: claim one (the nearest in time) as
  this submit's possible duplicate, with its id, and leave the rest to ``audit``.

"Nothing left" is only believed when the listing is known to be caught up: it
shows a task of a submit that began after the lost one ended (the store lists
tasks in the order it made them), or the lost submit is older than
``AGE_PROOF_S``. Until then the submit stays a possible duplicate, and a
background task looks again as later submits land.

Tasks of submits still in flight in this process show up unknown too; each
settlement first waits for sends that started before its listing was answered,
and settlements go one at a time, so two lost answers never claim one task.
Shards beside this run may still have tasks in flight: those can only be
over-counted, never adopted unless their request is identical to ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from batch.client import Client, Listed
from batch.errors import AuthError, BatchError
from batch.events import ABSENT, ORPHAN, SubmitSettled, Submitted
from batch.ledger import LedgerWriter, OtherLedgers
from batch.metrics import Metrics
from batch.state import Doubt, LedgerState, RowStatus, parse_ts

# Clocks of client and server differ: look this far before a send for what it made.
CLOCK_SKEW_S = 60.0
# A submit this old would be listed by now if it made a task, witness or not.
AGE_PROOF_S = 600.0
WITNESSES = 4096
MIN_LOOK_S = 0.05


def request_digest(payload: Mapping[str, Any]) -> str:
    """sha256 of a request's fields as canonical JSON (1 and 1.0, 1 and true differ)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def matches(item: Listed, sha: str | None, keys: Iterable[str]) -> bool:
    """The listed task carries every field we sent, unchanged."""
    inputs = item.inputs
    keys = tuple(keys)
    if inputs is None or sha is None or not keys or not all(k in inputs for k in keys):
        return False
    return request_digest({k: inputs[k] for k in keys}) == sha


@dataclass(frozen=True, slots=True)
class Outcome:
    adopted: str | None = None  # a task proven to be this submit's
    settled: bool = False  # absent or orphan, written to the ledger


@dataclass(slots=True)
class Send:
    """One submit request in the air; ``pid`` once its answer named a task."""

    start: float
    end: float = math.inf
    pid: str | None = None


@dataclass(slots=True)
class _Pending:
    doubt: Doubt
    model: str
    after: float  # a task of a submit begun after this (monotonic) proves the listing


class Settler:
    def __init__(
        self,
        client: Client,
        writer: LedgerWriter,
        state: LedgerState,
        metrics: Metrics,
        *,
        delay: float,
        others: OtherLedgers | None = None,
    ) -> None:
        self.client = client
        self.writer = writer
        self.state = state
        self.metrics = metrics
        # The store may not list (or answer for) a task for a moment after making it.
        self.delay = delay
        self.others = others if others is not None else OtherLedgers(writer.path)
        self._sends: dict[int, Send] = {}
        self._tokens = itertools.count()
        self._ended = asyncio.Event()
        self._lock = asyncio.Lock()
        # Recent answered submits, (start, id): the witnesses that the listing caught up.
        self._answered: deque[tuple[float, str]] = deque(maxlen=WITNESSES)
        self._pending: dict[str, _Pending] = {}
        self._drainer: asyncio.Task[None] | None = None
        # Whether the listing carries inputs, once a non-empty one was seen.
        self.listing_has_inputs: bool | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @contextlib.contextmanager
    def sending(self) -> Iterator[Send]:
        """Around one submit request; set ``pid`` on the answer. Settlements wait for
        every send that began before their listing was answered."""
        token = next(self._tokens)
        send = self._sends[token] = Send(time.monotonic())
        try:
            yield send
        finally:
            send.end = time.monotonic()
            del self._sends[token]
            if send.pid is not None:
                self._answered.append((send.start, send.pid))
            self._ended.set()

    async def lost(self, doubt: Doubt, model: str, attempt: int, sent_end: float) -> Outcome:
        """A lost answer of this run: adopt its task if the listing proves it ours, settle
        it if the listing can, else leave it to the background look-ups."""
        if self.listing_has_inputs is False:
            # The documented listing: nothing here could be adopted, so the row need not
            # wait; the background look-ups settle what the lost answer cost.
            self._defer(_Pending(doubt, model, sent_end))
            return Outcome()
        await asyncio.sleep(max(0.0, sent_end + self.delay - time.monotonic()))
        async with self._lock:
            at = doubt.at if doubt.at is not None else time.time()
            listed = await self._list(model, at - CLOCK_SKEW_S)
            if listed is not None and await self._quiet(time.monotonic()):
                fresh = self._fresh(listed, await self._known(), at)
                ours = [i for i in fresh if matches(i, doubt.request_sha, doubt.request_keys)]
                if ours:
                    return await self._adopt(doubt, _nearest(ours, doubt.at).id, attempt)
                if self._caught_up(listed, sent_end, doubt):
                    return await self._settle(doubt, fresh)
            self._defer(_Pending(doubt, model, sent_end))
        return Outcome()

    async def doubts(self, adoptable: Mapping[str, bool]) -> int:
        """Settle what earlier runs left in doubt (a kill between send and answer, a kill
        while settling). ``adoptable[row]`` says whether the row may still take a task.
        Returns how many were settled or adopted now; the rest wait for proof."""
        done = 0
        now = time.monotonic()  # every submit of this run begins after these doubts
        by_model: dict[str, list[Doubt]] = {}
        for doubt in self.state.doubts.values():
            if doubt.model and doubt.at is not None:
                by_model.setdefault(doubt.model, []).append(doubt)
        newest = _newest(self.state)
        for model, doubts in by_model.items():
            doubts.sort(key=lambda d: d.at or 0.0)
            youngest = max(d.at or 0.0 for d in doubts)
            await asyncio.sleep(max(0.0, youngest + self.delay - time.time()))
            async with self._lock:
                listed = await self._list(model, (doubts[0].at or 0.0) - CLOCK_SKEW_S)
                known = await self._known() if listed is not None else []
                for doubt in doubts:
                    if listed is None:
                        self._defer(_Pending(doubt, model, now))
                        continue
                    fresh = self._fresh(listed, known, doubt.at or 0.0)
                    if adoptable.get(doubt.row, False) and _latest(self.state, doubt, newest):
                        ours = [
                            i for i in fresh if matches(i, doubt.request_sha, doubt.request_keys)
                        ]
                        if ours:
                            row = self.state.rows.get(doubt.row)
                            attempt = (row.submits if row is not None else 0) + 1
                            await self._adopt(doubt, _nearest(ours, doubt.at).id, attempt)
                            done += 1
                            continue
                    if self._caught_up(listed, now, doubt):
                        await self._settle(doubt, fresh)
                        done += 1
                    else:
                        self._defer(_Pending(doubt, model, now))
        return done

    async def finish(self, wait: float) -> None:
        """At the end of a run: give the background look-ups up to ``wait`` seconds to
        settle what is pending (later submits have landed by now), then stop them."""
        if self._drainer is not None and self._pending and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drainer), wait)
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
            self._drainer = None

    def _defer(self, pending: _Pending) -> None:
        self._pending[pending.doubt.intent] = pending
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="settle")

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(max(self.delay, MIN_LOOK_S))
            async with self._lock:
                by_model: dict[str, list[_Pending]] = {}
                for p in self._pending.values():
                    by_model.setdefault(p.model, []).append(p)
                for model, waiting in by_model.items():
                    since = min(p.doubt.at or 0.0 for p in waiting) - CLOCK_SKEW_S
                    listed = await self._list(model, since)
                    if listed is None or not await self._quiet(time.monotonic()):
                        continue
                    known = await self._known()
                    for p in sorted(waiting, key=lambda p: p.doubt.at or 0.0):
                        if p.doubt.intent not in self.state.doubts:
                            self._pending.pop(p.doubt.intent, None)  # settled elsewhere
                        elif self._caught_up(listed, p.after, p.doubt):
                            fresh = self._fresh(listed, known, p.doubt.at or 0.0)
                            await self._settle(p.doubt, fresh)
                            self._pending.pop(p.doubt.intent, None)

    def _caught_up(self, listed: list[Listed], after: float, doubt: Doubt) -> bool:
        """The listing would show the doubt's task by now, if there is one."""
        if doubt.at is not None and time.time() - doubt.at >= AGE_PROOF_S:
            return True
        ids = {item.id for item in listed}
        return any(start > after and pid in ids for start, pid in self._answered)

    def _fresh(self, listed: list[Listed], known: list[Container[str]], at: float) -> list[Listed]:
        """Listed tasks no ledger knows or has claimed, created since ``at`` (skew allowed)."""
        return [
            item
            for item in listed
            if not any(item.id in ids for ids in known) and _created(item, at - CLOCK_SKEW_S)
        ]

    async def _adopt(self, doubt: Doubt, pid: str, attempt: int) -> Outcome:
        self.metrics.reconciled += 1
        self.metrics.note("lost submit: its task found and adopted", row=doubt.row, id=pid)
        await self.writer.write(
            Submitted(
                row=doubt.row,
                prediction_id=pid,
                seed=doubt.seed,
                attempt=attempt,
                intent=doubt.intent,
                price=doubt.price,
                fingerprint=doubt.fingerprint,
            ),
            durable=True,
        )
        return Outcome(adopted=pid)

    async def _settle(self, doubt: Doubt, fresh: list[Listed]) -> Outcome:
        """Absent, or the nearest unattributed task claimed. The line is applied to the
        state when handed over, before any other settlement can run."""
        self._pending.pop(doubt.intent, None)
        # A task whose listed inputs are another lost answer's request is that one's to
        # adopt or claim, never this one's.
        fresh = [i for i in fresh if not self._another_doubts(i, doubt)]
        if not fresh:
            self.metrics.note("lost submit settled: nothing created", row=doubt.row)
            await self.writer.write(SubmitSettled(doubt.row, doubt.intent, ABSENT))
            return Outcome(settled=True)
        orphan = _nearest(fresh, doubt.at).id
        self.metrics.note("lost submit settled: an unattributed task", row=doubt.row, id=orphan)
        await self.writer.write(SubmitSettled(doubt.row, doubt.intent, ORPHAN, orphan))
        return Outcome(settled=True)

    def _another_doubts(self, item: Listed, doubt: Doubt) -> bool:
        inputs = item.inputs
        if inputs is None:
            return False
        by_keys: dict[tuple[str, ...], set[str]] = {}
        for other in self.state.doubts.values():
            # The same request sent again (a retry, a repeat copy) may own it as well.
            if other.request_sha not in (None, doubt.request_sha):
                by_keys.setdefault(other.request_keys, set()).add(str(other.request_sha))
        return any(
            keys
            and all(k in inputs for k in keys)
            and request_digest({k: inputs[k] for k in keys}) in shas
            for keys, shas in by_keys.items()
        )

    async def _list(self, model: str, since: float) -> list[Listed] | None:
        try:
            listing = await self.client.list_predictions(model, since)
        except AuthError:
            raise
        except (BatchError, OSError) as exc:
            self.metrics.note("listing failed: lost submit stays counted", error=str(exc))
            return None
        if listing.items:
            self.listing_has_inputs = any(item.inputs is not None for item in listing.items)
        # A partial listing cannot prove that nothing was created.
        return list(listing.items) if listing.complete else None

    async def _quiet(self, before: float) -> bool:
        """Wait until every send that began before ``before`` has its outcome written:
        their tasks are then known, not mistaken for a lost one's."""
        limit = time.monotonic() + self.client.timeouts.submit + self.client.timeouts.connect
        while any(send.start < before for send in self._sends.values()):
            self._ended.clear()
            left = limit - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), left)
        return True

    async def _known(self) -> list[Container[str]]:
        others = await asyncio.to_thread(self.others.known_ids)
        # This run's own sets as they are, not copies: what it learns meanwhile counts.
        return [*others, self.state.predictions, self.state.orphans]


def _created(item: Listed, since: float) -> bool:
    when = parse_ts(item.created_at)
    return when is None or when >= since  # without a time, it may be ours: keep it


def _nearest(items: list[Listed], at: float | None) -> Listed:
    """The task created closest to (and preferably after) the send."""

    def distance(item: Listed) -> float:
        when = parse_ts(item.created_at)
        if when is None or at is None:
            return float("inf")
        return when - at if when >= at else (at - when) * 2

    return min(items, key=distance)


def _newest(state: LedgerState) -> dict[str, float]:
    """Each row's newest doubt time: one pass, however many doubts a kill left."""
    newest: dict[str, float] = {}
    for d in state.doubts.values():
        newest[d.row] = max(newest.get(d.row, 0.0), d.at or 0.0)
    return newest


def _latest(state: LedgerState, doubt: Doubt, newest: Mapping[str, float]) -> bool:
    """The row's newest doubt, and the row holds no task it could follow instead."""
    row = state.rows.get(doubt.row)
    if row is None or (doubt.at or 0.0) < newest.get(doubt.row, 0.0):
        return False
    if row.status is RowStatus.IN_DOUBT:
        return row.intent == doubt.intent
    return row.status is RowStatus.NOT_STARTED or (
        row.status is RowStatus.FAILED and row.retryable and row.prediction_id is None
    )
