"""Prompt sampling with consent on both sides (issue 6, §8 Traces).

The gateway's log line for a call carries no prompt text, unless the tenant's
owner set a sampling rate above zero *and* the calling user consented; then a
share ``rate`` of that user's calls log the prompt as it was sent to the
provider (personal data already replaced by vault tokens), never the answer.
Off by default: no rate row is rate 0, no consent row is no consent.

The gateway asks :meth:`PromptSampling.sampled` on every call; the answer for
a (tenant, user) is kept ``ttl_seconds``, so a withdrawn consent or a lowered
rate takes effect in every gateway process within that time.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from bastion import audit
from bastion.db.pool import Database

MAX_CACHED = 10_000  # (tenant, user) answers kept before the cache is emptied


@dataclass(frozen=True)
class SamplingRate:
    """A tenant's sampling rate (0 when never set)."""

    rate: float
    set_by: UUID | None = None
    updated_at: datetime | None = None


def valid_rate(rate: float) -> float:
    """``rate`` as a float in [0, 1]; raise ValueError otherwise (NaN, bool, out of range)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ValueError("the rate must be a number between 0 and 1")
    value = float(rate)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError("the rate must be a number between 0 and 1")
    return value


class PromptSampling:
    """Decides whether a call's prompt is sampled; the owner's rate and the user's consent."""

    def __init__(
        self,
        db: Database,
        ttl_seconds: float = 10,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.ttl_seconds = ttl_seconds
        self.rng = rng
        # (tenant, user) -> (expires at, rate, consented)
        self._cache: dict[tuple[UUID, UUID], tuple[float, float, bool]] = {}

    async def sampled(self, tenant_id: UUID, user_id: UUID) -> bool:
        """True when this call's prompt may be logged: rate > 0, consent, and the draw."""
        rate, consented = await self._lookup(tenant_id, user_id)
        return rate > 0 and consented and self.rng() < rate

    async def _lookup(self, tenant_id: UUID, user_id: UUID) -> tuple[float, bool]:
        key = (tenant_id, user_id)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            row = await (
                await tx.execute(
                    "SELECT coalesce((SELECT rate FROM bastion.prompt_sampling), 0) AS rate, "
                    "EXISTS (SELECT 1 FROM bastion.prompt_sampling_consents "
                    "WHERE user_id = %s) AS consented",
                    (user_id,),
                )
            ).fetchone()
        rate, consented = (float(row["rate"]), bool(row["consented"])) if row else (0.0, False)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (now + self.ttl_seconds, rate, consented)
        return rate, consented

    def _forget(self, tenant_id: UUID, user_id: UUID | None = None) -> None:
        """Drop this process's cached answers (other processes wait for the TTL)."""
        for key in [k for k in self._cache if k[0] == tenant_id and user_id in (None, k[1])]:
            del self._cache[key]

    # -- the owner's rate --------------------------------------------------------------

    async def rate(self, tenant_id: UUID, actor: UUID, role: str) -> SamplingRate:
        """The tenant's rate as ``actor`` (an owner or auditor) reads it."""
        async with self.db.tenant_tx(tenant_id, actor, role) as tx:
            row = await (
                await tx.execute("SELECT rate, set_by, updated_at FROM bastion.prompt_sampling")
            ).fetchone()
        if row is None:
            return SamplingRate(0.0)
        return SamplingRate(float(row["rate"]), row["set_by"], row["updated_at"])

    async def set_rate(self, tenant_id: UUID, actor: UUID, rate: float) -> SamplingRate:
        """Set the tenant's rate as its owner ``actor``; audited in the same transaction.

        Raises ValueError for a rate outside [0, 1] (nothing is written).
        """
        value = valid_rate(rate)
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            row = await (
                await tx.execute(
                    "INSERT INTO bastion.prompt_sampling (tenant_id, rate, set_by) "
                    "VALUES (%s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE "
                    "SET rate = excluded.rate, set_by = excluded.set_by, updated_at = now() "
                    "RETURNING rate, set_by, updated_at",
                    (tenant_id, value, actor),
                )
            ).fetchone()
            assert row is not None
            await audit.record(
                tx,
                actor=f"user:{actor}",
                action="sampling.configure",
                target=f"tenant:{tenant_id}",
                details={"rate": value},
            )
        self._forget(tenant_id)
        return SamplingRate(float(row["rate"]), row["set_by"], row["updated_at"])

    # -- the user's consent ------------------------------------------------------------

    async def consent(self, tenant_id: UUID, user_id: UUID, role: str = "viewer") -> bool:
        """Record ``user_id``'s consent; True if it is new. Audited in the same transaction."""
        return await self._change_consent(
            tenant_id,
            user_id,
            role,
            "INSERT INTO bastion.prompt_sampling_consents (tenant_id, user_id) "
            "VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (tenant_id, user_id),
            "sampling.consent",
        )

    async def withdraw(self, tenant_id: UUID, user_id: UUID, role: str = "viewer") -> bool:
        """Withdraw ``user_id``'s consent; True if there was one. Audited likewise."""
        return await self._change_consent(
            tenant_id,
            user_id,
            role,
            "DELETE FROM bastion.prompt_sampling_consents WHERE user_id = %s",
            (user_id,),
            "sampling.withdraw",
        )

    async def _change_consent(
        self,
        tenant_id: UUID,
        user_id: UUID,
        role: str,
        statement: str,
        params: tuple[UUID, ...],
        action: str,
    ) -> bool:
        # As the user themself: RLS lets a consent row be written only by the user it names.
        async with self.db.tenant_tx(tenant_id, user_id, role) as tx:
            changed = await tx.execute(statement, params)
            if changed.rowcount:
                await audit.record(
                    tx, actor=f"user:{user_id}", action=action, target=f"user:{user_id}"
                )
        self._forget(tenant_id, user_id)
        return bool(changed.rowcount)
