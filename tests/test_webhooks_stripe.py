"""Stripe webhooks over real HTTP: signatures (each refusal its own attack), storage,
duplicates, ordering, unknown types and customers, and bad input (CHECKLIST P2).

Deliveries are signed with Stripe's own construction (the library's
``generate_signature_header``: ``t=…,v1=HMAC-SHA256(secret, f"{t}.{body}")``).
Every refusal checks the answer *and* that nothing was stored or changed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.billing.errors import CustomerAlreadyBound
from bastion.billing.plans import PlanCatalogue
from bastion.billing.service import BillingService
from bastion.billing.webhooks import MAX_BODY_BYTES, EventCipher
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.stripe_double import (
    TEST_PRICES,
    event_object,
    price_plans,
    signed,
    subscription_object,
    to_json,
    webhook_api,
)

pytestmark = pytest.mark.anyio

SECRET_NAME = f"billing/test-stripe-{uuid4().hex[:8]}"
PROBLEM = "https://bastion.dev/problems/"


@dataclass
class Setup:
    url: str
    current: str
    previous: str


@pytest.fixture(scope="module")
def setup(database: DbHandles, keystore: LocalKeystore) -> Iterator[Setup]:
    # A rotation in progress: the previous secret is still active.
    previous = f"whsec_prev_{uuid4().hex}"
    current = f"whsec_curr_{uuid4().hex}"
    keystore.set(SECRET_NAME, previous.encode())
    keystore.set(SECRET_NAME, current.encode())
    with webhook_api(database, keystore, stripe_ref=f"local://{SECRET_NAME}") as url:
        yield Setup(url, current, previous)


@pytest.fixture
def service(db: Database, keystore: LocalKeystore) -> BillingService:
    return BillingService(db, EventCipher(keystore))


@pytest.fixture
async def tenant(db: Database, service: BillingService) -> tuple[UUID, str]:
    """A tenant linked to a fresh Stripe customer, plans priced."""
    await price_plans(db)
    created = await TenantService(db).create_tenant(f"s-{uuid4().hex[:8]}", "Stripe test")
    customer = f"cus_{uuid4().hex[:12]}"
    await service.link_stripe_customer(created.id, customer)
    return created.id, customer


def _rows(database: DbHandles) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute("SELECT count(*) FROM bastion.webhook_events").fetchone()
    assert row is not None
    return int(row[0])


def _event(database: DbHandles, event_id: str) -> dict[str, Any] | None:
    with psycopg.connect(database.superuser) as conn:
        cur = conn.execute(
            "SELECT status, tenant_id, outcome, payload FROM bastion.webhook_events "
            "WHERE provider = 'stripe' AND event_id = %s",
            (event_id,),
        )
        row = cur.fetchone()
    if row is None:
        return None
    return {"status": row[0], "tenant_id": row[1], "outcome": row[2], "payload": bytes(row[3])}


def _plan(database: DbHandles, tenant_id: UUID) -> tuple[str, str] | None:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT plan_code, status FROM bastion.subscriptions WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchone()
    return None if row is None else (row[0], row[1])


def _sub_event(
    customer: str, plan: str, *, created: int, kind: str = "customer.subscription.updated"
) -> dict[str, Any]:
    sub = subscription_object(f"sub_{customer}", customer, TEST_PRICES.get(plan, plan))
    return event_object(kind, sub, created=created)


async def _post(
    url: str, body: str | bytes, header: str | bytes | None, **headers: str
) -> httpx.Response:
    sent: dict[str, str | bytes] = dict(headers)
    if header is not None:
        sent["Stripe-Signature"] = header
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{url}/webhooks/stripe", content=body, headers=sent)


def _refused(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == PROBLEM + slug
    assert "whsec_" not in response.text and "Traceback" not in response.text


# -- signatures: accepted ----------------------------------------------------------------


async def test_valid_signature_with_the_current_secret_is_stored(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str]
) -> None:
    tenant_id, customer = tenant
    event = _sub_event(customer, "pro", created=int(time.time()))
    body = to_json(event)
    response = await _post(setup.url, body, signed(body, setup.current))
    assert response.status_code == 200
    assert response.json() == {"received": True, "duplicate": False}
    stored = _event(database, event["id"])
    assert stored is not None and stored["status"] == "queued"
    assert stored["tenant_id"] == tenant_id
    # Stored encrypted: neither the customer nor the event id appears in the bytes.
    assert customer.encode() not in stored["payload"]
    assert event["id"].encode() not in stored["payload"]


async def test_valid_signature_with_the_previous_secret_during_rotation(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str]
) -> None:
    _tenant, customer = tenant
    event = _sub_event(customer, "pro", created=int(time.time()))
    body = to_json(event)
    response = await _post(setup.url, body, signed(body, setup.previous))
    assert response.status_code == 200
    assert _event(database, event["id"]) is not None


# -- signatures: refused (each its own attack; nothing stored) ------------------------------


async def test_wrong_secret_is_refused_and_nothing_stored(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str]
) -> None:
    _tenant, customer = tenant
    event = _sub_event(customer, "enterprise", created=int(time.time()))
    body = to_json(event)
    before = _rows(database)
    response = await _post(setup.url, body, signed(body, "whsec_attacker_guess"))
    _refused(response, 400, "webhook-signature-invalid")
    assert _rows(database) == before and _event(database, event["id"]) is None


async def test_timestamp_outside_tolerance_is_refused(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str]
) -> None:
    _tenant, customer = tenant
    old = int(time.time()) - 301
    event = _sub_event(customer, "enterprise", created=old)
    body = to_json(event)
    before = _rows(database)
    response = await _post(setup.url, body, signed(body, setup.current, old))
    _refused(response, 400, "webhook-signature-invalid")
    assert _rows(database) == before and _event(database, event["id"]) is None


async def test_body_changed_by_one_byte_is_refused(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str]
) -> None:
    tenant_id, customer = tenant
    event = _sub_event(customer, "pro", created=int(time.time()))
    body = to_json(event)
    header = signed(body, setup.current)
    tampered = body.replace('"price_pro"', '"price_ent"')
    assert len(tampered) == len(body) and tampered != body
    one_byte = body[:-2] + ("1" if body[-2] != "1" else "2") + body[-1]
    before = _rows(database)
    for changed in (tampered, one_byte):
        response = await _post(setup.url, changed, header)
        _refused(response, 400, "webhook-signature-invalid")
    assert _rows(database) == before and _plan(database, tenant_id) == ("free", "active")


async def test_missing_signature_header_is_refused(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str]
) -> None:
    _tenant, customer = tenant
    event = _sub_event(customer, "pro", created=int(time.time()))
    before = _rows(database)
    response = await _post(setup.url, to_json(event), None)
    _refused(response, 400, "webhook-signature-invalid")
    response = await _post(setup.url, to_json(event), "")
    _refused(response, 400, "webhook-signature-invalid")
    assert _rows(database) == before


async def test_garbled_signature_header_is_refused(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str]
) -> None:
    _tenant, customer = tenant
    body = to_json(_sub_event(customer, "pro", created=int(time.time())))
    before = _rows(database)
    for header in ("t=notanumber,v1=abc", "v0=deadbeef", "t=1,v1=", "\u00e9" * 10):
        response = await _post(setup.url, body, header.encode("utf-8"))
        _refused(response, 400, "webhook-signature-invalid")
    assert _rows(database) == before


async def test_retired_secret_no_longer_verifies(
    database: DbHandles, keystore: LocalKeystore, tenant: tuple[UUID, str]
) -> None:
    name = f"billing/test-retire-{uuid4().hex[:8]}"
    old, new = f"whsec_old_{uuid4().hex}", f"whsec_new_{uuid4().hex}"
    first = keystore.set(name, old.encode())
    keystore.set(name, new.encode())
    keystore.retire(name, first)
    _tenant, customer = tenant
    body = to_json(_sub_event(customer, "pro", created=int(time.time())))
    before = _rows(database)
    with webhook_api(database, keystore, stripe_ref=f"local://{name}") as url:
        _refused(await _post(url, body, signed(body, old)), 400, "webhook-signature-invalid")
        assert _rows(database) == before
        assert (await _post(url, body, signed(body, new))).status_code == 200


async def test_no_configured_secret_fails_closed(
    database: DbHandles, keystore: LocalKeystore, tenant: tuple[UUID, str]
) -> None:
    _tenant, customer = tenant
    body = to_json(_sub_event(customer, "pro", created=int(time.time())))
    before = _rows(database)
    with webhook_api(database, keystore, stripe_ref="local://billing/never-configured") as url:
        response = await _post(url, body, signed(body, "whsec_anything"))
        _refused(response, 503, "webhooks-unavailable")
    assert _rows(database) == before


# -- bad input: never a 500, never a state change -----------------------------------------


async def test_signed_non_json_is_refused_without_storing(
    setup: Setup, database: DbHandles
) -> None:
    before = _rows(database)
    too_late = '{"object": "event", "id": "evt_x", "type": "t", "created": 99999999999999999999, '
    too_late += '"data": {"object": {}}}'
    for body in ("not json at all", "[1, 2, 3]", '{"object": "event"}', '{"id": 5}', too_late):
        response = await _post(setup.url, body, signed(body, setup.current))
        _refused(response, 400, "webhook-malformed")
    assert _rows(database) == before


async def test_non_utf8_body_is_refused(setup: Setup, database: DbHandles) -> None:
    before = _rows(database)
    response = await _post(setup.url, b"\xff\xfe\x00garbage", "t=1,v1=00")
    _refused(response, 400, "webhook-signature-invalid")
    assert _rows(database) == before


async def test_huge_body_is_refused_unread(setup: Setup, database: DbHandles) -> None:
    before = _rows(database)
    body = '{"pad": "' + "x" * (MAX_BODY_BYTES + 10) + '"}'
    response = await _post(setup.url, body, signed(body, setup.current))
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")
    assert _rows(database) == before


async def test_replayed_old_event_is_refused(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    """An attacker replays a captured delivery after the tolerance: refused, and the
    same event replayed inside the window is a stored-once duplicate."""
    tenant_id, customer = tenant
    first = int(time.time()) - 400
    event = _sub_event(customer, "enterprise", created=first)
    body = to_json(event)
    captured = signed(body, setup.current, first)
    _refused(await _post(setup.url, body, captured), 400, "webhook-signature-invalid")
    assert _event(database, event["id"]) is None
    fresh = signed(body, setup.current)
    assert (await _post(setup.url, body, fresh)).json()["duplicate"] is False
    await service.drain(tenant_id)
    assert _plan(database, tenant_id) == ("enterprise", "active")
    for _ in range(3):
        again = await _post(setup.url, body, signed(body, setup.current))
        assert again.status_code == 200 and again.json()["duplicate"] is True
    assert await service.drain(tenant_id) == 0
    with psycopg.connect(database.superuser) as conn:
        changes = conn.execute(
            "SELECT count(*) FROM bastion.plan_changes WHERE event_id = %s", (event["id"],)
        ).fetchone()
    assert changes == (1,)


async def test_unknown_event_type_is_stored_acked_ignored_and_counted(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer = tenant
    before = (await service.event_counts()).get("ignored", 0)
    event = event_object(
        "customer.tax_id.created", {"id": "txi_1", "customer": customer}, created=int(time.time())
    )
    body = to_json(event)
    response = await _post(setup.url, body, signed(body, setup.current))
    assert response.status_code == 200
    stored = _event(database, event["id"])
    assert stored is not None and stored["status"] == "ignored"
    assert (await service.event_counts())["ignored"] == before + 1
    assert await service.drain(tenant_id) == 0
    assert _plan(database, tenant_id) == ("free", "active")


async def test_unknown_customer_is_stored_flagged_then_routed(
    setup: Setup, database: DbHandles, db: Database, service: BillingService
) -> None:
    stranger = f"cus_{uuid4().hex[:12]}"
    event = _sub_event(stranger, "pro", created=int(time.time()))
    body = to_json(event)
    response = await _post(setup.url, body, signed(body, setup.current))
    assert response.status_code == 200
    stored = _event(database, event["id"])
    assert stored is not None and stored["status"] == "unrouted" and stored["tenant_id"] is None
    # Its customer becomes known (a checkout completes): reconciliation routes it.
    tenant = await TenantService(db).create_tenant(f"late-{uuid4().hex[:8]}", "Late")
    await service.link_stripe_customer(tenant.id, stranger)
    routed = _event(database, event["id"])
    assert routed is not None and routed["status"] == "queued" and routed["tenant_id"] == tenant.id
    assert await service.drain(tenant.id) == 1
    assert _plan(database, tenant.id) == ("pro", "active")


# -- ordering and effects -------------------------------------------------------------------


async def test_older_update_never_overwrites_a_newer_state(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer = tenant
    now = int(time.time())
    newer = _sub_event(customer, "enterprise", created=now)
    older = _sub_event(customer, "pro", created=now - 60)
    for event in (newer, older):  # delivered newest first
        body = to_json(event)
        assert (await _post(setup.url, body, signed(body, setup.current))).status_code == 200
    assert await service.drain(tenant_id) == 2
    assert _plan(database, tenant_id) == ("enterprise", "active")
    stale = _event(database, older["id"])
    assert stale is not None and stale["status"] == "stale"


async def test_same_second_events_order_by_event_id(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer = tenant
    now = int(time.time())
    a = _sub_event(customer, "pro", created=now)
    b = _sub_event(customer, "enterprise", created=now)
    stem = f"evt_{uuid4().hex[:6]}_"
    a["id"], b["id"] = stem + "a", stem + "b"
    for event in (b, a):
        body = to_json(event)
        assert (await _post(setup.url, body, signed(body, setup.current))).status_code == 200
    await service.drain(tenant_id)
    assert _plan(database, tenant_id) == ("enterprise", "active")


async def test_plan_change_records_who_what_when_why_and_sets_the_budget(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer = tenant
    event = _sub_event(customer, "pro", created=int(time.time()))
    body = to_json(event)
    await _post(setup.url, body, signed(body, setup.current))
    await service.drain(tenant_id)
    changes = await service.plan_changes(tenant_id, "billing-admin")
    assert [(c.from_plan, c.to_plan, c.source) for c in changes][-1] == ("free", "pro", "webhook")
    last = changes[-1]
    assert last.actor == f"stripe:{event['id']}" and "subscription.updated" in last.reason
    assert last.event_id == event["id"] and last.at is not None
    with psycopg.connect(database.superuser) as conn:
        budget = conn.execute(
            "SELECT call_limit, token_limit FROM bastion.budgets WHERE tenant_id = %s "
            "AND period_start <= now() AND now() < period_end",
            (tenant_id,),
        ).fetchone()
        audit = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = 'billing.plan.changed'",
            (tenant_id,),
        ).fetchone()
    assert budget == (100_000, 20_000_000)
    assert audit == (1,)


async def test_subscription_deleted_falls_back_to_free(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer = tenant
    now = int(time.time())
    for event in (
        _sub_event(customer, "pro", created=now - 5),
        _sub_event(customer, "pro", created=now, kind="customer.subscription.deleted"),
    ):
        body = to_json(event)
        await _post(setup.url, body, signed(body, setup.current))
    await service.drain(tenant_id)
    assert _plan(database, tenant_id) == ("free", "canceled")
    assert (await service.entitlements(tenant_id)).plan == "free"


async def test_unknown_price_fails_the_event_without_a_change(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, customer = tenant
    event = _sub_event(customer, "price_nobody_sells", created=int(time.time()))
    body = to_json(event)
    await _post(setup.url, body, signed(body, setup.current))
    await service.drain(tenant_id)
    stored = _event(database, event["id"])
    assert stored is not None and stored["status"] == "failed"
    assert stored["outcome"] == "unknown-price"
    assert _plan(database, tenant_id) == ("free", "active")


async def test_checkout_completed_links_the_customer_named_by_the_session(
    setup: Setup, database: DbHandles, db: Database, service: BillingService
) -> None:
    tenant = await TenantService(db).create_tenant(f"co-{uuid4().hex[:8]}", "Checkout")
    customer, sub_id = f"cus_{uuid4().hex[:12]}", f"sub_{uuid4().hex[:12]}"
    session = {
        "id": f"cs_test_{uuid4().hex[:10]}",
        "object": "checkout.session",
        "client_reference_id": str(tenant.id),
        "customer": customer,
        "subscription": sub_id,
        "mode": "subscription",
    }
    event = event_object("checkout.session.completed", session, created=int(time.time()))
    body = to_json(event)
    assert (await _post(setup.url, body, signed(body, setup.current))).status_code == 200
    await service.drain(tenant.id)
    sub = await service.subscription(tenant.id)
    assert (sub.stripe_customer_id, sub.stripe_subscription_id) == (customer, sub_id)


async def test_paid_invoice_calls_the_receipt_hook_once_in_the_applying_transaction(
    setup: Setup, database: DbHandles, db: Database, keystore: LocalKeystore,
    tenant: tuple[UUID, str],
) -> None:  # fmt: skip
    tenant_id, customer = tenant
    calls: list[tuple[UUID, str]] = []
    failing = {"on": True}

    async def hook(tx: Any, hook_tenant: UUID, event: dict[str, Any]) -> None:
        # Inside the applying transaction: the event is not yet marked applied.
        row = await (
            await tx.execute(
                "SELECT status FROM bastion.webhook_events WHERE event_id = %s", (event["id"],)
            )
        ).fetchone()
        assert row["status"] == "queued"
        if failing["on"]:
            raise ConnectionError("the receipt signer is down")
        calls.append((hook_tenant, event["id"]))

    service = BillingService(db, EventCipher(keystore), invoice_paid_hook=hook)
    invoice = {"id": f"in_{uuid4().hex[:10]}", "object": "invoice", "customer": customer}
    event = event_object("invoice.paid", invoice, created=int(time.time()))
    body = to_json(event)
    for _ in range(3):
        assert (await _post(setup.url, body, signed(body, setup.current))).status_code == 200
    # The hook's failure rolls the whole application back: retried later, not lost.
    with pytest.raises(ConnectionError):
        await service.drain(tenant_id)
    stored = _event(database, event["id"])
    assert stored is not None and stored["status"] == "queued"
    failing["on"] = False
    assert await service.drain(tenant_id) == 1
    assert await service.drain(tenant_id) == 0
    assert calls == [(tenant_id, event["id"])]


async def test_checkout_naming_another_tenant_than_the_customers_links_nothing(
    setup: Setup, database: DbHandles, db: Database, service: BillingService,
    tenant: tuple[UUID, str],
) -> None:  # fmt: skip
    owner_id, customer = tenant  # the customer already belongs to this tenant
    other = await TenantService(db).create_tenant(f"ot-{uuid4().hex[:8]}", "Other")
    session = {
        "id": f"cs_test_{uuid4().hex[:10]}",
        "object": "checkout.session",
        "client_reference_id": str(other.id),
        "customer": customer,
        "subscription": f"sub_{uuid4().hex[:10]}",
    }
    event = event_object("checkout.session.completed", session, created=int(time.time()))
    body = to_json(event)
    assert (await _post(setup.url, body, signed(body, setup.current))).status_code == 200
    await service.drain(owner_id)
    stored = _event(database, event["id"])
    assert stored is not None and (stored["status"], stored["outcome"]) == (
        "failed",
        "tenant-mismatch",
    )
    assert (await service.subscription(owner_id)).stripe_subscription_id is None
    with psycopg.connect(database.superuser) as conn:
        linked = conn.execute(
            "SELECT count(*) FROM bastion.subscriptions WHERE tenant_id = %s", (other.id,)
        ).fetchone()
    assert linked == (0,)


# -- a plan only for what was paid, a customer bound once (issue 13, findings 3 and 7b) -----


def _audit(database: DbHandles, tenant_id: UUID, action: str) -> list[tuple[str, Any]]:
    with psycopg.connect(database.superuser) as conn:
        return conn.execute(
            "SELECT actor, details FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = %s ORDER BY seq",
            (tenant_id, action),
        ).fetchall()


async def _deliver_and_drain(
    setup: Setup, service: BillingService, tenant_id: UUID, event: dict[str, Any]
) -> None:
    body = to_json(event)
    assert (await _post(setup.url, body, signed(body, setup.current))).status_code == 200
    await service.drain(tenant_id)


async def test_a_cheap_price_mapped_to_a_dear_plan_is_refused(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    """The catalogue says ``price_ent`` sells Enterprise (999.00 a month); a
    subscription billing 5.00 a month on it did not pay for Enterprise."""
    tenant_id, customer = tenant
    sub = subscription_object(f"sub_{customer}", customer, TEST_PRICES["enterprise"])
    sub["items"]["data"][0]["price"].update(
        unit_amount=500, currency="usd", recurring={"interval": "month", "interval_count": 1}
    )
    event = event_object("customer.subscription.updated", sub, created=int(time.time()))
    await _deliver_and_drain(setup, service, tenant_id, event)
    stored = _event(database, event["id"])
    assert stored is not None and (stored["status"], stored["outcome"]) == (
        "failed",
        "price-not-plan-price",
    )
    assert _plan(database, tenant_id) == ("free", "active")
    assert (await service.entitlements(tenant_id)).plan == "free"
    assert await service.plan_changes(tenant_id, "owner") == []
    ((actor, details),) = _audit(database, tenant_id, "billing.webhook.applied")
    assert actor == "stripe:webhook" and details["outcome"] == "price-not-plan-price"


async def test_a_subscription_to_an_inactive_plan_is_refused(
    setup: Setup, db: Database, database: DbHandles, tenant: tuple[UUID, str],
    service: BillingService,
) -> None:  # fmt: skip
    tenant_id, customer = tenant
    legacy = dataclasses.replace(
        await PlanCatalogue(db).get("pro"),
        code=f"legacy{uuid4().hex[:6]}",
        stripe_price_id=f"price_legacy_{uuid4().hex[:6]}",
        active=False,
    )
    await PlanCatalogue(db).put(legacy, actor="operator:alice")
    assert legacy.stripe_price_id is not None
    sub = subscription_object(
        f"sub_{customer}", customer, legacy.stripe_price_id, amount=legacy.monthly_price
    )
    event = event_object("customer.subscription.updated", sub, created=int(time.time()))
    await _deliver_and_drain(setup, service, tenant_id, event)
    stored = _event(database, event["id"])
    assert stored is not None and (stored["status"], stored["outcome"]) == (
        "failed",
        "plan-inactive",
    )
    assert _plan(database, tenant_id) == ("free", "active")
    assert await service.plan_changes(tenant_id, "owner") == []


async def test_a_checkout_with_another_customer_is_refused_audited_and_binds_nothing(
    setup: Setup, database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    """A completed checkout (a payment link, say, whose ``client_reference_id``
    anyone may set) names the tenant but carries a stranger's customer: the
    tenant's bound customer stays, and the stranger's events never reach it."""
    tenant_id, bound = tenant
    stranger = f"cus_{uuid4().hex[:12]}"
    session = {
        "id": f"cs_test_{uuid4().hex[:10]}",
        "object": "checkout.session",
        "client_reference_id": str(tenant_id),
        "metadata": {"tenant_id": str(tenant_id)},
        "customer": stranger,
        "subscription": f"sub_{uuid4().hex[:10]}",
        "mode": "subscription",
    }
    event = event_object("checkout.session.completed", session, created=int(time.time()))
    await _deliver_and_drain(setup, service, tenant_id, event)
    stored = _event(database, event["id"])
    assert stored is not None and (stored["status"], stored["outcome"]) == (
        "failed",
        "customer-mismatch",
    )
    sub = await service.subscription(tenant_id)
    assert (sub.stripe_customer_id, sub.stripe_subscription_id) == (bound, None)
    ((actor, details),) = _audit(database, tenant_id, "billing.customer.refused")
    assert actor == f"stripe:{event['id']}"
    assert details["reason"] == "another-customer-is-bound"
    assert stranger not in str(details)
    # The stranger's subscription events find no tenant.
    later = _sub_event(stranger, "enterprise", created=int(time.time()) + 1)
    body = to_json(later)
    assert (await _post(setup.url, body, signed(body, setup.current))).status_code == 200
    routed = _event(database, later["id"])
    assert routed is not None and (routed["status"], routed["tenant_id"]) == ("unrouted", None)
    assert _plan(database, tenant_id) == ("free", "active")


async def test_linking_another_customer_to_a_bound_tenant_is_refused_and_audited(
    database: DbHandles, tenant: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, bound = tenant
    with pytest.raises(CustomerAlreadyBound):
        await service.link_stripe_customer(tenant_id, f"cus_{uuid4().hex[:12]}", actor="operator:x")
    assert (await service.subscription(tenant_id)).stripe_customer_id == bound
    ((actor, details),) = _audit(database, tenant_id, "billing.customer.refused")
    assert (actor, details["reason"]) == ("operator:x", "another-customer-is-bound")
    await service.link_stripe_customer(tenant_id, bound)  # the same one again: a no-op
    assert len(_audit(database, tenant_id, "billing.customer.refused")) == 1
