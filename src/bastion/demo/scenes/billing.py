"""A downgrade arrives as a signed Stripe webhook; the gateway's new cap holds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from typing import Any

import httpx
import stripe

from bastion.billing.budgets import BudgetService
from bastion.billing.plans import Plan, PlanCatalogue
from bastion.billing.wiring import build_billing
from bastion.demo.common import DemoTenant, Report
from bastion.errors import Kind
from bastion.knowledge.answers import AskService, GatewayRefused
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import resolve_ref
from bastion.settings import Settings


def _stripe_event(kind: str, obj: dict[str, Any], created: int) -> str:
    """A Stripe event as Stripe sends it (the fields Bastion reads)."""
    event = {
        "id": f"evt_demo_{secrets.token_hex(8)}",
        "object": "event",
        "created": created,
        "type": kind,
        "livemode": False,
        "data": {"object": obj},
    }
    return json.dumps(event, separators=(",", ":"))


def _subscription(customer: str, plan: Plan, start: int) -> dict[str, Any]:
    """A subscription to ``plan``'s Stripe price, which bills exactly the plan's price
    (Bastion refuses any other amount, currency, interval or quantity)."""
    price = {
        "id": plan.stripe_price_id,
        "object": "price",
        "type": "recurring",
        "unit_amount": plan.monthly_price,
        "currency": plan.currency,
        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
    }
    return {
        "id": f"sub_{customer}",
        "object": "subscription",
        "customer": customer,
        "status": "active",
        "created": start,
        "items": {
            "object": "list",
            "data": [
                {
                    "object": "subscription_item",
                    "price": price,
                    "quantity": 1,
                    "current_period_start": start,
                    "current_period_end": start + 30 * 86400,
                }
            ],
        },
    }


async def check_downgrade(
    report: Report,
    settings: Settings,
    kb: KnowledgeService,
    tenants: list[DemoTenant],
    ask: AskService,
    keystore: Keystore,
    api: str,
) -> None:
    """A downgrade arrives as a signed Stripe webhook; the gateway's new cap holds."""
    acme = tenants[0]
    catalogue = PlanCatalogue(kb.db)
    pro = await catalogue.get("pro")
    pro = dataclasses.replace(pro, stripe_price_id="price_demo_pro")
    await catalogue.put(pro, actor="demo")
    starter = Plan(
        code="starter",
        name="Starter",
        rank=1,
        monthly_token_budget=100_000,
        monthly_call_budget=3,
        requests_per_minute=20,
        models_allowed=("bastion-local",),
        overage_policy="block",
        stripe_price_id="price_demo_starter",
    )
    await catalogue.put(starter, actor="demo")
    customer = f"cus_demo_{secrets.token_hex(6)}"
    billing = build_billing(settings, kb.db, keystore).service
    await billing.link_stripe_customer(acme.id, customer)
    secret = resolve_ref(keystore, settings.stripe_webhook_secret_ref).decode()
    start = int(time.time()) - 60
    budgets = BudgetService(kb.db)

    async def deliver(plan: Plan, created: int) -> httpx.Response:
        body = _stripe_event(
            "customer.subscription.updated", _subscription(customer, plan, start), created
        )
        header = stripe.WebhookSignature.generate_signature_header(body, secret)
        async with httpx.AsyncClient(timeout=10) as http:
            return await http.post(
                f"{api}/webhooks/stripe",
                content=body,
                headers={"Stripe-Signature": header, "Content-Type": "application/json"},
            )

    async def limit_is(calls: int) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = await budgets.state(acme.id)
            if state is not None and state.call_limit == calls:
                return True
            await asyncio.sleep(0.05)
        return False

    # The events are newer than the plan change made at sign-up (out-of-order
    # events older than the applied state are ignored).
    upgraded = await deliver(pro, int(time.time()))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        subscription = await billing.subscription(acme.id)
        if subscription.stripe_price_id == "price_demo_pro":
            break
        await asyncio.sleep(0.05)
    on_pro = upgraded.status_code == 200 and subscription.stripe_price_id == "price_demo_pro"
    writer = Actor(acme.id, acme.users["contributor"], "contributor")
    for _ in range(4):
        await ask.ask(writer, "support", "How do refunds work?", model="bastion-local")
    report.check(
        "billing",
        f"{acme.slug}'s Stripe subscription (Pro) arrives as a signed webhook",
        on_pro,
        f"{upgraded.status_code}; applied by the worker; {pro.monthly_call_budget:,} calls/month",
    )
    acked = await deliver(starter, int(time.time()) + 1)
    sent = time.perf_counter()
    in_budget = acked.status_code == 200 and await limit_is(starter.monthly_call_budget)
    budget_ms = (time.perf_counter() - sent) * 1000
    refused: GatewayRefused | None = None
    while refused is None and time.perf_counter() - sent < 60:
        try:
            await ask.ask(writer, "support", "And the invoice?", model="bastion-local")
        except GatewayRefused as problem:
            refused = problem
        else:
            await asyncio.sleep(0.2)
    capped_s = time.perf_counter() - sent
    report.check(
        "billing",
        "the billing-admin downgrades to Starter (3 calls a month) in Stripe: "
        "a signed webhook, and the cap holds at the gateway",
        in_budget and refused is not None and refused.kind is Kind.PAYMENT_REQUIRED,
        f"budget changed {budget_ms:.0f} ms after the ack; 402 at the gateway after "
        f"{capped_s:.1f} s (open budget leases close within 2 s), Retry-After "
        f"{refused.retry_after if refused else '-'} s",
    )
