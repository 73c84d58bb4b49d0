"""One reducer from ledger events to row states and spend; every view reads its result.

``apply`` is the only place that decides what an event means for a row: the
runner applies each event it writes, and the summary, ``status``, ``report``,
``export``, ``validate`` and the Python ``Ledger`` read the same ``LedgerState``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from operator import attrgetter, countOf
from types import MappingProxyType
from typing import Any

from batch.events import (
    ABSENT,
    Completed,
    Event,
    Finished,
    RunStarted,
    SubmitRefused,
    SubmitSettled,
    Submitted,
    SubmittedFacts,
    Submitting,
    SubmittingFacts,
    SubmitUnknown,
    Uploaded,
)
from batch.taskids import TaskIds

NO_RECORD: Mapping[str, Any] = MappingProxyType({})  # one shared "no event kept"
DEFAULT_PRICE = 0.024
UPLOAD_REUSE_SECONDS = 24 * 3600
GONE_CODE = "gone"


def parse_ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class RowStatus(Enum):
    """Where a row stands, by its events alone."""

    NOT_STARTED = "not_started"  # nothing sent yet, or only refused submits
    IN_DOUBT = "in_doubt"  # a submit went out and no answer was recorded (a kill)
    IN_FLIGHT = "in_flight"  # a live prediction id: the next run polls it, never resubmits
    COMPLETED = "completed"
    FAILED = "failed"  # ended without outputs; ``retryable`` says if the next run retries

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


@dataclass(slots=True)
class RowState:
    """What the ledger knows of one row."""

    base: RowStatus = RowStatus.NOT_STARTED
    fingerprint: str | None = None
    prediction_id: str | None = None
    seed: int | None = None
    outputs: tuple[str, ...] = ()
    retryable: bool = False
    error: str | None = None
    code: int | str | None = None
    task_status: str | None = None
    submits: int = 0  # billed submits (answered with an id)
    unknown: int = 0  # submits whose answer was lost
    gone: int = 0  # times a known prediction was found gone and the row paid again
    submitted_at: str | None = None
    ts: str | None = None
    intent: str | None = None  # an open submit intent, with the price it reserved
    intent_price: float = 0.0
    damaged: bool = False  # a ledger line about this row could not be read
    # The row's last event as written, for the report and the dataset files; readers
    # that need only the row facts (a resume, status, a run's own writes) leave it empty.
    last: Mapping[str, Any] = field(default_factory=lambda: NO_RECORD)

    @property
    def status(self) -> RowStatus:
        return RowStatus.IN_DOUBT if self.intent is not None else self.base


@dataclass(slots=True)
class Doubt:
    """A submit that may have created (and billed) a task nobody has the id of: sent, and
    no answer recorded yet (a kill) or its answer lost. The account's listing settles it."""

    row: str
    intent: str
    price: float
    ts: str | None  # when the intent was written, as the ledger has it
    request_sha: str | None = None
    request_keys: tuple[str, ...] = ()
    model: str | None = None
    seed: int = -1
    fingerprint: str | None = None
    counted: bool = False  # already a possible duplicate (answer lost, or superseded)

    @property
    def at(self) -> float | None:
        """When the intent was written, epoch seconds; parsed only when asked: almost
        every intent is answered, and a 100k-row resume need not parse them all."""
        return parse_ts(self.ts)


@dataclass(slots=True)
class Damage:
    """A ledger line that could not be read as what it claims to be."""

    line: int
    row: str | None  # the row it names, when that much can still be read
    reason: str
    path: str = ""


@dataclass(slots=True)
class LedgerState:
    rows: dict[str, RowState] = field(default_factory=dict)
    # sha256 of an input -> (download_url, when, API base URL it was uploaded through)
    uploads: dict[str, tuple[str, float, str]] = field(default_factory=dict)
    runs: list[Mapping[str, Any]] = field(default_factory=list)
    finished: list[Mapping[str, Any]] = field(default_factory=list)
    predictions: TaskIds = field(default_factory=TaskIds)  # every id any row was given
    doubts: dict[str, Doubt] = field(default_factory=dict)  # by intent, until settled
    orphans: dict[str, str] = field(default_factory=dict)  # unattributed task id -> row
    price: float = DEFAULT_PRICE  # of the latest run, for events that carry none
    submits: int = 0  # billed: answered with a prediction id
    possible_duplicates: int = 0  # lost answers and intents that never got one
    billed_spend: float = 0.0
    unknown_spend: float = 0.0
    open_spend: float = 0.0
    corrupt_lines: int = 0
    torn_tail: bool = False
    damage: list[Damage] = field(default_factory=list)

    @property
    def damage_unattributed(self) -> bool:
        """A damaged line that names no row: it could be about any of them."""
        return any(d.row is None for d in self.damage)

    def damaged(self, line: int, row: str | None, reason: str) -> None:
        """Record a damaged line; the row it names is held from new submits."""
        self.corrupt_lines += 1
        self.damage.append(Damage(line, row, reason))
        if row is not None:
            own_row(self, row).damaged = True

    @property
    def spend(self) -> float:
        """What this folder may have been charged: billed, possibly billed, reserved."""
        return self.billed_spend + self.unknown_spend + self.open_spend

    @property
    def in_doubt(self) -> int:
        return sum(1 for r in self.rows.values() if r.intent is not None)

    def fresh_upload(self, sha256: str, now: float, base_url: str) -> str | None:
        """A download_url for this input uploaded less than 24 h ago through the same API."""
        entry = self.uploads.get(sha256)
        if entry is None or now - entry[1] > UPLOAD_REUSE_SECONDS or entry[2] != base_url:
            return None
        return entry[0]

    def counts(self, row_ids: Iterable[str] | None = None) -> dict[RowStatus, int]:
        """Rows per status, over ``row_ids`` (rows the ledger does not know are not
        started) or over every row the ledger knows."""
        # Told in C (map, attrgetter, countOf) rather than a status property call a row:
        # a million-row run counts its rows in a tenth of the time. A row's status is its
        # base, unless an intent is open (in doubt): those few are moved over after.
        states: list[RowState | None] = (
            list(self.rows.values()) if row_ids is None else list(map(self.rows.get, row_ids))
        )
        unknown = countOf(states, None)
        known = [row for row in states if row is not None] if unknown else states
        # Tallied by identity: an Enum's hash is Python code, called twice a row otherwise.
        tally = Counter(map(id, map(_base, known)))
        tally[id(RowStatus.NOT_STARTED)] += unknown
        if len(known) != countOf(map(_intent, known), None):
            for row in known:
                if row is not None and row.intent is not None:
                    tally[id(row.base)] -= 1
                    tally[id(RowStatus.IN_DOUBT)] += 1
        return {s: tally[id(s)] for s in RowStatus}


_base = attrgetter("base")
_intent = attrgetter("intent")


def _close_intent(state: LedgerState, row: RowState) -> float:
    """End an open intent; return the price it reserved (0 when none was open)."""
    if row.intent is None:
        return 0.0
    price = row.intent_price
    state.open_spend = max(state.open_spend - price, 0.0)
    row.intent = None
    row.intent_price = 0.0
    return price


def _count_unknown(state: LedgerState, row: RowState, price: float, n: int = 1) -> None:
    state.possible_duplicates += n
    state.unknown_spend += price * n
    row.unknown += n


def _uncount(state: LedgerState, row: RowState, price: float) -> None:
    """A possible duplicate proven not to be one (nothing created, or the task adopted)."""
    state.possible_duplicates = max(state.possible_duplicates - 1, 0)
    state.unknown_spend = max(state.unknown_spend - price, 0.0)
    row.unknown = max(row.unknown - 1, 0)


def _count_doubt(state: LedgerState, row: RowState, intent: str | None, price: float) -> None:
    _count_unknown(state, row, price)
    doubt = state.doubts.get(intent) if intent is not None else None
    if doubt is not None:
        doubt.counted = True


def _settle(state: LedgerState, row: RowState, event: SubmitSettled) -> None:
    doubt = state.doubts.pop(event.intent, None)
    if row.intent == event.intent:
        _close_intent(state, row)  # an open intent was never counted
    if event.outcome == ABSENT:
        if doubt is not None and doubt.counted:
            _uncount(state, row, doubt.price)
        return
    if event.prediction_id:
        state.orphans[event.prediction_id] = event.row
    if doubt is not None and not doubt.counted:
        _count_unknown(state, row, doubt.price)


def apply(
    state: LedgerState, event: Event, record: Mapping[str, Any], keep_last: bool = True
) -> None:
    """Apply one event (``record`` is its line as written, with ``ts``)."""
    ts = record.get("ts")
    ts = ts if isinstance(ts, str) else None
    if isinstance(event, RunStarted):
        state.runs.append(record)
        if event.price >= 0:
            state.price = event.price
        return
    if isinstance(event, Finished):
        state.finished.append(record)
        return
    if isinstance(event, Uploaded):
        when = parse_ts(ts)
        if when is not None:
            state.uploads[event.sha256] = (event.download_url, when, event.base_url)
        return
    if isinstance(event, Completed):
        apply_completed(
            state,
            (event.row, event.prediction_id, event.outputs, event.seed, event.fingerprint),
            ts,
            record,
            keep_last,
        )
        return
    if isinstance(event, Submitting):
        e = event
        intent = (e.row, e.seed, e.intent, e.price, e.fingerprint, e.request_sha, e.request_keys)
        apply_submitting(state, (*intent, e.model), ts)
        return
    if isinstance(event, Submitted):
        answer = (event.row, event.prediction_id, event.seed, event.intent, event.price)
        facts = (*answer, event.fingerprint, event.possible_duplicates)
        apply_submitted(state, facts, ts, record, keep_last)
        return
    row = own_row(state, event.row)
    row.ts = ts
    if isinstance(event, SubmitSettled):
        _settle(state, row, event)
        return
    open_intent = row.intent
    price = _close_intent(state, row)
    if isinstance(event, SubmitUnknown):
        _count_doubt(state, row, event.intent, price or state.price)
        return
    if isinstance(event, SubmitRefused):
        state.doubts.pop(event.intent, None)
        return  # nothing created, the row stands as it did
    if price:
        _count_doubt(state, row, open_intent, price)  # an outcome never recorded for it
    _outcome(row, record, keep_last, event.fingerprint, event.seed)
    if event.possible_duplicates:
        _count_unknown(state, row, state.price, event.possible_duplicates)
    row.base = RowStatus.IN_FLIGHT if event.live else RowStatus.FAILED
    row.prediction_id = event.prediction_id
    if event.prediction_id:
        state.predictions.add(event.prediction_id)
    row.error = event.error
    row.code = event.code
    row.retryable = event.retryable
    row.task_status = event.task_status
    if event.code == GONE_CODE:
        row.gone += 1


def apply_submitting(state: LedgerState, facts: SubmittingFacts, ts: str | None) -> None:
    """Apply a ``submitting`` event given as its facts: from an event (``apply``), or
    from a line laid out as the writer lays it (``submitting_line_facts``)."""
    row_id, seed, intent, price, fingerprint, request_sha, request_keys, model = facts
    row = own_row(state, row_id)
    row.ts = ts
    if row.intent is not None:
        # A second intent with no outcome for the first: the first may have billed.
        superseded = row.intent
        _count_doubt(state, row, superseded, _close_intent(state, row))
    row.intent = intent
    row.intent_price = price if price > 0 else state.price
    state.open_spend += row.intent_price
    state.doubts[intent] = Doubt(
        row_id, intent, row.intent_price, ts, request_sha, request_keys, model, seed, fingerprint
    )
    if seed >= 0:
        row.seed = seed


def apply_submitted(
    state: LedgerState,
    facts: SubmittedFacts,
    ts: str | None,
    record: Mapping[str, Any],
    keep_last: bool,
) -> None:
    """Apply a ``submitted`` event given as its facts (see ``apply_submitting``)."""
    row_id, pid, seed, intent, price, fingerprint, possible_duplicates = facts
    row = own_row(state, row_id)
    row.ts = ts
    reserved = _close_intent(state, row)
    _outcome(row, record, keep_last, fingerprint, seed)
    paid = price if price is not None else (reserved or state.price)
    doubt = state.doubts.pop(intent, None) if intent else None
    if doubt is not None and doubt.counted:
        _uncount(state, row, doubt.price)  # a lost answer's task, found and adopted
    state.submits += 1
    state.billed_spend += paid
    if possible_duplicates:
        _count_unknown(state, row, paid, possible_duplicates)
    if pid:
        state.predictions.add(pid)
    row.base = RowStatus.IN_FLIGHT
    row.prediction_id = pid or None
    row.submits += 1
    row.submitted_at = ts
    row.task_status = row.error = row.code = None
    row.retryable = False


def _outcome(
    row: RowState,
    record: Mapping[str, Any],
    keep_last: bool,
    fingerprint: str | None,
    seed: int | None,
) -> None:
    """What every outcome of a submit (submitted, completed, failed) records alike."""
    if keep_last:
        row.last = record
    if fingerprint is not None:
        row.fingerprint = fingerprint
    if seed is not None and seed >= 0:
        row.seed = seed


CompletedFacts = tuple[str, str, tuple[str, ...], int | None, str | None]


def apply_completed(
    state: LedgerState,
    facts: CompletedFacts,
    ts: str | None,
    record: Mapping[str, Any],
    keep_last: bool = True,
) -> None:
    """Apply a ``completed`` event given as its facts (row, prediction_id, outputs, seed,
    fingerprint): what ``apply`` does with a ``Completed``, and what a ledger read does
    with a checked ``completed`` line without building the event (``completed_facts``)."""
    row_id, pid, outputs, seed, fingerprint = facts
    row = own_row(state, row_id)
    row.ts = ts
    open_intent = row.intent
    price = _close_intent(state, row)
    if price:
        _count_doubt(state, row, open_intent, price)  # an outcome never recorded for it
    _outcome(row, record, keep_last, fingerprint, seed)
    row.base = RowStatus.COMPLETED
    if pid and row.prediction_id != pid:
        # Else the submitted line's string stays, one a row, and is known already: every
        # id a row is given joins ``predictions`` as it is given.
        row.prediction_id = pid
        state.predictions.add(pid)
    row.outputs = outputs
    row.task_status = "completed"
    row.error = row.code = None
    row.retryable = False


# The one state of every row this run completed and let go of (``retire``): read-only,
# and ``own_row`` gives a row its own state again should an event about it come later.
FINISHED = RowState(base=RowStatus.COMPLETED, task_status="completed")


def own_row(state: LedgerState, row_id: str) -> RowState:
    """The row's state to change: a new one for a row not seen yet, and a copy of what
    is still known (completed) for a row let go of."""
    row = state.rows.get(row_id)
    if row is None:
        row = state.rows[row_id] = RowState()
    elif row is FINISHED:
        row = state.rows[row_id] = RowState(base=RowStatus.COMPLETED, task_status="completed")
    return row


def retire(state: LedgerState, row_id: str) -> None:
    """Let go of what is known of a row this run completed: its line is on disk, and for
    the rest of the run only its status counts (planning never hands a row out twice).
    A million finished rows would otherwise keep about 550 bytes each. A row with an
    open intent or a damaged line keeps its state."""
    row = state.rows.get(row_id)
    if (
        row is not None
        and row.base is RowStatus.COMPLETED
        and row.intent is None
        and not row.damaged
    ):
        state.rows[row_id] = FINISHED


def merge_states(states: list[LedgerState]) -> LedgerState:
    """One view of several ledgers (shards).

    Shards hold disjoint rows, so a row's state comes from the one ledger that has it;
    a row in several (an unsharded run, then shards) keeps its latest event by time.
    """
    if len(states) == 1:
        return states[0]
    merged = LedgerState()
    for state in states:
        for row_id, row in state.rows.items():
            known = merged.rows.get(row_id)
            if known is None or str(row.ts or "") >= str(known.ts or ""):
                merged.rows[row_id] = row
        merged.uploads.update(state.uploads)
        merged.runs += state.runs
        merged.finished += state.finished
        merged.predictions.update(state.predictions)
        merged.doubts.update(state.doubts)
        merged.orphans.update(state.orphans)
        merged.price = state.price if state.runs else merged.price
        merged.submits += state.submits
        merged.possible_duplicates += state.possible_duplicates
        merged.billed_spend += state.billed_spend
        merged.unknown_spend += state.unknown_spend
        merged.open_spend += state.open_spend
        merged.corrupt_lines += state.corrupt_lines
        merged.damage += state.damage
        merged.torn_tail = merged.torn_tail or state.torn_tail
    return merged


# -- what a run does with a row ---------------------------------------------------


class Action(Enum):
    DONE = "done"
    FAILED = "failed"
    POLL = "poll"
    SUBMIT = "submit"
    HELD = "held"  # would be submitted, but a damaged ledger line may be about it


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    prediction_id: str | None = None
    seed: int | None = None


def plan_row(
    state: RowState | None,
    fingerprint: str,
    files: set[str],
    retry_failed: bool,
    hold_all: bool = False,
) -> Plan:
    """Decide what a row needs, from its state alone. A row a damaged line may concern
    (``hold_all``: a damaged line naming no row) is never paid for again before the
    user has looked (``wsbatch repair``): it may already be paid."""
    if state is None:
        return _HELD if hold_all else _SUBMIT
    plan = _plan(state, fingerprint, files, retry_failed)
    if plan.action is Action.SUBMIT and (hold_all or state.damaged):
        return Plan(Action.HELD, plan.prediction_id, plan.seed)
    return plan


def is_done(state: RowState, fingerprint: str, files: set[str]) -> bool:
    """Completed for this very request, every output on disk: the plan most rows of a
    resume get, told without making one."""
    return state is FINISHED or (
        state.base is RowStatus.COMPLETED
        and state.intent is None
        and (state.fingerprint is None or state.fingerprint == fingerprint)
        and bool(state.outputs)
        and files.issuperset(state.outputs)
    )


def _plan(state: RowState, fingerprint: str, files: set[str], retry_failed: bool) -> Plan:
    if is_done(state, fingerprint, files):
        return _DONE
    if state.fingerprint is not None and state.fingerprint != fingerprint:
        return _SUBMIT  # the request changed under the same id: a new task
    seed, pid = state.seed, state.prediction_id
    status = state.status
    if status is RowStatus.COMPLETED:
        # An output went missing: fetch it again while the server still has it.
        return Plan(Action.POLL, pid, seed) if pid else _submit(seed)
    if status is RowStatus.IN_FLIGHT and pid:
        return Plan(Action.POLL, pid, seed)
    if status is RowStatus.FAILED and not state.retryable and not retry_failed:
        return _FAILED
    # Not started, in doubt (counted as a possible duplicate already), or retryable.
    return _submit(seed)


# The plans most rows get, made once: a million-row plan makes no million objects.
_DONE = Plan(Action.DONE)
_FAILED = Plan(Action.FAILED)
_SUBMIT = Plan(Action.SUBMIT)
_HELD = Plan(Action.HELD)


def _submit(seed: int | None) -> Plan:
    return _SUBMIT if seed is None else Plan(Action.SUBMIT, None, seed)


def count_actions(plans: Iterable[Plan]) -> dict[str, int]:
    """Rows per action: what `validate` and the start of a run announce."""
    counts = {a.value: 0 for a in Action}
    for plan in plans:
        counts[plan.action.value] += 1
    return counts
