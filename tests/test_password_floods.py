"""Floods of password checks cost other tenants nothing (issue 23 A3, siblings).

Each sign-in costs one argon2 verification, about 0.3 s of a core and 64 MiB,
even for an unknown e-mail (so timing does not reveal accounts); a password
change up to a dozen (the current password, the history, the new hash).
Before the fix they ran inside database transactions, in anyio's shared
40-thread pool: eight anonymous sign-ins, or a tenant's members changing
passwords, held every connection of the api's pool for seconds, and every
tenant's requests waited for one. Now every hash runs outside any
transaction, at most one per core at a time.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from argon2 import PasswordHasher

from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.passwords import PasswordService
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, s256
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles

pytestmark = pytest.mark.serial  # timing bounds: see Makefile `test`

ATTACKERS = 8
PASSWORD = "correct horse battery staple 23"
# Seeding only: the attackers' stored hashes are cheap to make; every hash the
# api computes (a new password's) costs the production parameters.
CHEAP = PasswordService(hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@dataclass
class Stack:
    url: str
    identity: Identity
    tenant: UUID
    viewer: UUID
    slug: str
    attacker_tenant: UUID
    attackers: list[UUID]


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    made: dict[str, Any] = {}

    async def seed(db: Database, _identity: Identity) -> None:
        tenants = TenantService(db)
        made["tenant"] = (await tenants.create_tenant(f"flood-{uuid4().hex[:6]}", "B")).id
        made["viewer"] = await tenants.add_member(made["tenant"], "viewer@flood.test", "viewer")
        other = (await tenants.create_tenant(f"noisy-{uuid4().hex[:6]}", "A")).id
        made["attacker_tenant"] = other
        made["attackers"] = []
        for i in range(ATTACKERS):
            user = await tenants.add_member(other, f"member-{i}@noisy.test", "viewer")
            async with db.tenant_tx(other, None, "system") as tx:
                await CHEAP.set_password(tx, user, PASSWORD)
            made["attackers"].append(user)

    with api_server(database, keystore, seed) as (url, _app, identity):
        with psycopg.connect(database.superuser) as conn:
            row = conn.execute(
                "SELECT slug FROM bastion.tenants WHERE id = %s", (made["tenant"],)
            ).fetchone()
        assert row is not None
        yield Stack(
            url,
            identity,
            made["tenant"],
            made["viewer"],
            row[0],
            made["attacker_tenant"],
            made["attackers"],
        )


def _auth_headers(stack: Stack, method: str, url: str, user: UUID, tenant: UUID) -> dict[str, str]:
    key = DpopKey.generate()
    token, _ = stack.identity.service.tokens.issue_access(
        user_id=user,
        tenant_id=tenant,
        roles=("viewer",),
        amr=("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    return {"Authorization": f"DPoP {token}", "DPoP": key.proof(method, url, access_token=token)}


def _listing_headers(stack: Stack, url: str) -> dict[str, str]:
    return _auth_headers(stack, "GET", url, stack.viewer, stack.tenant)


def _victim_during(stack: Stack, attack: list[threading.Thread]) -> list[float]:
    """Run ``attack``; meanwhile list the victim tenant's namespaces over and over.
    Return each listing's wait (inf for a failure), sorted."""
    listing = f"{stack.url}/tenants/{stack.tenant}/knowledge/namespaces"
    waits: list[float] = []
    done = threading.Event()

    def victim_loop() -> None:
        with httpx.Client(timeout=5) as http:
            while not done.is_set():
                headers = _listing_headers(stack, listing)
                started = time.perf_counter()  # the answer's wait, not the proof's signing
                ok = http.get(listing, headers=headers).status_code == 200
                waits.append(time.perf_counter() - started if ok else float("inf"))
                time.sleep(0.02)

    watcher = threading.Thread(target=victim_loop)
    watcher.start()
    time.sleep(0.1)
    for thread in attack:
        thread.start()
    for thread in attack:
        thread.join(60)
    done.set()
    watcher.join(10)
    return sorted(waits)


def test_sign_in_flood_does_not_hold_the_database_from_other_tenants(stack: Stack) -> None:
    """8 concurrent anonymous sign-ins (unknown e-mails, 0.3 s of argon2 each)
    while a member of another tenant lists its namespaces: every listing is
    answered within 500 ms (before the fix: up to 3 s, waiting for a connection)."""
    statuses: list[int] = []

    def sign_in() -> None:
        form = {
            "response_type": "code",
            "client_id": CLI_CLIENT_ID,
            "redirect_uri": CLI_REDIRECT_URI,
            "scope": "openid",
            "state": "st",
            "code_challenge": s256(secrets.token_urlsafe(48)),
            "code_challenge_method": "S256",
            "tenant": stack.slug,
            "email": f"nobody-{uuid4().hex[:8]}@flood.test",
            "password": "not the password, at all",
        }
        statuses.append(httpx.post(f"{stack.url}/authorize", data=form, timeout=30).status_code)

    waits = _victim_during(stack, [threading.Thread(target=sign_in) for _ in range(ATTACKERS)])
    assert statuses == [401] * ATTACKERS  # each one was checked, and refused
    assert waits[-1] < 0.5, f"waited up to {waits[-1]:.3f}s (p50 {waits[len(waits) // 2]:.3f}s)"
    assert len(waits) >= 10


def test_password_change_flood_does_not_hold_the_database_from_other_tenants(
    stack: Stack,
) -> None:
    """8 members of tenant A change their passwords at once (each change
    hashes and checks with argon2) while a member of tenant B lists its
    namespaces: every listing is answered within 500 ms (before the fix each
    change held a connection for its hashes: over a second of waiting)."""
    path = "/me/password"
    statuses: list[int] = []
    body = {"current_password": PASSWORD, "new_password": "violet anchor meadow 73 drifting"}

    def change(user: UUID) -> None:
        headers = _auth_headers(stack, "POST", stack.url + path, user, stack.attacker_tenant)
        answer = httpx.post(stack.url + path, json=body, headers=headers, timeout=30)
        statuses.append(answer.status_code)

    attack = [threading.Thread(target=change, args=(user,)) for user in stack.attackers]
    waits = _victim_during(stack, attack)
    assert statuses == [204] * ATTACKERS  # every change went through
    assert waits[-1] < 0.5, f"waited up to {waits[-1]:.3f}s (p50 {waits[len(waits) // 2]:.3f}s)"
    assert len(waits) >= 10
