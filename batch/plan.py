"""What a run would do, worked out offline: the schema checks, the folder's owner, each
row's plan from the ledgers, and the estimate at a given price. `validate` uses it
without loading the HTTP stack."""

from __future__ import annotations

from pathlib import Path

from batch.account import Estimate, Prices, estimate
from batch.errors import ManifestError
from batch.folder import check_owner
from batch.ledger import ledger_paths, read_ledgers
from batch.manifest import Manifest, Row
from batch.models import known as known_models
from batch.models import schema_problems
from batch.outputs import existing_files
from batch.state import Action, count_actions, plan_row


def check_schemas(manifest: Manifest) -> None:
    """Every row's params against its model's schema (cached or bundled), before any
    request: a field the model does not take is a paid task that fails."""
    problems = schema_problems(manifest.rows, known_models())
    if problems:
        raise ManifestError(problems)


def plan_manifest(
    manifest: Manifest, out_dir: Path, retry_failed: bool
) -> tuple[dict[str, int], float, list[Row]]:
    check_schemas(manifest)
    check_owner(out_dir, manifest)
    state = read_ledgers(ledger_paths(out_dir), keep_last=False)
    files = existing_files(out_dir)
    hold_all = state.damage_unattributed
    plans = [
        (row, plan_row(state.rows.get(row.id), row.fingerprint, files, retry_failed, hold_all))
        for row in manifest.rows
    ]
    to_submit = [row for row, plan in plans if plan.action is Action.SUBMIT]
    return count_actions(plan for _, plan in plans), state.spend, to_submit


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
            row.model: info.base_price
            for row in {r.model: r for r in to_submit}.values()
            if (info := catalogue.get(row.model)) is not None and info.base_price is not None
        }
        prices = Prices(price, base, source="catalogue")
    return estimate(counts, spent, to_submit, prices, None)
