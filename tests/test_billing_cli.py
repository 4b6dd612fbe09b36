"""The billing runbook commands, run as ``bastion …`` processes on a test database:
``incident pause-webhooks`` / ``resume-webhooks`` (store-and-ack, nothing lost) and the
plan commands (CHECKLIST A4, P3)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from uuid import uuid4

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
    database: DbHandles, keystore: LocalKeystore, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BASTION_HOME": str(short_tempdir("bastion-cli-")),
        "DATABASE_URL": database.superuser,
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
    changed = _bastion(
        database, keystore, "billing", "change-plan", "--tenant", slug, "--plan", code,
        "--reason", "sales deal",
    )  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    service = BillingService(db, EventCipher(keystore))
    assert (await service.entitlements(tenant.id)).monthly_call_budget == 5000
    last = (await service.plan_changes(tenant.id, "owner"))[-1]
    assert (last.source, last.reason) == ("operator", "sales deal")
    assert last.actor.startswith("operator:")

    unknown = _bastion(
        database, keystore, "billing", "change-plan", "--tenant", slug, "--plan", "platinum",
        "--reason", "typo",
    )  # fmt: skip
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error:") and "Traceback" not in unknown.stderr
    assert (await service.entitlements(tenant.id)).plan == code
