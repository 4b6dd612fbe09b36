"""Payments bound to exactly what was paid (issue 23, finding 5), over real HTTP.

Adyen items are signed with Adyen's own ``generate_notification_sig`` and
Stripe events with the Stripe library's construction, posted to the
production webhook routes, stored, then applied by the worker's drain. Every
refusal is its own test: the event is stored as ``failed`` with its reason,
audited (``billing.webhook.applied``), and nothing else changed — the
subscription row, the plan changes, the recorded payments and the budget.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import Adyen.util  # type: ignore[import-untyped]
import httpx
import psycopg
import pytest

from bastion.billing.service import BillingService, PaymentAccounts
from bastion.billing.webhooks import EventCipher
from bastion.billing.webhooks.adyen import merchant_reference
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir
from tests.stripe_double import (
    API_KEY,
    TEST_PRICES,
    event_object,
    price_plans,
    signed,
    stripe_double,
    subscription_object,
    to_json,
    webhook_api,
)

pytestmark = pytest.mark.anyio

ADYEN_KEY = f"billing/test-pi-adyen-{uuid4().hex[:8]}"
STRIPE_KEY = f"billing/test-pi-stripe-{uuid4().hex[:8]}"
MERCHANT = "BastionECOM"
# What the catalogue's plans cost a month (migration 0015), in cents of USD.
PRICES = {"free": 0, "pro": 4900, "enterprise": 99900}
TEST_MODE = PaymentAccounts(adyen_merchant_account=MERCHANT)
LIVE_MODE = PaymentAccounts(adyen_merchant_account=MERCHANT, adyen_live=True, stripe_livemode=True)


@dataclass
class Setup:
    url: str
    adyen_key: str
    stripe_secret: str


@pytest.fixture(scope="module")
def setup(database: DbHandles, keystore: LocalKeystore) -> Iterator[Setup]:
    adyen_key, stripe_secret = secrets.token_hex(32), f"whsec_{uuid4().hex}"
    keystore.set(ADYEN_KEY, adyen_key.encode())
    keystore.set(STRIPE_KEY, stripe_secret.encode())
    with webhook_api(
        database, keystore, stripe_ref=f"local://{STRIPE_KEY}", adyen_ref=f"local://{ADYEN_KEY}"
    ) as url:
        yield Setup(url, adyen_key, stripe_secret)


def _service(db: Database, keystore: LocalKeystore, accounts: PaymentAccounts) -> BillingService:
    return BillingService(db, EventCipher(keystore), accounts=accounts)


@pytest.fixture
def service(db: Database, keystore: LocalKeystore) -> BillingService:
    return _service(db, keystore, TEST_MODE)


@pytest.fixture
async def shopper(db: Database, service: BillingService) -> tuple[UUID, str]:
    await price_plans(db)
    tenant = await TenantService(db).create_tenant(f"pi-{uuid4().hex[:8]}", "Payments")
    reference = f"shopper-{uuid4().hex[:10]}"
    await service.link_adyen_shopper(tenant.id, reference)
    return tenant.id, reference


@pytest.fixture
async def customer(db: Database, service: BillingService) -> tuple[UUID, str]:
    await price_plans(db)
    tenant = await TenantService(db).create_tenant(f"pi-{uuid4().hex[:8]}", "Payments")
    customer_id = f"cus_{uuid4().hex[:12]}"
    await service.link_stripe_customer(tenant.id, customer_id)
    return tenant.id, customer_id


# -- Adyen ---------------------------------------------------------------------------------


def _item(
    key: str,
    shopper: str,
    plan: str,
    *,
    sequence: int = 1,
    code: str = "AUTHORISATION",
    amount: int | None = None,
    currency: str = "USD",
    merchant: str = MERCHANT,
    psp: str | None = None,
    original: str = "",
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pspReference": psp or f"PSP{uuid4().hex[:14].upper()}",
        "originalReference": original,
        "merchantAccountCode": merchant,
        "merchantReference": merchant_reference(shopper, plan, sequence),
        "amount": {"value": PRICES[plan] if amount is None else amount, "currency": currency},
        "eventCode": code,
        "success": "true",
        "eventDate": "2026-11-29T10:00:00+01:00",
    }
    item["additionalData"] = {
        "hmacSignature": Adyen.util.generate_notification_sig(item, key).decode()
    }
    return item


async def _adyen(setup: Setup, *items: dict[str, Any], live: str = "false") -> None:
    body = json.dumps(
        {"live": live, "notificationItems": [{"NotificationRequestItem": i} for i in items]}
    )
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{setup.url}/webhooks/adyen",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 200 and response.text == "[accepted]", response.text


def _state(database: DbHandles, tenant_id: UUID) -> dict[str, Any]:
    """Everything a payment could change for the tenant."""
    with psycopg.connect(database.superuser) as conn:
        sub = conn.execute(
            "SELECT plan_code, status, provider, stripe_subscription_id, current_period_end, "
            "adyen_payment, source_version, source_event_id, updated_at "
            "FROM bastion.subscriptions WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchone()
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM bastion.plan_changes WHERE tenant_id = %(t)s), "
            "(SELECT count(*) FROM bastion.adyen_payments WHERE tenant_id = %(t)s), "
            "(SELECT call_limit FROM bastion.budgets WHERE tenant_id = %(t)s "
            "AND period_start <= now() AND now() < period_end)",
            {"t": tenant_id},
        ).fetchone()
    return {"subscription": sub, "counts": counts}


def _plan(database: DbHandles, tenant_id: UUID) -> str:
    state = _state(database, tenant_id)
    return str(state["subscription"][0])


def _events(database: DbHandles, tenant_id: UUID) -> list[tuple[str, str, str]]:
    with psycopg.connect(database.superuser) as conn:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute(
                "SELECT event_type, status, outcome FROM bastion.webhook_events "
                "WHERE tenant_id = %s ORDER BY id",
                (tenant_id,),
            ).fetchall()
        ]


def _audited(database: DbHandles, tenant_id: UUID, outcome: str) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = 'billing.webhook.applied' AND details->>'status' = 'failed' "
            "AND details->>'outcome' = %s",
            (tenant_id, outcome),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _assert_refused(
    database: DbHandles,
    service: BillingService,
    tenant_id: UUID,
    before: dict[str, Any],
    reason: str,
) -> None:
    assert await service.drain(tenant_id) == 1
    assert _events(database, tenant_id)[-1][1:] == ("failed", reason)
    assert _audited(database, tenant_id, reason) == 1
    assert _state(database, tenant_id) == before  # nothing else written
    assert (await service.entitlements(tenant_id)).plan == "free"


async def test_adyen_a_cent_in_euros_for_enterprise_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    before = _state(database, tenant_id)
    await _adyen(setup, _item(setup.adyen_key, reference, "enterprise", amount=1, currency="EUR"))
    await _assert_refused(database, service, tenant_id, before, "amount-not-plan-price")


async def test_adyen_more_than_the_price_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    """Equal, not "covers": another amount is not this order's payment."""
    tenant_id, reference = shopper
    before = _state(database, tenant_id)
    await _adyen(setup, _item(setup.adyen_key, reference, "enterprise", amount=100_000))
    await _assert_refused(database, service, tenant_id, before, "amount-not-plan-price")


async def test_adyen_the_exact_amount_in_another_currency_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    before = _state(database, tenant_id)
    await _adyen(setup, _item(setup.adyen_key, reference, "enterprise", currency="EUR"))
    await _assert_refused(database, service, tenant_id, before, "amount-not-plan-price")


async def test_adyen_a_payment_to_another_merchant_account_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    before = _state(database, tenant_id)
    await _adyen(setup, _item(setup.adyen_key, reference, "pro", merchant="SomeoneElseECOM"))
    await _assert_refused(database, service, tenant_id, before, "merchant-account-mismatch")


async def test_adyen_no_merchant_account_configured_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], db: Database,
    keystore: LocalKeystore,
) -> None:  # fmt: skip
    tenant_id, reference = shopper
    unconfigured = _service(db, keystore, PaymentAccounts())
    before = _state(database, tenant_id)
    await _adyen(setup, _item(setup.adyen_key, reference, "pro"))
    await _assert_refused(
        database, unconfigured, tenant_id, before, "merchant-account-not-configured"
    )


async def test_adyen_a_test_payment_on_a_live_configuration_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], db: Database,
    keystore: LocalKeystore,
) -> None:  # fmt: skip
    tenant_id, reference = shopper
    live = _service(db, keystore, LIVE_MODE)
    before = _state(database, tenant_id)
    await _adyen(setup, _item(setup.adyen_key, reference, "pro"), live="false")
    await _assert_refused(database, live, tenant_id, before, "live-mode-mismatch")


async def test_adyen_a_live_payment_on_a_test_configuration_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    before = _state(database, tenant_id)
    await _adyen(setup, _item(setup.adyen_key, reference, "pro"), live="true")
    await _assert_refused(database, service, tenant_id, before, "live-mode-mismatch")


async def test_adyen_the_exact_price_buys_the_plan_for_one_month(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    item = _item(setup.adyen_key, reference, "enterprise")
    await _adyen(setup, item)
    assert await service.drain(tenant_id) == 1
    assert _events(database, tenant_id)[-1][1:] == ("applied", "plan free -> enterprise")
    assert (await service.entitlements(tenant_id)).plan == "enterprise"
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT s.adyen_payment, s.current_period_end = e.received_at + interval '1 month', "
            "p.amount, p.currency FROM bastion.subscriptions s "
            "JOIN bastion.adyen_payments p ON p.tenant_id = s.tenant_id "
            "AND p.psp_reference = s.adyen_payment "
            "JOIN bastion.webhook_events e ON e.tenant_id = s.tenant_id "
            "WHERE s.tenant_id = %s",
            (tenant_id,),
        ).fetchone()
    assert row == (item["pspReference"], True, 99900, "usd")


def _reversal(setup: Setup, reference: str, code: str, paid: dict[str, Any]) -> dict[str, Any]:
    """A CHARGEBACK names the payment itself; a CANCELLATION or REFUND is a
    modification of its own pspReference that names the payment as original."""
    if code == "CHARGEBACK":
        return _item(setup.adyen_key, reference, "enterprise", code=code, psp=paid["pspReference"])
    return _item(setup.adyen_key, reference, "enterprise", code=code, original=paid["pspReference"])


@pytest.mark.parametrize("code", ["REFUND", "CHARGEBACK", "CANCELLATION"])
async def test_adyen_a_reversal_after_the_purchase_takes_the_plan_back(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService,
    code: str,
) -> None:  # fmt: skip
    tenant_id, reference = shopper
    paid = _item(setup.adyen_key, reference, "enterprise")
    await _adyen(setup, paid)
    assert await service.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "enterprise"
    reversal = _reversal(setup, reference, code, paid)
    await _adyen(setup, reversal)
    await _adyen(setup, reversal)  # a redelivery: stored once, applied once
    assert await service.drain(tenant_id) == 1
    assert _events(database, tenant_id)[-1] == (code, "applied", "plan enterprise -> free")
    assert (await service.entitlements(tenant_id)).plan == "free"
    changes = await service.plan_changes(tenant_id, "owner")
    assert [(c.from_plan, c.to_plan) for c in changes] == [
        ("free", "enterprise"),
        ("enterprise", "free"),
    ]
    state = _state(database, tenant_id)
    assert state["subscription"][4] is None and state["subscription"][5] is None  # no period
    assert state["counts"][2] == 1000  # the free plan's call budget, now


async def test_adyen_a_refund_before_its_authorisation_buys_nothing(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    """Out of order: the refund is recorded although its payment is unknown, and
    the authorisation that follows buys nothing."""
    tenant_id, reference = shopper
    paid = _item(setup.adyen_key, reference, "enterprise")
    await _adyen(setup, _reversal(setup, reference, "REFUND", paid))
    await _adyen(setup, paid)
    assert await service.drain(tenant_id) == 2
    assert _events(database, tenant_id) == [
        ("REFUND", "applied", "payment-reversed"),
        ("AUTHORISATION", "failed", "payment-reversed"),
    ]
    assert _audited(database, tenant_id, "payment-reversed") == 1
    assert _plan(database, tenant_id) == "free"
    assert await service.plan_changes(tenant_id, "owner") == []
    assert (await service.entitlements(tenant_id)).plan == "free"


async def test_adyen_a_refund_of_the_upgrade_falls_back_to_the_running_earlier_payment(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    pro = _item(setup.adyen_key, reference, "pro", sequence=1)
    enterprise = _item(setup.adyen_key, reference, "enterprise", sequence=2)
    await _adyen(setup, pro)
    await _adyen(setup, enterprise)
    await _adyen(setup, _reversal(setup, reference, "REFUND", enterprise))
    assert await service.drain(tenant_id) == 3
    assert _plan(database, tenant_id) == "pro"
    assert _state(database, tenant_id)["subscription"][5] == pro["pspReference"]


async def test_adyen_a_refund_after_the_tenant_moved_to_stripe_leaves_stripe_s_plan(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    """A reversal takes back only what its payment bought, if that is still current."""
    tenant_id, reference = shopper
    customer_id = f"cus_{uuid4().hex[:12]}"
    await service.link_stripe_customer(tenant_id, customer_id)
    paid = _item(setup.adyen_key, reference, "pro")
    await _adyen(setup, paid)
    assert await service.drain(tenant_id) == 1
    await _stripe(setup, _sub_event(customer_id, "enterprise", sub_id=f"sub_{uuid4().hex[:12]}"))
    assert await service.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "enterprise"
    await _adyen(setup, _reversal(setup, reference, "REFUND", paid))
    assert await service.drain(tenant_id) == 1
    assert _events(database, tenant_id)[-1] == ("REFUND", "applied", "payment-reversed")
    assert (await service.entitlements(tenant_id)).plan == "enterprise"


def _age(database: DbHandles, tenant_id: UUID) -> None:
    """Move the tenant's paid months 40 days into the past."""
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "UPDATE bastion.subscriptions SET current_period_start = current_period_start "
            "- interval '40 days', current_period_end = current_period_end - interval '40 days' "
            "WHERE tenant_id = %s",
            (tenant_id,),
        )
        conn.execute(
            "UPDATE bastion.adyen_payments SET period_start = period_start - interval '40 days', "
            "period_end = period_end - interval '40 days' WHERE tenant_id = %s",
            (tenant_id,),
        )


async def test_adyen_when_the_paid_month_ends_the_tenant_is_back_on_free(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    await _adyen(setup, _item(setup.adyen_key, reference, "pro"))
    assert await service.drain(tenant_id) == 1
    assert (await service.entitlements(tenant_id)).plan == "pro"
    _age(database, tenant_id)
    # Lapsed: entitles to nothing at once, before the sweep has run.
    assert (await service.entitlements(tenant_id)).plan == "free"
    assert await service.expire_lapsed() >= 1
    assert _plan(database, tenant_id) == "free"
    changes = await service.plan_changes(tenant_id, "owner")
    assert [(c.to_plan, c.source) for c in changes][-1] == ("free", "reconcile")
    assert _state(database, tenant_id)["counts"][2] == 1000  # the free plan's call budget
    assert await service.expire_lapsed() == 0  # once


def _reconcile_adyen(database: DbHandles, keystore: LocalKeystore) -> str:
    """``bastion billing reconcile --provider adyen``, as an operator runs it."""
    env = {
        **os.environ,
        "BASTION_HOME": str(short_tempdir("bastion-pi-")),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "BASTION_ADYEN_MERCHANT_ACCOUNT": MERCHANT,
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "bastion", "billing", "reconcile", "--provider", "adyen"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_adyen_reconcile_takes_back_a_plan_no_payment_pays_for(
    database: DbHandles, shopper: tuple[UUID, str], keystore: LocalKeystore
) -> None:
    """Adyen has no API that lists payments: reconciliation checks each
    Adyen-bought plan against the stored, verified payments. A plan bought
    before payments were recorded (as by the code before this fix: no payment
    named, no period end — enterprise for good) is taken back, once."""
    tenant_id, _reference = shopper
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "UPDATE bastion.subscriptions SET plan_code = 'enterprise', provider = 'adyen' "
            "WHERE tenant_id = %s",
            (tenant_id,),
        )
    first = _reconcile_adyen(database, keystore)
    assert _plan(database, tenant_id) == "free"
    assert "subscriptions repaired: 0" not in first
    with psycopg.connect(database.superuser) as conn:
        change = conn.execute(
            "SELECT from_plan, to_plan, source FROM bastion.plan_changes WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchall()
    assert change == [("enterprise", "free", "reconcile")]
    assert "subscriptions repaired: 0" in _reconcile_adyen(database, keystore)


# -- Stripe --------------------------------------------------------------------------------


async def _stripe(setup: Setup, event: dict[str, Any]) -> None:
    body = to_json(event)
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{setup.url}/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": signed(body, setup.stripe_secret)},
        )
    assert response.status_code == 200, response.text


def _sub_event(
    customer: str,
    plan: str,
    *,
    sub_id: str | None = None,
    kind: str = "customer.subscription.updated",
    status: str = "active",
    later: int = 0,
    period_start: int | None = None,
) -> dict[str, Any]:
    """``later``: seconds after now (events are ordered by their ``created``)."""
    sub = subscription_object(
        sub_id or f"sub_{customer}",
        customer,
        TEST_PRICES[plan],
        status=status,
        period_start=period_start,
    )
    return event_object(kind, sub, created=int(time.time()) + later)


async def test_stripe_a_test_mode_event_on_a_live_configuration_is_refused(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], db: Database,
    keystore: LocalKeystore,
) -> None:  # fmt: skip
    tenant_id, customer_id = customer
    live = _service(db, keystore, LIVE_MODE)
    before = _state(database, tenant_id)
    await _stripe(setup, _sub_event(customer_id, "enterprise"))  # livemode: false
    await _assert_refused(database, live, tenant_id, before, "livemode-mismatch")


async def test_stripe_a_live_event_on_a_test_configuration_is_refused(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer_id = customer
    event = {**_sub_event(customer_id, "enterprise"), "livemode": True}
    before = _state(database, tenant_id)
    await _stripe(setup, event)
    await _assert_refused(database, service, tenant_id, before, "livemode-mismatch")


async def test_stripe_an_event_of_another_account_is_refused(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """A Connect endpoint delivers the events of connected accounts too."""
    tenant_id, customer_id = customer
    event = {**_sub_event(customer_id, "enterprise"), "account": "acct_someone_else"}
    before = _state(database, tenant_id)
    await _stripe(setup, event)
    await _assert_refused(database, service, tenant_id, before, "account-mismatch")


async def test_stripe_an_event_of_the_configured_account_applies(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], db: Database,
    keystore: LocalKeystore,
) -> None:  # fmt: skip
    tenant_id, customer_id = customer
    ours = _service(db, keystore, PaymentAccounts(stripe_account="acct_bastion"))
    await _stripe(setup, {**_sub_event(customer_id, "pro"), "account": "acct_bastion"})
    assert await ours.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "pro"


async def test_stripe_another_subscription_of_the_customer_leaves_the_plan_alone(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """The tenant's plan follows its bound subscription; the customer's second
    one (a second checkout, one made in the dashboard), deleted, must not end it."""
    tenant_id, customer_id = customer
    bound, other_sub = f"sub_{uuid4().hex[:12]}", f"sub_{uuid4().hex[:12]}"
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=bound))
    assert await service.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "pro"
    before = _state(database, tenant_id)
    other = _sub_event(
        customer_id,
        "pro",
        sub_id=other_sub,
        kind="customer.subscription.deleted",
        status="canceled",
        later=1,
    )
    await _stripe(setup, other)
    assert await service.drain(tenant_id) == 1
    assert _events(database, tenant_id)[-1][1:] == ("failed", "another-subscription-is-bound")
    assert _audited(database, tenant_id, "another-subscription-is-bound") == 1
    assert _state(database, tenant_id) == before
    assert (await service.entitlements(tenant_id)).plan == "pro"


async def test_stripe_a_new_subscription_is_bound_once_the_old_one_ended(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer_id = customer
    first, second = f"sub_{uuid4().hex[:12]}", f"sub_{uuid4().hex[:12]}"
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=first))
    await _stripe(
        setup,
        _sub_event(
            customer_id,
            "pro",
            sub_id=first,
            kind="customer.subscription.deleted",
            status="canceled",
            later=1,
        ),
    )
    assert await service.drain(tenant_id) == 2
    assert _plan(database, tenant_id) == "free"
    await _stripe(setup, _sub_event(customer_id, "enterprise", sub_id=second, later=2))
    assert await service.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "enterprise"


async def test_stripe_a_refund_of_the_period_s_payment_takes_the_plan_back(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """Stripe keeps the subscription active after a refund; the refunded period
    entitles to nothing, whatever later event of that period says, and the
    next period paid does."""
    tenant_id, customer_id = customer
    sub_id, now = f"sub_{uuid4().hex[:12]}", int(time.time())
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=sub_id, period_start=now - 60))
    charge = {
        "id": f"ch_{uuid4().hex[:12]}",
        "object": "charge",
        "customer": customer_id,
        "created": now - 50,
        "amount": 4900,
        "amount_refunded": 4900,
        "currency": "usd",
        "refunded": True,
    }
    await _stripe(setup, event_object("charge.refunded", charge, created=now + 1))
    # Stripe's next word on the same period: still "active".
    await _stripe(
        setup, _sub_event(customer_id, "pro", sub_id=sub_id, later=2, period_start=now - 60)
    )
    assert await service.drain(tenant_id) == 3
    assert [e[1:] for e in _events(database, tenant_id)] == [
        ("applied", "plan free -> pro"),
        ("applied", "plan pro -> free"),
        ("applied", "state-updated"),
    ]
    assert (await service.entitlements(tenant_id)).plan == "free"
    # The next period is paid: the plan is back.
    later = now + 31 * 86400
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=sub_id, later=3, period_start=later))
    assert await service.drain(tenant_id) == 1
    assert (await service.entitlements(tenant_id)).plan == "pro"


# -- Stripe: exactly the plan's price -------------------------------------------------------


def _priced_event(customer: str, plan: str, **price: Any) -> dict[str, Any]:
    """A subscription event for ``plan``'s catalogue price, its price object changed."""
    event = _sub_event(customer, plan)
    event["data"]["object"]["items"]["data"][0]["price"].update(price)
    return event


async def _assert_stripe_refused(
    setup: Setup,
    database: DbHandles,
    service: BillingService,
    customer: tuple[UUID, str],
    event: dict[str, Any],
    reason: str,
) -> None:
    tenant_id, _customer_id = customer
    before = _state(database, tenant_id)
    await _stripe(setup, event)
    await _assert_refused(database, service, tenant_id, before, reason)
    assert await service.plan_changes(tenant_id, "owner") == []


async def test_stripe_a_price_above_the_plan_price_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """Equal, not "at least": another amount is not the plan's price."""
    event = _priced_event(customer[1], "enterprise", unit_amount=PRICES["enterprise"] + 1)
    await _assert_stripe_refused(setup, database, service, customer, event, "price-not-plan-price")


async def test_stripe_the_plan_amount_in_another_currency_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    event = _priced_event(customer[1], "enterprise", currency="jpy")
    await _assert_stripe_refused(setup, database, service, customer, event, "price-not-plan-price")


async def test_stripe_an_upper_case_currency_does_not_skip_the_price_check(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """One spelling: "USD" is the plan's currency, and a cent of it is not its price."""
    event = _priced_event(customer[1], "enterprise", currency="USD", unit_amount=1)
    await _assert_stripe_refused(setup, database, service, customer, event, "price-not-plan-price")


async def test_stripe_the_exact_price_with_an_upper_case_currency_buys_the_plan(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer_id = customer
    await _stripe(setup, _priced_event(customer_id, "pro", currency="USD"))
    assert await service.drain(tenant_id) == 1
    assert (await service.entitlements(tenant_id)).plan == "pro"


async def test_stripe_the_monthly_amount_billed_yearly_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    event = _priced_event(
        customer[1],
        "enterprise",
        recurring={"interval": "year", "interval_count": 1, "usage_type": "licensed"},
    )
    await _assert_stripe_refused(setup, database, service, customer, event, "price-not-plan-price")


async def test_stripe_a_metered_price_of_the_plan_amount_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """Billed per unit used: no use, nothing paid."""
    event = _priced_event(
        customer[1],
        "enterprise",
        recurring={"interval": "month", "interval_count": 1, "usage_type": "metered"},
    )
    await _assert_stripe_refused(setup, database, service, customer, event, "price-not-plan-price")


async def test_stripe_a_quantity_of_two_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    event = _sub_event(customer[1], "enterprise")
    event["data"]["object"]["items"]["data"][0]["quantity"] = 2
    await _assert_stripe_refused(setup, database, service, customer, event, "quantity-not-one")


async def test_stripe_two_items_of_the_plan_buy_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    event = _sub_event(customer[1], "enterprise")
    items = event["data"]["object"]["items"]["data"]
    items.append({**items[0], "id": f"si_{uuid4().hex[:10]}"})
    await _assert_stripe_refused(setup, database, service, customer, event, "several-plans")


async def test_stripe_a_full_discount_coupon_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """A 100 % off coupon on the subscription: a paid plan for free."""
    event = _sub_event(customer[1], "enterprise")
    event["data"]["object"]["discounts"] = [f"di_{uuid4().hex[:14]}"]
    await _assert_stripe_refused(setup, database, service, customer, event, "discounted")


async def test_stripe_a_trial_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """Trialing: nothing paid yet; the plan starts with the first period paid."""
    tenant_id, customer_id = customer
    before = _state(database, tenant_id)
    await _stripe(setup, _sub_event(customer_id, "enterprise", status="trialing"))
    assert await service.drain(tenant_id) == 1
    assert _events(database, tenant_id)[-1][1:] == ("applied", "state-updated")
    assert _plan(database, tenant_id) == "free"
    assert await service.plan_changes(tenant_id, "owner") == []
    assert _state(database, tenant_id)["counts"] == before["counts"]
    assert (await service.entitlements(tenant_id)).plan == "free"


def _invoice(
    customer: str, sub_id: str, plan: str, *, period_start: int, discount: int = 0
) -> dict[str, Any]:
    """A paid ``subscription_cycle`` invoice of one plan line, ``discount`` off it
    (a coupon's ``discount_amounts``), in the API's current shape."""
    price, amount = TEST_PRICES[plan], PRICES[plan]
    discounts = [{"amount": discount, "discount": "di_coupon"}] if discount else []
    return {
        "id": f"in_{uuid4().hex[:14]}",
        "object": "invoice",
        "customer": customer,
        "billing_reason": "subscription_cycle",
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub_id},
        },
        "amount_paid": amount - discount,
        "currency": "usd",
        "total_discount_amounts": discounts,
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": f"il_{uuid4().hex[:10]}",
                    "object": "line_item",
                    "amount": amount,
                    "quantity": 1,
                    "discount_amounts": discounts,
                    "pricing": {"type": "price_details", "price_details": {"price": price}},
                    "parent": {"subscription_item_details": {"proration": False}},
                    "period": {"start": period_start, "end": period_start + 30 * 86400},
                }
            ],
        },
    }


async def test_stripe_an_invoice_paid_with_a_full_discount_takes_the_period_back(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """The coupon was added to the invoice: the amount paid is not the plan's price.
    In whichever order: Stripe's later "active" for that period changes nothing."""
    tenant_id, customer_id = customer
    sub_id, now = f"sub_{uuid4().hex[:12]}", int(time.time())
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=sub_id, period_start=now - 60))
    invoice = _invoice(customer_id, sub_id, "pro", period_start=now - 60, discount=PRICES["pro"])
    await _stripe(setup, event_object("invoice.paid", invoice, created=now + 1))
    await _stripe(
        setup, _sub_event(customer_id, "pro", sub_id=sub_id, later=2, period_start=now - 60)
    )
    assert await service.drain(tenant_id) == 3
    assert [e[1:] for e in _events(database, tenant_id)] == [
        ("applied", "plan free -> pro"),
        ("applied", "plan pro -> free"),
        ("applied", "state-updated"),
    ]
    assert (await service.entitlements(tenant_id)).plan == "free"
    changes = await service.plan_changes(tenant_id, "owner")
    assert [(c.from_plan, c.to_plan) for c in changes] == [("free", "pro"), ("pro", "free")]


async def test_stripe_an_invoice_paid_at_the_plan_price_keeps_the_plan(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer_id = customer
    sub_id, now = f"sub_{uuid4().hex[:12]}", int(time.time())
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=sub_id, period_start=now - 60))
    invoice = _invoice(customer_id, sub_id, "pro", period_start=now - 60)
    await _stripe(setup, event_object("invoice.paid", invoice, created=now + 1))
    assert await service.drain(tenant_id) == 2
    assert _events(database, tenant_id)[-1][1:] == ("applied", "invoice-paid")
    assert (await service.entitlements(tenant_id)).plan == "pro"


# -- Stripe: disputes (chargebacks) ---------------------------------------------------------


def _charge(customer: str, *, created: int, amount: int = PRICES["pro"]) -> dict[str, Any]:
    return {
        "id": f"ch_{uuid4().hex[:14]}",
        "object": "charge",
        "customer": customer,
        "created": created,
        "amount": amount,
        "currency": "usd",
        "paid": True,
        "status": "succeeded",
        "livemode": False,
    }


def _dispute(charge: dict[str, Any], status: str, *, dispute_id: str) -> dict[str, Any]:
    """A Stripe dispute: it names its charge, never a customer."""
    return {
        "id": dispute_id,
        "object": "dispute",
        "charge": charge["id"],
        "payment_intent": None,
        "amount": charge["amount"],
        "currency": "usd",
        "reason": "fraudulent",
        "status": status,
        "created": int(time.time()),
        "livemode": False,
    }


async def _paid_pro(
    setup: Setup, service: BillingService, customer: tuple[UUID, str], now: int
) -> tuple[str, dict[str, Any]]:
    """The tenant on pro, its period paid by a charge; returns (subscription, charge)."""
    tenant_id, customer_id = customer
    sub_id = f"sub_{uuid4().hex[:12]}"
    charge = _charge(customer_id, created=now - 50)
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=sub_id, period_start=now - 60))
    await _stripe(setup, event_object("charge.succeeded", charge, created=now - 50))
    assert await service.drain(tenant_id) == 2
    assert (await service.entitlements(tenant_id)).plan == "pro"
    return sub_id, charge


async def test_stripe_a_dispute_on_the_paying_charge_reverts_the_period(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """Once, audited, and Stripe's later "active" for the period does not undo it;
    the dispute's later events (funds withdrawn, lost) change nothing more."""
    tenant_id, customer_id = customer
    now = int(time.time())
    sub_id, charge = await _paid_pro(setup, service, customer, now)
    dispute_id = f"dp_{uuid4().hex[:14]}"
    created = event_object(
        "charge.dispute.created", _dispute(charge, "needs_response", dispute_id=dispute_id),
        created=now + 1,
    )  # fmt: skip
    await _stripe(setup, created)
    await _stripe(setup, created)  # a redelivery: stored once, applied once
    assert await service.drain(tenant_id) == 1
    assert _events(database, tenant_id)[-1] == (
        "charge.dispute.created",
        "applied",
        "plan pro -> free",
    )
    assert (await service.entitlements(tenant_id)).plan == "free"
    assert _state(database, tenant_id)["counts"][2] == 1000  # the free plan's call budget
    for kind, status, later in (
        ("charge.dispute.funds_withdrawn", "needs_response", 2),
        ("charge.dispute.closed", "lost", 3),
    ):
        dispute = _dispute(charge, status, dispute_id=dispute_id)
        await _stripe(setup, event_object(kind, dispute, created=now + later))
    await _stripe(
        setup, _sub_event(customer_id, "pro", sub_id=sub_id, later=4, period_start=now - 60)
    )
    assert await service.drain(tenant_id) == 3
    assert [e[2] for e in _events(database, tenant_id)[-3:]] == [
        "period-reversed",
        "period-reversed",
        "state-updated",
    ]
    assert (await service.entitlements(tenant_id)).plan == "free"
    changes = await service.plan_changes(tenant_id, "owner")
    assert [(c.from_plan, c.to_plan, c.event_id) for c in changes] == [
        ("free", "pro", changes[0].event_id),
        ("pro", "free", created["id"]),
    ]
    with psycopg.connect(database.superuser) as conn:
        audited = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = 'billing.plan.changed' AND details->>'event' = %s",
            (tenant_id, created["id"]),
        ).fetchone()
    assert audited == (1,)


async def test_stripe_a_dispute_before_its_payment_buys_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """The dispute arrives first (unrouted: its charge is not known yet), then the
    charge, then the subscription's event for the period the charge paid."""
    tenant_id, customer_id = customer
    now = int(time.time())
    before = _state(database, tenant_id)
    charge = _charge(customer_id, created=now - 50)
    dispute = _dispute(charge, "needs_response", dispute_id=f"dp_{uuid4().hex[:14]}")
    await _stripe(setup, event_object("charge.dispute.created", dispute, created=now + 1))
    await _stripe(setup, event_object("charge.succeeded", charge, created=now - 50))
    await _stripe(setup, _sub_event(customer_id, "pro", period_start=now - 60))
    assert await service.drain(tenant_id) == 3
    assert sorted(e[0] + ":" + e[2] for e in _events(database, tenant_id)) == [
        "charge.dispute.created:dispute-recorded",
        "charge.succeeded:charge-recorded",
        "customer.subscription.updated:state-updated",
    ]
    assert _plan(database, tenant_id) == "free"
    assert await service.plan_changes(tenant_id, "owner") == []
    assert _state(database, tenant_id)["counts"] == before["counts"]  # budget untouched
    assert (await service.entitlements(tenant_id)).plan == "free"


async def test_stripe_a_dispute_won_by_the_merchant_gives_the_period_back(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """Won: the money is back, so is the plan. A late copy of the dispute's
    earlier state (needs_response) is stale and takes nothing back again."""
    tenant_id, _customer_id = customer
    now = int(time.time())
    _sub_id, charge = await _paid_pro(setup, service, customer, now)
    dispute_id = f"dp_{uuid4().hex[:14]}"
    opened = _dispute(charge, "needs_response", dispute_id=dispute_id)
    await _stripe(setup, event_object("charge.dispute.created", opened, created=now + 1))
    won = _dispute(charge, "won", dispute_id=dispute_id)
    await _stripe(setup, event_object("charge.dispute.closed", won, created=now + 3))
    late = event_object("charge.dispute.updated", opened, created=now + 2)
    await _stripe(setup, late)
    assert await service.drain(tenant_id) == 3
    assert [e[1:] for e in _events(database, tenant_id)[-3:]] == [
        ("applied", "plan pro -> free"),
        ("applied", "plan free -> pro"),
        ("stale", "older-than-applied-state"),
    ]
    assert (await service.entitlements(tenant_id)).plan == "pro"
    changes = await service.plan_changes(tenant_id, "owner")
    assert [(c.from_plan, c.to_plan) for c in changes] == [
        ("free", "pro"),
        ("pro", "free"),
        ("free", "pro"),
    ]


async def test_stripe_a_dispute_of_another_customer_s_charge_changes_nothing(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService
) -> None:
    """A dispute is routed by its charge: a stranger's charge reaches no tenant."""
    tenant_id, _customer_id = customer
    now = int(time.time())
    await _paid_pro(setup, service, customer, now)
    before = _state(database, tenant_id)
    stranger = _charge(f"cus_{uuid4().hex[:12]}", created=now - 40)
    dispute = _dispute(stranger, "needs_response", dispute_id=f"dp_{uuid4().hex[:14]}")
    event = event_object("charge.dispute.created", dispute, created=now + 1)
    await _stripe(setup, event)
    assert await service.drain(tenant_id) == 0
    with psycopg.connect(database.superuser) as conn:
        stored = conn.execute(
            "SELECT tenant_id, status FROM bastion.webhook_events WHERE event_id = %s",
            (event["id"],),
        ).fetchone()
    assert stored == (None, "unrouted")
    assert _state(database, tenant_id) == before


# -- Stripe: reconciliation reaches the same state ------------------------------------------


def _reconcile_stripe(
    database: DbHandles, keystore: LocalKeystore, api_base: str, key_name: str, since: int
) -> str:
    """``bastion billing reconcile`` (Stripe), as an operator runs it, on the double."""
    env = {
        **os.environ,
        "BASTION_HOME": str(short_tempdir("bastion-pi-")),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "BASTION_BILLING_STRIPE_API_KEY_REF": f"local://{key_name}",
        "BASTION_BILLING_STRIPE_API_BASE": api_base,
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "bastion", "billing", "reconcile", "--since", str(since)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_stripe_reconcile_reverts_the_period_of_a_missed_dispute_of_an_unseen_charge(
    setup: Setup, database: DbHandles, customer: tuple[UUID, str], service: BillingService,
    keystore: LocalKeystore,
) -> None:  # fmt: skip
    """Neither the dispute's delivery nor its charge's reached Bastion: reconciliation
    lists the dispute, fetches its charge from Stripe to find its tenant, and the
    period is taken back as the webhook would have; Stripe's subscription still
    says "active", and a second run repairs nothing back."""
    tenant_id, customer_id = customer
    now = int(time.time())
    sub_id = f"sub_{uuid4().hex[:12]}"
    await _stripe(setup, _sub_event(customer_id, "pro", sub_id=sub_id, period_start=now - 60))
    assert await service.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "pro"
    charge = _charge(customer_id, created=now - 50)
    dispute = _dispute(charge, "needs_response", dispute_id=f"dp_{uuid4().hex[:14]}")
    key_name = f"billing/test-pi-stripe-api-{uuid4().hex[:8]}"
    keystore.set(key_name, API_KEY.encode())
    with stripe_double() as double:
        double.subscriptions[sub_id] = subscription_object(
            sub_id, customer_id, TEST_PRICES["pro"], period_start=now - 60
        )
        double.charges[charge["id"]] = charge
        double.add_event(event_object("charge.dispute.created", dispute, created=now + 1))
        first = _reconcile_stripe(database, keystore, double.url, key_name, now - 10)
        assert "charges recorded: 1" in first
        assert await service.drain(tenant_id) == 1
        assert _events(database, tenant_id)[-1] == (
            "charge.dispute.created",
            "applied",
            "plan pro -> free",
        )
        assert (await service.entitlements(tenant_id)).plan == "free"
        second = _reconcile_stripe(database, keystore, double.url, key_name, now - 10)
        assert "events recovered: 0" in second
    assert await service.drain(tenant_id) == 0
    assert _plan(database, tenant_id) == "free"
    changes = await service.plan_changes(tenant_id, "owner")
    assert [(c.from_plan, c.to_plan, c.source) for c in changes] == [
        ("free", "pro", "webhook"),
        ("pro", "free", "webhook"),
    ]
