"""Call and token budgets per tenant and period: reserve, settle, release (CHECKLIST P3).

The gateway reserves before it calls a provider and settles from the
provider's own ``usage`` afterwards (or releases on failure). A reservation
is one conditional UPDATE of the tenant's budget row — ``used + reserved +
wanted <= limit`` — so concurrent reservations queue on the row lock and each
re-checks the condition against the committed state: 200 concurrent calls
against a budget of 50 give exactly 50 reservations (LiteLLM's known failure
is to let all of them through). Over budget is :class:`OverBudget`: HTTP 402
with ``Retry-After`` = seconds until the period resets.

Tokens are reserved as an estimate (the request's ``max_tokens``, say); a
call that used more settles what it used, so a token budget is overshot by at
most what one call used beyond its estimate. Amounts are integers.

A gateway process takes budget in blocks with :meth:`BudgetService.lease`
(several calls and their tokens in one reservation, sized down to a quarter
of what is left so the last calls of a period still go one by one) and
settles the block's actual use when it closes
(:mod:`bastion.gateway.ledger`).

A tenant whose spending an operator froze (``bastion incident freeze-spend``,
migration 0034), or everyone when frozen globally, reserves nothing: the same
conditional UPDATE reads ``bastion.spend_frozen(tenant)`` — no extra round
trip — and the refusal is :class:`SpendFrozen` (402 ``spend-frozen``).

The database holds the invariant too (migration 0018): a reservation that
would take ``used + reserved`` past a limit, a call counted as used that no
reservation held, and a reservation closed twice are refused by triggers,
whoever writes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from bastion.db.pool import Conn, Database
from bastion.errors import BastionError, Kind

# A reservation its caller never settled (the process died) is released
# after this long by :meth:`BudgetService.release_expired`; a living gateway
# renews its leases' holds (:meth:`BudgetService.renew`).
HOLD_SECONDS = 300


class OverBudget(BastionError):
    slug = "budget-exceeded"
    title = "Budget exceeded"
    kind = Kind.PAYMENT_REQUIRED


class NoBudget(BastionError):
    slug = "no-budget"
    title = "No budget for this period"
    kind = Kind.PAYMENT_REQUIRED


class SpendFrozen(BastionError):
    """An operator froze the tenant's spending, or everyone's (``bastion incident
    freeze-spend``): no paid call until it is unfrozen."""

    slug = "spend-frozen"
    title = "Spending is frozen"
    kind = Kind.PAYMENT_REQUIRED


@dataclass(frozen=True)
class Reservation:
    id: UUID
    tenant_id: UUID
    period_start: datetime
    tokens: int
    calls: int = 1


@dataclass(frozen=True)
class BudgetState:
    period_start: datetime
    period_end: datetime
    call_limit: int
    token_limit: int
    calls_used: int
    tokens_used: int
    calls_reserved: int
    tokens_reserved: int


class BudgetService:
    """Budgets of every tenant, in the ``bastion.budgets`` table."""

    def __init__(self, db: Database, *, hold_seconds: int = HOLD_SECONDS) -> None:
        self.db = db
        self.hold_seconds = hold_seconds

    def _system(self, tenant_id: UUID) -> AbstractAsyncContextManager[Conn]:
        return self.db.tenant_tx(tenant_id, None, "system")

    async def set_budget(
        self,
        tenant_id: UUID,
        *,
        period_start: datetime,
        period_end: datetime,
        call_limit: int,
        token_limit: int,
    ) -> None:
        """Create the period's budget, or change its limits (usage is kept).

        Periods of a tenant never overlap: an earlier period still running at
        ``period_start`` ends there.
        """
        async with self._system(tenant_id) as tx:
            await tx.execute(
                "UPDATE bastion.budgets SET period_end = %(start)s, updated_at = now() "
                "WHERE tenant_id = %(tenant)s AND period_start < %(start)s "
                "AND period_end > %(start)s",
                {"tenant": tenant_id, "start": period_start},
            )
            await tx.execute(
                "INSERT INTO bastion.budgets (tenant_id, period_start, period_end, call_limit, "
                "token_limit) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, period_start) DO UPDATE SET "
                "period_end = EXCLUDED.period_end, call_limit = EXCLUDED.call_limit, "
                "token_limit = EXCLUDED.token_limit, updated_at = now()",
                (tenant_id, period_start, period_end, call_limit, token_limit),
            )

    async def reserve(self, tenant_id: UUID, tokens: int) -> Reservation:
        """Hold one call and ``tokens`` of the current period's budget.

        Raises :class:`OverBudget` (with ``Retry-After``) when either would go
        over its limit, :class:`NoBudget` when the tenant has no budget for now,
        :class:`SpendFrozen` when its spending is frozen.
        """
        if tokens < 0:
            raise ValueError("tokens must not be negative")
        async with self._system(tenant_id) as tx:
            cur = await tx.execute(
                "WITH held AS (UPDATE bastion.budgets SET calls_reserved = calls_reserved + 1, "
                "tokens_reserved = tokens_reserved + %(tokens)s, updated_at = now() "
                "WHERE tenant_id = %(tenant)s AND period_start <= now() AND now() < period_end "
                "AND calls_used + calls_reserved + 1 <= call_limit "
                "AND tokens_used + tokens_reserved + %(tokens)s <= token_limit "
                "AND NOT bastion.spend_frozen(%(tenant)s) "
                "RETURNING period_start) "
                "INSERT INTO bastion.budget_reservations (tenant_id, period_start, tokens, "
                "expires_at) SELECT %(tenant)s, period_start, %(tokens)s, "
                "now() + make_interval(secs => %(hold)s) FROM held RETURNING id, period_start",
                {"tenant": tenant_id, "tokens": tokens, "hold": self.hold_seconds},
            )
            row = await cur.fetchone()
            if row is not None:
                return Reservation(row["id"], tenant_id, row["period_start"], tokens)
            raise await _refusal(tx, tenant_id)

    async def lease(
        self, tenant_id: UUID, *, calls: int, tokens_per_call: int, min_tokens: int
    ) -> Reservation:
        """Hold up to ``calls`` calls and ``tokens_per_call`` tokens for each of them.

        The block is cut to a quarter of the calls (and tokens) left in the
        period, never below one call and ``min_tokens`` — the first call's
        need. Raises :class:`OverBudget` / :class:`NoBudget` as :meth:`reserve`.
        """
        if calls < 1 or tokens_per_call < 0 or min_tokens < 0:
            raise ValueError("a lease holds at least one call and no negative tokens")
        async with self._system(tenant_id) as tx:
            # FOR UPDATE: after waiting for the row lock, READ COMMITTED
            # re-reads the row, so the block is cut from what is left now.
            # (Casts: psycopg sends small ints as smallint; products overflow.)
            cur = await tx.execute(
                "WITH open AS (SELECT tenant_id, period_start, "
                "call_limit - calls_used - calls_reserved AS calls_left, "
                "token_limit - tokens_used - tokens_reserved AS tokens_left "
                "FROM bastion.budgets WHERE tenant_id = %(tenant)s AND period_start <= now() "
                "AND now() < period_end FOR UPDATE), "
                "block AS (SELECT tenant_id, period_start, "
                "LEAST(%(calls)s::bigint, GREATEST(1, calls_left / 4)) AS calls, "
                "LEAST(%(calls)s::bigint * %(per_call)s::bigint, "
                "GREATEST(%(min_tokens)s::bigint, tokens_left / 4)) AS tokens FROM open "
                "WHERE calls_left >= 1 AND tokens_left >= %(min_tokens)s::bigint "
                "AND NOT bastion.spend_frozen(%(tenant)s)), "
                "held AS (UPDATE bastion.budgets b SET "
                "calls_reserved = b.calls_reserved + block.calls, "
                "tokens_reserved = b.tokens_reserved + block.tokens, updated_at = now() "
                "FROM block WHERE b.tenant_id = block.tenant_id "
                "AND b.period_start = block.period_start "
                "RETURNING b.period_start, block.calls, block.tokens) "
                "INSERT INTO bastion.budget_reservations (tenant_id, period_start, tokens, "
                "calls, expires_at) SELECT %(tenant)s, period_start, tokens, calls, "
                "now() + make_interval(secs => %(hold)s) FROM held "
                "RETURNING id, period_start, tokens, calls",
                {
                    "tenant": tenant_id,
                    "calls": calls,
                    "per_call": tokens_per_call,
                    "min_tokens": min_tokens,
                    "hold": self.hold_seconds,
                },
            )
            row = await cur.fetchone()
            if row is not None:
                return Reservation(
                    row["id"], tenant_id, row["period_start"], row["tokens"], row["calls"]
                )
            raise await _refusal(tx, tenant_id)

    async def settle(
        self,
        reservation: Reservation,
        tokens_used: int,
        *,
        calls_used: int = 1,
        tx: Conn | None = None,
    ) -> bool:
        """Turn the reservation into usage: ``calls_used`` calls (of the calls it
        holds; the rest go back), ``tokens_used`` tokens.

        Idempotent: returns False (and changes nothing) if it was already
        settled or released. With ``tx`` (a system transaction of the
        reservation's tenant), it commits with whatever else ``tx`` does.
        """
        if tokens_used < 0 or not 0 <= calls_used <= reservation.calls:
            raise ValueError("usage must be within the reservation and not negative")
        return await self._close(reservation, "settled", tokens_used, calls_used, tx)

    async def release(self, reservation: Reservation, *, tx: Conn | None = None) -> bool:
        """Give the reservation back unused (the call failed). Idempotent."""
        return await self._close(reservation, "released", None, 0, tx)

    async def _close(
        self,
        reservation: Reservation,
        status: str,
        used: int | None,
        calls_used: int,
        tx: Conn | None,
    ) -> bool:
        if tx is None:
            async with self._system(reservation.tenant_id) as own:
                return await self._close(reservation, status, used, calls_used, own)
        cur = await tx.execute(
            "WITH closed AS (UPDATE bastion.budget_reservations SET status = %(status)s, "
            "tokens_used = %(used)s, calls_used = %(calls)s WHERE id = %(id)s "
            "AND status = 'held' RETURNING tenant_id, period_start, tokens, calls) "
            "UPDATE bastion.budgets b SET calls_reserved = b.calls_reserved - closed.calls, "
            "tokens_reserved = b.tokens_reserved - closed.tokens, "
            "calls_used = b.calls_used + %(calls)s, "
            "tokens_used = b.tokens_used + %(tokens)s, updated_at = now() FROM closed "
            "WHERE b.tenant_id = closed.tenant_id AND b.period_start = closed.period_start "
            "RETURNING 1",
            {
                "status": status,
                "used": used,
                "id": reservation.id,
                "calls": calls_used,
                "tokens": used or 0,
            },
        )
        return await cur.fetchone() is not None

    async def renew(self, reservations: Sequence[Reservation], *, tx: Conn) -> set[UUID]:
        """Push back the expiry of held reservations whose holder is still alive
        (a gateway's open leases); return the ids of those still held (the
        others were released meanwhile: their calls are no longer the holder's).

        ``tx`` is a system transaction of the reservations' tenant.
        """
        cur = await tx.execute(
            "UPDATE bastion.budget_reservations "
            "SET expires_at = now() + make_interval(secs => %(hold)s) "
            "WHERE id = ANY(%(ids)s) AND status = 'held' RETURNING id",
            {"ids": [r.id for r in reservations], "hold": self.hold_seconds},
        )
        return {row["id"] for row in await cur.fetchall()}

    async def release_expired(self, tenant_id: UUID) -> int:
        """Release the tenant's reservations held past their expiry (a dead caller's).

        One statement: the expiry is checked on the row as it is when it is
        released (READ COMMITTED re-checks it after a concurrent renewal), so a
        reservation its holder just renewed is never released.
        """
        async with self._system(tenant_id) as tx:
            cur = await tx.execute(
                "WITH closed AS (UPDATE bastion.budget_reservations SET status = 'released', "
                "calls_used = 0 WHERE tenant_id = %s AND status = 'held' "
                "AND expires_at < now() RETURNING tenant_id, period_start, tokens, calls), "
                "freed AS (SELECT tenant_id, period_start, sum(calls) AS calls, "
                "sum(tokens) AS tokens, count(*) AS n FROM closed "
                "GROUP BY tenant_id, period_start) "
                "UPDATE bastion.budgets b SET calls_reserved = b.calls_reserved - freed.calls, "
                "tokens_reserved = b.tokens_reserved - freed.tokens, updated_at = now() "
                "FROM freed WHERE b.tenant_id = freed.tenant_id "
                "AND b.period_start = freed.period_start RETURNING freed.n",
                (tenant_id,),
            )
            return sum(int(row["n"]) for row in await cur.fetchall())

    async def state(self, tenant_id: UUID) -> BudgetState | None:
        """The current period's budget of the tenant, or None."""
        async with self._system(tenant_id) as tx:
            cur = await tx.execute(
                "SELECT period_start, period_end, call_limit, token_limit, calls_used, "
                "tokens_used, calls_reserved, tokens_reserved FROM bastion.budgets "
                "WHERE tenant_id = %s AND period_start <= now() AND now() < period_end",
                (tenant_id,),
            )
            row = await cur.fetchone()
        return None if row is None else BudgetState(**row)


async def _refusal(tx: Conn, tenant_id: UUID) -> NoBudget | OverBudget | SpendFrozen:
    """Why nothing could be reserved: spending frozen, no budget now, or this one is spent."""
    cur = await tx.execute("SELECT bastion.spend_frozen(%s) AS frozen", (tenant_id,))
    frozen = await cur.fetchone()
    if frozen is not None and frozen["frozen"]:
        return SpendFrozen("spending is frozen for this tenant during an incident")
    cur = await tx.execute(
        "SELECT extract(epoch FROM period_end - now()) AS left FROM bastion.budgets "
        "WHERE tenant_id = %s AND period_start <= now() AND now() < period_end",
        (tenant_id,),
    )
    current = await cur.fetchone()
    if current is not None:
        retry_after = max(1, math.ceil(float(current["left"])))
        problem: NoBudget | OverBudget | SpendFrozen = OverBudget(
            "the tenant's budget for this period is spent", retry_after=retry_after
        )
    else:
        retry_after = await _until_next_period(tx, tenant_id)
        problem = NoBudget(
            "this tenant has no budget for the current period", retry_after=retry_after
        )
    problem.extensions["retry_after"] = retry_after  # in the body too, as ever
    return problem


async def _until_next_period(tx: Conn, tenant_id: UUID) -> int:
    """Seconds until a budget can next apply to a tenant that has none now: the
    start of a period already set for later, else the next reset of the
    calendar-month periods plans open (UTC, as ``BillingService`` opens them)."""
    cur = await tx.execute(
        "SELECT extract(epoch FROM min(period_start) - now()) AS wait FROM bastion.budgets "
        "WHERE tenant_id = %s AND period_start > now()",
        (tenant_id,),
    )
    row = await cur.fetchone()
    if row is not None and row["wait"] is not None:
        return max(1, math.ceil(float(row["wait"])))
    now = datetime.now(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    reset = (
        month.replace(year=month.year + 1, month=1)
        if month.month == 12
        else month.replace(month=month.month + 1)
    )
    return max(1, math.ceil((reset - now).total_seconds()))
