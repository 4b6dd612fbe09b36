"""Routing a model's calls: weighted targets with a canary, circuit breakers, fallbacks.

* Each request gets a sticky hash (tenant, user, conversation): the same
  conversation keeps landing on the same target, while across conversations
  a canary of weight 5 out of 100 gets ~5 % of the traffic.
* Only the provider's faults count against a target: 5xx, 429, timeouts,
  connection errors and unreadable answers (:attr:`Outcome.FAULT`). A request
  the upstream refused as malformed (:attr:`Outcome.REJECTED`, its 4xx) or a
  call whose caller went away (:attr:`Outcome.ABANDONED`) says nothing about
  the target's health and counts for nothing.
* Every target has a circuit breaker per tenant and a shared one
  (:class:`TargetBreaker`): a tenant's faults open the target for that tenant
  alone; the shared breaker, which opens it for everyone, counts at most
  ``tenant_share`` faults of each tenant, so with the defaults (5 faults, 3 a
  tenant) it takes the faults of two tenants. Whatever one tenant sends, it
  cannot take a target offline for another.
* The canary is rolled back automatically when, over a window of calls, its
  error rate exceeds the stable targets' by ``error_margin`` or its p95
  latency exceeds theirs by the factor ``latency_factor`` — and the verdict
  still stands without the calls of any one tenant — or when its shared
  breaker opens. It is re-admitted, with a fresh window, after a cool-down
  that doubles with each consecutive rollback (up to ``max_cooldown_seconds``).
* Fallback targets are tried, in order, after the model's own targets.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bastion.gateway.providers import Provider, Usage
from bastion.logs import get_logger

_log = get_logger("bastion.gateway")


class Outcome(enum.Enum):
    """How a call to a target ended, as far as the target's health is concerned."""

    ANSWERED = "answered"
    FAULT = "fault"  # the provider's: 5xx, 429, timeout, connection error, bad answer
    REJECTED = "rejected"  # the request's: the upstream refused it (4xx); no verdict
    ABANDONED = "abandoned"  # the caller went away before an outcome; no verdict


class CircuitBreaker:
    """Closed, open after ``failures`` consecutive failures, half-open after ``open_seconds``.

    Half-open lets one probe through; its outcome closes or re-opens the
    breaker. A probe that ends without a verdict gives its turn back
    (:meth:`release`), and one that never reports is presumed lost after
    ``open_seconds``, so a breaker can never stay half-open and shut.
    """

    def __init__(
        self,
        failures: int = 5,
        open_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.open_seconds = open_seconds
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probe_since: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.open_seconds else "open"

    @property
    def probing(self) -> bool:
        """Whether a probe is out (and not yet presumed lost)."""
        return self.probe_since is not None and self.clock() - self.probe_since < self.open_seconds

    def available(self) -> bool:
        """Whether a call could go to the target now, without taking the probe's turn."""
        state = self.state
        return state == "closed" or (state == "half-open" and not self.probing)

    def allow(self) -> bool:
        """Whether a call may go to the target now; half-open, it takes the one probe's turn."""
        if not self.available():
            return False
        if self.state == "half-open":
            self.probe_since = self.clock()
        return True

    def release(self) -> None:
        """The probe ended without a verdict: the next call probes instead."""
        self.probe_since = None

    def record(self, ok: bool) -> None:
        self.probe_since = None
        if ok:
            self.consecutive, self.opened_at = 0, None
            return
        self.consecutive += 1
        if self.opened_at is not None or self.consecutive >= self.threshold:
            self.opened_at = self.clock()  # (re)open: a failed probe waits again


# Tenants whose own breakers a target remembers at most (the least recently
# failing ones are forgotten first); a tenant that succeeds is forgotten at once.
MAX_TENANT_BREAKERS = 4096


@dataclass(frozen=True)
class Probe:
    """Which half-open breakers an admitted call is the probe of."""

    shared: bool = False
    own: CircuitBreaker | None = None


class TargetBreaker:
    """A target's breakers: one per tenant, and a shared one in which each tenant's part is capped.

    * A tenant's faults open the target for that tenant alone: its own
      :class:`CircuitBreaker` (``failures`` consecutive faults, ``open_seconds``).
    * The shared breaker opens the target for every tenant. It counts a run
      of faults, any answer ending the run, in which each tenant counts at
      most ``tenant_share``: it takes ``failures`` counted faults, so the
      faults of ``ceil(failures / tenant_share)`` tenants (2 by default), to
      open it — and, half-open, to open it again. Half-open, it lets through
      one probe per tenant and ``ceil(failures / tenant_share)`` at a time:
      one tenant can neither keep it open after an outage nor hold every
      probe. Whatever one tenant sends, it cannot close a target for another.
    * A call goes through only when both breakers let it.
    """

    def __init__(
        self,
        failures: int = 5,
        open_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        tenant_share: int = 3,
    ) -> None:
        if failures < 1 or tenant_share < 1:
            raise ValueError("failures and tenant_share must be at least 1")
        self.failures = failures
        self.open_seconds = open_seconds
        self.clock = clock
        self.tenant_share = tenant_share
        self.max_probes = -(-failures // tenant_share)
        self.opened_at: float | None = None
        self._run: Counter[str] = Counter()  # each tenant's counted faults in the run
        self._probes: dict[str, float] = {}  # tenant -> since when its probe is out
        self._own: OrderedDict[str, CircuitBreaker] = OrderedDict()

    @property
    def state(self) -> str:
        """The shared breaker's state: the target as every tenant sees it."""
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.open_seconds else "open"

    def state_for(self, tenant: str) -> str:
        """The target as ``tenant`` sees it: the worse of the shared and its own breaker."""
        own = self._own.get(tenant)
        states = {self.state, own.state if own else "closed"}
        return next(s for s in ("open", "half-open", "closed") if s in states)

    def _probing(self) -> dict[str, float]:
        """The probes out, less those presumed lost (out longer than ``open_seconds``)."""
        now = self.clock()
        self._probes = {t: at for t, at in self._probes.items() if now - at < self.open_seconds}
        return self._probes

    def available(self, tenant: str) -> bool:
        """Whether a call of ``tenant`` could go through now (nothing is claimed)."""
        own = self._own.get(tenant)
        if own is not None and not own.available():
            return False
        state = self.state
        if state == "half-open":
            probing = self._probing()
            return tenant not in probing and len(probing) < self.max_probes
        return state == "closed"

    def admit(self, tenant: str) -> Probe | None:
        """Let a call of ``tenant`` through, or None; say which probes the call is."""
        if not self.available(tenant):
            return None
        shared = self.state == "half-open"
        if shared:
            self._probes[tenant] = self.clock()
        own = self._own.get(tenant)
        own_probe = own is not None and own.state == "half-open" and own.allow()
        return Probe(shared, own if own_probe else None)

    def record(self, tenant: str, outcome: Outcome, probe: Probe | None = None) -> None:
        if probe is not None and probe.shared:
            self._probes.pop(tenant, None)
        if outcome is Outcome.ANSWERED:
            self.opened_at = None
            self._run.clear()
            self._own.pop(tenant, None)  # closed again: nothing to remember
            return
        if outcome is not Outcome.FAULT:
            if probe is not None and probe.own is not None:
                probe.own.release()  # no verdict: the tenant's next call probes instead
            return
        own = self._own.pop(tenant, None) or CircuitBreaker(
            self.failures, self.open_seconds, self.clock
        )
        own.record(False)
        self._own[tenant] = own  # the most recently failing last
        while len(self._own) > MAX_TENANT_BREAKERS:
            self._own.popitem(last=False)
        if self._run[tenant] >= self.tenant_share:
            return  # past its share: its faults decide nothing for other tenants
        self._run[tenant] += 1
        if self.state != "open" and sum(self._run.values()) >= self.failures:
            self.opened_at = self.clock()  # (re)open; the next run starts afresh
            self._run.clear()
            self._probes.clear()


@dataclass(frozen=True)
class Price:
    """A target's list price in micro-USD per million tokens (money is integers)."""

    prompt: int = 0
    completion: int = 0

    def cost(self, usage: Usage) -> int:
        """Return the call's cost in micro-USD, rounded up to a whole micro-USD."""
        scaled = usage.prompt_tokens * self.prompt + usage.completion_tokens * self.completion
        return -(-scaled // 1_000_000)


@dataclass(frozen=True)
class Sample:
    """One judged call: whether it answered, how long it took, whose it was."""

    ok: bool
    latency: float
    tenant: str


@dataclass
class Target:
    name: str
    provider: Provider
    weight: int = 100
    canary: bool = False
    fallback: bool = False
    price: Price = Price()
    breaker: TargetBreaker = field(default_factory=TargetBreaker)
    # Who serves it, as ``bastion incident serve-cached --provider`` names it:
    # the upstream's host, or ``local``.
    provider_name: str = ""
    # The last calls, for the canary comparison.
    window: deque[Sample] = field(default_factory=lambda: deque(maxlen=200))

    def error_rate(self) -> float:
        return sum(not s.ok for s in self.window) / len(self.window) if self.window else 0.0

    def p95(self) -> float:
        latencies = sorted(s.latency for s in self.window)
        return latencies[_p95_index(len(latencies))] if latencies else 0.0


def _p95_index(count: int) -> int:
    return int(0.95 * (count - 1))


def sticky_bucket(key: str) -> float:
    """A stable number in [0, 1) for ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Admission:
    """A call let through to ``target`` for ``tenant``; :meth:`ModelRouter.record` ends it."""

    target: Target
    tenant: str
    probe: Probe = Probe()


@dataclass
class _Tally:
    """Counts of a window's calls, whole and per tenant, against one latency threshold."""

    calls: int = 0
    failures: int = 0
    slow: int = 0
    by_tenant: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def _tally(window: Iterable[Sample], slow_above: float | None) -> _Tally:
    tally = _Tally()
    for s in window:
        failed = not s.ok
        slow = slow_above is not None and s.latency > slow_above
        calls, failures, slows = tally.by_tenant.get(s.tenant, (0, 0, 0))
        tally.by_tenant[s.tenant] = (calls + 1, failures + failed, slows + slow)
        tally.calls += 1
        tally.failures += failed
        tally.slow += slow
    return tally


def _least_error_rate(window: Iterable[Sample]) -> float:
    """The window's error rate without the one tenant that raises it most."""
    tally = _tally(window, None)
    rates = [tally.failures / tally.calls] if tally.calls else [0.0]
    rates += [
        (tally.failures - failures) / (tally.calls - calls)
        for calls, failures, _ in tally.by_tenant.values()
        if calls < tally.calls
    ]
    return min(rates)


class ModelRouter:
    """The targets of one model and the decisions over them."""

    def __init__(
        self,
        targets: list[Target],
        *,
        error_margin: float = 0.05,
        latency_factor: float = 1.5,
        min_samples: int = 20,
        cooldown_seconds: float = 300.0,
        max_cooldown_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not any(not t.fallback for t in targets):
            raise ValueError("a model needs at least one target that is not a fallback")
        self.targets = targets
        self.error_margin = error_margin
        self.latency_factor = latency_factor
        self.min_samples = min_samples
        self.cooldown_seconds = cooldown_seconds
        self.max_cooldown_seconds = max_cooldown_seconds
        self.clock = clock
        self.rolled_back: set[str] = set()
        self._readmit_at: dict[str, float] = {}
        self._rollbacks: Counter[str] = Counter()  # consecutive, for the cool-down's length

    async def aclose(self) -> None:
        for target in self.targets:
            await target.provider.aclose()

    def _weighted(self) -> list[Target]:
        if self.rolled_back:
            self._readmit_due()
        return [t for t in self.targets if not t.fallback and t.name not in self.rolled_back]

    def candidates(self, sticky_key: str, tenant: str = "") -> list[Target]:
        """Targets to try, in order: the sticky pick, the other live ones, the fallbacks.

        Targets whose breakers are open for ``tenant`` are left out; none is
        claimed here (a half-open target's probe is taken by :meth:`admit`,
        right before its call).
        """
        weighted = self._weighted()
        total = sum(t.weight for t in weighted)
        point = sticky_bucket(sticky_key) * total
        pick = weighted[-1]
        for target in weighted:
            if point < target.weight:
                pick = target
                break
            point -= target.weight
        others = [t for t in weighted if t is not pick and not t.canary]
        fallbacks = [t for t in self.targets if t.fallback]
        return [t for t in (pick, *others, *fallbacks) if t.breaker.available(tenant)]

    def admit(self, target: Target, tenant: str = "") -> Admission | None:
        """Let one call of ``tenant`` go to ``target`` now, or None (its breaker refuses)."""
        probe = target.breaker.admit(tenant)
        return None if probe is None else Admission(target, tenant, probe)

    def record(self, admission: Admission, outcome: Outcome, latency: float) -> None:
        """The admitted call ended: its breakers and the canary's verdict learn from it."""
        target, tenant = admission.target, admission.tenant
        target.breaker.record(tenant, outcome, admission.probe)
        if outcome not in (Outcome.ANSWERED, Outcome.FAULT):
            return  # the request's fault, or nobody waited: no evidence either way
        target.window.append(Sample(outcome is Outcome.ANSWERED, latency, tenant))
        if target.canary and target.name not in self.rolled_back:
            self._judge(target)

    def _judge(self, canary: Target) -> None:
        stable = [t for t in self._weighted() if not t.canary]
        if not stable:
            return
        if canary.breaker.state == "open":  # failing outright, for several tenants
            self._roll_back(canary, "breaker open")
            return
        if len(canary.window) < self.min_samples:
            return
        stable_errors = max(_least_error_rate(t.window) for t in stable)
        stable_p95 = max(t.p95() for t in stable)
        slow_above = stable_p95 * self.latency_factor if stable_p95 > 0 else None
        tally = _tally(canary.window, slow_above)
        worse = self._worse(tally.calls, tally.failures, tally.slow, stable_errors)
        if not worse:
            if len(canary.window) == canary.window.maxlen:
                self._rollbacks.pop(canary.name, None)  # a full healthy window: forgiven
            return
        # One tenant's calls (crafted to fail, or to be slow) never decide alone.
        for calls, failures, slow in tally.by_tenant.values():
            if not self._worse(
                tally.calls - calls, tally.failures - failures, tally.slow - slow, stable_errors
            ):
                return
        self._roll_back(
            canary,
            f"{worse}: error rate {canary.error_rate():.3f} vs {stable_errors:.3f}, "
            f"p95 {canary.p95() * 1000:.1f} ms vs {stable_p95 * 1000:.1f} ms",
        )

    def _worse(self, calls: int, failures: int, slow: int, stable_errors: float) -> str | None:
        """Why ``calls`` canary calls are worse than the stable targets, or None."""
        if calls < self.min_samples:
            return None
        if failures / calls > stable_errors + self.error_margin:
            return "errors"
        # p95 above the threshold: the sorted p95 index falls among the slow calls.
        if slow and slow >= calls - _p95_index(calls):
            return "latency"
        return None

    def _roll_back(self, canary: Target, why: str) -> None:
        self._rollbacks[canary.name] += 1
        cooldown = min(
            self.cooldown_seconds * 2 ** (self._rollbacks[canary.name] - 1),
            self.max_cooldown_seconds,
        )
        self.rolled_back.add(canary.name)
        self._readmit_at[canary.name] = self.clock() + cooldown
        _log.warning("canary_rolled_back", target=canary.name, why=why, cooldown_s=cooldown)

    def _readmit_due(self) -> None:
        now = self.clock()
        for target in self.targets:
            if target.name in self.rolled_back and now >= self._readmit_at.get(target.name, 0.0):
                self.rolled_back.discard(target.name)
                target.window.clear()  # a fresh verdict, on its calls from now on
                _log.info("canary_readmitted", target=target.name)
