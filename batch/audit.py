"""``wsbatch audit``: the folder's ledgers against what the account listed and billed.

For the time windows of the folder's runs it lists the account's predictions and
billing records of the models the runs used, then says:

- orphans: tasks billed or listed that no row of any ledger holds. Some are
  recorded already (lost answers settled as possible duplicates, with their id);
  the rest no ledger knows: kills between send and answer that no run has
  settled yet, or other use of the same account in those windows;
- failed tasks of the folder, refunded or not yet (the vendor refunds within
  about three hours);
- spend as recorded (billed, possibly billed, reserved) against spend billed.

It never submits. With ``adopt`` it settles what the ledgers left in doubt the
way a run's start does, under the folder's lock: a task whose listed inputs
match a request in full is adopted for its row; nothing less adopts one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batch.client import Billed, Client, Listed
from batch.errors import UsageError
from batch.ledger import LedgerWriter, OtherLedgers, ledger_paths, read_ledger, read_ledgers
from batch.lock import OutDirLock
from batch.metrics import Metrics
from batch.settle import CLOCK_SKEW_S, Settler
from batch.state import LedgerState, parse_ts

# A run's tasks may be created (and billed) this long after its last line: a kill, a
# lost answer the server finished handling late.
AFTER_RUN_S = 600.0


@dataclass(frozen=True, slots=True)
class Orphan:
    prediction_id: str
    model: str | None
    amount: float | None  # None when the billing records do not have it (yet)
    refunded: bool
    created_at: str | None
    recorded_for: str | None  # the row whose lost answer claimed it, if any


@dataclass(slots=True)
class Audit:
    out_dir: str
    windows: list[tuple[str, str]]
    models: list[str]
    rows_tasks: int  # tasks the ledgers hold for rows
    recorded_spend: float
    possible_duplicates: int
    in_doubt: int  # submits whose outcome no ledger settled yet
    billed_tasks: int  # billing records of those models in those windows
    billed_spend: float  # charged and not refunded
    billed_for_rows: float
    orphans: list[Orphan] = field(default_factory=list)
    failed_refunded: int = 0
    failed_not_refunded: int = 0
    adopted: int = 0
    settled: int = 0

    @property
    def unrecorded(self) -> list[Orphan]:
        return [o for o in self.orphans if o.recorded_for is None]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["unrecorded_orphans"] = len(self.unrecorded)
        return out


def run_windows(state: LedgerState, now: float) -> list[tuple[float, float]]:
    """The spans in which the folder's runs could have created tasks, merged."""
    finished = {
        str(r.get("run_id")): parse_ts(r.get("ts")) for r in state.finished if r.get("run_id")
    }
    starts = sorted(
        (when, str(r.get("run_id")))
        for r in state.runs
        if (when := parse_ts(r.get("ts"))) is not None
    )
    spans: list[tuple[float, float]] = []
    for n, (start, run_id) in enumerate(starts):
        end = finished.get(run_id)
        if end is None:  # killed: until the next run began, or now
            end = starts[n + 1][0] if n + 1 < len(starts) else now
        spans.append((start - CLOCK_SKEW_S, min(end + AFTER_RUN_S, now)))
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _models(state: LedgerState) -> list[str]:
    models = {str(r.get("model")) for r in state.runs if r.get("model")}
    models |= {d.model for d in state.doubts.values() if d.model}
    return sorted(models)


async def audit(
    out_dir: Path, client: Client, *, adopt: bool = False, settle_delay: float = 0.0
) -> Audit:
    paths = ledger_paths(out_dir)
    if not paths:
        raise UsageError(f"{out_dir} has no ledger: not a wsbatch output folder")
    result = Audit(out_dir=str(out_dir), windows=[], models=[], rows_tasks=0, recorded_spend=0,
                   possible_duplicates=0, in_doubt=0, billed_tasks=0, billed_spend=0,
                   billed_for_rows=0)  # fmt: skip
    if adopt:
        result.adopted, result.settled = await _settle_doubts(out_dir, paths, client, settle_delay)
    state = await asyncio.to_thread(read_ledgers, paths, keep_last=False)
    now = time.time()
    windows = run_windows(state, now)
    models = _models(state)
    listed: dict[str, Listed] = {}
    billed: dict[str, Billed] = {}
    for since, until in windows:
        for model in models:
            listing = await client.list_predictions(model, since, until)
            listed.update((item.id, item) for item in listing.items)
        for charge in await client.billings(since, until):
            if charge.model is None or charge.model in models:
                billed[charge.prediction_id] = charge
    known = state.predictions
    known.update(row.prediction_id for row in state.rows.values() if row.prediction_id)
    result.windows = [(_iso(a), _iso(b)) for a, b in windows]
    result.models = models
    result.rows_tasks = len(known)
    result.recorded_spend = round(state.spend, 6)
    result.possible_duplicates = state.possible_duplicates
    result.in_doubt = len(state.doubts)
    result.billed_tasks = len(billed)
    charged = {pid: b.amount for pid, b in billed.items() if not b.refunded}
    result.billed_spend = round(sum(charged.values()), 6)
    result.billed_for_rows = round(sum(a for pid, a in charged.items() if pid in known), 6)
    for pid in sorted(set(listed) | set(billed)):
        if pid in known:
            record = billed.get(pid)
            if record is not None and record.status == "failed":
                if record.refunded:
                    result.failed_refunded += 1
                else:
                    result.failed_not_refunded += 1
            continue
        item, record = listed.get(pid), billed.get(pid)
        result.orphans.append(
            Orphan(
                prediction_id=pid,
                model=(item.model if item else None) or (record.model if record else None),
                amount=record.amount if record else None,
                refunded=bool(record and record.refunded),
                created_at=item.created_at if item else None,
                recorded_for=state.orphans.get(pid),
            )
        )
    return result


async def _settle_doubts(
    out_dir: Path, paths: list[Path], client: Client, delay: float
) -> tuple[int, int]:
    """Settle each ledger's doubts in that ledger, holding the whole folder."""
    lock = OutDirLock(out_dir)
    await asyncio.to_thread(lock.acquire)
    adopted = settled = 0
    with lock:
        for path in paths:
            state, _ = await asyncio.to_thread(read_ledger, path, keep_last=False)
            if not state.doubts:
                continue
            adoptable = {
                d.row: d.fingerprint is not None
                and d.fingerprint == getattr(state.rows.get(d.row), "fingerprint", None)
                for d in state.doubts.values()
            }
            before = state.submits
            writer = LedgerWriter(path, state)
            await writer.start()
            try:
                settler = Settler(
                    client, writer, state, Metrics(), delay=delay, others=OtherLedgers(path)
                )
                done = await settler.doubts(adoptable)
                await settler.finish(wait=0.0)
            finally:
                await writer.close()
            adopted += state.submits - before
            settled += done - (state.submits - before)
    return adopted, settled


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def describe(a: Audit) -> list[str]:
    money = _money
    unrecorded = a.unrecorded
    recorded = [o for o in a.orphans if o.recorded_for is not None]
    lines = [
        f"{a.out_dir}: {len(a.windows)} run window(s), models {', '.join(a.models) or '-'}",
        f"  ledgers: {a.rows_tasks} tasks held by rows; {a.possible_duplicates} possible "
        f"duplicate(s); {a.in_doubt} submit(s) still in doubt; spend recorded "
        f"{money(a.recorded_spend)}",
        f"  account: {a.billed_tasks} task(s) billed in those windows; charged "
        f"{money(a.billed_spend)}, of which {money(a.billed_for_rows)} for rows' tasks",
        f"  orphans: {len(a.orphans)} task(s) no row holds, "
        f"{money(sum(o.amount or 0.0 for o in a.orphans if not o.refunded))}: "
        f"{len(recorded)} recorded as possible duplicates, {len(unrecorded)} unknown to "
        "every ledger",
    ]
    for o in unrecorded[:50]:
        cost = money(o.amount) if o.amount is not None else "not billed yet"
        lines.append(f"    {o.prediction_id} {o.model or ''} created {o.created_at or '?'} {cost}")
    if len(unrecorded) > 50:
        lines.append(f"    ... and {len(unrecorded) - 50} more (--json lists all)")
    lines.append(
        f"  failed tasks: {a.failed_refunded} refunded, {a.failed_not_refunded} not yet "
        "(refunds come within about 3 hours)"
    )
    if a.adopted or a.settled:
        lines.append(f"  settled now: {a.adopted} adopted on a full input match, {a.settled} "
                     "settled from the listing")  # fmt: skip
    if unrecorded:
        lines.append(
            "  unknown orphans are kills no run has settled yet, or other use of the same "
            "account in those windows; `wsbatch audit --adopt` adopts only tasks whose "
            "listed inputs match a request in full"
        )
    return lines


def _money(value: float | None) -> str:
    return f"${value:.3f}" if value is not None else "-"
