"""Exactly once under a storm, pause/resume under a storm, and a downgrade reaching the
gateway's budget — over real HTTP, applied by a real worker process (CHECKLIST P2, P3, A4).

The storm: 1,000 events for 50 tenants, each delivered 3-10 times (every
delivery signed afresh, as Stripe's retries are), shuffled, sent by 16
concurrent senders. The final subscriptions must equal the ground truth (the
newest subscription event of each tenant, by ``created`` then id) and every
side effect must have happened exactly once, counted in the database.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.api.problems import status_of
from bastion.billing.budgets import BudgetService, OverBudget
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir
from tests.served import serving_process
from tests.stripe_double import (
    TEST_PRICES,
    event_object,
    price_plans,
    signed,
    subscription_object,
    to_json,
)

pytestmark = pytest.mark.anyio

SECRET_NAME = f"billing/test-storm-{uuid4().hex[:8]}"
SENDERS = 16
PLANS = ("free", "pro", "enterprise")


@dataclass
class Stack:
    url: str
    secret: str


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    """The api and the worker, each its own process, as ``bastion up`` runs them."""
    secret = f"whsec_storm_{uuid4().hex}"
    keystore.set(SECRET_NAME, secret.encode())
    home = short_tempdir("bastion-storm-")
    extra = {"BASTION_STRIPE_WEBHOOK_SECRET_REF": f"local://{SECRET_NAME}"}
    with (
        serving_process("worker", database, keystore, home),
        serving_process("api", database, keystore, home, extra) as (_api, url),
    ):
        yield Stack(url, secret)


@pytest.fixture
def service(db: Database, keystore: LocalKeystore) -> BillingService:
    return BillingService(db, EventCipher(keystore))


@dataclass
class Storm:
    tenants: dict[str, UUID]  # customer -> tenant
    events: list[dict[str, Any]]
    truth: dict[UUID, str]  # tenant -> plan
    invoices: set[str]
    unknown: set[str]


async def _storm(
    db: Database, service: BillingService, *, tenants: int, per_tenant: int, seed: int
) -> Storm:
    rng = random.Random(seed)
    await price_plans(db)
    made: dict[str, UUID] = {}
    for i in range(tenants):
        tenant = await TenantService(db).create_tenant(f"st-{uuid4().hex[:10]}", f"Storm {i}")
        customer = f"cus_storm_{uuid4().hex[:10]}"
        await service.link_stripe_customer(tenant.id, customer)
        made[customer] = tenant.id
    base = int(time.time()) - 20_000
    events: list[dict[str, Any]] = []
    truth: dict[UUID, str] = {}
    invoices: set[str] = set()
    unknown: set[str] = set()
    for customer, tenant_id in made.items():
        newest: tuple[int, str] | None = None
        for k in range(per_tenant):
            kind = k % 10
            if kind in (3, 7):
                invoice = {
                    "id": f"in_{uuid4().hex[:12]}",
                    "object": "invoice",
                    "customer": customer,
                    "amount_paid": 2900,
                    "currency": "eur",
                }
                event = event_object("invoice.paid", invoice, created=base + k)
                invoices.add(event["id"])
            elif kind == 9:
                event = event_object(
                    "customer.updated", {"id": customer, "object": "customer"}, created=base + k
                )
                unknown.add(event["id"])
            else:
                plan = rng.choice(PLANS)
                # Few distinct seconds: ties are broken by the event id.
                created = base + rng.randrange(0, per_tenant // 2)
                sub = subscription_object(f"sub_{customer}", customer, TEST_PRICES[plan])
                event = event_object("customer.subscription.updated", sub, created=created)
                key = (created, event["id"])
                if newest is None or key > newest:
                    newest, truth[tenant_id] = key, plan
            events.append(event)
    return Storm(made, events, truth, invoices, unknown)


def _deliveries(storm: Storm, seed: int) -> list[str]:
    rng = random.Random(seed)
    bodies = [to_json(e) for e in storm.events for _ in range(rng.randint(3, 10))]
    rng.shuffle(bodies)
    return bodies


def _send_blocking(url: str, secret: str, bodies: list[str]) -> tuple[int, float]:
    host, port = url.removeprefix("http://").split(":")
    pending = list(reversed(bodies))
    lock = threading.Lock()
    duplicates: list[int] = []
    failures: list[str] = []

    def sender() -> None:
        # One keep-alive connection per sender, like a provider's delivery worker.
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        seen = 0
        try:
            while True:
                with lock:
                    if not pending:
                        break
                    body = pending.pop()
                conn.request(
                    "POST",
                    "/webhooks/stripe",
                    body=body.encode(),
                    headers={
                        "Stripe-Signature": signed(body, secret),
                        "Content-Type": "application/json",
                    },
                )
                response = conn.getresponse()
                answer = response.read()
                if response.status != 200:
                    failures.append(f"{response.status} {answer[:200]!r}")
                    return
                seen += json.loads(answer)["duplicate"]
        finally:
            conn.close()
            with lock:
                duplicates.append(seen)

    started = time.perf_counter()
    threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    return sum(duplicates), time.perf_counter() - started


async def _send(url: str, secret: str, bodies: list[str]) -> tuple[int, float]:
    """Deliver ``bodies`` with 16 concurrent senders (threads, one keep-alive
    connection each); returns (answers saying duplicate, seconds)."""
    return await asyncio.to_thread(_send_blocking, url, secret, bodies)


def _settled(database: DbHandles, timeout: float = 90.0) -> float:
    """Wait until no event waits for the worker; returns when that was."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM bastion.webhook_events WHERE status IN "
                "('queued', 'held')) + (SELECT count(*) FROM procrastinate.procrastinate_jobs "
                "WHERE queue_name = 'billing' AND status IN ('todo', 'doing'))"
            ).fetchone()
            if row == (0,):
                return time.perf_counter()
            assert time.monotonic() < deadline, f"still pending: {row}"
            time.sleep(0.05)


def _check_exactly_once(database: DbHandles, storm: Storm) -> None:
    ids = [e["id"] for e in storm.events]
    tenant_ids = list(storm.tenants.values())
    with psycopg.connect(database.superuser) as conn:
        stored = conn.execute(
            "SELECT event_id, status FROM bastion.webhook_events WHERE event_id = ANY(%s)", (ids,)
        ).fetchall()
        plans = dict(
            conn.execute(
                "SELECT tenant_id, plan_code FROM bastion.subscriptions WHERE tenant_id = ANY(%s)",
                (tenant_ids,),
            ).fetchall()
        )
        applied = conn.execute(
            "SELECT target FROM bastion.audit_events WHERE action = 'billing.webhook.applied' "
            "AND tenant_id = ANY(%s)",
            (tenant_ids,),
        ).fetchall()
        paid = conn.execute(
            "SELECT target, details->>'amount_paid' FROM bastion.audit_events "
            "WHERE action = 'billing.invoice.paid' AND tenant_id = ANY(%s)",
            (tenant_ids,),
        ).fetchall()
        paid_events = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE action = 'billing.invoice.paid' "
            "AND tenant_id = ANY(%s)",
            (tenant_ids,),
        ).fetchone()
        changes = conn.execute(
            "SELECT c.event_id, e.status FROM bastion.plan_changes c JOIN "
            "bastion.webhook_events e ON e.event_id = c.event_id "
            "WHERE c.tenant_id = ANY(%s) AND c.source = 'webhook'",
            (tenant_ids,),
        ).fetchall()
    # Every event stored exactly once; none left waiting, none failed.
    assert sorted(e for e, _ in stored) == sorted(ids)
    statuses = Counter(s for _, s in stored)
    assert set(statuses) <= {"applied", "stale", "ignored"}, statuses
    assert statuses["ignored"] == len(storm.unknown)
    # Final state equals the ground truth for every tenant.
    assert {t: plans[t] for t in storm.truth} == storm.truth
    # Each handled event applied exactly once (the audit row commits with it).
    targets = Counter(t for (t,) in applied)
    assert all(n == 1 for n in targets.values())
    assert len(targets) == len(ids) - len(storm.unknown)
    # The side effect of a paid invoice (the receipts call site) ran once per invoice.
    assert paid_events == (len(storm.invoices),)
    assert len({t for t, _ in paid}) == len(storm.invoices)
    # Every plan change came from an applied (not stale) event, once.
    assert all(status == "applied" for _, status in changes)
    assert len({e for e, _ in changes}) == len(changes)


async def test_storm_is_applied_exactly_once_and_matches_the_ground_truth(
    stack: Stack, database: DbHandles, db: Database, service: BillingService
) -> None:
    storm = await _storm(db, service, tenants=50, per_tenant=20, seed=7)
    assert len(storm.events) == 1000
    bodies = _deliveries(storm, seed=11)
    duplicates, seconds = await _send(stack.url, stack.secret, bodies)
    done = _settled(database)
    assert duplicates == len(bodies) - len(storm.events)
    _check_exactly_once(database, storm)
    print(
        f"\nstorm: {len(bodies)} deliveries of {len(storm.events)} events in {seconds:.1f} s "
        f"({len(bodies) / seconds:.0f}/s over HTTP); applied "
        f"{done - time.perf_counter() + seconds:.1f} s after the first delivery"
    )


async def test_pause_then_resume_under_a_storm_loses_and_doubles_nothing(
    stack: Stack, database: DbHandles, db: Database, service: BillingService
) -> None:
    storm = await _storm(db, service, tenants=20, per_tenant=15, seed=21)
    bodies = _deliveries(storm, seed=23)
    half = len(bodies) // 2
    await service.pause(actor="test", reason="storm drill")
    try:
        await _send(stack.url, stack.secret, bodies[:half])
        await asyncio.sleep(0.5)  # give the worker every chance to (wrongly) apply
        with psycopg.connect(database.superuser) as conn:
            applied = conn.execute(
                "SELECT count(*) FROM bastion.webhook_events WHERE status IN ('applied', "
                "'stale') AND event_id = ANY(%s)",
                ([e["id"] for e in storm.events],),
            ).fetchone()
            changed = conn.execute(
                "SELECT count(*) FROM bastion.plan_changes WHERE tenant_id = ANY(%s)",
                (list(storm.tenants.values()),),
            ).fetchone()
        assert applied == (0,) and changed == (0,)
        # Resume while the second half is still arriving.
        sending = asyncio.create_task(_send(stack.url, stack.secret, bodies[half:]))
        await asyncio.sleep(0.2)
    finally:
        await service.resume(actor="test")
    await sending
    _settled(database)
    _check_exactly_once(database, storm)


async def test_downgrade_reaches_the_gateway_budget_and_caps_calls(
    stack: Stack, database: DbHandles, db: Database, service: BillingService
) -> None:
    await price_plans(db)
    tenant = await TenantService(db).create_tenant(f"dg-{uuid4().hex[:8]}", "Downgrade")
    customer = f"cus_dg_{uuid4().hex[:10]}"
    await service.link_stripe_customer(tenant.id, customer)
    now = int(time.time())
    budgets = BudgetService(db)

    async def deliver(plan: str, created: int) -> float:
        sub = subscription_object(f"sub_{customer}", customer, TEST_PRICES.get(plan, plan))
        body = to_json(event_object("customer.subscription.updated", sub, created=created))
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                f"{stack.url}/webhooks/stripe",
                content=body,
                headers={"Stripe-Signature": signed(body, stack.secret)},
            )
        assert response.status_code == 200
        return time.perf_counter()

    await deliver("pro", now - 10)
    for _ in range(100):
        state = await budgets.state(tenant.id)
        if state is not None and state.call_limit == 100_000:
            break
        await asyncio.sleep(0.05)
    for _ in range(5):  # five calls on pro
        await budgets.settle(await budgets.reserve(tenant.id, 10), 10)

    sent = await deliver("price_tiny", now)  # downgrade to 3 calls a month
    while True:
        state = await budgets.state(tenant.id)
        if state is not None and state.call_limit == 3:
            took = time.perf_counter() - sent
            break
        assert time.perf_counter() - sent < 60, "the downgrade did not reach the budget"
        await asyncio.sleep(0.01)
    assert took < 60
    with pytest.raises(OverBudget) as refused:
        await budgets.reserve(tenant.id, 10)
    assert status_of(refused.value) == 402
    assert refused.value.retry_after is not None and refused.value.retry_after > 0
    assert state.calls_used == 5  # usage kept, only the limit changed
    print(f"\ndowngrade reached the gateway's budget {took * 1000:.0f} ms after the ack")
