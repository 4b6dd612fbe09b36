"""The tenant's billing routes over real HTTP (DPoP-bound tokens): who may read the
subscription and change the plan, and that every refusal changes nothing (CHECKLIST P3)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from bastion.api.app import create_app
from bastion.billing.routes import build_router
from bastion.billing.wiring import build_billing
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.wiring import Identity, build_identity
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.http_server import serving

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
    sides: dict[str, Side] = {}
    built: list[Identity] = []

    def build(url: str) -> FastAPI:
        db = Database(database.app, database.context_key, max_size=4)
        settings = Settings(issuer=url)
        identity = build_identity(settings, db, keystore)
        billing = build_billing(settings, db, keystore)
        built.append(identity)

        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            await db.open()
            try:
                await identity.start()
                tenants = TenantService(db)
                for name in ("a", "b"):
                    tenant = (await tenants.create_tenant(f"bl-{name}-{uuid4().hex[:6]}", name)).id
                    users = {
                        role: await tenants.add_member(tenant, f"{role}-{name}@bl.test", role)
                        for role in ROLES
                    }
                    sides[name] = Side(tenant, users)
                yield
            finally:
                await db.close()

        return create_app(
            readiness=db.ping,
            lifespan=lifespan,
            extra_routers=(build_router(billing.service, billing.catalogue, identity.guard),),
        )

    with serving(build) as url:
        yield Stack(url, built[0], sides["a"], sides["b"])


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


def test_billing_admin_with_mfa_changes_the_plan_with_who_what_why(
    stack: Stack, database: DbHandles
) -> None:
    body = {"plan": "pro", "reason": "growing team"}
    response = _call(stack, "PUT", _plan_path(stack.a), role="billing-admin", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"plan": "pro", "status": "active"}
    changes = _call(
        stack, "GET", f"/tenants/{stack.a.tenant}/billing/plan-changes", role="auditor"
    ).json()["changes"]
    last = changes[-1]
    assert last["actor"] == f"user:{stack.a.users['billing-admin']}"
    assert (last["from_plan"], last["to_plan"], last["reason"], last["source"]) == (
        None,
        "pro",
        "growing team",
        "admin",
    )
    assert last["at"]
    sub, _, budget = _state(database, stack.a.tenant)
    assert sub == ("pro",) and budget[-1] == (100_000,)
    seen = _call(stack, "GET", f"/tenants/{stack.a.tenant}/billing/subscription", role="auditor")
    assert seen.status_code == 200
    assert seen.json()["entitlements"]["plan"] == "pro"
    assert seen.json()["entitlements"]["monthly_call_budget"] == 100_000


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
