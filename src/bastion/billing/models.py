"""Billing's records as the service hands them out (tables: migration 0007)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

# The platform context: the nil tenant with the system role. Only the app
# signs it; policies grant it the webhook intake, the catalogue and the pause
# switch, and nothing of a tenant's own rows (migration 0007).
PLATFORM = UUID(int=0)

# Subscription statuses under which the plan's entitlements hold; any other
# status (canceled, unpaid, incomplete_expired, ...) falls back to FREE_PLAN.
ENTITLED = frozenset({"active", "trialing", "past_due"})
FREE_PLAN = "free"


@dataclass(frozen=True)
class Subscription:
    tenant_id: UUID
    plan_code: str
    status: str
    provider: str
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    stripe_price_id: str | None
    adyen_shopper_reference: str | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    source_version: int
    source_event_id: str
    updated_at: datetime
    updated_by: str
    # The Adyen payment (pspReference) that bought the current plan, if one did.
    adyen_payment: str | None = None
    # Stripe: the end of the last period whose payment was refunded (migration 0020).
    reversed_until: datetime | None = None


@dataclass(frozen=True)
class PlanChange:
    at: datetime
    actor: str
    from_plan: str | None
    to_plan: str
    reason: str
    source: str
    provider: str | None
    event_id: str | None
