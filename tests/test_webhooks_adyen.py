"""Adyen standard notifications over real HTTP: each item's HMAC (Adyen's own
``generate_notification_sig`` signs the test items), rotation, refusals that store
nothing, duplicates and ordering by the signed reference (CHECKLIST P2)."""

from __future__ import annotations

import json
import secrets
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
from tests.conftest import DbHandles
from tests.stripe_double import price_plans, webhook_api

pytestmark = pytest.mark.anyio

KEY_NAME = f"billing/test-adyen-{uuid4().hex[:8]}"
PROBLEM = "https://bastion.dev/problems/"


@dataclass
class Setup:
    url: str
    current: str
    previous: str


@pytest.fixture(scope="module")
def setup(database: DbHandles, keystore: LocalKeystore) -> Iterator[Setup]:
    previous, current = secrets.token_hex(32), secrets.token_hex(32)
    keystore.set(KEY_NAME, previous.encode())
    keystore.set(KEY_NAME, current.encode())
    with webhook_api(
        database,
        keystore,
        stripe_ref="local://billing/test-adyen-no-stripe",
        adyen_ref=f"local://{KEY_NAME}",
    ) as url:
        yield Setup(url, current, previous)


@pytest.fixture
def service(db: Database, keystore: LocalKeystore) -> BillingService:
    accounts = PaymentAccounts(adyen_merchant_account="BastionTest")
    return BillingService(db, EventCipher(keystore), accounts=accounts)


@pytest.fixture
async def shopper(db: Database, service: BillingService) -> tuple[UUID, str]:
    await price_plans(db)
    tenant = await TenantService(db).create_tenant(f"ad-{uuid4().hex[:8]}", "Adyen test")
    reference = f"shopper-{uuid4().hex[:10]}"
    await service.link_adyen_shopper(tenant.id, reference)
    return tenant.id, reference


# What the catalogue's plans cost a month (migration 0015), in cents of USD.
PRICES = {"free": 0, "pro": 4900, "enterprise": 99900}


def _item(
    key: str,
    shopper: str,
    plan: str,
    sequence: int,
    *,
    code: str = "AUTHORISATION",
    amount: int | None = None,
    currency: str = "USD",
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pspReference": f"PSP{uuid4().hex[:14].upper()}",
        "originalReference": "",
        "merchantAccountCode": "BastionTest",
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


def _batch(*items: dict[str, Any]) -> str:
    return json.dumps(
        {"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]}
    )


async def _post(url: str, body: str | bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"{url}/webhooks/adyen", content=body, headers={"Content-Type": "application/json"}
        )


def _count(database: DbHandles) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.webhook_events WHERE provider = 'adyen'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _plan(database: DbHandles, tenant_id: UUID) -> str:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT plan_code FROM bastion.subscriptions WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def _refused(response: httpx.Response, slug: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["type"] == PROBLEM + slug
    assert "[accepted]" not in response.text


async def test_valid_hmac_is_accepted_stored_and_applied(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    response = await _post(setup.url, _batch(_item(setup.current, reference, "pro", 1)))
    assert response.status_code == 200 and response.text == "[accepted]"
    assert await service.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "pro"


async def test_previous_key_verifies_during_rotation(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str]
) -> None:
    _tenant, reference = shopper
    before = _count(database)
    response = await _post(setup.url, _batch(_item(setup.previous, reference, "pro", 1)))
    assert response.text == "[accepted]" and _count(database) == before + 1


async def test_wrong_key_is_refused_and_nothing_stored(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str]
) -> None:
    _tenant, reference = shopper
    before = _count(database)
    response = await _post(setup.url, _batch(_item(secrets.token_hex(32), reference, "pro", 1)))
    _refused(response, "webhook-signature-invalid")
    assert _count(database) == before


async def test_altered_signed_field_is_refused(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str]
) -> None:
    tenant_id, reference = shopper
    item = _item(setup.current, reference, "pro", 1)
    item["merchantReference"] = merchant_reference(reference, "enterprise", 1)
    before = _count(database)
    _refused(await _post(setup.url, _batch(item)), "webhook-signature-invalid")
    assert _count(database) == before and _plan(database, tenant_id) == "free"


async def test_a_signed_item_that_reads_two_ways_is_refused_and_nothing_stored(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str]
) -> None:
    # Adyen joins the signed fields with ':' unescaped. With a ':' inside one,
    # the same HMAC covers another split of the fields, under another event id
    # (pspReference "P" becomes "P:"): one notification, applied twice.
    tenant_id, reference = shopper
    item = _item(setup.current, reference, "pro", 1)
    item["merchantAccountCode"] = "Bastion:EU"
    del item["additionalData"]
    item["additionalData"] = {
        "hmacSignature": Adyen.util.generate_notification_sig(item, setup.current).decode()
    }
    twin = {
        **item,
        "pspReference": item["pspReference"] + ":",
        "originalReference": "Bastion",
        "merchantAccountCode": "EU",
    }
    for signed in (item, twin):  # both verify under Adyen's scheme
        assert Adyen.util.is_valid_hmac_notification(signed, setup.current)
    before = _count(database)
    for signed in (item, twin):
        _refused(await _post(setup.url, _batch(signed)), "webhook-malformed")
    assert _count(database) == before and _plan(database, tenant_id) == "free"


async def test_missing_hmac_is_refused(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str]
) -> None:
    _tenant, reference = shopper
    item = _item(setup.current, reference, "pro", 1)
    del item["additionalData"]
    empty = _item(setup.current, reference, "pro", 2)
    empty["additionalData"]["hmacSignature"] = ""
    before = _count(database)
    for bad in (item, empty):
        _refused(await _post(setup.url, _batch(bad)), "webhook-signature-invalid")
    assert _count(database) == before


async def test_one_bad_item_refuses_the_whole_batch(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str]
) -> None:
    _tenant, reference = shopper
    good = _item(setup.current, reference, "pro", 1)
    bad = _item(secrets.token_hex(32), reference, "enterprise", 2)
    before = _count(database)
    _refused(await _post(setup.url, _batch(good, bad)), "webhook-signature-invalid")
    assert _count(database) == before


async def test_malformed_bodies_are_refused_without_a_500(
    setup: Setup, database: DbHandles
) -> None:
    before = _count(database)
    for body in (
        "not json",
        b"\xff\xfe",
        "[]",
        '{"notificationItems": []}',
        '{"notificationItems": [{"NotificationRequestItem": {"pspReference": "x"}}]}',
        '{"notificationItems": [17]}',
    ):
        _refused(await _post(setup.url, body), "webhook-malformed")
    assert _count(database) == before


async def test_redelivery_is_a_no_op_and_older_sequence_is_stale(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    newer = _item(setup.current, reference, "enterprise", 20)
    older = _item(setup.current, reference, "pro", 10)
    for _ in range(3):
        assert (await _post(setup.url, _batch(newer))).text == "[accepted]"
    assert (await _post(setup.url, _batch(older))).text == "[accepted]"
    assert await service.drain(tenant_id) == 2
    assert _plan(database, tenant_id) == "enterprise"
    with psycopg.connect(database.superuser) as conn:
        changes = conn.execute(
            "SELECT count(*) FROM bastion.plan_changes WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()
    assert changes == (1,)


async def test_unknown_event_code_is_stored_and_ignored(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService
) -> None:
    tenant_id, reference = shopper
    item = _item(setup.current, reference, "enterprise", 5, code="REPORT_AVAILABLE")
    assert (await _post(setup.url, _batch(item))).text == "[accepted]"
    assert await service.drain(tenant_id) == 0
    assert _plan(database, tenant_id) == "free"
    assert (await service.event_counts())["ignored"] >= 1


@pytest.mark.parametrize(
    ("amount", "currency"),
    [(100, "USD"), (99899, "USD"), (99900, "EUR"), (0, "USD")],
)
async def test_an_authorisation_that_does_not_pay_for_its_plan_is_refused(
    setup: Setup, database: DbHandles, shopper: tuple[UUID, str], service: BillingService,
    amount: int, currency: str,
) -> None:  # fmt: skip
    """The signed reference names Enterprise; the signed amount must be its price
    (integers, in the plan's currency; test_payment_integrity has the rest)."""
    tenant_id, reference = shopper
    item = _item(setup.current, reference, "enterprise", 1, amount=amount, currency=currency)
    assert (await _post(setup.url, _batch(item))).text == "[accepted]"
    assert await service.drain(tenant_id) == 1
    assert _plan(database, tenant_id) == "free"
    assert await service.plan_changes(tenant_id, "owner") == []
    with psycopg.connect(database.superuser) as conn:
        outcome = conn.execute(
            "SELECT status, outcome FROM bastion.webhook_events WHERE provider = 'adyen' "
            "AND tenant_id = %s",
            (tenant_id,),
        ).fetchone()
    assert outcome == ("failed", "amount-not-plan-price")
