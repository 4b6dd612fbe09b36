"""OpenBao down mid-run, through the real gateway over HTTP (issue 17).

The composed gateway (``bastion serve gateway``'s wiring, tests/gateway_stack.py)
runs with the tenants' KEKs in a real ``bao server -dev`` (transit), and a
provider double upstream. Every prompt carries an e-mail address, so every
call needs the tenant's data key and token key (the PII vault seals the
original). The bao server is stopped while the gateway serves: a tenant whose
keys are cached keeps being answered; a tenant whose keys were never
unwrapped by this gateway gets 503 problem+json with ``Retry-After`` (and
nothing goes upstream, nothing is written); once the cache's short TTL is
over, the first tenant gets the same 503.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.api.problems import problem_type
from bastion.billing.budgets import BudgetService
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.safety.vault import PiiVault
from bastion.secrets import LocalKeystore, open_key_ring
from bastion.secrets.openbao import OpenBaoKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.gateway_stack import gateway_server
from tests.http_server import running_server
from tests.provider_double import API_KEY, DoubleState, provider_double
from tests.test_secrets_openbao import Bao, _start_bao

pytestmark = pytest.mark.anyio
ISSUER = "https://api.bastion.test"
CACHE_SECONDS = 2.0  # the OpenBao data-key cache's TTL in this test
UNAVAILABLE = problem_type("secrets-backend-unavailable")


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[Bao]:
    server = _start_bao(tmp_path)
    yield server
    if server.process.poll() is None:
        server.stop()


def _client(tokens: TokenIssuer, tenant: UUID, user: UUID) -> httpx.AsyncClient:
    """A client of ``tenant``'s contributor: its token and a fresh DPoP proof per request."""
    key = DpopKey.generate()
    token, _ = tokens.issue_access(
        user_id=user,
        tenant_id=tenant,
        roles=("contributor",),
        amr=("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )

    async def sign(request: httpx.Request) -> None:
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = key.proof(request.method, str(request.url), access_token=token)

    return httpx.AsyncClient(event_hooks={"request": [sign]}, timeout=30)


async def _chat(client: httpx.AsyncClient, url: str) -> httpx.Response:
    prompt = f"Please refund ada.{uuid4().hex[:6]}@example.com"
    payload = {"model": "solo", "messages": [{"role": "user", "content": prompt}]}
    return await client.post(f"{url}/v1/chat/completions", json=payload)


def _vault_rows(database: DbHandles, tenant: UUID) -> int:
    with psycopg.connect(database.superuser, autocommit=True) as admin:  # RLS-scoped rows
        (count,) = admin.execute(
            "SELECT count(*) FROM bastion.pii_vault WHERE tenant_id = %s", (tenant,)
        ).fetchone() or (0,)
    return int(count)


def _assert_unavailable(answer: httpx.Response, bao: Bao) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.headers["Retry-After"] == "5"
    problem: dict[str, Any] = answer.json()
    assert problem["type"] == UNAVAILABLE and problem["status"] == 503
    assert "example.com" not in answer.text


async def test_a_stopped_openbao_is_survived_on_cached_keys_then_503_over_http(
    bao: Bao, database: DbHandles, keystore: LocalKeystore, tmp_path: Path
) -> None:
    keystore.set("providers/double", API_KEY.encode())
    upstream = DoubleState()
    kms = open_key_ring(bao.settings(tmp_path / "gw", openbao_cache_seconds=CACHE_SECONDS)).kms
    assert isinstance(kms, OpenBaoKMS)
    seeded: dict[str, tuple[UUID, UUID]] = {}

    async def seed(db: Database) -> None:
        tenants, budgets = TenantService(db), BudgetService(db)
        start = datetime.now(UTC) - timedelta(minutes=1)
        for name in ("warm", "cold"):
            tenant = (await tenants.create_tenant(f"bao-{uuid4().hex[:8]}", name)).id
            user = await tenants.add_member(tenant, f"contributor@{name}.test", "contributor")
            await budgets.set_budget(
                tenant,
                period_start=start,
                period_end=start + timedelta(hours=1),
                call_limit=100,
                token_limit=10**9,
            )
            seeded[name] = (tenant, user)
        # The cold tenant's keys exist (wrapped in OpenBao), made by another
        # process: this gateway has never unwrapped them.
        other = open_key_ring(bao.settings(tmp_path / "other")).kms
        await PiiVault(TenantKeys(other)).tokenize(db, seeded["cold"][0], "mail bob@example.com")

    with running_server(provider_double(upstream)) as upstream_url:
        route = ModelRoute(
            name="solo",
            provider="openai_compatible",
            base_url=f"{upstream_url}/v1",
            api_key_ref="local://providers/double",
            timeout_seconds=2,
        )
        settings = Settings(issuer=ISSUER, embedder="hashing", gateway_models=[route])
        with gateway_server(
            database,
            keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            without_plan_gate=True,
            kms=kms,
        ) as (url, _gateway):
            tokens = TokenIssuer(
                SigningKeys(keystore), issuer=ISSUER, audience=ISSUER, lifetime=timedelta(minutes=5)
            )
            warm, cold = seeded["warm"], seeded["cold"]
            async with _client(tokens, *warm) as w, _client(tokens, *cold) as c:
                first = await _chat(w, url)  # unwraps (creates) the warm tenant's keys
                assert first.status_code == 200, first.text
                warmed_at = time.monotonic()
                bao.stop()

                # Within the TTL: the outage is not felt by the warm tenant.
                during = await _chat(w, url)
                assert during.status_code == 200, during.text
                assert time.monotonic() - warmed_at < CACHE_SECONDS

                # A key this gateway never unwrapped: 503, nothing upstream, nothing written.
                calls, rows = upstream.calls, _vault_rows(database, cold[0])
                _assert_unavailable(await _chat(c, url), bao)
                assert upstream.calls == calls and _vault_rows(database, cold[0]) == rows

                # Past the TTL the warm tenant fails closed too.
                time.sleep(max(0.0, warmed_at + CACHE_SECONDS + 0.2 - time.monotonic()))
                calls, rows = upstream.calls, _vault_rows(database, warm[0])
                _assert_unavailable(await _chat(w, url), bao)
                assert upstream.calls == calls and _vault_rows(database, warm[0]) == rows
