"""Prompt sampling (issue 6, §8 Traces): a prompt reaches the gateway's log line
only when the tenant's owner set a rate and the user consented, and then only
as sent to the provider (vault tokens, never the personal data), never the
answer. The routes are attacked over real HTTP; each refusal also checks that
nothing was written."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.billing.budgets import BudgetService
from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.gateway.app import build_routers
from bastion.gateway.ledger import CallLedger
from bastion.gateway.sampling import PromptSampling
from bastion.gateway.service import Caller, GatewayService
from bastion.identity.dpop import DpopKey
from bastion.safety.vault import PiiVault
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import ModelRoute
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import Captured, DbHandles

pytestmark = pytest.mark.anyio
MODEL = "bastion-local"
EMAIL = "jane.doe@example.org"
PROMPT = f"Please write to {EMAIL} about the refund for order 4411."


# -- the gateway's log line ----------------------------------------------------------


@dataclass
class Stack:
    service: GatewayService
    sampling: PromptSampling
    tenant: UUID
    owner: UUID
    user: UUID


async def _tenant(db: Database) -> tuple[UUID, UUID, UUID]:
    tenants = TenantService(db)
    suffix = uuid4().hex[:8]
    tenant = (await tenants.create_tenant(f"ps-{suffix}", "sampling")).id
    owner = await tenants.add_member(tenant, f"owner-{suffix}@ps.test", "owner")
    user = await tenants.add_member(tenant, f"user-{suffix}@ps.test", "contributor")
    start = datetime.now(UTC) - timedelta(minutes=1)
    await BudgetService(db).set_budget(
        tenant,
        period_start=start,
        period_end=start + timedelta(hours=1),
        call_limit=1_000,
        token_limit=10**9,
    )
    return tenant, owner, user


@pytest.fixture
async def stack(db: Database, keystore: LocalKeystore) -> AsyncIterator[Stack]:
    routers = build_routers(
        [ModelRoute(name=MODEL, provider="local")], keystore, embedder="hashing"
    )
    ledger = CallLedger(db, BudgetService(db), lease_calls=16, lease_seconds=5)
    sampling = PromptSampling(db, ttl_seconds=0.2)
    service = GatewayService(
        ledger, routers, vault=PiiVault(TenantKeys(LocalKMS(keystore))), sampling=sampling
    )
    tenant, owner, user = await _tenant(db)
    ledger.start()
    try:
        yield Stack(service, sampling, tenant, owner, user)
    finally:
        await ledger.aclose()
        for router in routers.values():
            await router.aclose()


async def _call_line(stack: Stack, logs: Captured, prompt: str = PROMPT) -> dict[str, Any]:
    """Make one chat call as the user; return its ``model_call`` log line."""
    before = len(logs.records())
    caller = Caller(stack.tenant, stack.user, frozenset({"contributor"}))
    completion, _how = await stack.service.chat(
        caller, MODEL, [{"role": "user", "content": prompt}], max_tokens=64, temperature=0.7
    )
    lines = [r for r in logs.records()[before:] if r["event"] == "model_call"]
    assert len(lines) == 1
    line = lines[0]
    assert line["decision"] == "answered" and line["tenant"] == str(stack.tenant)
    # Never the answer, whatever the sampling.
    assert completion.text
    assert not {"answer", "completion", "text", "content", "messages"} & line.keys()
    return line


def _has_no_prompt(line: dict[str, Any]) -> bool:
    text = str(line)
    return "prompt_sample" not in line and EMAIL not in text and "refund" not in text


async def test_off_by_default(stack: Stack, logs: Captured) -> None:
    assert _has_no_prompt(await _call_line(stack, logs))


async def test_tenant_rate_without_user_consent_logs_no_prompt(
    stack: Stack, logs: Captured
) -> None:
    await stack.sampling.set_rate(stack.tenant, stack.owner, 1.0)
    for _ in range(3):
        assert _has_no_prompt(await _call_line(stack, logs))


async def test_consent_with_tenant_rate_zero_logs_no_prompt(stack: Stack, logs: Captured) -> None:
    await stack.sampling.consent(stack.tenant, stack.user)
    await stack.sampling.set_rate(stack.tenant, stack.owner, 0.0)
    for _ in range(3):
        assert _has_no_prompt(await _call_line(stack, logs))


async def test_both_consented_logs_the_tokenized_prompt(stack: Stack, logs: Captured) -> None:
    await stack.sampling.set_rate(stack.tenant, stack.owner, 1.0)
    await stack.sampling.consent(stack.tenant, stack.user)
    line = await _call_line(stack, logs)
    sample = line["prompt_sample"]
    assert "refund for order 4411" in sample  # the prompt itself
    assert EMAIL not in logs.text  # the address never reaches the log ...
    assert "⟦EMAIL_" in sample  # ... its vault token does
    assert sample.startswith("user: ")


async def test_streamed_call_is_sampled_alike(stack: Stack, logs: Captured) -> None:
    await stack.sampling.set_rate(stack.tenant, stack.owner, 1.0)
    await stack.sampling.consent(stack.tenant, stack.user)
    caller = Caller(stack.tenant, stack.user, frozenset({"contributor"}))
    _first, rest = await stack.service.chat_stream(
        caller, MODEL, [{"role": "user", "content": PROMPT}], max_tokens=64, temperature=0.7
    )
    async for _item in rest:
        pass
    await rest.aclose()
    (line,) = [r for r in logs.records() if r["event"] == "model_call"]
    assert "⟦EMAIL_" in line["prompt_sample"] and EMAIL not in logs.text


async def test_sample_is_truncated_to_4000_characters(stack: Stack, logs: Captured) -> None:
    await stack.sampling.set_rate(stack.tenant, stack.owner, 1.0)
    await stack.sampling.consent(stack.tenant, stack.user)
    line = await _call_line(stack, logs, "refund " * 2_000)
    assert len(line["prompt_sample"]) == 4_000


async def test_rate_is_a_share_of_calls(db: Database, stack: Stack) -> None:
    draws = iter([0.1, 0.6, 0.49, 0.5])
    sampling = PromptSampling(db, rng=lambda: next(draws))
    await sampling.set_rate(stack.tenant, stack.owner, 0.5)
    await sampling.consent(stack.tenant, stack.user)
    decisions = [await sampling.sampled(stack.tenant, stack.user) for _ in range(4)]
    assert decisions == [True, False, True, False]


async def test_withdrawn_consent_stops_sampling_after_the_ttl(
    db: Database, stack: Stack, logs: Captured
) -> None:
    await stack.sampling.set_rate(stack.tenant, stack.owner, 1.0)
    await stack.sampling.consent(stack.tenant, stack.user)
    assert "prompt_sample" in await _call_line(stack, logs)
    # Withdrawn through another process's service: this gateway learns it
    # from the database once its cached answer is older than the TTL.
    await PromptSampling(db).withdraw(stack.tenant, stack.user)
    await asyncio.sleep(stack.sampling.ttl_seconds + 0.05)
    assert _has_no_prompt(await _call_line(stack, logs))


async def test_changes_are_audited_in_their_transaction(database: DbHandles, stack: Stack) -> None:
    await stack.sampling.set_rate(stack.tenant, stack.owner, 0.25)
    assert await stack.sampling.consent(stack.tenant, stack.user)
    assert not await stack.sampling.consent(stack.tenant, stack.user)  # already given
    assert await stack.sampling.withdraw(stack.tenant, stack.user)
    assert _audit(database, stack.tenant) == [
        ("sampling.configure", f"user:{stack.owner}"),
        ("sampling.consent", f"user:{stack.user}"),
        ("sampling.withdraw", f"user:{stack.user}"),
    ]
    with pytest.raises(ValueError):
        await stack.sampling.set_rate(stack.tenant, stack.owner, float("nan"))
    assert (await stack.sampling.rate(stack.tenant, stack.owner, "owner")).rate == 0.25


async def test_a_user_cannot_consent_for_another_in_the_database(
    db: Database, database: DbHandles, stack: Stack
) -> None:
    """RLS: a consent row is only ever the acting user's own."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(stack.tenant, stack.owner, "owner") as tx:
            await tx.execute(
                "INSERT INTO bastion.prompt_sampling_consents (user_id) VALUES (%s)",
                (stack.user,),
            )
    await stack.sampling.consent(stack.tenant, stack.user)
    async with db.tenant_tx(stack.tenant, stack.owner, "owner") as tx:
        deleted = await tx.execute("DELETE FROM bastion.prompt_sampling_consents WHERE true")
    assert deleted.rowcount == 0
    assert _consents(database, stack.tenant) == [stack.user]
    # And only owners write the rate.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(stack.tenant, stack.user, "contributor") as tx:
            await tx.execute("INSERT INTO bastion.prompt_sampling (rate) VALUES (1)")
    assert _rates(database, stack.tenant) == []


# -- helpers reading as the superuser (what was really written) ------------------------


def _audit(database: DbHandles, tenant: UUID) -> list[tuple[str, str]]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT action, actor FROM bastion.audit_events "
            "WHERE tenant_id = %s AND action LIKE 'sampling.%%' ORDER BY seq",
            (tenant,),
        ).fetchall()
    return [(a, b) for a, b in rows]


def _rates(database: DbHandles, tenant: UUID) -> list[float]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT rate FROM bastion.prompt_sampling WHERE tenant_id = %s", (tenant,)
        ).fetchall()
    return [r for (r,) in rows]


def _consents(database: DbHandles, tenant: UUID) -> list[UUID]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT user_id FROM bastion.prompt_sampling_consents WHERE tenant_id = %s",
            (tenant,),
        ).fetchall()
    return [u for (u,) in rows]


# -- the routes, over real HTTP ------------------------------------------------------------


@dataclass
class Api:
    url: str
    identity: Identity
    tenants: dict[str, UUID]
    users: dict[str, UUID]


ROLES = ("owner", "auditor", "contributor", "viewer")


@pytest.fixture(scope="module")
def api(database: DbHandles, keystore: LocalKeystore) -> Iterator[Api]:
    tenants: dict[str, UUID] = {}
    users: dict[str, UUID] = {}

    async def seed(db: Database, _identity: Identity) -> None:
        service = TenantService(db)
        for name in ("a", "b"):
            tenants[name] = (await service.create_tenant(f"s{name}-{uuid4().hex[:8]}", name)).id
            for role in ROLES:
                users[f"{role}-{name}"] = await service.add_member(
                    tenants[name], f"{role}-{name}-{uuid4().hex[:6]}@ps.test", role
                )

    with api_server(database, keystore, seed) as (url, _app, identity):
        yield Api(url, identity, tenants, users)


async def _as(
    api: Api,
    who: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    mfa: bool = True,
    raw: bytes | None = None,
) -> httpx.Response:
    """``who`` is ``role-tenant`` (``owner-a``); a fresh DPoP-bound token of theirs."""
    role, tenant = who.rsplit("-", 1)
    key = DpopKey.generate()
    token, _ = api.identity.service.tokens.issue_access(
        user_id=api.users[who],
        tenant_id=api.tenants[tenant],
        roles=(role,),
        amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    url = f"{api.url}{path}"
    headers = {"Authorization": f"DPoP {token}", "DPoP": key.proof(method, url, access_token=token)}
    async with httpx.AsyncClient(timeout=10) as http:
        if raw is not None:
            headers["Content-Type"] = "application/json"
            return await http.request(method, url, content=raw, headers=headers)
        return await http.request(method, url, json=body, headers=headers)


def _path(api: Api, tenant: str = "a") -> str:
    return f"/tenants/{api.tenants[tenant]}/prompt-sampling"


async def test_owner_sets_and_auditor_reads_the_rate(api: Api, database: DbHandles) -> None:
    tenant = api.tenants["a"]
    unset = await _as(api, "owner-a", "GET", _path(api))
    assert unset.status_code == 200 and unset.json()["rate"] == 0.0  # off by default
    assert _rates(database, tenant) == []
    answer = await _as(api, "owner-a", "PUT", _path(api), {"rate": 0.25})
    assert answer.status_code == 200 and answer.json()["rate"] == 0.25
    assert _rates(database, tenant) == [0.25]
    read = await _as(api, "auditor-a", "GET", _path(api))
    assert read.status_code == 200
    assert read.json()["rate"] == 0.25 and read.json()["set_by"] == str(api.users["owner-a"])
    assert ("sampling.configure", f"user:{api.users['owner-a']}") in _audit(database, tenant)
    viewer = await _as(api, "viewer-a", "GET", _path(api))
    assert viewer.status_code == 403 and viewer.json()["type"].endswith("/forbidden")


async def test_user_consents_and_withdraws_their_own(api: Api, database: DbHandles) -> None:
    tenant, me = api.tenants["a"], api.users["viewer-a"]
    given = await _as(api, "viewer-a", "PUT", "/me/prompt-sampling-consent", mfa=False)
    assert given.status_code == 200 and given.json() == {"consented": True}
    assert me in _consents(database, tenant)
    # Someone else withdrawing changes only their own (absent) consent.
    other = await _as(api, "contributor-a", "DELETE", "/me/prompt-sampling-consent", mfa=False)
    assert other.status_code == 204
    assert me in _consents(database, tenant)
    gone = await _as(api, "viewer-a", "DELETE", "/me/prompt-sampling-consent", mfa=False)
    assert gone.status_code == 204
    assert me not in _consents(database, tenant)
    assert _audit(database, tenant)[-2:] == [
        ("sampling.consent", f"user:{me}"),
        ("sampling.withdraw", f"user:{me}"),
    ]


@pytest.mark.parametrize("role", ["contributor", "viewer", "auditor"])
async def test_non_owner_cannot_set_the_rate(api: Api, database: DbHandles, role: str) -> None:
    tenant = api.tenants["a"]
    rates, audit = _rates(database, tenant), _audit(database, tenant)
    answer = await _as(api, f"{role}-a", "PUT", _path(api), {"rate": 1.0})
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith("/forbidden")
    assert _rates(database, tenant) == rates and 1.0 not in rates
    assert _audit(database, tenant) == audit


async def test_owner_without_mfa_cannot_set_the_rate(api: Api, database: DbHandles) -> None:
    tenant = api.tenants["a"]
    rates, audit = _rates(database, tenant), _audit(database, tenant)
    answer = await _as(api, "owner-a", "PUT", _path(api), {"rate": 1.0}, mfa=False)
    assert answer.status_code == 403 and answer.json()["type"].endswith("/mfa-required")
    assert _rates(database, tenant) == rates and _audit(database, tenant) == audit


async def test_owner_of_a_cannot_set_the_rate_of_b(api: Api, database: DbHandles) -> None:
    a, b = api.tenants["a"], api.tenants["b"]
    before = {t: (_rates(database, t), _audit(database, t)) for t in (a, b)}
    answer = await _as(api, "owner-a", "PUT", _path(api, "b"), {"rate": 1.0})
    # The project's convention for a path naming another tenant: 404, not even 403.
    assert answer.status_code == 404 and answer.json()["type"].endswith("/not-found")
    read = await _as(api, "owner-a", "GET", _path(api, "b"))
    assert read.status_code == 404 and "rate" not in read.json()
    assert {t: (_rates(database, t), _audit(database, t)) for t in (a, b)} == before
    assert _rates(database, b) == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"rate": 1.5}',
        b'{"rate": -1}',
        b'{"rate": "x"}',
        b'{"rate": "0.5"}',
        b'{"rate": true}',
        b'{"rate": NaN}',
        b'{"rate": Infinity}',
        b'{"rate": null}',
        b"{}",
        b'{"rate": 0.5, "extra": 1}',
        b"[0.5]",
        b"not json",  # the project's malformed-json problem: 400
    ],
)
async def test_bad_rate_is_422_and_writes_nothing(
    api: Api, database: DbHandles, raw: bytes
) -> None:
    tenant = api.tenants["b"]  # untouched by the other tests: no rate row at all
    audit = _audit(database, tenant)
    answer = await _as(api, "owner-b", "PUT", _path(api, "b"), raw=raw)
    expected = (400, "/malformed-json") if raw == b"not json" else (422, "/validation-error")
    assert answer.status_code == expected[0], answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith(expected[1])
    assert "Traceback" not in answer.text
    assert _rates(database, tenant) == [] and _audit(database, tenant) == audit
