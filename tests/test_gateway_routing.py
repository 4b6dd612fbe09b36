"""Routing decisions: the canary's share and stickiness, automatic rollback,
the circuit breaker's states, fallbacks last, and the tenant-scoped cache."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast
from uuid import UUID, uuid4

import pytest

from bastion.api.problems import status_of
from bastion.billing.plans import Entitlements
from bastion.gateway.cache import AnswerCache, CacheKey
from bastion.gateway.entitlements import ModelNotInPlan, PlanGate, RateLimited
from bastion.gateway.ledger import CallLedger
from bastion.gateway.providers import Completion, LocalProvider, Usage
from bastion.gateway.routing import (
    Admission,
    CircuitBreaker,
    ModelRouter,
    Outcome,
    Target,
    TargetBreaker,
)
from bastion.gateway.service import GatewayService


def _targets(canary_weight: int = 5) -> list[Target]:
    provider = LocalProvider("hashing")
    return [
        Target("stable", provider, weight=100 - canary_weight),
        Target("canary", provider, weight=canary_weight, canary=True),
        Target("fallback", provider, fallback=True),
    ]


def _record(router: ModelRouter, target: Target, ok: bool, latency: float, tenant: str) -> None:
    """One call of ``tenant`` to ``target`` that answered (``ok``) or failed."""
    outcome = Outcome.ANSWERED if ok else Outcome.FAULT
    router.record(Admission(target, tenant), outcome, latency)


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
    for i in range(40):
        _record(router, stable, True, 0.010, f"t{i % 4}")
    for i in range(40):  # a third fail, never 5 in a row, from four tenants
        _record(router, canary, i % 3 != 0, 0.010, f"t{i % 4}")
        if router.rolled_back:
            break
    assert router.rolled_back == {"canary"}
    assert all(t.name != "canary" for i in range(200) for t in router.candidates(str(i)))


def test_canary_with_a_slow_p95_is_rolled_back_and_a_good_one_is_kept() -> None:
    good = ModelRouter(_targets(), min_samples=20)
    for i in range(40):
        _record(good, good.targets[0], True, 0.010, f"t{i % 4}")
        _record(good, good.targets[1], True, 0.012, f"t{i % 4}")
    assert good.rolled_back == set()
    slow = ModelRouter(_targets(), min_samples=20)
    for i in range(40):
        _record(slow, slow.targets[0], True, 0.010, f"t{i % 4}")
        _record(slow, slow.targets[1], True, 0.040, f"t{i % 4}")
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
        _record(router, stable, False, 0.01, "a")
    # Open for the tenant whose calls failed; for another, a tenant's faults count
    # only so far (they need another tenant's to open the target for everyone).
    assert [t.name for t in router.candidates("x", "a")] == ["fallback"]
    assert [t.name for t in router.candidates("x", "b")] == ["stable", "fallback"]
    for _ in range(2):
        _record(router, stable, False, 0.01, "b")
    assert [t.name for t in router.candidates("x", "c")] == ["fallback"]


def test_a_model_needs_a_target_that_is_not_a_fallback() -> None:
    with pytest.raises(ValueError):
        ModelRouter([Target("only", LocalProvider("hashing"), fallback=True)])


# -- one tenant cannot decide for another (issue 23, A1) ---------------------------------


def _clocked(**kw: float) -> tuple[list[float], TargetBreaker]:
    now = [0.0]
    return now, TargetBreaker(clock=lambda: now[0], **kw)  # type: ignore[arg-type]


def test_a_tenant_s_faults_open_a_target_for_itself_and_count_only_a_share_for_all() -> None:
    _now, breaker = _clocked()
    for _ in range(100):
        if breaker.admit("a") is not None:
            breaker.record("a", Outcome.FAULT)
    assert breaker.state_for("a") == "open" and breaker.admit("a") is None
    assert breaker.state == "closed" and breaker.admit("b") is not None
    breaker.record("b", Outcome.FAULT)  # a's three and b's one: still not five
    assert breaker.state == "closed"
    breaker.record("b", Outcome.FAULT)  # two tenants' faults: open for everyone
    assert breaker.state == "open" and breaker.admit("c") is None


def test_rejected_and_abandoned_calls_are_no_evidence_and_give_their_probe_back() -> None:
    now, breaker = _clocked(open_seconds=10)
    for tenant in ("a", "a", "a", "b", "b"):
        breaker.record(tenant, Outcome.FAULT)
    assert breaker.state == "open"
    now[0] = 10.0
    for outcome in (Outcome.REJECTED, Outcome.ABANDONED):
        for tenant in ("a", "b"):  # one probe a tenant, two at a time
            probe = breaker.admit(tenant)
            assert probe is not None and probe.shared
            assert breaker.admit(tenant) is None
            breaker.record(tenant, outcome, probe)
        assert breaker.state == "half-open"  # no verdict either way
    probe = breaker.admit("c")
    assert probe is not None
    breaker.record("c", Outcome.ANSWERED, probe)
    assert breaker.state == "closed"


def test_a_probe_that_never_reports_is_presumed_lost() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, open_seconds=10, clock=lambda: now[0])
    breaker.record(False)
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()
    now[0] = 20.0  # the probe's caller vanished without a word
    assert breaker.allow()


def test_after_an_outage_one_tenant_cannot_keep_the_target_shut() -> None:
    now, breaker = _clocked(open_seconds=10)
    for tenant in ("b", "c", "b", "c", "b"):
        breaker.record(tenant, Outcome.FAULT)
    assert breaker.state == "open"
    now[0] = 10.0
    for _ in range(3):  # the upstream is back; a's crafted requests still fail
        probe = breaker.admit("a")
        if probe is not None:
            breaker.record("a", Outcome.FAULT, probe)
    assert breaker.state == "half-open"
    probe = breaker.admit("b")
    assert probe is not None
    breaker.record("b", Outcome.ANSWERED, probe)
    assert breaker.state == "closed"


def _judged(faulty: tuple[str, ...], slow: tuple[str, ...] = ()) -> ModelRouter:
    """A canary after 60 calls of tenants t0..t3 (and 20 of its own for ``attacker``):
    the calls of the tenants in ``faulty`` fail, those in ``slow`` are slow."""
    router = ModelRouter(_targets(), min_samples=20)
    stable, canary, _ = router.targets
    for i in range(60):
        _record(router, stable, True, 0.010, f"t{i % 4}")
    for i in range(80):
        tenant = f"t{i % 4}" if i < 60 else "attacker"
        latency = 0.050 if tenant in slow else 0.010
        _record(router, canary, tenant not in faulty, latency, tenant)
    return router


def test_one_tenant_never_decides_a_canary_s_rollback() -> None:
    assert _judged(faulty=("attacker",)).rolled_back == set()
    assert _judged(faulty=(), slow=("attacker",)).rolled_back == set()
    # The same calls failing for two tenants is the canary's doing.
    assert _judged(faulty=("t0", "t1")).rolled_back == {"canary"}
    assert _judged(faulty=(), slow=("t0", "t1")).rolled_back == {"canary"}


def test_a_rolled_back_canary_returns_after_a_cooldown_that_doubles() -> None:
    now = [0.0]
    router = ModelRouter(
        _targets(canary_weight=50), min_samples=20, cooldown_seconds=60, clock=lambda: now[0]
    )
    stable, canary, _ = router.targets
    conversations = [f"t|u|{i}" for i in range(40)]

    def canary_served() -> bool:
        return any(router.candidates(key)[0] is canary for key in conversations)

    for cooldown in (60, 120):
        for i in range(40):
            _record(router, stable, True, 0.010, f"t{i % 4}")
            _record(router, canary, i % 2 == 0, 0.010, f"t{i % 4}")
            if router.rolled_back:
                break
        assert router.rolled_back == {"canary"} and not canary_served()
        now[0] += cooldown - 1
        assert not canary_served()
        now[0] += 1
        assert canary_served() and router.rolled_back == set()
        assert len(canary.window) == 0  # judged afresh


def test_a_readmitted_canary_is_not_sent_back_by_one_tenant_s_probe() -> None:
    now = [0.0]
    router = ModelRouter(_targets(canary_weight=50), cooldown_seconds=60, clock=lambda: now[0])
    canary = router.targets[1]
    canary.breaker = TargetBreaker(clock=lambda: now[0])
    for tenant in ("t0", "t1", "t0", "t1", "t0"):  # an outage: its breaker opens
        _record(router, canary, False, 0.01, tenant)
    assert router.rolled_back == {"canary"}
    now[0] = 60.0  # re-admitted, its breaker half-open
    router.candidates("t|u|x", "attacker")
    assert router.rolled_back == set()
    for _ in range(3):
        probe = router.admit(canary, "attacker")
        if probe is not None:
            router.record(probe, Outcome.FAULT, 0.01)
    assert router.rolled_back == set() and canary.breaker.state == "half-open"
    probe = router.admit(canary, "t1")
    assert probe is not None
    router.record(probe, Outcome.ANSWERED, 0.01)
    assert canary.breaker.state == "closed" and router.rolled_back == set()


def test_cache_is_per_tenant_ttl_and_size_capped() -> None:
    now = [0.0]
    cache = AnswerCache(max_entries=2, ttl_seconds=10, stale_seconds=100, clock=lambda: now[0])
    a, b, user = uuid4(), uuid4(), uuid4()
    messages = [{"role": "user", "content": "What is the refund policy?"}]

    def key(tenant: UUID, model: str = "m", content: str = messages[0]["content"]) -> CacheKey:
        sent = {"model": model, "messages": [{"role": "user", "content": content}]}
        return cache.key(tenant, user, sent=sent)

    answer = Completion("30 days", "stop", Usage(5, 2))
    cache.put(key(a), answer)
    assert cache.fresh(key(a)) == answer
    # Another tenant or model is another key; so is other whitespace (code, poems…).
    assert cache.fresh(key(b)) is None
    assert cache.fresh(key(a, "other")) is None
    assert cache.fresh(key(a, content="What is  the refund policy?")) is None
    now[0] = 50
    assert cache.fresh(key(a)) is None
    assert cache.stale_fallback(key(a)) == answer
    for i in range(3):
        cache.put(key(a, content=f"q{i}"), answer)
    assert len(cache) == 2


def test_the_configured_cache_is_kept_even_while_empty() -> None:
    # An empty cache is falsy (it has a length): "cache or default" once dropped it.
    cache = AnswerCache(ttl_seconds=0)
    # No database is touched: the ledger only lends its handle to the egress policies.
    service = GatewayService(cast(CallLedger, SimpleNamespace(db=None)), {}, cache)
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
    assert status_of(refused.value) == 403


@pytest.mark.anyio
async def test_the_plan_gate_limits_requests_per_minute_with_retry_after() -> None:
    now = [1000.0]
    gate = PlanGate(lambda _tenant: _async(_entitlements(3, ("*",))), clock=lambda: now[0])
    tenant, other = uuid4(), uuid4()
    for _ in range(3):
        await gate.admit(tenant, "m")
    with pytest.raises(RateLimited) as limited:
        await gate.admit(tenant, "m")
    assert status_of(limited.value) == 429 and limited.value.retry_after == 60
    await gate.admit(other, "m")  # another tenant has its own window
    now[0] += 45
    with pytest.raises(RateLimited) as later:
        await gate.admit(tenant, "m")
    assert later.value.retry_after == 15
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


@pytest.mark.anyio
async def test_requests_that_fetch_the_plan_at_once_share_one_window() -> None:
    # Each request that found no entitlements fetched them and counted in a
    # window of its own, which the next fetch replaced: a burst of first
    # requests all passed a limit of 3 per minute.
    async def lookup(_tenant: object) -> Entitlements:
        await asyncio.sleep(0)  # the database answers later
        return _entitlements(3, ("*",))

    gate = PlanGate(lookup)
    tenant = uuid4()
    outcomes = await asyncio.gather(
        *(gate.admit(tenant, "m") for _ in range(10)), return_exceptions=True
    )
    assert outcomes.count(None) == 3
    assert all(isinstance(o, RateLimited) for o in outcomes if o is not None)
