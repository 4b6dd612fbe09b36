"""Routing a model's calls: weighted targets with a canary, circuit breakers, fallbacks.

* Each request gets a sticky hash (tenant, user, conversation): the same
  conversation keeps landing on the same target, while across conversations
  a canary of weight 5 out of 100 gets ~5 % of the traffic.
* The canary is rolled back automatically when, over a window of calls, its
  error rate exceeds the stable targets' by ``error_margin`` or its p95
  latency exceeds theirs by the factor ``latency_factor``.
* Every target has a circuit breaker (closed → open after ``failures``
  consecutive failures → half-open after ``open_seconds``: one probe decides).
* Fallback targets are tried, in order, after the model's own targets.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.gateway.providers import Provider, Usage
from bastion.logs import get_logger

_log = get_logger("bastion.gateway")


class CircuitBreaker:
    """Closed, open after ``failures`` consecutive failures, half-open after ``open_seconds``."""

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
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.open_seconds else "open"

    def allow(self) -> bool:
        """Whether a call may go to the target now (one probe at a time when half-open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def record(self, ok: bool) -> None:
        self.probing = False
        if ok:
            self.consecutive, self.opened_at = 0, None
            return
        self.consecutive += 1
        if self.opened_at is not None or self.consecutive >= self.threshold:
            self.opened_at = self.clock()  # (re)open: a failed probe waits again


@dataclass(frozen=True)
class Price:
    """A target's list price in USD per million tokens."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, usage: Usage) -> float:
        return (usage.prompt_tokens * self.prompt + usage.completion_tokens * self.completion) / 1e6


@dataclass
class Target:
    name: str
    provider: Provider
    weight: int = 100
    canary: bool = False
    fallback: bool = False
    price: Price = Price()
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    # (ok, latency seconds) of the last calls, for the canary comparison.
    window: deque[tuple[bool, float]] = field(default_factory=lambda: deque(maxlen=200))

    def error_rate(self) -> float:
        return sum(not ok for ok, _ in self.window) / len(self.window) if self.window else 0.0

    def p95(self) -> float:
        latencies = sorted(latency for _, latency in self.window)
        return latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0


def sticky_bucket(key: str) -> float:
    """A stable number in [0, 1) for ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ModelRouter:
    """The targets of one model and the decisions over them."""

    def __init__(
        self,
        targets: list[Target],
        *,
        error_margin: float = 0.05,
        latency_factor: float = 1.5,
        min_samples: int = 20,
    ) -> None:
        if not any(not t.fallback for t in targets):
            raise ValueError("a model needs at least one target that is not a fallback")
        self.targets = targets
        self.error_margin = error_margin
        self.latency_factor = latency_factor
        self.min_samples = min_samples
        self.rolled_back: set[str] = set()

    async def aclose(self) -> None:
        for target in self.targets:
            await target.provider.aclose()

    def _weighted(self) -> list[Target]:
        return [t for t in self.targets if not t.fallback and t.name not in self.rolled_back]

    def candidates(self, sticky_key: str) -> list[Target]:
        """Targets to try, in order: the sticky pick, the other live ones, the fallbacks.

        Targets whose breaker refuses are left out.
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
        return [t for t in (pick, *others, *fallbacks) if t.breaker.allow()]

    def record(self, target: Target, ok: bool, latency: float) -> None:
        target.breaker.record(ok)
        target.window.append((ok, latency))
        if target.canary and target.name not in self.rolled_back:
            self._judge(target)

    def _judge(self, canary: Target) -> None:
        stable = [t for t in self._weighted() if not t.canary]
        if not stable:
            return
        if canary.breaker.state != "closed":  # failing outright: no need to wait for samples
            self._roll_back(canary, "breaker open")
            return
        if len(canary.window) < self.min_samples:
            return
        stable_errors = max(t.error_rate() for t in stable)
        stable_p95 = max(t.p95() for t in stable)
        worse_errors = canary.error_rate() > stable_errors + self.error_margin
        slower = stable_p95 > 0 and canary.p95() > stable_p95 * self.latency_factor
        if worse_errors or slower:
            self._roll_back(
                canary,
                f"error rate {canary.error_rate():.3f} vs {stable_errors:.3f}, "
                f"p95 {canary.p95() * 1000:.1f} ms vs {stable_p95 * 1000:.1f} ms",
            )

    def _roll_back(self, canary: Target, why: str) -> None:
        self.rolled_back.add(canary.name)
        _log.warning("canary_rolled_back", target=canary.name, why=why)
