"""Pause and resume never strand a webhook event (issue 23, finding 8; CHECKLIST P2, A4).

A resume queues every ``held`` event; that is exactly once only if no writer
holds an event after the resume collected them. Routing an unrouted event
(its customer just became known) used to read the pause flag unlocked, in
its statement's snapshot: when a resume ran in between, the event was held
with webhooks running, and nothing ever queued it again.

The race is made to happen, not hoped for: a second connection holds the
unrouted event's row lock, so routing stops inside its UPDATE — after it
read the flag — while a resume and more intakes run. On the real database,
with the real service and intake; the drain is the worker's own method.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.billing.models import PLATFORM
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher, IncomingEvent, WebhookIntake
from bastion.billing.webhooks.stripe import parse
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.stripe_double import event_object

pytestmark = pytest.mark.anyio

ROUNDS = 12


@pytest.fixture
def service(db: Database, keystore: LocalKeystore) -> BillingService:
    return BillingService(db, EventCipher(keystore))


@pytest.fixture
def intake(db: Database, service: BillingService) -> WebhookIntake:
    return WebhookIntake(db, service.cipher)


def _invoice_paid(customer: str) -> IncomingEvent:
    """A verified ``invoice.paid`` event (read by the production parser): applying it
    writes one ``billing.invoice.paid`` audit event, so a double application shows."""
    invoice = {
        "id": f"in_{uuid4().hex[:16]}",
        "object": "invoice",
        "customer": customer,
        "amount_paid": 4900,
        "currency": "usd",
    }
    event = event_object("invoice.paid", invoice, created=int(time.time()))
    return parse(json.dumps(event).encode())


async def _tenant(db: Database, service: BillingService, *, linked: bool) -> tuple[UUID, str]:
    tenant = await TenantService(db).create_tenant(f"pr-{uuid4().hex[:10]}", "pause race")
    customer = f"cus_{uuid4().hex[:14]}"
    if linked:
        await service.link_stripe_customer(tenant.id, customer)
    return tenant.id, customer


async def _waiting_on_locks(superuser: psycopg.AsyncConnection[Any], at_least: int) -> bool:
    cur = await superuser.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    row = await cur.fetchone()
    return row is not None and row[0] >= at_least


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "the interleaving did not happen"
        await asyncio.sleep(0.005)


def _outcome(database: DbHandles, ids: list[str]) -> tuple[dict[str, str], Counter[str], int]:
    """Each event's status, how often each was applied (its audit events), and how
    many paid-invoice side effects ran for them."""
    with psycopg.connect(database.superuser) as conn:
        statuses = dict(
            conn.execute(
                "SELECT event_id, status FROM bastion.webhook_events WHERE event_id = ANY(%s)",
                (ids,),
            ).fetchall()
        )
        applied = Counter(
            target.removeprefix("stripe:")
            for (target,) in conn.execute(
                "SELECT target FROM bastion.audit_events WHERE action = "
                "'billing.webhook.applied' AND target = ANY(%s)",
                ([f"stripe:{i}" for i in ids],),
            ).fetchall()
        )
        paid = conn.execute(
            "SELECT count(*) FROM bastion.audit_events a JOIN bastion.webhook_events e "
            "ON a.actor = 'stripe:' || e.event_id WHERE a.action = 'billing.invoice.paid' "
            "AND e.event_id = ANY(%s)",
            (ids,),
        ).fetchone()
    assert paid is not None
    return statuses, applied, int(paid[0])


async def test_pause_resume_and_intake_interleaved_strand_and_double_nothing(
    db: Database, database: DbHandles, service: BillingService, intake: WebhookIntake
) -> None:
    rng = random.Random(23)
    known = [await _tenant(db, service, linked=True) for _ in range(3)]
    ids: list[str] = []
    touched: set[UUID] = {tenant for tenant, _ in known}
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(
        database.superuser, autocommit=True
    ) as watcher:
        for _round in range(ROUNDS):
            await service.pause(actor="test", reason="race drill")
            # An event of a customer nobody is bound to yet: stored unrouted.
            newcomer, customer = await _tenant(db, service, linked=False)
            touched.add(newcomer)
            unrouted = _invoice_paid(customer)
            assert (await intake.store([unrouted]))[0].status == "unrouted"
            before = [_invoice_paid(rng.choice(known)[1]) for _ in range(rng.randint(1, 3))]
            assert {s.status for s in await intake.store(before)} == {"held"}
            ids += [unrouted.event_id, *(e.event_id for e in before)]

            # Routing will stop on this row lock inside its UPDATE, flag already read.
            async with await psycopg.AsyncConnection.connect(database.superuser) as blocker:
                await blocker.execute(
                    "SELECT 1 FROM bastion.webhook_events WHERE event_id = %s FOR UPDATE",
                    (unrouted.event_id,),
                )
                routing = asyncio.create_task(service.link_stripe_customer(newcomer, customer))
                await _until(lambda: _waiting_on_locks(watcher, 1))
                # Resume, with deliveries arriving all along.
                during = [_invoice_paid(rng.choice(known)[1]) for _ in range(rng.randint(1, 3))]
                ids += [e.event_id for e in during]
                resuming = asyncio.create_task(service.resume(actor="test"))
                arriving = [asyncio.create_task(intake.store([e])) for e in during]
                # The resume either finished (routing's flag was never locked) or
                # waits for routing, which waits for the blocker.
                await _until(lambda: _resumed_or_waiting(resuming, watcher))  # noqa: B023
                await asyncio.sleep(rng.random() * 0.02)
                await blocker.rollback()
            await asyncio.gather(routing, resuming, *arriving)

            # Webhooks run again: nothing may be left held or unrouted.
            assert not await service.paused()
            statuses, _applied, _paid = _outcome(database, ids)
            stranded = sorted(i for i, s in statuses.items() if s in ("held", "unrouted"))
            assert stranded == [], f"events left {statuses[stranded[0]]} after a resume"
            for tenant in touched:
                await service.drain(tenant)

    statuses, applied, paid = _outcome(database, ids)
    assert sorted(statuses) == sorted(ids)
    assert set(statuses.values()) == {"applied"}, Counter(statuses.values())
    assert set(applied.values()) == {1} and len(applied) == len(ids)  # each applied once
    assert paid == len(ids)  # each invoice's side effect ran once
    assert time.monotonic() - started < 60


async def _resumed_or_waiting(
    resuming: asyncio.Task[Any], watcher: psycopg.AsyncConnection[Any]
) -> bool:
    return resuming.done() or await _waiting_on_locks(watcher, 2)


# -- the database holds every writer to the rule ----------------------------------------------


async def test_no_writer_can_hold_an_event_while_webhooks_run(
    db: Database, database: DbHandles, service: BillingService, intake: WebhookIntake
) -> None:
    """Any writer — here plain SQL as the app in the platform context — that marks an
    event held while webhooks are not paused gets it queued, its drain enqueued;
    while paused, held stays held."""
    tenant, customer = await _tenant(db, service, linked=True)
    event = _invoice_paid(customer)
    assert (await intake.store([event]))[0].status == "queued"
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        await tx.execute(
            "UPDATE bastion.webhook_events SET status = 'held' WHERE event_id = %s",
            (event.event_id,),
        )
    statuses, _, _ = _outcome(database, [event.event_id])
    assert statuses == {event.event_id: "queued"}
    assert _drain_jobs(database, tenant) == 1

    await service.pause(actor="test", reason="drill")
    try:
        async with db.tenant_tx(PLATFORM, None, "system") as tx:
            await tx.execute(
                "UPDATE bastion.webhook_events SET status = 'held' WHERE event_id = %s",
                (event.event_id,),
            )
        assert _outcome(database, [event.event_id])[0] == {event.event_id: "held"}
    finally:
        assert await service.resume(actor="test") == 1
    assert await service.drain(tenant) == 1
    statuses, applied, paid = _outcome(database, [event.event_id])
    assert statuses == {event.event_id: "applied"} and applied[event.event_id] == 1 and paid == 1


def _drain_jobs(database: DbHandles, tenant: UUID) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE lock = %s "
            "AND status = 'todo'",
            (f"billing:{tenant}",),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_the_sweep_queues_a_stranded_hold_only_while_webhooks_run(
    db: Database, database: DbHandles, service: BillingService, intake: WebhookIntake
) -> None:
    """An event left held with webhooks running (written before the rule, or past
    the database's triggers) is queued by the worker's sweep and applied once; a
    sweep during a pause leaves held events alone."""
    tenant, customer = await _tenant(db, service, linked=True)
    event = _invoice_paid(customer)
    await intake.store([event])
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute("SET search_path = procrastinate, pg_catalog")  # for its triggers
        conn.execute(
            "DELETE FROM procrastinate.procrastinate_jobs WHERE lock = %s", (f"billing:{tenant}",)
        )
        conn.execute("SET session_replication_role = replica")  # past the triggers
        conn.execute(
            "UPDATE bastion.webhook_events SET status = 'held' WHERE event_id = %s",
            (event.event_id,),
        )
    assert await service.drain(tenant) == 0  # a drain takes queued events only

    await service.pause(actor="test", reason="drill")
    assert await service.release_held() == 0
    assert _outcome(database, [event.event_id])[0] == {event.event_id: "held"}
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute("UPDATE bastion.webhook_control SET paused = false")  # not via resume
    assert await service.release_held() == 1
    assert _drain_jobs(database, tenant) == 1
    assert await service.release_held() == 0
    assert await service.drain(tenant) == 1
    statuses, applied, paid = _outcome(database, [event.event_id])
    assert statuses == {event.event_id: "applied"} and applied[event.event_id] == 1 and paid == 1
