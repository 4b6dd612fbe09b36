"""Pending admin-role requests can be listed and cancelled, over real HTTP on
the composed api; a tenant is named by its id only (a slug is refused)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.api_stack import api_stack
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio


@dataclass
class Stack:
    url: str
    issue: Any
    tenants: dict[str, UUID]
    slugs: dict[str, str]
    users: dict[str, UUID]


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    tenants: dict[str, UUID] = {}
    slugs: dict[str, str] = {}
    users: dict[str, UUID] = {}

    async def seed(db: Database, _identity: Any) -> None:
        service = TenantService(db)
        for side in ("own", "other"):
            slugs[side] = f"rr-{uuid4().hex[:8]}"
            tenants[side] = (await service.create_tenant(slugs[side], side)).id
        for name, role in (("first", "owner"), ("second", "owner"), ("viewer", "viewer")):
            users[name] = await service.add_member(tenants["own"], f"{name}@rr.test", role)
        users["target"] = await service.add_member(tenants["own"], "target@rr.test", "viewer")
        users["stranger"] = await service.add_member(tenants["other"], "s@rr.test", "owner")

    with api_stack(database, keystore, seed) as (url, api):
        yield Stack(url, api.identity.service.tokens, tenants, slugs, users)


def _call(
    http: httpx.Client,
    stack: Stack,
    who: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    mfa: bool = True,
) -> httpx.Response:
    side = "other" if who == "stranger" else "own"
    role = "viewer" if who == "viewer" else "owner"
    key = DpopKey.generate()
    token, _ = stack.issue.issue_access(
        user_id=stack.users[who],
        tenant_id=stack.tenants[side],
        roles=(role,),
        amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    url = f"{stack.url}{path}"
    return http.request(
        method,
        url,
        json=body,
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof(method, url, access_token=token),
        },
    )


def _request_row(database: DbHandles, request: str) -> tuple[Any, ...]:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT status, decided_by FROM bastion.role_requests WHERE id = %s", (request,)
        ).fetchone()
    assert row is not None
    return tuple(row)


def _cancel_events(database: DbHandles, tenant: UUID) -> list[tuple[str, Any]]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT actor, details FROM bastion.audit_events "
            "WHERE tenant_id = %s AND action = 'role.cancel' ORDER BY seq",
            (tenant,),
        ).fetchall()
    return [tuple(r) for r in rows]


def _ask(http: httpx.Client, stack: Stack, role: str) -> str:
    base = f"/tenants/{stack.tenants['own']}"
    asked = _call(
        http, stack, "first", "POST", f"{base}/members", {"email": "target@rr.test", "role": role}
    )
    assert asked.status_code == 202, asked.text
    return str(asked.json()["request_id"])


def test_pending_requests_are_listed_and_cancelled(stack: Stack, database: DbHandles) -> None:
    base = f"/tenants/{stack.tenants['own']}"
    with httpx.Client(timeout=30) as http:
        request = _ask(http, stack, "auditor")
        listed = _call(http, stack, "second", "GET", f"{base}/role-requests")
        assert listed.status_code == 200
        (entry,) = [r for r in listed.json()["requests"] if r["request_id"] == request]
        assert entry["role"] == "auditor"
        assert entry["user_id"] == str(stack.users["target"])
        assert entry["requested_by"] == str(stack.users["first"])

        # The requester withdraws it: no one "decided" their own request.
        cancelled = _call(http, stack, "first", "POST", f"{base}/role-requests/{request}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert _request_row(database, request) == ("rejected", None)
        after = _call(http, stack, "second", "GET", f"{base}/role-requests")
        assert request not in {r["request_id"] for r in after.json()["requests"]}
        # Cancelled is final: neither approved nor cancelled again.
        late = _call(http, stack, "second", "POST", f"{base}/role-requests/{request}/approve")
        assert late.status_code == 409 and late.json()["reason"] == "decided"
        again = _call(http, stack, "second", "POST", f"{base}/role-requests/{request}/cancel")
        assert again.status_code == 409 and again.json()["reason"] == "decided"

        # Another owner may cancel it too.
        other = _ask(http, stack, "billing-admin")
        by_second = _call(http, stack, "second", "POST", f"{base}/role-requests/{other}/cancel")
        assert by_second.status_code == 200
        assert _request_row(database, other) == ("rejected", stack.users["second"])
    events = _cancel_events(database, stack.tenants["own"])
    assert [actor for actor, _ in events] == [
        f"user:{stack.users['first']}",
        f"user:{stack.users['second']}",
    ]
    assert [d["request"] for _, d in events] == [request, other]
    # The target's roles did not change.
    with psycopg.connect(database.superuser) as conn:
        held = conn.execute(
            "SELECT role FROM bastion.memberships WHERE user_id = %s", (stack.users["target"],)
        ).fetchall()
    assert [r[0] for r in held] == ["viewer"]


def test_refused_cancellations_change_nothing(stack: Stack, database: DbHandles) -> None:
    own, other = stack.tenants["own"], stack.tenants["other"]
    with httpx.Client(timeout=30) as http:
        request = _ask(http, stack, "auditor")
        before = _cancel_events(database, own)
        path = f"/tenants/{own}/role-requests/{request}/cancel"
        viewer = _call(http, stack, "viewer", "POST", path)
        assert viewer.status_code == 403 and viewer.json()["type"].endswith("/forbidden")
        weak = _call(http, stack, "second", "POST", path, mfa=False)
        assert weak.status_code == 403 and weak.json()["type"].endswith("/mfa-required")
        listing = _call(http, stack, "viewer", "GET", f"/tenants/{own}/role-requests")
        assert listing.status_code == 403
        # Another tenant's owner: on their own path RLS hides it, on ours the
        # tenant does not match; both are not found.
        theirs = _call(
            http, stack, "stranger", "POST", f"/tenants/{other}/role-requests/{request}/cancel"
        )
        assert theirs.status_code == 404
        assert _call(http, stack, "stranger", "POST", path).status_code == 404
        strangers_list = _call(http, stack, "stranger", "GET", f"/tenants/{other}/role-requests")
        assert request not in strangers_list.text
    assert _request_row(database, request) == ("pending", None)
    assert _cancel_events(database, own) == before


def test_a_tenant_slug_is_refused_with_a_stable_type(stack: Stack) -> None:
    slug = stack.slugs["own"]
    with httpx.Client(timeout=30) as http:
        for method, tail in (("GET", "/members"), ("GET", "/role-requests"), ("GET", "/audit")):
            answer = _call(http, stack, "first", method, f"/tenants/{slug}{tail}")
            assert answer.status_code == 422, answer.text
            assert answer.json()["type"] == "https://bastion.dev/problems/tenant-id-required"
            assert slug not in answer.text
