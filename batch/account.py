"""Money before spending: the live price of each model the run submits, the account's
balance, and the estimate for the rows still to do.

The live price comes from ``POST /api/v3/model/price`` (or the older pricing
shape), asked once per model with a row's real fields. ``--price`` is only the
offline fallback: a budget counted at a guessed price is no budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batch.manifest import Row, RowTable, models_of

if TYPE_CHECKING:
    from batch.client import Client

# A manifest naming more models than this is priced at --price beyond them: asking costs
# a request each, and such a manifest is a sweep that the estimate only sketches.
MAX_PRICED_MODELS = 20


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per task, by model; ``fallback`` for models the API did not price."""

    fallback: float
    by_model: Mapping[str, float] = field(default_factory=dict)
    source: str = "live"  # where by_model came from: "live", or "catalogue" (offline)

    def of(self, model: str) -> float:
        return self.by_model.get(model, self.fallback)

    @property
    def live(self) -> bool:
        return bool(self.by_model)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a run is about to do and what it may cost, before the first submit."""

    counts: Mapping[str, int]  # rows per action
    spent: float  # what the folder has committed already
    cost: float  # the rows to submit, at ``prices``
    prices: Prices
    balance: float | None = None  # None when offline or not readable

    @property
    def short_by(self) -> float:
        """How much the estimate exceeds the balance (0 when it is covered or unknown)."""
        if self.balance is None:
            return 0.0
        return max(self.cost - self.balance, 0.0)


def price_inputs(row: Row) -> dict[str, Any]:
    """A row's fields as the price endpoint wants them; a local image is not uploaded for
    a quote (the price of an edit does not depend on the picture)."""
    inputs: dict[str, Any] = {**row.params, "prompt": row.prompt, "seed": row.seed}
    inputs["output_format"] = row.output_format
    if row.image_path is None:
        inputs["image"] = row.image
    return inputs


async def live_prices(client: Client, rows: Iterable[Row], fallback: float) -> Prices:
    """The live price of each model among ``rows``, asked with its first row's fields."""
    first: dict[str, Row] = {}
    if isinstance(rows, RowTable):
        rows = rows[:1]  # one model for every row of a table
    for row in rows:
        if row.model not in first:
            first[row.model] = row
            if len(first) >= MAX_PRICED_MODELS:
                break
    models = list(first)
    quotes = await asyncio.gather(*(client.price(m, price_inputs(first[m])) for m in models))
    return Prices(fallback, {m: q for m, q in zip(models, quotes, strict=True) if q is not None})


def estimate(
    counts: Mapping[str, int],
    spent: float,
    to_submit: Iterable[Row],
    prices: Prices,
    balance: float | None,
) -> Estimate:
    cost = sum(map(prices.of, models_of(to_submit)))
    return Estimate(counts, spent, cost, prices, balance)


def describe(e: Estimate) -> str:
    """The plan line: rows per action, the estimate and where its price came from."""
    c = e.counts
    total = sum(c.values())
    models = sorted(e.prices.by_model.items())
    if len(models) == 1:
        price = f"${models[0][1]:g} {e.prices.source} price"
    elif models:
        price = f"{e.prices.source} prices"
    else:
        price = f"${e.prices.fallback:g} from --price"
    held = f", {c['held']} held by a damaged ledger" if c.get("held") else ""
    line = (
        f"{total} rows: {c['done']} done, {c['poll']} to poll, "
        f"{c['submit']} to submit, {c['failed']} failed{held}"
        f"; estimated cost ${e.cost:.2f} ({c['submit']} at {price})"
    )
    if e.spent:
        line += f"; ${e.spent:.2f} spent in this folder so far"
    if e.balance is not None:
        line += f"; balance ${e.balance:.2f}"
    return line


def shortfall(e: Estimate) -> str | None:
    """A warning when the balance does not cover the estimate."""
    if not e.short_by:
        return None
    return (
        f"the estimate ${e.cost:.2f} exceeds the account's balance ${e.balance:.2f}: "
        "submitting stops when the balance is used up; top up to finish in one run"
    )
