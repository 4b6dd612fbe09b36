"""Every route of the api, for every role, with MFA or not, own or other tenant,
over real HTTP, against the decision the Cedar policies give.

The routes come from the app's own router, so a new route is walked as soon
as it exists; one that declares no action cannot even be built."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from bastion.access.authorize import ROLES, Authorizer, Resource, Subject
from bastion.access.declare import PUBLIC, api_routes, declared_action
from bastion.api.app import create_app
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.passwords import PasswordService
from bastion.identity.wiring import Identity, build_identity
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery staple 42"
DENIED_TYPES = ("/forbidden", "/mfa-required", "/not-found")

# A body each route accepts, so that an allowed call gets past validation.
BODIES: dict[str, Any] = {
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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    db = Database(database.app, database.context_key, max_size=6)
    identity = build_identity(Settings(issuer=url), db, keystore)
    tenants: dict[str, UUID] = {}
    users: dict[str, UUID] = {}

    @asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        await db.open()
        await identity.start()
        service = TenantService(db)
        for name in ("own", "other"):
            tenants[name] = (await service.create_tenant(f"m-{uuid4().hex[:8]}", name)).id
        for role in ROLES:
            users[role] = await service.add_member(tenants["own"], f"{role}@matrix.test", role)
            async with db.tenant_tx(tenants["own"], None, "system") as tx:
                await PasswordService().set_password(tx, users[role], PASSWORD)
        yield
        await db.close()

    app = create_app(readiness=db.ping, lifespan=lifespan, extra_routers=identity.routers)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server did not start")
        threading.Event().wait(0.01)
    try:
        yield Api(url, app, identity, tenants, users)
    finally:
        server.should_exit = True
        thread.join(10)


def _guarded_routes(app: FastAPI) -> list[tuple[str, str, str]]:
    """(method, path template, action) of every non-public route."""
    routes = []
    for route in api_routes(app.routes):
        found = declared_action(route)
        assert found is not None, f"{route.path} declares no action"
        if found != PUBLIC:
            routes.extend((method, route.path, found) for method in sorted(route.methods or ()))
    return routes


def test_every_route_is_walked(api: Api) -> None:
    walked = {(m, p) for m, p, _ in _guarded_routes(api.app)}
    assert ("GET", "/tenants/{tenant_id}/members") in walked
    assert ("GET", "/userinfo") in walked
    assert len(walked) >= 7


async def test_route_matrix(api: Api) -> None:
    authorizer = Authorizer()
    failures = []
    seen = {True: 0, False: 0}
    async with httpx.AsyncClient(timeout=10) as http:
        for method, template, action in _guarded_routes(api.app):
            sides = ("own", "other") if "{tenant_id}" in template else ("own",)
            for role in ROLES:
                for mfa in (False, True):
                    for side in sides:
                        path = template.replace("{tenant_id}", str(api.tenants[side]))
                        outcome = await _call(api, http, method, path, role, mfa)
                        expected = side == "own" and _allowed(
                            authorizer, api, role, mfa, action, template
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
    authorizer: Authorizer, api: Api, role: str, mfa: bool, action: str, template: str
) -> bool:
    user, tenant = api.users[role], api.tenants["own"]
    resource_type = {
        "member:list": "Member",
        "audit:read": "AuditLog",
    }.get(action, "Account")
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
    )
    url = f"{api.url}{path}"
    answer = await http.request(
        method,
        url,
        json=BODIES.get(path),
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
