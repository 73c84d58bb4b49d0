"""What a run would do, worked out offline: the schema checks, the folder's owner, each
row's plan from the ledgers, and the estimate at a given price. `validate` uses it
without loading the HTTP stack."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from batch.account import Estimate, Prices, estimate
from batch.errors import ManifestError
from batch.folder import check_owner
from batch.ledger import ledger_paths, read_ledgers
from batch.manifest import Manifest, Row, RowTable, ids_and_fingerprints, models_of
from batch.models import known as known_models
from batch.models import schema_problems
from batch.outputs import existing_files
from batch.state import Action, LedgerState, is_done, plan_row

_CODE = {action: n for n, action in enumerate(Action)}
# By identity: an Enum's hash is Python code, a million calls of it a second of planning.
_CODE_BY_ID = {id(action): n for action, n in _CODE.items()}


@dataclass(frozen=True, slots=True)
class Planned:
    """Each row's action as one byte, in manifest order: a million rows are planned
    without a million plan objects, and the run works out a row's plan again only
    when a worker takes it."""

    actions: bytearray

    @property
    def counts(self) -> dict[str, int]:
        """Rows per action: what `validate` and the start of a run announce."""
        return {action.value: self.actions.count(code) for action, code in _CODE.items()}

    def indices(self, action: Action) -> Iterator[int]:
        """The positions of the rows planned to ``action``, in order (found in C: a resume
        of a million finished rows looks at none of them here)."""
        code = _CODE[action]
        found = self.actions.find(code)
        while found >= 0:
            yield found
            found = self.actions.find(code, found + 1)

    def has(self, index: int, action: Action) -> bool:
        return self.actions[index] == _CODE[action]


def plan_rows(
    rows: Sequence[Row], state: LedgerState, files: set[str], retry_failed: bool
) -> Planned:
    """Plan every row from the ledger state and the files on disk, in one pass."""
    known, hold_all, code = state.rows.get, state.damage_unattributed, _CODE_BY_ID
    done = _CODE[Action.DONE]
    actions = bytearray([done]) * len(rows)
    # Ids and fingerprints only: a finished row's Row is never made.
    for n, (row_id, fingerprint) in enumerate(ids_and_fingerprints(rows)):
        row_state = known(row_id)
        if row_state is not None and is_done(row_state, fingerprint, files):
            continue  # the common case of a resume, told without a plan
        plan = plan_row(row_state, fingerprint, files, retry_failed, hold_all)
        actions[n] = code[id(plan.action)]
    return Planned(actions)


def check_schemas(manifest: Manifest) -> None:
    """Every row's params against its model's schema (cached or bundled), before any
    request: a field the model does not take is a paid task that fails."""
    rows: Iterable[Row] = manifest.rows
    catalogue = known_models()
    if isinstance(rows, RowTable):
        # What is checked is what rows share: one row of each, then every row like the
        # ones that fail (each problem names its row's line).
        rows = rows.of_kinds(k for k, r in rows.samples() if schema_problems([r], catalogue))
    problems = schema_problems(rows, catalogue)
    if problems:
        raise ManifestError(problems)


def plan_manifest(
    manifest: Manifest, out_dir: Path, retry_failed: bool
) -> tuple[dict[str, int], float, Sequence[Row]]:
    check_schemas(manifest)
    check_owner(out_dir, manifest)
    state = read_ledgers(ledger_paths(out_dir), keep_last=False)
    rows = manifest.rows
    planned = plan_rows(rows, state, existing_files(out_dir), retry_failed)
    to_submit = _picked(rows, planned.indices(Action.SUBMIT))
    return planned.counts, state.spend, to_submit


def _picked(rows: Sequence[Row], indices: Iterable[int]) -> Sequence[Row]:
    """The rows at ``indices``; a table's stay columns (a million rows to submit are
    counted and priced without making them)."""
    if isinstance(rows, RowTable):
        return rows.take(indices)
    return [rows[n] for n in indices]


def estimate_offline(
    manifest: Manifest, out_dir: Path, retry_failed: bool, price: float, *, given: bool = False
) -> Estimate:
    """The plan and its cost from the folder's ledgers alone: at ``price`` when the user
    ``given`` it, else at each model's base price from the cached (or bundled) catalogue,
    ``price`` for models it does not know."""
    counts, spent, to_submit = plan_manifest(manifest, out_dir, retry_failed)
    prices = Prices(price)
    if not given:
        catalogue = known_models()
        base = {
            model: info.base_price
            for model in set(models_of(to_submit))
            if (info := catalogue.get(model)) is not None and info.base_price is not None
        }
        prices = Prices(price, base, source="catalogue")
    return estimate(counts, spent, to_submit, prices, None)
