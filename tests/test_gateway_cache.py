"""The answer cache under attack, over real HTTP (issue 23, A4 and B7).

A tenant's flood of distinct prompts evicts only its own answers: another
tenant keeps its hits and its stale fallback during an outage. The key covers
every field of the request that could change the answer (deny by default, also
fields the gateway does not know), and the asking user. A truncated answer is
never served again. The upstream is a real HTTP server (the provider double)
that counts the calls it gets.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

from bastion.billing.budgets import BudgetService
from bastion.db.pool import Database
from bastion.gateway.cache import (
    ENTRY_OVERHEAD_BYTES,
    MAX_KEY_DEPTH,
    AnswerCache,
    CacheKey,
)
from bastion.gateway.providers import Completion, LocalProvider, Usage
from bastion.gateway.service import GatewayService
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.safety.signing import ToolCall
from bastion.secrets import LocalKeystore
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.gateway_stack import gateway_server
from tests.http_server import running_server
from tests.provider_double import ANSWER, API_KEY, TRUNCATED_ANSWER, DoubleState, provider_double

pytestmark = pytest.mark.anyio
ISSUER = "https://api.bastion.test"
TTL_SECONDS = 300.0
TENANT_ENTRIES = 8  # each tenant's quota; the total is larger
TOTAL_ENTRIES = 20


@dataclass
class Stack:
    url: str
    double: DoubleState
    service: GatewayService
    tokens: TokenIssuer
    users: dict[str, tuple[UUID, UUID]]  # name -> (tenant, user)
    now: list[float]  # the cache's clock


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    keystore.set("providers/double", API_KEY.encode())
    double = DoubleState()
    now = [1_000.0]
    seeded: dict[str, Any] = {}
    with running_server(provider_double(double)) as upstream:
        settings = Settings(
            issuer=ISSUER,
            embedder="hashing",
            gateway_budget_lease_calls=8,
            gateway_budget_lease_seconds=0.5,
            gateway_models=[
                ModelRoute(
                    name="upstream",
                    provider="openai_compatible",
                    base_url=f"{upstream}/v1",
                    api_key_ref="local://providers/double",
                    timeout_seconds=1.5,
                )
            ],
        )

        async def seed(db: Database) -> None:
            tenants, budgets = TenantService(db), BudgetService(db)
            start = datetime.now(UTC) - timedelta(minutes=1)
            users: dict[str, tuple[UUID, UUID]] = {}
            for name in ("a", "b"):
                tenant = (await tenants.create_tenant(f"c-{uuid4().hex[:8]}", name)).id
                await budgets.set_budget(
                    tenant,
                    period_start=start,
                    period_end=start + timedelta(hours=1),
                    call_limit=10_000,
                    token_limit=10**9,
                )
                for n in (1, 2):
                    user = await tenants.add_member(tenant, f"u{n}@{name}.test", "contributor")
                    users[f"{name}{n}"] = (tenant, user)
            seeded["users"] = users

        # Composed as ``bastion serve gateway`` builds it, with the cache on a test
        # clock and without the plan gate (these tenants have budgets, no plan).
        with gateway_server(
            database,
            keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            pool_size=6,
            answer_cache=AnswerCache(
                max_entries=TOTAL_ENTRIES,
                tenant_entries=TENANT_ENTRIES,
                ttl_seconds=TTL_SECONDS,
                clock=lambda: now[0],
            ),
            without_plan_gate=True,
        ) as (url, composed):
            tokens = TokenIssuer(
                SigningKeys(keystore),
                issuer=ISSUER,
                audience=ISSUER,
                lifetime=timedelta(minutes=15),
            )
            yield Stack(url, double, composed.service, tokens, seeded["users"], now)


@pytest.fixture(autouse=True)
def _upstream_ok(stack: Stack) -> Iterator[None]:
    """Each test starts with a healthy upstream and closed breakers."""
    stack.double.mode = "ok"
    for router in stack.service.models.values():
        for target in router.targets:
            target.breaker = type(target.breaker)()  # closed again, whatever its kind
            target.window.clear()
    yield
    stack.double.mode = "ok"


class Client:
    """One user's DPoP-bound client posting raw chat bodies (any field, as sent)."""

    def __init__(self, stack: Stack, who: str) -> None:
        tenant, user = stack.users[who]
        self.url = f"{stack.url}/v1/chat/completions"
        key = DpopKey.generate()
        token, _ = stack.tokens.issue_access(
            user_id=user,
            tenant_id=tenant,
            roles=("contributor",),
            amr=("pwd",),
            jkt=key.thumbprint,
            auth_time=int(time.time()),
        )

        async def sign(request: httpx.Request) -> None:
            request.headers["Authorization"] = f"DPoP {token}"
            request.headers["DPoP"] = key.proof(
                request.method, str(request.url), access_token=token
            )

        self.http = httpx.AsyncClient(event_hooks={"request": [sign]}, timeout=30)

    async def ask(self, prompt: str, **fields: Any) -> httpx.Response:
        body = {"model": "upstream", "temperature": 0, **fields}
        body.setdefault("messages", [{"role": "user", "content": prompt}])
        return await self.http.post(self.url, json=body)


def _text(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


def _unavailable(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith("/provider-unavailable")
    assert "bastion-cache" not in answer.headers


# -- A4: one tenant's flood evicts only its own answers --------------------------------


async def test_a_tenant_s_flood_evicts_only_its_own_answers_and_never_another_s_fallback(
    stack: Stack,
) -> None:
    victim, flooder = Client(stack, "b1"), Client(stack, "a1")
    asked = f"What is the refund policy? {uuid4()}"
    assert _text(await victim.ask(asked)) == ANSWER
    # More distinct prompts than the whole cache holds, all cacheable.
    flood = [f"flood {i} {uuid4()}" for i in range(TOTAL_ENTRIES + 5)]
    for prompt in flood:
        assert (await flooder.ask(prompt)).status_code == 200
    calls = stack.double.calls
    hit = await victim.ask(asked)
    assert _text(hit) == ANSWER and hit.headers["bastion-cache"] == "hit"
    assert stack.double.calls == calls  # answered from the cache

    # The outage: past the fresh TTL, the upstream down, the victim's answer still served.
    stack.now[0] += TTL_SECONDS + 1
    stack.double.mode = "fail"
    fallback = await victim.ask(asked)
    assert _text(fallback) == ANSWER and fallback.headers["bastion-cache"] == "stale-fallback"
    # The flooder's oldest prompts were its own to lose: 503, no fallback.
    _unavailable(await flooder.ask(flood[0]))
    cache = stack.service.cache
    assert cache.entries_of(stack.users["a1"][0]) == TENANT_ENTRIES  # its own quota
    assert len(cache) <= TOTAL_ENTRIES


# -- B7: the key covers what changes the answer; truncated answers are not kept --------


async def test_a_truncated_answer_is_never_served_again_fresh_or_stale(stack: Stack) -> None:
    client = Client(stack, "b1")
    fresh, stale = f"Summarise the ticket {uuid4()}", f"And this {uuid4()}"
    stack.double.mode = "length"
    for prompt in (fresh, stale):
        cut = await client.ask(prompt, max_tokens=2)
        assert _text(cut) == TRUNCATED_ANSWER
        assert cut.json()["choices"][0]["finish_reason"] == "length"
    stack.double.mode = "ok"
    calls = stack.double.calls
    again = await client.ask(fresh, max_tokens=2)
    assert _text(again) == ANSWER and "bastion-cache" not in again.headers
    assert stack.double.calls == calls + 1  # asked upstream again, not served the cut answer
    stack.double.mode = "fail"
    _unavailable(await client.ask(stale, max_tokens=2))  # no stale fallback either


# Each: a field of the first request that the second (temperature 0, else the
# same) lacks. The old key (tenant, model, messages) served the first answer to
# the second request.
CHANGED_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("max_tokens", {"max_tokens": 2}),
    ("max_completion_tokens", {"max_completion_tokens": 2}),
    ("temperature", {"temperature": 1.3}),
    ("stop", {"stop": ["."]}),
    ("seed", {"seed": 7}),
    ("top_p", {"top_p": 0.1}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("logit_bias", {"logit_bias": {"1234": -100}}),
    ("presence_penalty", {"presence_penalty": 1.5}),
    # A field nobody listed (a future OpenAI parameter): deny by default.
    ("unknown field", {"x_future_parameter": {"depth": 3}}),
    # A field of a message that is not its text.
    ("message field", {"messages": "named"}),
]


@pytest.mark.parametrize(
    "changed", [fields for _name, fields in CHANGED_FIELDS], ids=[n for n, _f in CHANGED_FIELDS]
)
async def test_a_request_differing_in_any_field_is_not_answered_from_the_cache(
    stack: Stack, changed: dict[str, Any]
) -> None:
    client = Client(stack, "b1")
    prompt = f"When was the refund issued? {uuid4()}"
    if changed.get("messages") == "named":
        changed = {"messages": [{"role": "user", "content": prompt, "name": "alice"}]}
    assert (await client.ask(prompt, **changed)).status_code == 200
    calls = stack.double.calls
    plain = await client.ask(prompt)
    assert plain.status_code == 200 and "bastion-cache" not in plain.headers
    assert stack.double.calls == calls + 1
    # The same request twice is a hit: the key is canonical, not random.
    repeated = await client.ask(prompt)
    assert repeated.headers.get("bastion-cache") == "hit" and stack.double.calls == calls + 1


async def test_one_user_s_answer_is_not_served_to_another_user_of_the_tenant(
    stack: Stack,
) -> None:
    first, colleague = Client(stack, "b1"), Client(stack, "b2")
    asked = f"Is the customer's account closed? {uuid4()}"
    assert _text(await first.ask(asked)) == ANSWER
    calls = stack.double.calls
    theirs = await colleague.ask(asked)
    assert _text(theirs) == ANSWER and "bastion-cache" not in theirs.headers
    assert stack.double.calls == calls + 1  # no hit: the cache does not say who asked what
    only_first = f"A question only the first user asked {uuid4()}"
    assert (await first.ask(only_first)).status_code == 200
    stack.double.mode = "fail"
    _unavailable(await colleague.ask(only_first))
    assert (await first.ask(only_first)).headers["bastion-cache"] == "hit"


async def test_a_request_too_deep_to_key_is_answered_and_never_cached(stack: Stack) -> None:
    client = Client(stack, "b1")
    prompt = f"deep {uuid4()}"
    nested: Any = 1
    for _ in range(MAX_KEY_DEPTH + 1):
        nested = [nested]
    calls = stack.double.calls
    for _ in range(2):
        answer = await client.ask(prompt, x_nested=nested)
        assert _text(answer) == ANSWER and "bastion-cache" not in answer.headers
    assert stack.double.calls == calls + 2


# -- the cache itself: bounds, fairness, canonical keys ---------------------------------


def _completion(text: str = "30 days", finish: str = "stop") -> Completion:
    return Completion(text, finish, Usage(5, 2))


def _key(cache: AnswerCache, tenant: UUID, prompt: str, user: UUID | None = None) -> CacheKey:
    sent = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    return cache.key(tenant, user or tenant, sent=sent)


def test_the_totals_hold_when_more_tenants_than_expected_fill_their_quotas() -> None:
    cache = AnswerCache(max_entries=12, tenant_entries=6)
    small, *large = (uuid4() for _ in range(4))
    cache.put(_key(cache, small, "kept"), _completion())
    cache.put(_key(cache, small, "kept too"), _completion())
    for tenant in large:
        for i in range(10):
            cache.put(_key(cache, tenant, f"q{i}"), _completion())
    assert len(cache) == 12
    # Within its fair share (12 / 4 tenants), the small tenant loses nothing;
    # the others were cut to what is left, most recent kept.
    assert cache.entries_of(small) == 2
    assert sorted(cache.entries_of(t) for t in large) == [3, 3, 4]
    assert cache.fresh(_key(cache, small, "kept")) is not None
    assert cache.fresh(_key(cache, large[0], "q9")) is not None
    assert cache.fresh(_key(cache, large[0], "q0")) is None


def test_memory_is_bounded_in_bytes_per_tenant_and_in_total() -> None:
    cache = AnswerCache(max_bytes=40_000, tenant_bytes=20_000)
    one, other = uuid4(), uuid4()
    big = "x" * 8_000
    for i in range(5):
        cache.put(_key(cache, one, f"q{i}"), _completion(big))
    entry = ENTRY_OVERHEAD_BYTES + sys.getsizeof(big)
    assert cache.entries_of(one) == 20_000 // entry and cache.size_bytes <= 20_000
    cache.put(_key(cache, other, "huge"), _completion("y" * 30_000))  # over any tenant's quota
    assert cache.entries_of(other) == 0 and cache.size_bytes <= 40_000


def test_incomplete_answers_and_tool_calls_are_not_stored() -> None:
    cache = AnswerCache()
    tenant = uuid4()
    for finish in ("length", "content_filter", "tool_calls", "error"):
        cache.put(_key(cache, tenant, finish), _completion("cut", finish))
    call = Completion("", "stop", Usage(1, 1), (ToolCall("c1", "refund", "{}"),))
    cache.put(_key(cache, tenant, "tool"), call)
    assert len(cache) == 0


def test_the_key_is_canonical_scoped_and_unkeyable_requests_are_never_stored() -> None:
    cache = AnswerCache()
    tenant, user, colleague = uuid4(), uuid4(), uuid4()
    sent = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    one = {"model": "m", "seed": 1, "stop": ["."], "messages": [{"role": "user", "content": "a"}]}
    reordered = {"stop": ["."], "messages": [{"content": "a", "role": "user"}], "seed": 1}
    reordered["model"] = "m"
    assert cache.key(tenant, user, sent=sent, request=one) == cache.key(
        tenant, user, sent=sent, request=reordered
    )
    # How the answer is delivered is not part of it; who asks is.
    streamed = {**one, "stream": False, "stream_options": None}
    assert cache.key(tenant, user, sent=sent, request=streamed) == cache.key(
        tenant, user, sent=sent, request=one
    )
    assert cache.key(tenant, colleague, sent=sent) != cache.key(tenant, user, sent=sent)
    shared = AnswerCache(shared_within_tenant=True)
    assert shared.key(tenant, colleague, sent=sent) == shared.key(tenant, user, sent=sent)
    # The key is keyed: another process (or cache) derives other keys.
    assert AnswerCache().key(tenant, user, sent=sent) != cache.key(tenant, user, sent=sent)

    schema: Any = {"type": "string"}  # a tool's parameters, 20 levels deep: keyed
    for _ in range(10):
        schema = {"type": "object", "properties": {"inner": schema}}
    assert cache.key(tenant, user, sent=sent, request={"tools": [schema]}).digest is not None
    deep: Any = 1
    for _ in range(MAX_KEY_DEPTH):
        deep = [deep]
    unkeyable = cache.key(tenant, user, sent=sent, request={"x": deep})
    assert unkeyable.digest is None
    cache.put(unkeyable, _completion())
    assert len(cache) == 0 and cache.stale_fallback(unkeyable) is None


def test_a_shredded_tenant_s_answers_are_forgotten() -> None:
    cache = AnswerCache()
    gone, kept = uuid4(), uuid4()
    for tenant in (gone, kept):
        cache.put(_key(cache, tenant, "q"), _completion())
    cache.forget_tenant(gone)
    assert cache.stale_fallback(_key(cache, gone, "q")) is None
    assert cache.stale_fallback(_key(cache, kept, "q")) is not None and len(cache) == 1


@pytest.mark.parametrize(("words", "finish"), [(3, "length"), (200, "stop")])
async def test_the_local_model_says_when_max_tokens_cut_its_answer(words: int, finish: str) -> None:
    context = "Context:\n[doc:3f1c9a20] The refund for the double charge was sent on 5 March."
    messages = [
        {"role": "system", "content": context},
        {"role": "user", "content": "When was the refund for the double charge sent?"},
    ]
    answer = await LocalProvider("hashing").complete(
        "bastion-local", messages, max_tokens=words, temperature=0
    )
    assert answer.finish_reason == finish
