"""No tenant can take a model offline for another (issue 23, A1), over real HTTP.

Three tenants call a gateway whose upstreams are real HTTP servers (the
double). A request the upstream refuses as malformed (400) goes back to its
caller as 400 ``upstream-rejected-request``, is tried on no other target and
counts against none: twenty of them from tenant A leave every breaker
closed and the canary live, and tenant B is answered by the primary. Faults
one tenant can induce (a prompt the upstream crashes on) open the target
for that tenant alone. A real outage still opens the breaker for everyone
and rolls the canary back, and the canary comes back after its cool-down.
"""

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

from bastion.api.problems import problem_type, status_of
from bastion.billing.budgets import BudgetService
from bastion.db.pool import Database
from bastion.gateway.routing import ModelRouter, TargetBreaker
from bastion.gateway.service import GatewayService
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.knowledge.answers import _passed_on
from bastion.secrets import LocalKeystore
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.gateway_stack import gateway_server
from tests.http_server import running_server
from tests.provider_double import (
    ANSWER,
    API_KEY,
    CONTEXT_CHARS,
    CRASH,
    MODEL_MAX_TOKENS,
    SECRET_ERROR,
    USAGE,
    DoubleState,
    provider_double,
)

pytestmark = pytest.mark.anyio
ISSUER = "https://api.bastion.test"
TENANTS = ("a", "b", "c")
REJECTED = problem_type("upstream-rejected-request")


@dataclass
class Stack:
    url: str
    upstreams: tuple[str, ...]
    primary: DoubleState
    fallback: DoubleState
    canary: DoubleState
    service: GatewayService
    tokens: TokenIssuer
    tenants: dict[str, UUID]
    users: dict[str, UUID]

    def router(self, model: str) -> ModelRouter:
        return self.service.models[model]


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    keystore.set("providers/double", API_KEY.encode())
    primary, fallback, canary = DoubleState(), DoubleState(), DoubleState()
    seeded: dict[str, Any] = {}
    with (
        running_server(provider_double(primary)) as primary_url,
        running_server(provider_double(fallback)) as fallback_url,
        running_server(provider_double(canary)) as canary_url,
    ):

        def route(name: str, url: str, **kw: Any) -> ModelRoute:
            return ModelRoute(
                name=name,
                provider="openai_compatible",
                base_url=f"{url}/v1",
                api_key_ref="local://providers/double",
                timeout_seconds=0.5,
                **kw,
            )

        settings = Settings(
            issuer=ISSUER,
            embedder="hashing",
            gateway_budget_lease_calls=8,
            gateway_budget_lease_seconds=0.5,
            gateway_models=[
                route("solo", primary_url),
                route("solo", fallback_url, fallback=True),
                # Half the conversations on the canary, so that a test sees enough of it.
                route("canaried", primary_url, weight=50),
                route("canaried", canary_url, weight=50, canary=True),
            ],
        )

        async def seed(db: Database) -> None:
            tenants = TenantService(db)
            seeded["tenants"], seeded["users"] = {}, {}
            for name in TENANTS:
                tenant = (await tenants.create_tenant(f"f-{uuid4().hex[:8]}", name)).id
                seeded["tenants"][name] = tenant
                seeded["users"][name] = await tenants.add_member(
                    tenant, f"contributor@{name}.test", "contributor"
                )

        # Composed as ``bastion serve gateway`` builds it, without the plan gate
        # (these tenants have no plan).
        with gateway_server(
            database,
            keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            pool_size=8,
            without_plan_gate=True,
        ) as (url, composed):
            tokens = TokenIssuer(
                SigningKeys(keystore),
                issuer=ISSUER,
                audience=ISSUER,
                lifetime=timedelta(minutes=15),
            )
            yield Stack(
                url,
                (primary_url, fallback_url, canary_url),
                primary,
                fallback,
                canary,
                composed.service,
                tokens,
                seeded["tenants"],
                seeded["users"],
            )


@pytest.fixture
async def budgets(database: DbHandles, stack: Stack) -> AsyncIterator[BudgetService]:
    """A fresh budget period for every tenant: earlier tests' usage does not count."""
    async with Database(database.app, database.context_key, max_size=2) as db:
        service = BudgetService(db)
        start = datetime.now(UTC) - timedelta(minutes=1)
        for tenant in stack.tenants.values():
            await service.set_budget(
                tenant,
                period_start=start,
                period_end=start + timedelta(hours=1),
                call_limit=1000,
                token_limit=10**9,
            )
        yield service


@pytest.fixture(autouse=True)
def _healthy(stack: Stack) -> Iterator[None]:
    """Each test starts with healthy upstreams, closed breakers and its canary live."""
    for state in (stack.primary, stack.fallback, stack.canary):
        state.mode = "ok"
    for router in stack.service.models.values():
        router.rolled_back.clear()
        for target in router.targets:
            target.breaker = TargetBreaker()
            target.window.clear()
    yield
    for state in (stack.primary, stack.fallback, stack.canary):
        state.mode = "ok"


def _http(stack: Stack, tenant: str) -> httpx.AsyncClient:
    """A client of ``tenant``'s contributor: its token and a fresh DPoP proof per request."""
    key = DpopKey.generate()
    token, _ = stack.tokens.issue_access(
        user_id=stack.users[tenant],
        tenant_id=stack.tenants[tenant],
        roles=("contributor",),
        amr=("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )

    async def sign(request: httpx.Request) -> None:
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = key.proof(request.method, str(request.url), access_token=token)

    return httpx.AsyncClient(event_hooks={"request": [sign]}, timeout=30)


async def _chat(
    client: httpx.AsyncClient, stack: Stack, model: str, prompt: str, **body: Any
) -> httpx.Response:
    """POST a chat completion and read the whole answer (a stream to its end)."""
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], **body}
    async with client.stream("POST", f"{stack.url}/v1/chat/completions", json=payload) as answer:
        await answer.aread()
    return answer


def _bad_request(i: int) -> tuple[str, dict[str, Any], str | None, str | None]:
    """The i-th of the bad requests a tenant can send: (prompt, body, code, param)."""
    kinds: list[tuple[str, dict[str, Any], str | None, str | None]] = [
        (f"q {i}", {"max_tokens": MODEL_MAX_TOKENS + 1}, None, None),
        (
            f"q {i}",
            {
                "tools": [
                    {"type": "function", "function": {"name": "run python!", "parameters": {}}}
                ]
            },
            "invalid_value",
            "tools[0].function.name",
        ),
        ("word " * (CONTEXT_CHARS // 5 + 1), {}, "context_length_exceeded", "messages"),
    ]
    prompt, body, code, param = kinds[i % len(kinds)]
    return f"{prompt} {i} {uuid4()}", {**body, "stream": i % 2 == 1}, code, param


def _assert_rejected(answer: httpx.Response, stack: Stack, prompt: str) -> dict[str, Any]:
    """A 400 problem of a stable type that quotes nothing the upstream said or was sent."""
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = answer.json()
    assert problem["type"] == REJECTED and problem["status"] == 400
    for leaked in (SECRET_ERROR, "hunter2", "10.0.0.7", API_KEY, *stack.upstreams, prompt[:40]):
        assert leaked not in answer.text
    return problem


async def _rejected_events(database: DbHandles, tenant: UUID, count: int) -> int:
    """How many ``model.invoke`` events record an upstream refusal for ``tenant``,
    waiting for ``count`` of them (the ledger writes audit events in batches)."""
    deadline = time.monotonic() + 5
    with psycopg.connect(database.superuser, autocommit=True) as admin:  # RLS-scoped rows
        while True:
            (found,) = admin.execute(
                "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s"
                " AND action = 'model.invoke' AND details->>'decision' = 'rejected:upstream'",
                (tenant,),
            ).fetchone() or (0,)
            if found >= count or time.monotonic() > deadline:
                return int(found)
            await asyncio.sleep(0.05)


async def test_bad_requests_from_one_tenant_are_400_tried_once_and_close_nothing(
    stack: Stack, budgets: BudgetService, database: DbHandles
) -> None:
    """The attack of issue 23 A1: with the model's breakers opened by five bad
    requests, another tenant got 503 for 30 s. Now none of twenty counts."""
    primary, fallback = stack.primary.calls, stack.fallback.calls
    async with _http(stack, "a") as attacker, _http(stack, "b") as victim:
        for i in range(20):
            prompt, body, code, param = _bad_request(i)
            problem = _assert_rejected(
                await _chat(attacker, stack, "solo", prompt, **body), stack, prompt
            )
            expected = {
                "status": 400,
                "type": "invalid_request_error",
                "code": code,
                "param": param,
            }
            if code is None:  # vLLM's shape: its type is known, its code (400) a number
                expected = {"status": 400, "type": "BadRequestError"}
            assert problem["upstream"] == expected
        # Asked once each, on the target the conversation belongs to; never on another.
        assert stack.primary.calls - primary == 20
        assert stack.fallback.calls == fallback
        for target in stack.router("solo").targets:
            assert target.breaker.state == "closed"
            assert target.breaker.state_for(str(stack.tenants["a"])) == "closed"
        answer = await _chat(victim, stack, "solo", f"When was the refund issued? {uuid4()}")
        assert (
            answer.status_code == 200
            and answer.json()["choices"][0]["message"]["content"] == ANSWER
        )
        assert stack.primary.calls - primary == 21 and stack.fallback.calls == fallback
        own = await _chat(attacker, stack, "solo", f"and a good one {uuid4()}")
        assert own.status_code == 200
    # Each refusal cost its tenant one call and no token, and is audited.
    deadline = time.monotonic() + 5
    while True:
        state = await budgets.state(stack.tenants["a"])
        assert state is not None
        if state.calls_reserved == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (state.calls_used, state.tokens_used) == (21, USAGE["total_tokens"])
    assert await _rejected_events(database, stack.tenants["a"], 20) == 20
    assert await _rejected_events(database, stack.tenants["b"], 0) == 0


async def test_an_upstream_error_s_own_words_never_reach_the_client(
    stack: Stack, budgets: BudgetService
) -> None:
    # Members no vocabulary knows (a secret in ``code``, a host in ``param``) are dropped.
    stack.primary.mode = "leaky-400"
    prompt = f"anything {uuid4()}"
    async with _http(stack, "a") as client:
        for stream in (False, True):
            answer = await _chat(client, stack, "solo", prompt, stream=stream)
            assert _assert_rejected(answer, stack, prompt)["upstream"] == {"status": 400}


async def test_bad_requests_on_a_canary_never_roll_it_back(
    stack: Stack, budgets: BudgetService
) -> None:
    router = stack.router("canaried")
    before = stack.primary.calls + stack.canary.calls
    canary_before = stack.canary.calls
    async with _http(stack, "a") as attacker, _http(stack, "b") as victim:
        for i in range(40):
            prompt, body, _code, _param = _bad_request(i)
            _assert_rejected(
                await _chat(attacker, stack, "canaried", prompt, **body), stack, prompt
            )
        assert stack.primary.calls + stack.canary.calls - before == 40  # none tried twice
        assert stack.canary.calls - canary_before >= 8  # the canary had its share of them
        assert router.rolled_back == set()
        assert router.targets[1].breaker.state == "closed"
        seen = stack.canary.calls
        for i in range(10):
            answer = await _chat(victim, stack, "canaried", f"conversation {i} {uuid4()}")
            assert answer.status_code == 200
        assert stack.canary.calls > seen  # still live for everyone


async def test_one_tenant_s_induced_faults_close_the_model_for_itself_only(
    stack: Stack, budgets: BudgetService
) -> None:
    """A prompt the upstream crashes on (500) is a fault the tenant induces: it
    opens the targets for that tenant, and counts only its share for others."""
    primary, fallback = stack.primary.calls, stack.fallback.calls
    async with _http(stack, "a") as attacker, _http(stack, "b") as victim:
        for i in range(20):
            answer = await _chat(attacker, stack, "solo", f"{CRASH} {i} {uuid4()}")
            assert answer.status_code == 503
            assert answer.json()["type"].endswith("/provider-unavailable")
        answer = await _chat(victim, stack, "solo", f"When was the refund issued? {uuid4()}")
        assert answer.status_code == 200  # by the primary
        assert stack.primary.calls - primary == 6 and stack.fallback.calls - fallback == 5
        # Five faults opened each target for the attacker: it costs the upstream no more.
        tenant_a = str(stack.tenants["a"])
        for target in stack.router("solo").targets:
            assert target.breaker.state_for(tenant_a) == "open"
            assert target.breaker.state == "closed"


async def test_one_tenant_s_induced_faults_never_roll_the_canary_back(
    stack: Stack, budgets: BudgetService
) -> None:
    router = stack.router("canaried")
    canary_before = stack.canary.calls
    async with _http(stack, "a") as attacker, _http(stack, "b") as victim:
        # A burst: five on the canary open its breaker for the attacker. The split
        # is random (50/50): 40 calls bring five to the canary but once in ten
        # million runs (20 missed it once in about 170).
        for i in range(40):
            await _chat(attacker, stack, "canaried", f"{CRASH} {i} {uuid4()}")
        assert stack.canary.calls - canary_before >= 5
        for i in range(60):
            answer = await _chat(victim, stack, "canaried", f"conversation {i} {uuid4()}")
            assert answer.status_code == 200
    assert router.rolled_back == set()
    canary = router.targets[1]
    assert len(canary.window) >= router.min_samples  # it was judged, and kept
    assert not all(sample.ok for sample in canary.window)  # with the attacker's faults in


@pytest.mark.parametrize("mode", ["fail", "hang", "rate-limited"])
async def test_a_real_outage_still_opens_the_breaker_for_everyone(
    stack: Stack, budgets: BudgetService, mode: str
) -> None:
    """5xx, timeouts and 429 are the provider's faults: seen by two tenants, they
    open the primary for all, and the fallback answers."""
    stack.primary.mode = mode
    stack.primary.hang_seconds = 1.0  # past the target's timeout (0.5 s), not the teardown
    clients = [_http(stack, name) for name in TENANTS]
    try:
        for i in range(6):
            answer = await _chat(clients[i % 2], stack, "solo", f"q {i} {uuid4()}")
            assert answer.status_code == 200  # from the fallback
        primary = stack.router("solo").targets[0]
        assert primary.breaker.state == "open"
        calls, fallback = stack.primary.calls, stack.fallback.calls
        answer = await _chat(clients[2], stack, "solo", f"a third tenant {uuid4()}")
        assert answer.status_code == 200
        assert stack.primary.calls == calls and stack.fallback.calls == fallback + 1
    finally:
        for client in clients:
            await client.aclose()


async def test_a_failing_canary_is_rolled_back_then_readmitted_after_its_cooldown(
    stack: Stack, budgets: BudgetService
) -> None:
    router = stack.router("canaried")
    canary = router.targets[1]
    canary.breaker = TargetBreaker(open_seconds=0.2)
    router.cooldown_seconds = 0.5
    stack.canary.mode = "fail"
    clients = [_http(stack, name) for name in TENANTS[:2]]
    try:
        for i in range(60):
            answer = await _chat(clients[i % 2], stack, "canaried", f"outage {i} {uuid4()}")
            assert answer.status_code == 200  # a failed canary call falls back to stable
            if router.rolled_back:
                break
        assert router.rolled_back == {canary.name}
        rolled_back_at = time.monotonic()
        stack.canary.mode = "ok"
        seen = stack.canary.calls
        for i in range(10):
            await _chat(clients[i % 2], stack, "canaried", f"cooling {i} {uuid4()}")
        assert stack.canary.calls == seen or time.monotonic() - rolled_back_at >= 0.5
        await asyncio.sleep(max(0.0, rolled_back_at + 0.6 - time.monotonic()))
        for i in range(20):
            answer = await _chat(clients[i % 2], stack, "canaried", f"back {i} {uuid4()}")
            assert answer.status_code == 200
        assert router.rolled_back == set()
        assert stack.canary.calls > seen  # re-admitted, and answering
        # Judged afresh: only calls since its return are in its window.
        assert all(sample.ok for sample in canary.window)
    finally:
        for client in clients:
            await client.aclose()
        router.cooldown_seconds = 300.0


async def test_a_probe_that_decides_nothing_leaves_the_breaker_usable(
    stack: Stack, budgets: BudgetService
) -> None:
    """Listing the candidates took the one probe of every half-open target, also of
    the fallback nobody then called: it stayed shut for good."""
    primary, fallback = stack.router("solo").targets
    for target in (primary, fallback):
        target.breaker = TargetBreaker(open_seconds=0.2)
    stack.primary.mode = stack.fallback.mode = "fail"
    clients = [_http(stack, name) for name in TENANTS]
    try:
        for i in range(6):  # an outage of both, seen by two tenants
            await _chat(clients[i % 2], stack, "solo", f"q {i} {uuid4()}")
        assert primary.breaker.state == fallback.breaker.state == "open"
        stack.primary.mode = stack.fallback.mode = "ok"
        await asyncio.sleep(0.25)  # both half-open
        answer = await _chat(clients[2], stack, "solo", f"the primary probe {uuid4()}")
        assert answer.status_code == 200 and primary.breaker.state == "closed"
        stack.primary.mode = "fail"
        answer = await _chat(clients[2], stack, "solo", f"now the fallback {uuid4()}")
        assert answer.status_code == 200  # the fallback's probe was still to take
        assert fallback.breaker.state == "closed"
    finally:
        for client in clients:
            await client.aclose()


def test_the_api_passes_an_upstream_refusal_on_as_the_caller_s_400() -> None:
    """A question the model's provider refused (too long with its context, say) is
    the caller's to change: 400, not a 502 that invites a retry."""
    refused = httpx.Response(
        400,
        json={"type": REJECTED, "title": "The model's provider rejected the request"},
    )
    problem = _passed_on(refused)
    assert (status_of(problem), problem.type) == (400, REJECTED)
    # Any other 400 of the gateway is the api's own doing: still a 502.
    assert (
        status_of(_passed_on(httpx.Response(400, json={"type": problem_type("bad-request")})))
        == 502
    )
