"""The billing runbook commands, run as ``bastion …`` processes on a test database:
``incident pause-webhooks`` / ``resume-webhooks`` (store-and-ack, nothing lost) and the
plan commands (CHECKLIST A4, P3)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher, WebhookIntake
from bastion.billing.webhooks.stripe import parse
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir
from tests.stripe_double import (
    TEST_PRICES,
    event_object,
    price_plans,
    subscription_object,
    to_json,
)

pytestmark = pytest.mark.anyio


def _bastion(
    database: DbHandles, keystore: LocalKeystore, *args: str, operator: str = "alice"
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # The operator as the CLI names them: their login (getpass reads LOGNAME first).
        "LOGNAME": operator,
        "USER": operator,
        "BASTION_HOME": str(short_tempdir("bastion-cli-")),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _statuses(database: DbHandles, ids: list[str]) -> dict[str, str]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT event_id, status FROM bastion.webhook_events WHERE event_id = ANY(%s)", (ids,)
        ).fetchall()
    return dict(rows)


async def test_pause_stores_and_acks_and_resume_applies_everything_in_order(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    cipher = EventCipher(keystore)
    service, intake = BillingService(db, cipher), WebhookIntake(db, cipher)
    await price_plans(db)
    tenant = await TenantService(db).create_tenant(f"cli-{uuid4().hex[:8]}", "CLI")
    customer = f"cus_{uuid4().hex[:12]}"
    await service.link_stripe_customer(tenant.id, customer)

    paused = _bastion(database, keystore, "incident", "pause-webhooks", "--reason", "drill")
    assert paused.returncode == 0, paused.stderr
    assert "paused" in paused.stdout
    assert await service.paused()

    now = int(time.time())
    events = [
        event_object(
            "customer.subscription.updated",
            subscription_object(f"sub_{customer}", customer, TEST_PRICES[plan]),
            created=now + i,
        )
        for i, plan in enumerate(("pro", "enterprise", "pro", "enterprise"))
    ]
    for event in events:
        stored = await intake.store([parse(to_json(event).encode())])
        assert stored[0].status == "held"
    ids = [e["id"] for e in events]
    assert await service.drain(tenant.id) == 0
    assert set(_statuses(database, ids).values()) == {"held"}

    assert (await service.event_counts())["held"] >= 4

    resumed = _bastion(database, keystore, "incident", "resume-webhooks")
    assert resumed.returncode == 0, resumed.stderr
    assert "4 held events queued" in resumed.stdout
    assert not await service.paused()
    assert await service.drain(tenant.id) == 4
    assert set(_statuses(database, ids).values()) == {"applied"}
    assert (await service.subscription(tenant.id)).plan_code == "enterprise"
    changes = await service.plan_changes(tenant.id, "owner")
    assert [c.event_id for c in changes if c.source == "webhook"] == ids  # in order, once each


async def test_plan_commands(db: Database, database: DbHandles, keystore: LocalKeystore) -> None:
    slug = f"clp-{uuid4().hex[:8]}"
    tenant = await TenantService(db).create_tenant(slug, "Plans")
    code = f"startup{uuid4().hex[:4]}"
    made = _bastion(
        database,
        keystore,
        "billing",
        "plan-set",
        code,
        "--name",
        "Startup",
        "--tokens",
        "5000000",
        "--calls",
        "5000",
        "--rpm",
        "60",
        "--models",
        "bastion-local,gpt-4o-mini",
    )
    assert made.returncode == 0, made.stderr
    # Free -> Startup gives more: an upgrade outside the payment provider waits for
    # a second operator.
    requested = _bastion(
        database, keystore, "billing", "change-plan", "--tenant", slug, "--plan", code,
        "--reason", "sales deal",
    )  # fmt: skip
    assert requested.returncode == 0, requested.stderr
    assert "pending approval" in requested.stdout
    service = BillingService(db, EventCipher(keystore))
    assert (await service.entitlements(tenant.id)).plan == "free"
    request_id = _request_id(requested.stdout)
    listed = _bastion(database, keystore, "billing", "requests")
    assert listed.returncode == 0 and request_id[:8] in listed.stdout
    approved = _bastion(database, keystore, "billing", "approve", request_id, operator="bob")
    assert approved.returncode == 0, approved.stderr
    assert (await service.entitlements(tenant.id)).monthly_call_budget == 5000
    last = (await service.plan_changes(tenant.id, "owner"))[-1]
    assert (last.source, last.actor) == ("operator", "operator:bob")
    assert "sales deal" in last.reason and "operator:alice" in last.reason

    # Back to Free is a downgrade: one operator, at once.
    down = _bastion(
        database, keystore, "billing", "change-plan", "--tenant", slug, "--plan", "free",
        "--reason", "deal ended",
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert (await service.entitlements(tenant.id)).plan == "free"

    unknown = _bastion(
        database, keystore, "billing", "change-plan", "--tenant", slug, "--plan", "platinum",
        "--reason", "typo",
    )  # fmt: skip
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error:") and "Traceback" not in unknown.stderr
    assert (await service.entitlements(tenant.id)).plan == "free"


def _request_id(stdout: str) -> str:
    found = re.search(r"pending approval ([0-9a-f-]{36})", " ".join(stdout.split()))
    assert found is not None, stdout
    return found.group(1)


def _audited(database: DbHandles, tenant: UUID, action: str) -> list[tuple[str, Any]]:
    with psycopg.connect(database.superuser) as conn:
        return conn.execute(
            "SELECT actor, details FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = %s ORDER BY seq",
            (tenant, action),
        ).fetchall()


def _plan_state(database: DbHandles, tenant: UUID) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.superuser) as conn:
        return [
            *conn.execute(
                "SELECT plan_code FROM bastion.subscriptions WHERE tenant_id = %s", (tenant,)
            ).fetchall(),
            *conn.execute(
                "SELECT count(*) FROM bastion.plan_changes WHERE tenant_id = %s", (tenant,)
            ).fetchall(),
            *conn.execute(
                "SELECT call_limit FROM bastion.budgets WHERE tenant_id = %s", (tenant,)
            ).fetchall(),
        ]


async def test_an_operator_cannot_approve_their_own_upgrade(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    slug = f"cls-{uuid4().hex[:8]}"
    tenant = await TenantService(db).create_tenant(slug, "Self")
    requested = _bastion(
        database, keystore, "billing", "change-plan", "--tenant", slug, "--plan", "enterprise",
        "--reason", "my friend's company", operator="mallory",
    )  # fmt: skip
    assert requested.returncode == 0, requested.stderr
    request_id = _request_id(requested.stdout)
    before = _plan_state(database, tenant.id)
    refused = _bastion(database, keystore, "billing", "approve", request_id, operator="mallory")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error:") and "(self-approval)" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _plan_state(database, tenant.id) == before
    service = BillingService(db, EventCipher(keystore))
    assert (await service.entitlements(tenant.id)).plan == "free"
    ((actor, details),) = _audited(database, tenant.id, "billing.plan.approval_refused")
    assert actor == "operator:mallory"
    assert details == {"request": request_id, "reason": "self-approval"}
    with psycopg.connect(database.superuser) as conn:
        status = conn.execute(
            "SELECT status, decided_by FROM bastion.plan_requests WHERE id = %s", (request_id,)
        ).fetchone()
    assert status == ("pending", None)
    # Once a second operator has decided, the request is spent.
    assert (
        _bastion(database, keystore, "billing", "approve", request_id, operator="bob").returncode
        == 0
    )
    again = _bastion(database, keystore, "billing", "approve", request_id, operator="carol")
    assert again.returncode == 1 and "(decided)" in again.stderr
    assert (await service.entitlements(tenant.id)).plan == "enterprise"
