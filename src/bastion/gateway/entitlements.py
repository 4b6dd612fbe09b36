"""The plan's limits at the gateway: models allowed and requests per minute
(CHECKLIST P1, P3).

A tenant's entitlements come from its subscription's plan (``lookup``:
:meth:`bastion.billing.service.BillingService.entitlements`) and are kept for
``ttl_seconds`` per process, so a plan change holds at the gateway within that
time (the budget's new limits hold within the ledger's lease time).

Requests per minute are counted per process in a sliding window of 60 s: with
N gateway processes a tenant may get up to N times its rate. The rate smooths
bursts; the budget, enforced in PostgreSQL, is the hard cap.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from bastion.billing.plans import Entitlements
from bastion.errors import BastionError, Kind

WINDOW_SECONDS = 60.0


class ModelNotInPlan(BastionError):
    slug = "model-not-in-plan"
    title = "The tenant's plan does not include this model"
    kind = Kind.FORBIDDEN


class RateLimited(BastionError):
    slug = "rate-limited"
    title = "Too many requests for the tenant's plan"
    kind = Kind.RATE_LIMITED


@dataclass(frozen=True)
class _Tenant:
    entitlements: Entitlements
    fetched: float


class PlanGate:
    def __init__(
        self,
        lookup: Callable[[UUID], Awaitable[Entitlements]],
        *,
        ttl_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup
        self.ttl = ttl_seconds
        self.clock = clock
        self._tenants: dict[UUID, _Tenant] = {}
        # Each tenant's window, apart from its entitlements: requests that
        # fetch the entitlements at once must count in one window, not each
        # in a window of its own that the last fetch replaces.
        self._calls: dict[UUID, deque[float]] = {}

    async def _current(self, tenant_id: UUID) -> _Tenant:
        now = self.clock()
        known = self._tenants.get(tenant_id)
        if known is None or now - known.fetched >= self.ttl:
            entitlements = await self.lookup(tenant_id)
            known = self._tenants[tenant_id] = _Tenant(entitlements, now)
        return known

    async def admit(self, tenant_id: UUID, model: str) -> None:
        """Count the call, or raise :class:`ModelNotInPlan` / :class:`RateLimited`."""
        tenant = await self._current(tenant_id)
        allowed = tenant.entitlements.models_allowed
        if "*" not in allowed and model not in allowed:
            raise ModelNotInPlan(
                "the tenant's plan does not include that model",
                plan=tenant.entitlements.plan,
            )
        now = self.clock()
        calls = self._calls.setdefault(tenant_id, deque())
        while calls and now - calls[0] >= WINDOW_SECONDS:
            calls.popleft()
        if len(calls) >= tenant.entitlements.requests_per_minute:
            retry_after = max(1, math.ceil(WINDOW_SECONDS - (now - calls[0]) if calls else 60))
            problem = RateLimited(
                f"the {tenant.entitlements.plan!r} plan allows "
                f"{tenant.entitlements.requests_per_minute} requests per minute",
                retry_after=retry_after,
            )
            problem.extensions["retry_after"] = retry_after  # in the body too, as ever
            raise problem
        calls.append(now)
