"""Revealing PII tokens over real HTTP: only an owner with MFA, only the
caller's tenant, only with a reason — each refusal its own request, each
checked for the refusal and for nothing written (no audit event, no value
in the answer)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.safety.vault import PiiVault
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles

ROLES = ("owner", "auditor", "contributor", "viewer", "billing-admin")
SECRET_A = "alice.private@customer.test"
SECRET_B = "bob.private@customer.test"


@dataclass
class Side:
    tenant: UUID
    users: dict[str, UUID]
    token: str  # the vault token of this side's secret e-mail address


@dataclass
class Stack:
    url: str
    identity: Identity
    database: DbHandles
    a: Side
    b: Side


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    sides: dict[str, Side] = {}

    async def seed(db: Database, _identity: Identity) -> None:
        tenants = TenantService(db)
        vault = PiiVault(TenantKeys(LocalKMS(keystore)))
        for name, secret in (("a", SECRET_A), ("b", SECRET_B)):
            tenant = (await tenants.create_tenant(f"pii-{name}-{uuid4().hex[:6]}", name)).id
            users = {
                role: await tenants.add_member(tenant, f"{role}-{name}@pii.test", role)
                for role in ROLES
            }
            redaction = await vault.tokenize(db, tenant, f"Contact {secret} today.")
            sides[name] = Side(tenant, users, redaction.tokens[0].token)

    with api_server(database, keystore, seed) as (url, _app, identity):
        yield Stack(url, identity, database, sides["a"], sides["b"])


def _reveal(
    stack: Stack,
    body: Any,
    *,
    side: Side | None = None,
    role: str = "owner",
    mfa: bool = True,
    path_tenant: UUID | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    side = side or stack.a
    url = f"{stack.url}/tenants/{path_tenant or side.tenant}/pii/reveal"
    key = DpopKey.generate()
    token, _ = stack.identity.service.tokens.issue_access(
        user_id=side.users[role],
        tenant_id=side.tenant,
        roles=(role,),
        amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    headers = {
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof("POST", url, access_token=token),
    }
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(url, content=content, headers=headers, timeout=10)
    return httpx.post(url, json=body, headers=headers, timeout=10)


def _reveal_events(stack: Stack) -> int:
    with psycopg.connect(stack.database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE action = 'pii.reveal'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _refused(stack: Stack, answer: httpx.Response, status: int, slug: str, before: int) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith(f"/{slug}")
    assert SECRET_A not in answer.text and SECRET_B not in answer.text
    assert _reveal_events(stack) == before  # nothing written


REASON = "customer asked for the address on file"


def test_owner_with_mfa_reveals_and_it_is_audited(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"tokens": [stack.a.token], "reason": REASON})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "values": [{"token": stack.a.token, "kind": "email", "value": SECRET_A}]
    }
    assert answer.headers["cache-control"] == "no-store"
    assert _reveal_events(stack) == before + 1
    with psycopg.connect(stack.database.superuser) as conn:
        row = conn.execute(
            "SELECT tenant_id, actor, details, request_id FROM bastion.audit_events "
            "WHERE action = 'pii.reveal' ORDER BY at DESC, seq DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    tenant_id, actor, details, request_id = row
    assert request_id == answer.headers["x-request-id"]
    assert tenant_id == stack.a.tenant
    assert actor == f"user:{stack.a.users['owner']}"
    assert details["tokens"] == [stack.a.token]
    # Sealed under the tenant's data key (tests/test_vault.py opens one).
    assert REASON not in str(details) and set(details["reason"]) == {"sealed", "key_version", "id"}
    assert SECRET_A not in str(details)


def test_text_with_tokens_is_restored(stack: Stack) -> None:
    answer = _reveal(stack, {"text": f"Reply to {stack.a.token} please.", "reason": REASON})
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == f"Reply to {SECRET_A} please."


def test_tenant_b_token_with_tenant_a_credentials_is_not_found(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"tokens": [stack.b.token], "reason": REASON})
    _refused(stack, answer, 404, "pii-token-not-found", before)


def test_tenant_b_token_among_a_tokens_reveals_nothing(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"tokens": [stack.a.token, stack.b.token], "reason": REASON})
    _refused(stack, answer, 404, "pii-token-not-found", before)


def test_tenant_b_path_with_tenant_a_credentials_is_refused(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(
        stack, {"tokens": [stack.b.token], "reason": REASON}, path_tenant=stack.b.tenant
    )
    _refused(stack, answer, 404, "not-found", before)


@pytest.mark.parametrize("role", ["auditor", "contributor", "viewer", "billing-admin"])
def test_roles_without_pii_reveal_are_forbidden(stack: Stack, role: str) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"tokens": [stack.a.token], "reason": REASON}, role=role)
    _refused(stack, answer, 403, "forbidden", before)


def test_owner_without_mfa_must_step_up(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"tokens": [stack.a.token], "reason": REASON}, mfa=False)
    _refused(stack, answer, 403, "mfa-required", before)


def test_missing_reason_is_refused(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"tokens": [stack.a.token]})
    _refused(stack, answer, 422, "validation-error", before)


def test_empty_reason_is_refused(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"tokens": [stack.a.token], "reason": "        "})
    _refused(stack, answer, 422, "pii-token-malformed", before)


@pytest.mark.parametrize(
    "body",
    [
        {"tokens": ["not-a-token"], "reason": REASON},
        {"tokens": [], "reason": REASON},
        {"tokens": ["⟦EMAIL_0123456789abcdef⟧"] * 101, "reason": REASON},
        {"tokens": ["⟦EMAIL_0123456789abcdef⟧"], "text": "x", "reason": REASON},
        {"reason": REASON},
        {"tokens": ["⟦EMAIL_0123456789abcdef⟧"], "reason": REASON, "tenant_id": str(uuid4())},
    ],
    ids=["malformed", "empty", "too-many", "both", "neither", "extra-member"],
)
def test_malformed_requests_are_refused(stack: Stack, body: dict[str, Any]) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, body)
    _refused(stack, answer, 422, "validation-error", before)


def test_non_utf8_body_is_a_clear_400(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, None, content=b'{"tokens": ["\xff\xfe"], "reason": "x"}')
    _refused(stack, answer, 400, "malformed-json", before)


def test_text_without_tokens_reveals_nothing_and_audits_nothing(stack: Stack) -> None:
    before = _reveal_events(stack)
    answer = _reveal(stack, {"text": "no tokens in here", "reason": REASON})
    assert answer.status_code == 200 and answer.json() == {
        "text": "no tokens in here",
        "values": [],
    }
    assert _reveal_events(stack) == before
