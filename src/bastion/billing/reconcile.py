"""Reconciliation: compare local billing state with the provider and repair drift (CHECKLIST P2).

Three passes, each safe to repeat (four for Stripe):

1. *Missed events*: the provider's event list since a point in time is fed
   through the same intake as webhooks (``via = 'reconcile'``). Events already
   stored are duplicates and change nothing; the missing ones are stored and
   applied by the worker like any other.
2. *Unrouted events*: events whose customer has since been linked to a tenant
   are routed to it. A dispute names only its charge: a charge Bastion has not
   seen is fetched from Stripe and recorded for the tenant of its customer,
   and the dispute is routed there.
3. *Drift*: each Stripe subscription Bastion knows is fetched; a plan or
   status that differs from the provider's is repaired (a ``reconcile`` plan
   change, recorded like any other) and stamped newer than every event
   already generated, so a stale event arriving later cannot undo the repair.

The provider is behind :class:`BillingProvider`; :class:`StripeProvider` is the
``stripe`` library's client (tests point it at a local double of Stripe's API).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import stripe

from bastion.billing.errors import MalformedEvent
from bastion.billing.models import ENTITLED, FREE_PLAN, PLATFORM
from bastion.billing.plans import plan_by_code
from bastion.billing.service import (
    PAYMENT_REVERSED,
    BillingService,
    paid_plan,
    pays_for_plan,
    timestamp,
    voided,
)
from bastion.billing.webhooks import IncomingEvent, WebhookIntake
from bastion.billing.webhooks.stripe import DISPUTE_EVENTS, parse
from bastion.db.pool import Database

# Stripe's event list holds 30 days; a first run looks back this far.
DEFAULT_LOOKBACK_SECONDS = 3 * 86400
REPAIR_EVENT_ID = "~reconcile"  # sorts after every Stripe event id of the same second


class BillingProvider(Protocol):
    def events_since(self, created_gte: int) -> Iterator[dict[str, Any]]:
        """Every event created at or after ``created_gte`` (any order)."""
        ...

    def subscription(self, subscription_id: str) -> dict[str, Any] | None:
        """The subscription as the provider has it now, or None if it has none."""
        ...

    def charge(self, charge_id: str) -> dict[str, Any] | None:
        """The charge, or None if the provider has none of that id."""
        ...


class StripeProvider:
    """Stripe's REST API through the official client."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self.client = client

    def events_since(self, created_gte: int) -> Iterator[dict[str, Any]]:
        page = self.client.v1.events.list({"limit": 100, "created": {"gte": created_gte}})
        for event in page.auto_paging_iter():
            yield event.to_dict()

    def subscription(self, subscription_id: str) -> dict[str, Any] | None:
        try:
            return self.client.v1.subscriptions.retrieve(subscription_id).to_dict()
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise

    def charge(self, charge_id: str) -> dict[str, Any] | None:
        try:
            return self.client.v1.charges.retrieve(charge_id).to_dict()
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise


@dataclass
class ReconcileReport:
    events_seen: int = 0
    events_malformed: int = 0
    events_recovered: int = 0
    events_routed: int = 0
    subscriptions_checked: int = 0
    subscriptions_repaired: int = 0
    adyen_expired: int = 0
    charges_recorded: int = 0


class Reconciler:
    def __init__(
        self,
        db: Database,
        service: BillingService,
        intake: WebhookIntake,
        provider: BillingProvider | None,
    ) -> None:
        self.db = db
        self.service = service
        self.intake = intake
        self.provider = provider

    async def run(self, *, since: int | None = None, provider: str = "stripe") -> ReconcileReport:
        """Run the three passes; returns what each found and did.

        ``provider="adyen"``: Adyen has no API that lists a merchant's payments
        or notifications, so its pass works from the verified events Bastion
        stored: route the unrouted ones, end the months that have ended, and
        check every Adyen-bought plan against the payment that bought it
        (:meth:`BillingService.reconcile_adyen`)."""
        report = ReconcileReport()
        if provider == "adyen":
            report.events_routed = await self.service.route_unrouted()
            report.adyen_expired = await self.service.expire_lapsed()
            checked, repaired = await self.service.reconcile_adyen()
            report.subscriptions_checked, report.subscriptions_repaired = checked, repaired
            return report
        if self.provider is not None:
            await self._missed_events(report, since)
            await self._disputed_charges(report)
        report.events_routed = await self.service.route_unrouted()
        if self.provider is not None:
            await self._drift(report)
        return report

    async def _missed_events(self, report: ReconcileReport, since: int | None) -> None:
        assert self.provider is not None
        provider = self.provider
        gte = since if since is not None else int(time.time()) - DEFAULT_LOOKBACK_SECONDS
        raw = await asyncio.to_thread(lambda: list(provider.events_since(gte)))
        events: list[IncomingEvent] = []
        for item in raw:
            try:
                events.append(parse(json.dumps(item, separators=(",", ":")).encode()))
            except MalformedEvent:  # one odd event must not stop the pass
                report.events_malformed += 1
        report.events_seen = len(events)
        # Oldest first, like the provider generated them.
        events.sort(key=lambda e: (e.version, e.event_id))
        for start in range(0, len(events), 100):
            stored = await self.intake.store(events[start : start + 100], via="reconcile")
            report.events_recovered += sum(not s.duplicate for s in stored)

    async def _disputed_charges(self, report: ReconcileReport) -> None:
        """Record the charges of unrouted disputes (a dispute names only its charge),
        fetched from Stripe, for the tenant whose bound customer made each; the
        routing pass then gives those disputes to it."""
        assert self.provider is not None
        provider = self.provider
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT DISTINCT e.customer_ref FROM bastion.webhook_events e "
                "WHERE e.provider = 'stripe' AND e.status = 'unrouted' "
                "AND e.event_type = ANY(%s) AND e.customer_ref IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM bastion.stripe_charges c WHERE c.charge_id = e.customer_ref) "
                "ORDER BY 1 LIMIT 1000",
                (sorted(DISPUTE_EVENTS),),
            )
            charges = [row["customer_ref"] for row in await cur.fetchall()]
        for charge_id in charges:
            charge = await asyncio.to_thread(provider.charge, charge_id)
            customer = charge.get("customer") if charge is not None else None
            if not isinstance(customer, str):
                continue
            async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
                cur = await tx.execute(
                    "SELECT tenant_id FROM bastion.subscriptions WHERE stripe_customer_id = %s",
                    (customer,),
                )
                found = await cur.fetchone()
            if found is None or charge is None:
                continue
            async with self.db.tenant_tx(found["tenant_id"], None, "system") as tx:
                if await self.service.record_charge(
                    tx, found["tenant_id"], charge, actor="reconcile"
                ):
                    report.charges_recorded += 1

    async def _drift(self, report: ReconcileReport) -> None:
        assert self.provider is not None
        provider = self.provider
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT tenant_id, stripe_subscription_id FROM bastion.subscriptions "
                "WHERE stripe_subscription_id IS NOT NULL ORDER BY tenant_id"
            )
            known = [
                (row["tenant_id"], row["stripe_subscription_id"]) for row in await cur.fetchall()
            ]
        for tenant_id, sub_id in known:
            remote = await asyncio.to_thread(provider.subscription, sub_id)
            report.subscriptions_checked += 1
            if await self._repair(tenant_id, sub_id, remote):
                report.subscriptions_repaired += 1

    async def _repair(self, tenant_id: UUID, sub_id: str, remote: dict[str, Any] | None) -> bool:
        status = "canceled" if remote is None else str(remote.get("status") or "active")[:40]
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            sub = await self.service.read_subscription(tx, tenant_id, lock=True)
            if sub is None or sub.stripe_subscription_id != sub_id:
                return False
            remote_customer = remote.get("customer") if remote is not None else None
            if isinstance(remote_customer, str) and remote_customer != sub.stripe_customer_id:
                return False  # not this tenant's customer's subscription: nothing to repair
            livemode = self.service.accounts.stripe_livemode
            if remote is not None and remote.get("livemode", livemode) is not livemode:
                return False  # the other mode's object (a key of the other mode): not ours
            # The same rule as the webhook: the plan the subscription pays for.
            paid = await paid_plan(tx, remote) if remote is not None else "unknown-price"
            item: dict[str, Any] = {}
            if not isinstance(paid, str) and status in ENTITLED:
                start = timestamp(paid[1].get("current_period_start"))
                end = timestamp(paid[1].get("current_period_end"))
                # Stripe keeps it active; its payment was refunded or is disputed.
                if voided(sub, end) or await self.service.period_disputed(
                    tx, tenant_id, start, end
                ):
                    status = PAYMENT_REVERSED
            if isinstance(paid, str) or not pays_for_plan(status, paid[0]):
                plan = await plan_by_code(tx, FREE_PLAN)
            else:
                plan, item = paid
            if not plan.active and plan.code not in (sub.plan_code, FREE_PLAN):
                return False  # never onto an inactive plan; the event's failure stays flagged
            if sub.plan_code == plan.code and sub.status == status:
                return False
            price = item["price"]["id"] if item else None
            start = timestamp(item.get("current_period_start"))
            end = timestamp(item.get("current_period_end"))
            await tx.execute(
                "UPDATE bastion.subscriptions SET plan_code = %s, status = %s, "
                "stripe_price_id = coalesce(%s, stripe_price_id), "
                "current_period_start = coalesce(%s, current_period_start), "
                "current_period_end = coalesce(%s, current_period_end), "
                "source_version = greatest(source_version, %s), source_event_id = %s, "
                "updated_at = now(), updated_by = 'reconcile' WHERE tenant_id = %s",
                (
                    plan.code,
                    status,
                    price,
                    start,
                    end,
                    int(time.time()),
                    REPAIR_EVENT_ID,
                    tenant_id,
                ),
            )
            if sub.plan_code != plan.code:
                await self.service.record_change(
                    tx,
                    tenant_id,
                    sub.plan_code,
                    plan,
                    actor="reconcile",
                    reason=(
                        f"drift from Stripe: {sub.plan_code}/{sub.status} -> {plan.code}/{status}"
                    ),
                    source="reconcile",
                    provider="stripe",
                    event_id=f"reconcile:{sub_id}:{int(time.time() * 1000)}",
                    period=(start, end),
                )
        return True
