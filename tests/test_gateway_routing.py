"""Routing decisions: the canary's share and stickiness, automatic rollback,
the circuit breaker's states, fallbacks last, and the tenant-scoped cache."""

from __future__ import annotations

from typing import cast
from uuid import uuid4

import pytest

from bastion.billing.plans import Entitlements
from bastion.gateway.cache import AnswerCache, cache_key
from bastion.gateway.entitlements import ModelNotInPlan, PlanGate, RateLimited
from bastion.gateway.ledger import CallLedger
from bastion.gateway.providers import Completion, LocalProvider, Usage
from bastion.gateway.routing import CircuitBreaker, ModelRouter, Target
from bastion.gateway.service import GatewayService


def _targets(canary_weight: int = 5) -> list[Target]:
    provider = LocalProvider("hashing")
    return [
        Target("stable", provider, weight=100 - canary_weight),
        Target("canary", provider, weight=canary_weight, canary=True),
        Target("fallback", provider, fallback=True),
    ]


def test_canary_gets_five_percent_of_2000_conversations() -> None:
    router = ModelRouter(_targets())
    picks = [router.candidates(f"tenant|user|conversation {i}")[0].name for i in range(2000)]
    share = picks.count("canary") / len(picks)
    assert 0.035 <= share <= 0.065, share


def test_a_conversation_sticks_to_its_target_and_fallbacks_come_last() -> None:
    router = ModelRouter(_targets(canary_weight=50))
    for i in range(50):
        key = f"t|u|{i}"
        first = [t.name for t in router.candidates(key)]
        assert [t.name for t in router.candidates(key)] == first
        assert first[-1] == "fallback"
        assert first[0] in ("stable", "canary")
        # The canary is never a second choice: a stable call never lands on it.
        assert "canary" not in first[1:]


def test_canary_with_more_errors_is_rolled_back() -> None:
    router = ModelRouter(_targets(), min_samples=20)
    stable, canary, _ = router.targets
    for _ in range(40):
        router.record(stable, True, 0.010)
    for i in range(20):
        router.record(canary, i % 3 != 0, 0.010)  # a third fail, never 5 in a row
    assert router.rolled_back == {"canary"}
    assert all(t.name != "canary" for i in range(200) for t in router.candidates(str(i)))


def test_canary_with_a_slow_p95_is_rolled_back_and_a_good_one_is_kept() -> None:
    good = ModelRouter(_targets(), min_samples=20)
    for _ in range(40):
        good.record(good.targets[0], True, 0.010)
        good.record(good.targets[1], True, 0.012)
    assert good.rolled_back == set()
    slow = ModelRouter(_targets(), min_samples=20)
    for _ in range(40):
        slow.record(slow.targets[0], True, 0.010)
        slow.record(slow.targets[1], True, 0.040)
    assert slow.rolled_back == {"canary"}


def test_breaker_opens_half_opens_with_one_probe_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, open_seconds=10, clock=lambda: now[0])
    for _ in range(2):
        breaker.record(False)
    assert breaker.state == "closed" and breaker.allow()
    breaker.record(False)
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.5
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record(False)  # the probe failed: open again, for another 10 s
    assert breaker.state == "open"
    now[0] = 21.0
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed" and breaker.allow()


def test_open_breakers_are_skipped() -> None:
    router = ModelRouter(_targets(canary_weight=0))
    stable = router.targets[0]
    for _ in range(5):
        router.record(stable, False, 0.01)
    assert [t.name for t in router.candidates("x")] == ["fallback"]


def test_a_model_needs_a_target_that_is_not_a_fallback() -> None:
    with pytest.raises(ValueError):
        ModelRouter([Target("only", LocalProvider("hashing"), fallback=True)])


def test_cache_is_per_tenant_ttl_and_size_capped() -> None:
    now = [0.0]
    cache = AnswerCache(max_entries=2, ttl_seconds=10, stale_seconds=100, clock=lambda: now[0])
    a, b = uuid4(), uuid4()
    messages = [{"role": "user", "content": "What is  the refund policy?"}]
    answer = Completion("30 days", "stop", Usage(5, 2))
    cache.put(cache_key(a, "m", messages), answer)
    assert cache.fresh(cache_key(a, "m", messages)) == answer
    # Whitespace is normalised; another tenant or model is another key.
    same = [{"role": "user", "content": "What is the refund policy?"}]
    assert cache.fresh(cache_key(a, "m", same)) == answer
    assert cache.fresh(cache_key(b, "m", messages)) is None
    assert cache.fresh(cache_key(a, "other", messages)) is None
    now[0] = 50
    assert cache.fresh(cache_key(a, "m", messages)) is None
    assert cache.stale_fallback(cache_key(a, "m", messages)) == answer
    for i in range(3):
        cache.put(f"k{i}", answer)
    assert len(cache) == 2


def test_the_configured_cache_is_kept_even_while_empty() -> None:
    # An empty cache is falsy (it has a length): "cache or default" once dropped it.
    cache = AnswerCache(ttl_seconds=0)
    service = GatewayService(cast(CallLedger, None), {}, cache)
    assert service.cache is cache


def _entitlements(rpm: int, models: tuple[str, ...]) -> Entitlements:
    return Entitlements("pro", "active", 10**6, 10**4, rpm, models, "block")


@pytest.mark.anyio
async def test_the_plan_gate_refuses_models_outside_the_plan() -> None:
    gate = PlanGate(lambda _tenant: _async(_entitlements(100, ("bastion-local",))))
    tenant = uuid4()
    await gate.admit(tenant, "bastion-local")
    with pytest.raises(ModelNotInPlan) as refused:
        await gate.admit(tenant, "gpt-big")
    assert refused.value.status == 403


@pytest.mark.anyio
async def test_the_plan_gate_limits_requests_per_minute_with_retry_after() -> None:
    now = [1000.0]
    gate = PlanGate(lambda _tenant: _async(_entitlements(3, ("*",))), clock=lambda: now[0])
    tenant, other = uuid4(), uuid4()
    for _ in range(3):
        await gate.admit(tenant, "m")
    with pytest.raises(RateLimited) as limited:
        await gate.admit(tenant, "m")
    assert limited.value.status == 429 and limited.value.headers["Retry-After"] == "60"
    await gate.admit(other, "m")  # another tenant has its own window
    now[0] += 45
    with pytest.raises(RateLimited) as later:
        await gate.admit(tenant, "m")
    assert later.value.headers["Retry-After"] == "15"
    now[0] += 15
    await gate.admit(tenant, "m")  # the first calls left the window


@pytest.mark.anyio
async def test_a_plan_change_reaches_the_gate_within_its_ttl() -> None:
    now = [0.0]
    plan = {"models": ("*",)}
    gate = PlanGate(
        lambda _tenant: _async(_entitlements(100, plan["models"])),
        ttl_seconds=10,
        clock=lambda: now[0],
    )
    tenant = uuid4()
    await gate.admit(tenant, "gpt-big")
    plan["models"] = ("bastion-local",)  # downgraded
    now[0] += 9.9
    await gate.admit(tenant, "gpt-big")  # still the cached entitlements
    now[0] += 0.1
    with pytest.raises(ModelNotInPlan):
        await gate.admit(tenant, "gpt-big")


async def _async(value: Entitlements) -> Entitlements:
    return value
