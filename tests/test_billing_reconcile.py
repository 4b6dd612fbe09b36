"""Reconciliation against Stripe's API (the ``stripe`` client on a local double of
Stripe's REST API): missed events recovered, unrouted events routed, drift repaired
and never undone by a stale event (CHECKLIST P2)."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest

import bastion
from bastion.billing.plans import PlanCatalogue
from bastion.billing.reconcile import Reconciler, StripeProvider
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher, WebhookIntake
from bastion.billing.webhooks.stripe import parse
from bastion.billing.wiring import stripe_client
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.stripe_double import (
    API_KEY,
    TEST_PRICES,
    StripeDouble,
    event_object,
    price_plans,
    stripe_double,
    subscription_object,
    to_json,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def double() -> StripeDouble:
    with stripe_double() as running:
        yield running  # type: ignore[misc]


@pytest.fixture
def parts(db: Database, keystore: LocalKeystore) -> tuple[BillingService, WebhookIntake]:
    cipher = EventCipher(keystore)
    return BillingService(db, cipher), WebhookIntake(db, cipher)


async def _tenant(db: Database, service: BillingService) -> tuple[UUID, str]:
    await price_plans(db)
    tenant = await TenantService(db).create_tenant(f"rc-{uuid4().hex[:8]}", "Reconcile")
    customer = f"cus_{uuid4().hex[:12]}"
    await service.link_stripe_customer(tenant.id, customer)
    return tenant.id, customer


def _plan(database: DbHandles, tenant_id: UUID) -> tuple[str, str]:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT plan_code, status FROM bastion.subscriptions WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


async def test_missed_events_are_recovered_and_applied_once(
    db: Database,
    database: DbHandles,
    double: StripeDouble,
    parts: tuple[BillingService, WebhookIntake],
) -> None:
    service, intake = parts
    tenant_id, customer = await _tenant(db, service)
    now = int(time.time())
    sub = subscription_object(f"sub_{customer}", customer, TEST_PRICES["pro"])
    delivered = event_object("customer.subscription.updated", sub, created=now - 100)
    missed = event_object(
        "customer.subscription.updated",
        subscription_object(f"sub_{customer}", customer, TEST_PRICES["enterprise"]),
        created=now - 50,
    )
    # 120 more events of other customers: the list spans two pages of 100.
    noise = [
        event_object("customer.updated", {"id": f"cus_other_{i}"}, created=now - 200 + i)
        for i in range(120)
    ]
    for event in (*noise, delivered, missed):
        double.add_event(event)
    await intake.store([parse(to_json(delivered).encode())])  # only this one arrived

    reconciler = Reconciler(db, service, intake, StripeProvider(double.client()))
    report = await reconciler.run(since=now - 3600)
    assert report.events_seen == 122
    assert report.events_recovered == 121  # all but the delivered one
    assert len(double.calls("GET", "/v1/events")) == 2  # paginated with starting_after
    await service.drain(tenant_id)
    assert _plan(database, tenant_id) == ("enterprise", "active")

    again = await reconciler.run(since=now - 3600)
    assert again.events_recovered == 0
    assert await service.drain(tenant_id) == 0
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT via FROM bastion.webhook_events WHERE event_id = %s", (missed["id"],)
        ).fetchall()
    assert rows == [("reconcile",)]


async def test_drift_is_repaired_and_a_stale_event_cannot_undo_it(
    db: Database,
    database: DbHandles,
    double: StripeDouble,
    parts: tuple[BillingService, WebhookIntake],
) -> None:
    service, intake = parts
    tenant_id, customer = await _tenant(db, service)
    now = int(time.time())
    sub_id = f"sub_{customer}"
    first = event_object(
        "customer.subscription.updated",
        subscription_object(sub_id, customer, TEST_PRICES["pro"]),
        created=now - 100,
    )
    await intake.store([parse(to_json(first).encode())])
    await service.drain(tenant_id)
    assert _plan(database, tenant_id) == ("pro", "active")
    # At Stripe the customer has since moved to enterprise; that event was lost
    # and has aged out of the event list. Only the subscription says so.
    double.subscriptions[sub_id] = subscription_object(sub_id, customer, TEST_PRICES["enterprise"])

    reconciler = Reconciler(db, service, intake, StripeProvider(double.client()))
    report = await reconciler.run(since=now)
    assert report.subscriptions_repaired >= 1
    assert _plan(database, tenant_id) == ("enterprise", "active")
    changes = await service.plan_changes(tenant_id, "auditor")
    assert (changes[-1].source, changes[-1].from_plan, changes[-1].to_plan) == (
        "reconcile",
        "pro",
        "enterprise",
    )
    # A delayed delivery of an event older than the repair changes nothing.
    late = event_object(
        "customer.subscription.updated",
        subscription_object(sub_id, customer, TEST_PRICES["free"]),
        created=now - 60,
    )
    await intake.store([parse(to_json(late).encode())])
    await service.drain(tenant_id)
    assert _plan(database, tenant_id) == ("enterprise", "active")
    assert (await reconciler.run(since=now)).subscriptions_repaired == 0
    assert _plan(database, tenant_id) == ("enterprise", "active")


async def test_subscription_gone_at_stripe_falls_back_to_free(
    db: Database,
    database: DbHandles,
    double: StripeDouble,
    parts: tuple[BillingService, WebhookIntake],
) -> None:
    service, intake = parts
    tenant_id, customer = await _tenant(db, service)
    event = event_object(
        "customer.subscription.updated",
        subscription_object(f"sub_{customer}", customer, TEST_PRICES["pro"]),
        created=int(time.time()) - 10,
    )
    await intake.store([parse(to_json(event).encode())])
    await service.drain(tenant_id)
    report = await Reconciler(db, service, intake, StripeProvider(double.client())).run(
        since=int(time.time())
    )
    assert report.subscriptions_repaired >= 1  # (earlier tests' tenants are gone too)
    assert _plan(database, tenant_id) == ("free", "canceled")


async def test_provider_outage_fails_the_run_and_changes_nothing(
    db: Database,
    database: DbHandles,
    double: StripeDouble,
    parts: tuple[BillingService, WebhookIntake],
) -> None:
    service, intake = parts
    tenant_id, _customer = await _tenant(db, service)
    double.fail_with = 500
    reconciler = Reconciler(db, service, intake, StripeProvider(double.client()))
    with pytest.raises(Exception, match="double told to fail"):
        await reconciler.run(since=int(time.time()) - 60)
    assert _plan(database, tenant_id) == ("free", "active")


async def test_drift_onto_an_inactive_or_underpaid_plan_is_not_repaired(
    db: Database,
    database: DbHandles,
    double: StripeDouble,
    parts: tuple[BillingService, WebhookIntake],
) -> None:
    """Reconciliation follows the webhook's rule: a plan only for what the
    subscription pays, and never an inactive one (issue 13, finding 3)."""
    service, intake = parts
    tenant_id, customer = await _tenant(db, service)
    sub_id = f"sub_{customer}"
    first = event_object(
        "customer.subscription.updated",
        subscription_object(sub_id, customer, TEST_PRICES["pro"]),
        created=int(time.time()) - 100,
    )
    await intake.store([parse(to_json(first).encode())])
    await service.drain(tenant_id)
    assert _plan(database, tenant_id) == ("pro", "active")
    legacy = dataclasses.replace(
        await PlanCatalogue(db).get("enterprise"),
        code=f"legacy{uuid4().hex[:6]}",
        stripe_price_id=f"price_legacy_{uuid4().hex[:6]}",
        active=False,
    )
    await PlanCatalogue(db).put(legacy, actor="operator:alice")
    assert legacy.stripe_price_id is not None
    double.subscriptions[sub_id] = subscription_object(
        sub_id, customer, legacy.stripe_price_id, amount=legacy.monthly_price
    )
    reconciler = Reconciler(db, service, intake, StripeProvider(double.client()))
    await reconciler.run(since=int(time.time()))
    assert _plan(database, tenant_id) == ("pro", "active")
    changes = len(await service.plan_changes(tenant_id, "auditor"))
    # Enterprise's price, billing 1.00 a month: it did not pay for Enterprise.
    underpaid = subscription_object(sub_id, customer, TEST_PRICES["enterprise"])
    underpaid["items"]["data"][0]["price"].update(
        unit_amount=100, currency="usd", recurring={"interval": "month", "interval_count": 1}
    )
    double.subscriptions[sub_id] = underpaid
    await reconciler.run(since=int(time.time()))
    # As for a price the catalogue does not know: no paid plan, so Free.
    assert _plan(database, tenant_id) == ("free", "active")
    after = await service.plan_changes(tenant_id, "auditor")
    assert [(c.from_plan, c.to_plan) for c in after[changes:]] == [("pro", "free")]


def test_one_stripe_client_built_with_the_public_api_reaches_the_configured_base_and_account(
    double: StripeDouble, keystore: LocalKeystore
) -> None:
    """Checkout, metering and reconciliation share :func:`stripe_client`: Stripe's
    public ``base_addresses`` (a plain mapping) and the connected account events
    must come from (``Stripe-Account``), so reconciliation reads that account's
    subscriptions, not the platform's. No module reaches into the library's
    private ones."""
    key_name = f"billing/test-rc-api-{uuid4().hex[:8]}"
    keystore.set(key_name, API_KEY.encode())
    settings = Settings(
        billing_stripe_api_key_ref=f"local://{key_name}",
        billing_stripe_api_base=double.url,
        stripe_account_id="acct_bastion",
    )
    client = stripe_client(settings, keystore)
    assert client is not None
    assert StripeProvider(client).subscription("sub_nobody") is None  # a 404, read as none
    (request,) = double.calls("GET", "/v1/subscriptions/sub_nobody")
    assert request.headers["stripe-account"] == "acct_bastion"
    assert stripe_client(Settings(), keystore) is None
    src = Path(bastion.__file__).parent
    private = [
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        if re.search(r"\bstripe\._[a-z]", path.read_text(encoding="utf-8"))
    ]
    assert private == []
