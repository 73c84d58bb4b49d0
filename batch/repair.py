"""``wsbatch repair``: what to do about damaged ledger lines, decided by the user.

A damaged line (garbled JSON, a known event with broken fields) may be the only
record of a payment, so a run never pays for a row it may concern: such rows are
*held*. ``repair`` lists the damage and what dropping it would mean; with
``drop`` it moves the damaged lines to ``ledger.damaged.jsonl`` (nothing is
deleted) and rewrites the ledger without them, under the folder's lock. The rows
then plan from their remaining lines, and may be paid again: ``wsbatch audit``
shows what the account holds for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from batch.errors import UsageError
from batch.files import atomic_file
from batch.ledger import ledger_paths, read_ledger
from batch.lock import OutDirLock
from batch.state import Damage

DAMAGED_NAME = "ledger.damaged.jsonl"


@dataclass(slots=True)
class Repair:
    damage: list[Damage] = field(default_factory=list)
    dropped: int = 0
    torn_cut: int = 0  # ledgers whose torn last line was cut

    @property
    def rows(self) -> list[str]:
        return sorted({d.row for d in self.damage if d.row is not None})

    @property
    def unattributed(self) -> int:
        return sum(1 for d in self.damage if d.row is None)


def inspect(out_dir: Path) -> Repair:
    paths = ledger_paths(out_dir)
    if not paths:
        raise UsageError(f"{out_dir} has no ledger: not a wsbatch output folder")
    found = Repair()
    for path in paths:
        state, _ = read_ledger(path, keep_last=False, from_snapshot=False)
        found.damage += state.damage
    return found


def drop(out_dir: Path) -> Repair:
    """Move every damaged line out of the folder's ledgers, holding the whole folder."""
    found = inspect(out_dir)
    lock = OutDirLock(out_dir)
    lock.acquire()
    with lock:
        for path in ledger_paths(out_dir):
            state, good_end = read_ledger(path, keep_last=False, from_snapshot=False)
            bad = {d.line for d in state.damage}
            data = path.read_bytes()
            if not bad and good_end == len(data):
                continue
            lines = data[:good_end].splitlines(keepends=True)
            kept = [line for n, line in enumerate(lines, 1) if n not in bad]
            moved = [line for n, line in enumerate(lines, 1) if n in bad]
            if moved:
                # Appended whole, before the ledger changes: a crash loses nothing.
                fd = os.open(
                    out_dir / DAMAGED_NAME,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                    0o644,
                )
                try:
                    os.write(fd, b"".join(moved))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            with atomic_file(path) as fh:
                fh.write(b"".join(kept))
            found.dropped += len(moved)
            found.torn_cut += good_end < len(data)
    return found


def describe(found: Repair, out_dir: Path, dropped: bool) -> list[str]:
    if not found.damage:
        return [f"{out_dir}: no damaged ledger line"]
    lines = [f"{out_dir}: {len(found.damage)} damaged ledger line(s):"]
    for d in found.damage[:50]:
        about = f"row {d.row}" if d.row is not None else "names no row"
        lines.append(f"  {d.path}:{d.line}: {d.reason} ({about})")
    if len(found.damage) > 50:
        lines.append(f"  ... and {len(found.damage) - 50} more")
    rows = found.rows
    if dropped:
        lines.append(
            f"moved {found.dropped} line(s) to {DAMAGED_NAME}; the next run plans "
            f"{len(rows)} row(s) from their remaining lines and may pay for them again "
            "(`wsbatch audit` shows what the account holds)"
        )
    else:
        held = "every row not finished" if found.unattributed else f"rows {', '.join(rows)}"
        lines.append(
            f"runs hold {held} from new submits until this is settled. "
            f"`wsbatch repair {out_dir} --drop` moves the damaged lines to {DAMAGED_NAME}; "
            "the rows they concern are then planned from their other lines (and may be "
            "paid again)"
        )
    return lines
