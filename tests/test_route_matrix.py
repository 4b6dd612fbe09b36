"""Every route of the api, for every role, with MFA or not, own or other tenant,
over real HTTP, against the decision the Cedar policies give.

The routes come from the app's own router, so a new route is walked as soon
as it exists; one that declares no action cannot even be built."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from fastapi import FastAPI

from bastion.access.authorize import ROLES, Authorizer, Resource, Subject
from bastion.access.declare import PUBLIC, api_routes, declared_action
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.passwords import PasswordService
from bastion.identity.wiring import Identity
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery staple 42"
DENIED_TYPES = ("/forbidden", "/mfa-required", "/not-found")

# A body each route accepts, so that an allowed call gets past validation.
BODIES: dict[str, Any] = {
    "members": {"email": "nobody@matrix.test", "role": "viewer"},
    "/me/mfa/totp/confirm": {"code": "000000"},
    "/me/password": {"current_password": PASSWORD, "new_password": "short"},
}


@dataclass
class Api:
    url: str
    app: FastAPI
    identity: Identity
    tenants: dict[str, UUID]
    users: dict[str, UUID]


@pytest.fixture(scope="module")
def api(database: DbHandles, keystore: LocalKeystore) -> Iterator[Api]:
    tenants: dict[str, UUID] = {}
    users: dict[str, UUID] = {}

    async def seed(db: Database, _identity: Identity) -> None:
        service = TenantService(db)
        for name in ("own", "other"):
            tenants[name] = (await service.create_tenant(f"m-{uuid4().hex[:8]}", name)).id
        for role in ROLES:
            users[role] = await service.add_member(tenants["own"], f"{role}@matrix.test", role)
            async with db.tenant_tx(tenants["own"], None, "system") as tx:
                await PasswordService().set_password(tx, users[role], PASSWORD)

    with api_server(database, keystore, seed) as (url, app, identity):
        yield Api(url, app, identity, tenants, users)


def _guarded_routes(app: FastAPI) -> list[tuple[str, str, str, str]]:
    """(method, path template, action, resource type) of every non-public route."""
    routes = []
    for route in api_routes(app.routes):
        found = declared_action(route)
        assert found is not None, f"{route.path} declares no action"
        if found == PUBLIC:
            continue
        guards = [d.call for d in route.dependant.dependencies if hasattr(d.call, "bastion_action")]
        assert len(guards) == 1, f"{route.path} should have exactly one guard"
        resource_type = guards[0].resource_type  # type: ignore[union-attr]
        routes.extend(
            (method, route.path, found, resource_type) for method in sorted(route.methods or ())
        )
    return routes


def test_every_route_is_walked(api: Api) -> None:
    walked = {(m, p) for m, p, _, _ in _guarded_routes(api.app)}
    assert ("GET", "/tenants/{tenant_id}/members") in walked
    assert ("GET", "/userinfo") in walked
    assert len(walked) >= 7


async def test_route_matrix(api: Api) -> None:
    authorizer = Authorizer()
    failures = []
    seen = {True: 0, False: 0}
    async with httpx.AsyncClient(timeout=10) as http:
        for method, template, action, resource_type in _guarded_routes(api.app):
            sides = ("own", "other") if "{tenant_id}" in template else ("own",)
            for role in ROLES:
                for mfa in (False, True):
                    for side in sides:
                        path = (
                            template.replace("{tenant_id}", str(api.tenants[side]))
                            .replace("{request_id}", str(uuid4()))
                            .replace("{user_id}", str(uuid4()))
                            .replace("{role}", "viewer")
                            .replace("{namespace}", "nowhere")
                            .replace("{document_id}", str(uuid4()))
                        )
                        outcome = await _call(api, http, method, path, role, mfa)
                        expected = side == "own" and _allowed(
                            authorizer, api, role, mfa, action, resource_type
                        )
                        seen[outcome] += 1
                        if outcome != expected:
                            failures.append(
                                f"{method} {template} as {role} mfa={mfa} {side}: "
                                f"expected {'allow' if expected else 'deny'}"
                            )
    assert failures == []
    assert seen[True] > 10 and seen[False] > 10  # both kinds of decision were exercised


def _allowed(
    authorizer: Authorizer, api: Api, role: str, mfa: bool, action: str, resource_type: str
) -> bool:
    user, tenant = api.users[role], api.tenants["own"]
    owner = user if resource_type == "Account" else None
    subject = Subject(user, tenant, frozenset({role}), mfa)
    return authorizer.authorize(
        subject, action, Resource(resource_type, str(tenant), tenant, owner)
    )


async def _call(
    api: Api, http: httpx.AsyncClient, method: str, path: str, role: str, mfa: bool
) -> bool:
    """Make the request with a fresh token of ``role``; True if it was let through."""
    key = DpopKey.generate()
    token, _claims = api.identity.service.tokens.issue_access(
        user_id=api.users[role],
        tenant_id=api.tenants["own"],
        roles=(role,),
        amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    url = f"{api.url}{path}"
    answer = await http.request(
        method,
        url,
        json=BODIES.get(path.rsplit("/", 1)[-1] if path.endswith("/members") else path),
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof(method, url, access_token=token),
        },
    )
    assert answer.status_code != 401, answer.text  # the token itself is always good here
    denied = answer.status_code in (403, 404) and answer.json().get("type", "").endswith(
        DENIED_TYPES
    )
    return not denied


# -- two-person approval of admin roles, and revocation ---------------------------------


class Caller:
    """A member of the own tenant with a minted token (MFA or not)."""

    def __init__(
        self,
        api: Api,
        user_id: UUID,
        roles: tuple[str, ...],
        *,
        mfa: bool,
        tenant: str = "own",
        age: int = 0,  # seconds since the sign-in
    ) -> None:
        self.api, self.key = api, DpopKey.generate()
        self.token, _ = api.identity.service.tokens.issue_access(
            user_id=user_id,
            tenant_id=api.tenants[tenant],
            roles=roles,
            amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
            jkt=self.key.thumbprint,
            auth_time=int(time.time()) - age,
        )

    async def __call__(
        self, http: httpx.AsyncClient, method: str, path: str, body: Any = None
    ) -> httpx.Response:
        url = f"{self.api.url}{path}"
        return await http.request(
            method,
            url,
            json=body,
            headers={
                "Authorization": f"DPoP {self.token}",
                "DPoP": self.key.proof(method, url, access_token=self.token),
            },
        )


async def _member(db: Database, api: Api, role: str, tenant: str = "own") -> tuple[UUID, str]:
    email = f"{role}-{uuid4().hex[:6]}@matrix.test"
    return await TenantService(db).add_member(api.tenants[tenant], email, role), email


async def _roles_of(db: Database, api: Api, user_id: UUID) -> set[str]:
    return set(await db.member_roles(api.tenants["own"], user_id))


async def test_admin_role_needs_a_second_owner(api: Api, db: Database) -> None:
    first_id, _ = await _member(db, api, "owner")
    second_id, _ = await _member(db, api, "owner")
    target_id, target_email = await _member(db, api, "contributor")
    first = Caller(api, first_id, ("owner",), mfa=True)
    second = Caller(api, second_id, ("owner",), mfa=True)
    base = f"/tenants/{api.tenants['own']}"
    async with httpx.AsyncClient(timeout=10) as http:
        asked = await first(
            http, "POST", f"{base}/members", {"email": target_email, "role": "billing-admin"}
        )
        assert asked.status_code == 202 and asked.json()["status"] == "pending"
        assert await _roles_of(db, api, target_id) == {"contributor"}  # not yet
        request = asked.json()["request_id"]

        own = await first(http, "POST", f"{base}/role-requests/{request}/approve")
        assert own.status_code == 403 and own.json()["reason"] == "self-approval"
        assert await _roles_of(db, api, target_id) == {"contributor"}

        approved = await second(http, "POST", f"{base}/role-requests/{request}/approve")
        assert approved.status_code == 200
        assert await _roles_of(db, api, target_id) == {"contributor", "billing-admin"}

        again = await second(http, "POST", f"{base}/role-requests/{request}/approve")
        assert again.status_code == 409 and again.json()["reason"] == "decided"

        # Viewer and contributor need no second owner.
        plain_id, plain_email = await _member(db, api, "viewer")
        direct = await first(
            http, "POST", f"{base}/members", {"email": plain_email, "role": "contributor"}
        )
        assert direct.status_code == 200
        assert await _roles_of(db, api, plain_id) == {"viewer", "contributor"}


async def test_refused_approvals_write_nothing(api: Api, db: Database, database: DbHandles) -> None:
    import psycopg

    requester_id, _ = await _member(db, api, "owner")
    target_id, target_email = await _member(db, api, "viewer")
    requester = Caller(api, requester_id, ("owner",), mfa=True)
    base = f"/tenants/{api.tenants['own']}"
    async with httpx.AsyncClient(timeout=10) as http:
        asked = await requester(
            http, "POST", f"{base}/members", {"email": target_email, "role": "auditor"}
        )
        request = asked.json()["request_id"]
        # A lower role (billing-admin, with MFA) may not approve.
        billing_id, _ = await _member(db, api, "billing-admin")
        lower = Caller(api, billing_id, ("billing-admin",), mfa=True)
        refused = await lower(http, "POST", f"{base}/role-requests/{request}/approve")
        assert refused.status_code == 403 and refused.json()["type"].endswith("/forbidden")
        # An owner without MFA is asked to step up.
        weak_id, _ = await _member(db, api, "owner")
        weak = Caller(api, weak_id, ("owner",), mfa=False)
        step_up = await weak(http, "POST", f"{base}/role-requests/{request}/approve")
        assert step_up.status_code == 403 and step_up.json()["type"].endswith("/mfa-required")
        # An owner of another tenant: on their own path RLS hides the request, on
        # ours the tenant does not match; both are 404.
        stranger_id, _ = await _member(db, api, "owner", tenant="other")
        stranger = Caller(api, stranger_id, ("owner",), mfa=True, tenant="other")
        theirs = await stranger(
            http, "POST", f"/tenants/{api.tenants['other']}/role-requests/{request}/approve"
        )
        assert theirs.status_code == 404
        ours = await stranger(http, "POST", f"{base}/role-requests/{request}/approve")
        assert ours.status_code == 404
        # Expired requests cannot be approved.
        with psycopg.connect(database.superuser, autocommit=True) as conn:
            conn.execute(
                "UPDATE bastion.role_requests SET expires_at = now() - interval '1 s' "
                "WHERE id = %s",
                (request,),
            )
        second_id, _ = await _member(db, api, "owner")
        second = Caller(api, second_id, ("owner",), mfa=True)
        expired = await second(http, "POST", f"{base}/role-requests/{request}/approve")
        assert expired.status_code == 409 and expired.json()["reason"] == "expired"
    assert await _roles_of(db, api, target_id) == {"viewer"}
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT status, decided_by FROM bastion.role_requests WHERE id = %s", (request,)
        ).fetchone()
    assert row == ("pending", None)


async def test_revoked_role_stops_on_the_next_request(api: Api, db: Database) -> None:
    owner_id, _ = await _member(db, api, "owner")
    holder_id, _ = await _member(db, api, "viewer")
    owner = Caller(api, owner_id, ("owner",), mfa=True)
    holder = Caller(api, holder_id, ("viewer",), mfa=False)  # token says viewer, 15 min
    members = f"/tenants/{api.tenants['own']}/members"
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await holder(http, "GET", members)).status_code == 200
        revoked = await owner(http, "DELETE", f"{members}/{holder_id}/roles/viewer")
        assert revoked.status_code == 204
        after = await holder(http, "GET", members)
        assert after.status_code == 403
        assert after.json()["type"].endswith("/forbidden")


async def test_role_changes_need_a_fresh_sign_in(api: Api, db: Database) -> None:
    owner_id, _ = await _member(db, api, "owner")
    _target_id, target_email = await _member(db, api, "viewer")
    stale = Caller(api, owner_id, ("owner",), mfa=True, age=3600)  # signed in an hour ago
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await stale(
            http,
            "POST",
            f"/tenants/{api.tenants['own']}/members",
            {"email": target_email, "role": "auditor"},
        )
    assert answer.status_code == 403
    assert answer.json()["type"].endswith("/mfa-required")
    assert "max_age" in answer.headers["www-authenticate"]
