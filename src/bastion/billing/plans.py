"""Plans as data: the catalogue in ``bastion.plans`` and the entitlements a plan gives.

A plan carries a monthly token budget, a monthly call budget, a request rate,
the models it may use and its overage policy (``block``: 402 past the budget;
``metered``: the gateway may let calls through and metering bills them). The
defaults (free, pro, enterprise) come with migration 0007; operators edit them
with ``bastion billing plan-set``, in the platform context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.billing.errors import UnknownPlan
from bastion.billing.models import PLATFORM
from bastion.db.pool import Conn, Database

_COLUMNS = (
    "code, name, rank, monthly_token_budget, monthly_call_budget, requests_per_minute, "
    "models_allowed, overage_policy, stripe_price_id, active"
)


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

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Plan:
        return cls(**{**row, "models_allowed": tuple(row["models_allowed"])})

    def allows_model(self, model: str) -> bool:
        return "*" in self.models_allowed or model in self.models_allowed


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
        raise UnknownPlan(f"no plan {code!r}")
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
        """Create or replace ``plan`` (by code). Subscribed tenants' budgets follow
        at their next plan change or period; the gateway reads budgets, not plans."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            await tx.execute(
                "INSERT INTO bastion.plans (code, name, rank, monthly_token_budget, "
                "monthly_call_budget, requests_per_minute, models_allowed, overage_policy, "
                "stripe_price_id, active, updated_by) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name, rank = EXCLUDED.rank, "
                "monthly_token_budget = EXCLUDED.monthly_token_budget, "
                "monthly_call_budget = EXCLUDED.monthly_call_budget, "
                "requests_per_minute = EXCLUDED.requests_per_minute, "
                "models_allowed = EXCLUDED.models_allowed, "
                "overage_policy = EXCLUDED.overage_policy, "
                "stripe_price_id = EXCLUDED.stripe_price_id, active = EXCLUDED.active, "
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
                    actor,
                ),
            )
        return plan
