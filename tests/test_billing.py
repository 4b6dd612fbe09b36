"""Billing's tables attacked as the app role (RLS, the platform context, the intake
function), plans as data, and plan changes with their record (CHECKLIST R2, P2, P3)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.billing.approvals import PlanApprovals
from bastion.billing.errors import (
    CatalogueEditNeedsApproval,
    PlanApprovalRefused,
    UnknownPlan,
    WebhooksUnavailable,
)
from bastion.billing.models import PLATFORM
from bastion.billing.plans import Plan, PlanCatalogue, edit_gives_more, is_upgrade
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher, IncomingEvent, WebhookIntake
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

TABLES = (
    "plans",
    "subscriptions",
    "plan_changes",
    "plan_requests",
    "webhook_events",
    "webhook_control",
)


@pytest.fixture
def service(db: Database, keystore: LocalKeystore) -> BillingService:
    return BillingService(db, EventCipher(keystore))


@pytest.fixture
async def pair(db: Database, service: BillingService) -> tuple[UUID, UUID]:
    tenants = TenantService(db)
    a = (await tenants.create_tenant(f"ba-{uuid4().hex[:8]}", "A")).id
    b = (await tenants.create_tenant(f"bb-{uuid4().hex[:8]}", "B")).id
    approvals = PlanApprovals(db, service)
    for tenant in (a, b):
        await service.link_stripe_customer(tenant, f"cus_{uuid4().hex[:12]}")
        request = await approvals.request_tenant_plan(
            tenant, "pro", operator="operator:one", reason="setup"
        )
        await approvals.approve(request.id, operator="operator:two")
    return a, b


def _snapshot(database: DbHandles) -> list[tuple[object, ...]]:
    with psycopg.connect(database.superuser) as conn:
        rows: list[tuple[object, ...]] = []
        for table in TABLES:
            rows += conn.execute(f"SELECT '{table}', count(*) FROM bastion.{table}").fetchall()
        rows += conn.execute(
            "SELECT tenant_id, plan_code, status FROM bastion.subscriptions ORDER BY tenant_id"
        ).fetchall()
        rows += conn.execute("SELECT paused FROM bastion.webhook_control").fetchall()
        rows += conn.execute(
            "SELECT code, monthly_call_budget FROM bastion.plans ORDER BY code"
        ).fetchall()
    return rows


def _event(event_id: str, customer: str | None = None) -> IncomingEvent:
    return IncomingEvent(
        provider="stripe",
        event_id=event_id,
        event_type="customer.subscription.updated",
        handled=True,
        customer=customer,
        tenant_hint=None,
        object_id="sub_x",
        version=1,
        raw=b"{}",
    )


# -- RLS: attacks as the app role -------------------------------------------------------------


async def test_no_context_sees_no_billing_rows(db: Database, pair: tuple[UUID, UUID]) -> None:
    async with db.pool.connection() as conn:
        for table in TABLES:
            row = await (
                await conn.execute(f"SELECT count(*) AS n FROM bastion.{table}")
            ).fetchone()
            assert row is not None and row["n"] == 0, table


async def test_tenant_reads_only_its_own_subscription_and_changes(
    db: Database, pair: tuple[UUID, UUID]
) -> None:
    a, b = pair
    async with db.tenant_tx(a, None, "owner") as tx:
        subs = await (await tx.execute("SELECT tenant_id FROM bastion.subscriptions")).fetchall()
        changes = await (await tx.execute("SELECT tenant_id FROM bastion.plan_changes")).fetchall()
        by_id = await (
            await tx.execute("SELECT 1 FROM bastion.subscriptions WHERE tenant_id = %s", (b,))
        ).fetchall()
    assert {s["tenant_id"] for s in subs} == {a}
    assert {c["tenant_id"] for c in changes} == {a}
    assert by_id == []


@pytest.mark.parametrize("role", ["owner", "billing-admin"])
async def test_tenant_roles_cannot_write_their_subscription_directly(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID], role: str
) -> None:
    """Only the system role writes plans (after the service's checks and records)."""
    a, _b = pair
    before = _snapshot(database)
    async with db.tenant_tx(a, None, role) as tx:
        changed = await tx.execute(
            "UPDATE bastion.subscriptions SET plan_code = 'enterprise' WHERE true"
        )
    assert changed.rowcount == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(a, None, role) as tx:
            await tx.execute(
                "INSERT INTO bastion.plan_changes (actor, to_plan, reason, source) "
                "VALUES ('me', 'enterprise', 'forged', 'admin')"
            )
    assert _snapshot(database) == before


async def test_system_role_of_one_tenant_cannot_touch_another(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID]
) -> None:
    a, b = pair
    before = _snapshot(database)
    async with db.tenant_tx(a, None, "system") as tx:
        moved = await tx.execute(
            "UPDATE bastion.subscriptions SET plan_code = 'free' WHERE tenant_id = %s", (b,)
        )
    assert moved.rowcount == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(a, None, "system") as tx:
            await tx.execute("SELECT bastion.enqueue_billing_drain(%s)", (b,))
    assert _snapshot(database) == before


async def test_a_tenant_cannot_pause_or_resume_webhooks(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID]
) -> None:
    a, _b = pair
    before = _snapshot(database)
    for role in ("owner", "system"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            async with db.tenant_tx(a, None, role) as tx:
                await tx.execute("UPDATE bastion.webhook_control SET paused = true")
    assert _snapshot(database) == before


async def test_a_tenant_cannot_store_events_through_the_intake(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID]
) -> None:
    """Forging an event needs the platform context, which only the app signs."""
    a, _b = pair
    before = _snapshot(database)
    for role in ("owner", "system"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="platform context"):
            async with db.tenant_tx(a, None, role) as tx:
                await tx.execute(
                    "SELECT bastion.webhook_receive('stripe', 'evt_forged', "
                    "'customer.subscription.updated', true, NULL, %s, NULL, 1, '\\x00', 1)",
                    (a,),
                )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            async with db.tenant_tx(a, None, role) as tx:
                await tx.execute(
                    "INSERT INTO bastion.webhook_events (provider, event_id, tenant_id, "
                    "event_type, payload, key_version, status) VALUES ('stripe', 'evt_f', %s, "
                    "'x', '\\x00', 1, 'queued')",
                    (a,),
                )
    # Without any context the function refuses too.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.pool.connection() as conn:
            await conn.execute(
                "SELECT bastion.webhook_receive('stripe', 'evt_forged2', 'x', true, NULL, NULL, "
                "NULL, 1, '\\x00', 1)"
            )
    assert _snapshot(database) == before


async def test_the_platform_context_cannot_be_forged(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID]
) -> None:
    a, _b = pair
    before = _snapshot(database)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
        async with db.tenant_tx(a, None, "system") as tx:
            await tx.execute("SELECT set_config('app.tenant_id', %s, true)", (str(PLATFORM),))
            await tx.execute("UPDATE bastion.webhook_control SET paused = true")
    assert _snapshot(database) == before


async def test_tenants_read_plans_but_only_the_platform_edits_them(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID]
) -> None:
    a, _b = pair
    before = _snapshot(database)
    async with db.tenant_tx(a, None, "owner") as tx:
        plans = await (await tx.execute("SELECT code FROM bastion.plans")).fetchall()
        changed = await tx.execute("UPDATE bastion.plans SET monthly_call_budget = 1 WHERE true")
    assert {"free", "pro", "enterprise"} <= {p["code"] for p in plans}
    assert changed.rowcount == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(a, None, "system") as tx:
            await tx.execute(
                "INSERT INTO bastion.plans (code, name, monthly_token_budget, "
                "monthly_call_budget, requests_per_minute) VALUES ('forged', 'F', 1, 1, 1)"
            )
    assert _snapshot(database) == before


# -- plans as data and plan changes -------------------------------------------------------------


async def test_operator_edits_a_plan_and_a_change_applies_its_limits(
    db: Database, database: DbHandles, service: BillingService, pair: tuple[UUID, UUID]
) -> None:
    a, _b = pair
    catalogue = PlanCatalogue(db)
    team = replace(await catalogue.get("pro"), code=f"team{uuid4().hex[:6]}", name="Team", rank=15)
    team = replace(team, monthly_call_budget=777, monthly_token_budget=7_777, stripe_price_id=None)
    await catalogue.put(team, actor="operator:alice")
    sub = await service.change_plan(a, team.code, actor="user:x", reason="custom deal")
    assert sub.plan_code == team.code
    entitlements = await service.entitlements(a)
    assert (entitlements.plan, entitlements.monthly_call_budget) == (team.code, 777)
    with psycopg.connect(database.superuser) as conn:
        budget = conn.execute(
            "SELECT call_limit, token_limit FROM bastion.budgets WHERE tenant_id = %s "
            "AND period_start <= now() AND now() < period_end",
            (a,),
        ).fetchone()
    assert budget == (777, 7_777)


async def test_unknown_plan_changes_nothing(
    database: DbHandles, service: BillingService, pair: tuple[UUID, UUID]
) -> None:
    a, _b = pair
    before = _snapshot(database)
    with pytest.raises(UnknownPlan):
        await service.change_plan(a, "platinum", actor="user:x", reason="typo")
    assert _snapshot(database) == before


async def test_events_of_one_delivery_batch_are_stored_once(
    db: Database, keystore: LocalKeystore, database: DbHandles
) -> None:
    intake = WebhookIntake(db, EventCipher(keystore))
    event_id = f"evt_{uuid4().hex}"
    stored = await intake.store([_event(event_id), _event(event_id)])
    assert [s.duplicate for s in stored] == [False, True]
    assert stored[0].status == "unrouted"
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM bastion.webhook_events WHERE event_id = %s", (event_id,)
        ).fetchone()
    assert rows == (1,)


async def test_a_stored_event_that_was_altered_fails_without_a_change(
    db: Database, database: DbHandles, service: BillingService, pair: tuple[UUID, UUID]
) -> None:
    """Ciphertext moved to another event row (or altered) does not open: failed."""
    a, _b = pair
    intake = WebhookIntake(db, EventCipher(service.cipher.keystore))
    sub = await service.subscription(a)
    first, second = f"evt_{uuid4().hex}", f"evt_{uuid4().hex}"
    await intake.store(
        [_event(first, sub.stripe_customer_id), _event(second, sub.stripe_customer_id)]
    )
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "UPDATE bastion.webhook_events SET payload = (SELECT payload FROM "
            "bastion.webhook_events WHERE event_id = %s) WHERE event_id = %s",
            (first, second),
        )
    before = await service.plan_changes(a, "owner")
    await service.drain(a)
    with psycopg.connect(database.superuser) as conn:
        status = conn.execute(
            "SELECT status, outcome FROM bastion.webhook_events WHERE event_id = %s", (second,)
        ).fetchone()
    assert status == ("failed", "payload-unreadable")
    assert await service.plan_changes(a, "owner") == before


async def test_events_whose_drain_was_lost_are_requeued(
    db: Database, database: DbHandles, service: BillingService, pair: tuple[UUID, UUID]
) -> None:
    """A drain job that gave up (or vanished) leaves no event behind for good."""
    a, _b = pair
    intake = WebhookIntake(db, service.cipher)
    sub = await service.subscription(a)
    event_id = f"evt_{uuid4().hex}"
    assert (await intake.store([_event(event_id, sub.stripe_customer_id)]))[0].status == "queued"
    lock = f"billing:{a}"
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute("SET search_path = procrastinate, pg_catalog")  # for its triggers
        conn.execute("DELETE FROM procrastinate.procrastinate_jobs WHERE lock = %s", (lock,))
        conn.execute(
            "UPDATE bastion.webhook_events SET received_at = now() - interval '1 hour' "
            "WHERE event_id = %s",
            (event_id,),
        )
    assert await service.requeue_pending() >= 1
    with psycopg.connect(database.superuser) as conn:
        jobs = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE lock = %s "
            "AND status = 'todo'",
            (lock,),
        ).fetchone()
    assert jobs == (1,)


async def test_database_down_means_503_for_the_provider_never_a_hang(
    database: DbHandles, keystore: LocalKeystore
) -> None:
    closed = Database(database.app, database.context_key)  # never opened: unreachable
    intake = WebhookIntake(closed, EventCipher(keystore))
    with pytest.raises(WebhooksUnavailable):
        await intake.store([_event(f"evt_{uuid4().hex}")])


# -- what counts as an upgrade (issue 13, finding 3) ---------------------------------------

BASE = Plan(
    code="base",
    name="Base",
    rank=0,
    monthly_token_budget=1000,
    monthly_call_budget=100,
    requests_per_minute=10,
    models_allowed=("bastion-local",),
    overage_policy="block",
    monthly_price=4900,
    currency="usd",
)


@pytest.mark.parametrize(
    "change",
    [
        {"monthly_price": 4901},
        {"monthly_token_budget": 1001},
        {"monthly_call_budget": 101},
        {"requests_per_minute": 11},
        {"models_allowed": ("bastion-local", "gpt-4o")},
        {"models_allowed": ("*",)},
        {"overage_policy": "metered"},
        {"currency": "eur"},
        # Cheaper, but more of one thing: still an upgrade.
        {"monthly_price": 100, "monthly_call_budget": 101},
    ],
)
def test_a_move_that_costs_or_gives_more_of_anything_is_an_upgrade(change: dict[str, Any]) -> None:
    assert is_upgrade(BASE, replace(BASE, code="target", **change))
    # The same change made to a catalogue plan gives its subscribers more, unless
    # it only raises the price.
    assert edit_gives_more(BASE, replace(BASE, **change)) == (
        "monthly_price" not in change or len(change) > 1
    )


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"monthly_price": 0},
        {"monthly_price": 0, "currency": "eur"},  # free is free in any currency
        {"monthly_call_budget": 1, "monthly_token_budget": 0, "requests_per_minute": 0},
        {"models_allowed": ()},
    ],
)
def test_a_move_that_costs_and_gives_no_more_is_a_downgrade(change: dict[str, Any]) -> None:
    assert not is_upgrade(BASE, replace(BASE, code="target", **change))


# -- the database's backstops under the service's checks ------------------------------------


async def test_a_bound_customer_is_never_replaced_even_by_the_system_role(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID]
) -> None:
    a, _b = pair
    before = _snapshot(database)
    for value in ("cus_someone_else", None):
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="bound"):
            async with db.tenant_tx(a, None, "system") as tx:
                await tx.execute(
                    "UPDATE bastion.subscriptions SET stripe_customer_id = %s", (value,)
                )
    assert _snapshot(database) == before


async def test_no_tenant_is_moved_onto_an_inactive_plan_even_by_the_system_role(
    db: Database, database: DbHandles, pair: tuple[UUID, UUID]
) -> None:
    a, _b = pair
    legacy = replace(
        await PlanCatalogue(db).get("free"), code=f"old{uuid4().hex[:6]}", active=False
    )
    await PlanCatalogue(db).put(legacy, actor="operator:alice")
    before = _snapshot(database)
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="inactive"):
        async with db.tenant_tx(a, None, "system") as tx:
            await tx.execute("UPDATE bastion.subscriptions SET plan_code = %s", (legacy.code,))
    assert _snapshot(database) == before


async def test_the_requester_cannot_decide_a_plan_request_even_in_sql(
    db: Database, database: DbHandles, service: BillingService, pair: tuple[UUID, UUID]
) -> None:
    a, b = pair
    request = await PlanApprovals(db, service).request_tenant_plan(
        a, "enterprise", operator="operator:mallory", reason="self-serve"
    )
    before = _snapshot(database)
    with pytest.raises(psycopg.errors.CheckViolation):
        async with db.tenant_tx(a, None, "system") as tx:
            await tx.execute(
                "UPDATE bastion.plan_requests SET status = 'approved', "
                "decided_by = requested_by WHERE id = %s",
                (request.id,),
            )
    # A tenant's own people (owner included) cannot write requests, and another
    # tenant's system role does not see them.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(a, None, "owner") as tx:
            await tx.execute(
                "INSERT INTO bastion.plan_requests (kind, tenant_id, plan_code, reason, "
                "requested_by, expires_at) VALUES ('tenant-plan', %s, 'enterprise', 'x', "
                "'operator:me', now() + interval '1 day')",
                (a,),
            )
    async with db.tenant_tx(a, None, "owner") as tx:
        approved = await tx.execute(
            "UPDATE bastion.plan_requests SET status = 'approved', decided_by = 'operator:x'"
        )
    assert approved.rowcount == 0
    async with db.tenant_tx(b, None, "system") as tx:
        seen = await (await tx.execute("SELECT id FROM bastion.plan_requests")).fetchall()
    assert request.id not in {row["id"] for row in seen}
    assert _snapshot(database) == before


async def test_a_catalogue_edit_that_gives_more_waits_for_a_second_operator(
    db: Database, database: DbHandles, service: BillingService
) -> None:
    catalogue = PlanCatalogue(db)
    approvals = PlanApprovals(db, service)
    plan = replace(await catalogue.get("pro"), code=f"cat{uuid4().hex[:6]}", stripe_price_id=None)
    await catalogue.put(plan, actor="operator:alice")  # a new plan: at once
    richer = replace(plan, monthly_call_budget=plan.monthly_call_budget * 10)
    before = _snapshot(database)
    with pytest.raises(CatalogueEditNeedsApproval):
        await catalogue.put(richer, actor="operator:alice")
    with pytest.raises(CatalogueEditNeedsApproval):
        await catalogue.put(replace(plan, monthly_price=1), actor="operator:alice")
    assert _snapshot(database) == before
    request = await approvals.request_catalogue_edit(
        richer, operator="operator:alice", reason="promo"
    )
    with pytest.raises(PlanApprovalRefused) as refused:
        await approvals.approve(request.id, operator="operator:alice")
    assert refused.value.extensions["reason"] == "self-approval"
    assert await catalogue.get(plan.code) == plan
    decided = await approvals.approve(request.id, operator="operator:bob")
    assert (decided.status, decided.decided_by) == ("approved", "operator:bob")
    assert await catalogue.get(plan.code) == richer
    # An edit that gives no more applies at once.
    leaner = replace(richer, monthly_call_budget=1, monthly_price=plan.monthly_price + 1)
    await catalogue.put(leaner, actor="operator:alice")
    assert await catalogue.get(plan.code) == leaner
