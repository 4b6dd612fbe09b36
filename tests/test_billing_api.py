"""The tenant's billing routes over real HTTP (DPoP-bound tokens): who may read the
subscription and change the plan, and that every refusal changes nothing (CHECKLIST P3)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.billing.approvals import PlanApprovals
from bastion.billing.plans import PlanCatalogue
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles

PROBLEM = "https://bastion.dev/problems/"
ROLES = ("owner", "billing-admin", "auditor", "contributor", "viewer")


@dataclass
class Side:
    tenant: UUID
    users: dict[str, UUID]


@dataclass
class Stack:
    url: str
    identity: Identity
    a: Side
    b: Side


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    """The api as compose builds it, with two tenants holding every role."""
    sides: dict[str, Side] = {}

    async def seed(db: Database, _identity: Identity) -> None:
        tenants = TenantService(db)
        for name in ("a", "b"):
            tenant = (await tenants.create_tenant(f"bl-{name}-{uuid4().hex[:6]}", name)).id
            users = {
                role: await tenants.add_member(tenant, f"{role}-{name}@bl.test", role)
                for role in ROLES
            }
            sides[name] = Side(tenant, users)

    with api_server(database, keystore, seed) as (url, _app, identity):
        yield Stack(url, identity, sides["a"], sides["b"])


def _call(
    stack: Stack,
    method: str,
    path: str,
    *,
    role: str,
    mfa: bool = True,
    side: Side | None = None,
    **kwargs: Any,
) -> httpx.Response:
    side = side or stack.a
    url = f"{stack.url}{path}"
    key = DpopKey.generate()
    token, _ = stack.identity.service.tokens.issue_access(
        user_id=side.users[role],
        tenant_id=side.tenant,
        roles=(role,),
        amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    headers = {"Authorization": f"DPoP {token}", "DPoP": key.proof(method, url, access_token=token)}
    return httpx.request(method, url, headers=headers, timeout=10, **kwargs)


def _state(database: DbHandles, tenant: UUID) -> tuple[Any, ...]:
    with psycopg.connect(database.superuser) as conn:
        sub = conn.execute(
            "SELECT plan_code FROM bastion.subscriptions WHERE tenant_id = %s", (tenant,)
        ).fetchone()
        changes = conn.execute(
            "SELECT count(*) FROM bastion.plan_changes WHERE tenant_id = %s", (tenant,)
        ).fetchone()
        budget = conn.execute(
            "SELECT call_limit FROM bastion.budgets WHERE tenant_id = %s ORDER BY period_start",
            (tenant,),
        ).fetchall()
    return sub, changes, budget


def _plan_path(side: Side) -> str:
    return f"/tenants/{side.tenant}/billing/plan"


async def _put_on(db: Database, keystore: LocalKeystore, tenant: UUID, plan: str) -> None:
    """Put ``tenant`` on ``plan`` as two operators would (the setup of a test)."""
    approvals = PlanApprovals(db, BillingService(db, EventCipher(keystore)))
    request = await approvals.request_tenant_plan(
        tenant, plan, operator="operator:setup", reason="test setup"
    )
    await approvals.approve(request.id, operator="operator:setup-approver")


def _audit(database: DbHandles, tenant: UUID, action: str) -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT actor, details FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = %s ORDER BY seq",
            (tenant, action),
        ).fetchall()
    return [(actor, details) for actor, details in rows]


def _entitlements(stack: Stack) -> dict[str, Any]:
    seen = _call(stack, "GET", f"/tenants/{stack.a.tenant}/billing/subscription", role="auditor")
    assert seen.status_code == 200
    return dict(seen.json()["entitlements"])


@pytest.mark.anyio
async def test_billing_admin_with_mfa_moves_down_with_who_what_why(
    stack: Stack, database: DbHandles, db: Database, keystore: LocalKeystore
) -> None:
    await _put_on(db, keystore, stack.a.tenant, "enterprise")
    body = {"plan": "pro", "reason": "smaller team"}
    response = _call(stack, "PUT", _plan_path(stack.a), role="billing-admin", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"plan": "pro", "status": "active"}
    changes = _call(
        stack, "GET", f"/tenants/{stack.a.tenant}/billing/plan-changes", role="auditor"
    ).json()["changes"]
    last = changes[-1]
    assert last["actor"] == f"user:{stack.a.users['billing-admin']}"
    assert (last["from_plan"], last["to_plan"], last["reason"], last["source"]) == (
        "enterprise",
        "pro",
        "smaller team",
        "admin",
    )
    assert last["at"]
    sub, _, budget = _state(database, stack.a.tenant)
    assert sub == ("pro",) and budget[-1] == (100_000,)
    assert _entitlements(stack)["plan"] == "pro"
    assert _entitlements(stack)["monthly_call_budget"] == 100_000
    (actor, details), *_ = _audit(database, stack.a.tenant, "billing.plan.changed")[-1:]
    assert actor == f"user:{stack.a.users['billing-admin']}"
    assert (details["from"], details["to"], details["source"]) == ("enterprise", "pro", "admin")


# -- self-service moves only down (issue 13, finding 3): each refusal its own attack -----


def _refused_move(stack: Stack, database: DbHandles, plan: str, *, status: int, slug: str) -> None:
    """PUT ``plan`` as an owner with MFA: refused with ``slug``, nothing changed but
    the audit event of the attempt."""
    before, entitled = _state(database, stack.a.tenant), _entitlements(stack)
    refusals = len(_audit(database, stack.a.tenant, "billing.plan.change_refused"))
    body = {"plan": plan, "reason": "let me have it"}
    response = _call(stack, "PUT", _plan_path(stack.a), role="owner", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == PROBLEM + slug
    assert _state(database, stack.a.tenant) == before
    assert _entitlements(stack) == entitled
    audited = _audit(database, stack.a.tenant, "billing.plan.change_refused")
    assert len(audited) == refusals + 1
    actor, details = audited[-1]
    assert actor == f"user:{stack.a.users['owner']}"
    assert (details["to"], details["refusal"]) == (plan, slug)


@pytest.mark.anyio
async def test_an_owner_with_mfa_cannot_upgrade_itself(
    stack: Stack, database: DbHandles, db: Database, keystore: LocalKeystore
) -> None:
    await _put_on(db, keystore, stack.a.tenant, "pro")
    _refused_move(stack, database, "enterprise", status=403, slug="plan-upgrade-needs-payment")


@pytest.mark.anyio
async def test_an_inactive_plan_is_never_assigned(
    stack: Stack, database: DbHandles, db: Database, keystore: LocalKeystore
) -> None:
    await _put_on(db, keystore, stack.a.tenant, "pro")
    # Cheaper and smaller than Pro: a downgrade, were it still offered.
    legacy = replace(
        await PlanCatalogue(db).get("free"), code=f"legacy{uuid4().hex[:6]}", active=False
    )
    await PlanCatalogue(db).put(legacy, actor="operator:alice")
    _refused_move(stack, database, legacy.code, status=422, slug="plan-inactive")


@pytest.mark.anyio
async def test_an_equal_price_with_more_entitlements_is_an_upgrade(
    stack: Stack, database: DbHandles, db: Database, keystore: LocalKeystore
) -> None:
    await _put_on(db, keystore, stack.a.tenant, "pro")
    pro = await PlanCatalogue(db).get("pro")
    plus = replace(
        pro,
        code=f"proplus{uuid4().hex[:6]}",
        monthly_call_budget=pro.monthly_call_budget + 1,
        stripe_price_id=None,
    )
    await PlanCatalogue(db).put(plus, actor="operator:alice")
    assert plus.monthly_price == pro.monthly_price
    _refused_move(stack, database, plus.code, status=403, slug="plan-upgrade-needs-payment")


def test_billing_admin_without_mfa_is_refused(stack: Stack, database: DbHandles) -> None:
    before = _state(database, stack.a.tenant)
    response = _call(
        stack,
        "PUT",
        _plan_path(stack.a),
        role="billing-admin",
        mfa=False,
        json={"plan": "enterprise", "reason": "no second factor"},
    )
    assert response.status_code == 403
    assert response.json()["type"].startswith(PROBLEM)
    assert _state(database, stack.a.tenant) == before


@pytest.mark.parametrize("role", ["viewer", "contributor", "auditor"])
def test_roles_without_plan_change_are_refused(
    stack: Stack, database: DbHandles, role: str
) -> None:
    before = _state(database, stack.a.tenant)
    response = _call(
        stack, "PUT", _plan_path(stack.a), role=role, json={"plan": "enterprise", "reason": "x"}
    )
    assert response.status_code == 403
    assert _state(database, stack.a.tenant) == before


def test_other_tenants_plan_cannot_be_changed_or_read(stack: Stack, database: DbHandles) -> None:
    before = _state(database, stack.b.tenant)
    body = {"plan": "enterprise", "reason": "attack"}
    response = _call(stack, "PUT", _plan_path(stack.b), role="billing-admin", json=body)
    assert response.status_code == 404
    read = _call(stack, "GET", f"/tenants/{stack.b.tenant}/billing/subscription", role="owner")
    assert read.status_code == 404
    assert "subscription" not in read.json() and "entitlements" not in read.json()
    assert _state(database, stack.b.tenant) == before


def test_viewer_cannot_read_billing(stack: Stack) -> None:
    response = _call(stack, "GET", f"/tenants/{stack.a.tenant}/billing/subscription", role="viewer")
    assert response.status_code == 403


@pytest.mark.parametrize(
    "body",
    [
        {"plan": "platinum", "reason": "no such plan"},
        {"plan": "PRO; DROP TABLE x", "reason": "injection"},
        {"plan": "pro"},
        {"plan": "pro", "reason": ""},
        {"plan": "pro", "reason": "x", "tenant_id": "00000000-0000-0000-0000-000000000000"},
        {"plan": "pro", "reason": "r" * 1001},
    ],
)
def test_bad_plan_change_bodies_are_refused(
    stack: Stack, database: DbHandles, body: dict[str, Any]
) -> None:
    before = _state(database, stack.a.tenant)
    response = _call(stack, "PUT", _plan_path(stack.a), role="owner", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] in (PROBLEM + "unknown-plan", PROBLEM + "validation-error")
    assert _state(database, stack.a.tenant) == before


def test_plans_are_listed_for_billing_readers(stack: Stack) -> None:
    response = _call(stack, "GET", f"/tenants/{stack.a.tenant}/billing/plans", role="auditor")
    assert response.status_code == 200
    codes = [p["code"] for p in response.json()["plans"]]
    assert {"free", "pro", "enterprise"} <= set(codes)


def test_a_card_number_in_a_plan_change_is_refused_and_stored_nowhere(
    stack: Stack, database: DbHandles
) -> None:
    before = _state(database, stack.a.tenant)
    card = "4111 1111 1111 1111"
    body = {"plan": "enterprise", "reason": f"charge my card {card}"}
    response = _call(stack, "PUT", _plan_path(stack.a), role="billing-admin", json=body)
    assert response.status_code == 422
    assert response.json()["type"] == PROBLEM + "card-data-refused"
    assert card not in response.text
    assert _state(database, stack.a.tenant) == before
    with psycopg.connect(database.superuser) as conn:
        reasons = conn.execute("SELECT reason FROM bastion.plan_changes").fetchall()
    assert not [r for (r,) in reasons if "4111" in (r or "")]
