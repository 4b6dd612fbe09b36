"""Plans as data: the catalogue in ``bastion.plans`` and the entitlements a plan gives.

A plan carries a monthly token budget, a monthly call budget, a request rate,
the models it may use, its overage policy (``block``: 402 past the budget;
``metered``: the gateway may let calls through and metering bills them) and
its monthly price (integer minor units of ``currency``). The defaults (free,
pro, enterprise) come with migrations 0007 and 0015; operators edit them with
``bastion billing plan-set``, in the platform context.

**What counts as an upgrade** (:func:`is_upgrade`): a move from plan A to
plan B is a *downgrade* only if B costs no more than A (integer prices, same
currency — prices in different currencies are not comparable, so such a
move is an upgrade unless B is free) **and** B gives nothing A does not: no
larger token, call or rate budget, no model outside A's, no ``metered``
overage where A blocks. Everything else — a dearer plan, and an equal or
cheaper one that gives more of anything — is an upgrade, which only the
payment provider or two operators may make (:mod:`bastion.billing.service`,
:mod:`bastion.billing.approvals`).

A catalogue edit that gives a plan's subscribers more for their money (a
larger budget, another model, a lower price: :func:`edit_gives_more`) is an
upgrade of every tenant on it: :meth:`PlanCatalogue.put` refuses it, and it
goes through the same two-operator approval. Creating a plan, or an edit
that gives no more, applies at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.billing.errors import CatalogueEditNeedsApproval, UnknownPlan
from bastion.billing.models import PLATFORM
from bastion.db.pool import Conn, Database

_COLUMNS = (
    "code, name, rank, monthly_token_budget, monthly_call_budget, requests_per_minute, "
    "models_allowed, overage_policy, stripe_price_id, active, monthly_price, currency"
)
# ``metered`` lets calls past the budget through (billed later): more than ``block``.
_OVERAGE_ORDER = {"block": 0, "metered": 1}


@dataclass(frozen=True)
class Plan:
    code: str
    name: str
    rank: int
    monthly_token_budget: int
    monthly_call_budget: int
    requests_per_minute: int
    models_allowed: tuple[str, ...]
    overage_policy: str
    stripe_price_id: str | None = None
    active: bool = True
    monthly_price: int = 0  # minor units of ``currency`` (cents for usd)
    currency: str = "usd"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Plan:
        return cls(**{**row, "models_allowed": tuple(row["models_allowed"])})

    def allows_model(self, model: str) -> bool:
        return "*" in self.models_allowed or model in self.models_allowed


def _models_beyond(candidate: tuple[str, ...], reference: tuple[str, ...]) -> bool:
    """Whether ``candidate`` admits a model ``reference`` does not (``*``: every model)."""
    if "*" in reference:
        return False
    return "*" in candidate or not set(candidate) <= set(reference)


def gives_more(candidate: Plan, reference: Plan) -> bool:
    """Whether ``candidate`` gives anything ``reference`` does not (budgets, rate,
    models, overage)."""
    return (
        candidate.monthly_token_budget > reference.monthly_token_budget
        or candidate.monthly_call_budget > reference.monthly_call_budget
        or candidate.requests_per_minute > reference.requests_per_minute
        or _models_beyond(candidate.models_allowed, reference.models_allowed)
        or _OVERAGE_ORDER.get(candidate.overage_policy, 1)
        > _OVERAGE_ORDER.get(reference.overage_policy, 1)
    )


def costs_more(candidate: Plan, reference: Plan) -> bool:
    """Whether ``candidate`` costs more than ``reference`` a month; a price in
    another currency is not comparable and counts as more (unless it is zero)."""
    if candidate.monthly_price == 0:
        return False
    if candidate.currency != reference.currency and reference.monthly_price != 0:
        return True
    return candidate.monthly_price > reference.monthly_price


def is_upgrade(current: Plan, target: Plan) -> bool:
    """Whether moving from ``current`` to ``target`` needs payment or two operators:
    ``target`` costs more, or gives anything ``current`` does not."""
    return costs_more(target, current) or gives_more(target, current)


def edit_gives_more(before: Plan, after: Plan) -> bool:
    """Whether changing a catalogue plan from ``before`` to ``after`` gives its
    subscribers more for their money: more of anything, or a lower price."""
    return gives_more(after, before) or costs_more(before, after)


@dataclass(frozen=True)
class Entitlements:
    """What a tenant may use right now, derived from its subscription's plan."""

    plan: str
    status: str
    monthly_token_budget: int
    monthly_call_budget: int
    requests_per_minute: int
    models_allowed: tuple[str, ...]
    overage_policy: str


async def plan_by_code(tx: Conn, code: str) -> Plan:
    """Return the plan ``code``; raise :class:`UnknownPlan`."""
    cur = await tx.execute(f"SELECT {_COLUMNS} FROM bastion.plans WHERE code = %s", (code,))
    row = await cur.fetchone()
    if row is None:
        raise UnknownPlan("no such plan")
    return Plan.from_row(row)


async def plan_by_stripe_price(tx: Conn, price_id: str) -> Plan | None:
    cur = await tx.execute(
        f"SELECT {_COLUMNS} FROM bastion.plans WHERE stripe_price_id = %s", (price_id,)
    )
    row = await cur.fetchone()
    return None if row is None else Plan.from_row(row)


class PlanCatalogue:
    """Reads and edits the catalogue (edits in the platform context only)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def list(self) -> list[Plan]:
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(f"SELECT {_COLUMNS} FROM bastion.plans ORDER BY rank, code")
            return [Plan.from_row(row) for row in await cur.fetchall()]

    async def get(self, code: str) -> Plan:
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            return await plan_by_code(tx, code)

    async def put(self, plan: Plan, *, actor: str) -> Plan:
        """Create ``plan``, or replace the plan of its code with an edit that gives
        its subscribers no more (:func:`edit_gives_more`). Subscribed tenants'
        budgets follow at their next plan change or period; the gateway reads
        budgets, not plans.

        Raises :class:`CatalogueEditNeedsApproval` (nothing written) for an
        edit that gives more: it needs a second operator
        (:meth:`bastion.billing.approvals.PlanApprovals.request_catalogue_edit`).
        """
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                f"SELECT {_COLUMNS} FROM bastion.plans WHERE code = %s FOR UPDATE", (plan.code,)
            )
            row = await cur.fetchone()
            if row is not None and edit_gives_more(Plan.from_row(row), plan):
                raise CatalogueEditNeedsApproval(
                    "this edit gives the plan's subscribers more for their money; "
                    "a second operator must approve it"
                )
            await write_plan(tx, plan, actor=actor)
        return plan


async def write_plan(tx: Conn, plan: Plan, *, actor: str) -> None:
    """Create or replace ``plan`` in ``tx`` (the platform context), unchecked: the
    callers decide whether it may be written."""
    await tx.execute(
        "INSERT INTO bastion.plans (code, name, rank, monthly_token_budget, "
        "monthly_call_budget, requests_per_minute, models_allowed, overage_policy, "
        "stripe_price_id, active, monthly_price, currency, updated_by) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name, rank = EXCLUDED.rank, "
        "monthly_token_budget = EXCLUDED.monthly_token_budget, "
        "monthly_call_budget = EXCLUDED.monthly_call_budget, "
        "requests_per_minute = EXCLUDED.requests_per_minute, "
        "models_allowed = EXCLUDED.models_allowed, "
        "overage_policy = EXCLUDED.overage_policy, "
        "stripe_price_id = EXCLUDED.stripe_price_id, active = EXCLUDED.active, "
        "monthly_price = EXCLUDED.monthly_price, currency = EXCLUDED.currency, "
        "updated_by = EXCLUDED.updated_by, updated_at = now()",
        (
            plan.code,
            plan.name,
            plan.rank,
            plan.monthly_token_budget,
            plan.monthly_call_budget,
            plan.requests_per_minute,
            list(plan.models_allowed),
            plan.overage_policy,
            plan.stripe_price_id,
            plan.active,
            plan.monthly_price,
            plan.currency,
            actor,
        ),
    )
