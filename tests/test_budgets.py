"""Budgets on the real database: concurrent reservations never overshoot,
settlement and release are idempotent, over budget carries Retry-After."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.api.problems import status_of
from bastion.billing.budgets import BudgetService, BudgetState, NoBudget, OverBudget, Reservation
from bastion.db.pool import Database
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio


@pytest.fixture
async def wide_db(database: DbHandles) -> AsyncIterator[Database]:
    """A pool wide enough for real concurrency at the database."""
    async with Database(database.app, database.context_key, max_size=24) as pool:
        yield pool


async def _tenant(db: Database) -> UUID:
    return (await TenantService(db).create_tenant(f"b-{uuid4().hex[:8]}", "budget")).id


async def _budget(
    budgets: BudgetService, tenant: UUID, *, calls: int, tokens: int, hours: float = 2
) -> datetime:
    start = datetime.now(UTC) - timedelta(minutes=1)
    end = start + timedelta(hours=hours)
    await budgets.set_budget(
        tenant, period_start=start, period_end=end, call_limit=calls, token_limit=tokens
    )
    return end


async def _attempt(budgets: BudgetService, tenant: UUID, tokens: int) -> Reservation | OverBudget:
    try:
        return await budgets.reserve(tenant, tokens)
    except OverBudget as refused:
        return refused


async def test_200_concurrent_calls_against_a_budget_of_50(wide_db: Database) -> None:
    budgets = BudgetService(wide_db)
    tenant = await _tenant(wide_db)
    end = await _budget(budgets, tenant, calls=50, tokens=10**9)
    outcomes = await asyncio.gather(*(_attempt(budgets, tenant, 10) for _ in range(200)))
    held = [o for o in outcomes if isinstance(o, Reservation)]
    refused = [o for o in outcomes if isinstance(o, OverBudget)]
    assert len(held) == 50 and len(refused) == 150
    expected = (end - datetime.now(UTC)).total_seconds()
    for problem in refused:
        retry_after = problem.retry_after or 0
        assert status_of(problem) == 402 and abs(retry_after - expected) < 30
    state = await budgets.state(tenant)
    assert state is not None and state.calls_reserved == 50 and state.tokens_reserved == 500
    # Settling every held call (twice each, concurrently) counts each once.
    settled = await asyncio.gather(
        *(budgets.settle(r, 7) for r in held), *(budgets.settle(r, 7) for r in held)
    )
    assert sum(settled) == 50
    state = await budgets.state(tenant)
    assert state is not None
    assert (state.calls_used, state.tokens_used, state.calls_reserved, state.tokens_reserved) == (
        50,
        350,
        0,
        0,
    )
    with pytest.raises(OverBudget):
        await budgets.reserve(tenant, 1)


async def test_token_budget_holds_under_concurrency(wide_db: Database) -> None:
    budgets = BudgetService(wide_db)
    tenant = await _tenant(wide_db)
    await _budget(budgets, tenant, calls=1000, tokens=1000)
    outcomes = await asyncio.gather(*(_attempt(budgets, tenant, 300) for _ in range(40)))
    held = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(held) == 3
    # A call that used more than it reserved settles what it used: the overshoot
    # is bounded by that one call.
    await budgets.settle(held[0], 450)
    state = await budgets.state(tenant)
    assert state is not None and state.tokens_used + state.tokens_reserved == 1050


async def test_release_gives_the_reservation_back_once(wide_db: Database) -> None:
    budgets = BudgetService(wide_db)
    tenant = await _tenant(wide_db)
    await _budget(budgets, tenant, calls=1, tokens=100)
    first = await budgets.reserve(tenant, 100)
    with pytest.raises(OverBudget):
        await budgets.reserve(tenant, 1)
    assert await budgets.release(first) is True
    assert await budgets.release(first) is False
    assert await budgets.settle(first, 10) is False  # a released call is not billed
    second = await budgets.reserve(tenant, 100)
    assert await budgets.settle(second, 90) is True
    state = await budgets.state(tenant)
    assert state is not None and (state.calls_used, state.tokens_used) == (1, 90)


async def test_reservations_of_a_dead_caller_are_released(wide_db: Database) -> None:
    budgets = BudgetService(wide_db, hold_seconds=0)
    tenant = await _tenant(wide_db)
    await _budget(budgets, tenant, calls=2, tokens=100)
    await budgets.reserve(tenant, 50)
    await budgets.reserve(tenant, 50)
    await asyncio.sleep(0.05)
    assert await budgets.release_expired(tenant) == 2
    state = await budgets.state(tenant)
    assert state is not None and (state.calls_reserved, state.tokens_reserved) == (0, 0)


async def test_no_budget_and_a_past_period_refuse(wide_db: Database) -> None:
    budgets = BudgetService(wide_db)
    tenant = await _tenant(wide_db)
    with pytest.raises(NoBudget):
        await budgets.reserve(tenant, 1)
    past = datetime.now(UTC) - timedelta(days=40)
    await budgets.set_budget(
        tenant,
        period_start=past,
        period_end=past + timedelta(days=30),
        call_limit=9,
        token_limit=9,
    )
    with pytest.raises(NoBudget):
        await budgets.reserve(tenant, 1)


async def test_tenants_cannot_touch_budgets(wide_db: Database, database: DbHandles) -> None:
    budgets = BudgetService(wide_db)
    mine, other = await _tenant(wide_db), await _tenant(wide_db)
    await _budget(budgets, other, calls=5, tokens=5)
    for role in ("owner", "billing-admin"):
        async with wide_db.tenant_tx(mine, None, role) as tx:
            cur = await tx.execute("UPDATE bastion.budgets SET call_limit = 1000000")
            assert cur.rowcount == 0
        async with wide_db.tenant_tx(other, None, role) as tx:
            cur = await tx.execute("UPDATE bastion.budgets SET call_limit = 1000000")
            assert cur.rowcount == 0  # even its own: limits come from the plan
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT call_limit FROM bastion.budgets WHERE tenant_id = %s", (other,)
        ).fetchone()
    assert row == (5,)


async def test_the_database_refuses_an_overshoot_from_any_writer(wide_db: Database) -> None:
    # Whatever a writer of the system role sends (a bug in a gateway, SQL
    # injection), the budget row stays within its limit and counts only
    # reserved calls; a closed reservation never closes again.
    budgets = BudgetService(wide_db)
    tenant = await _tenant(wide_db)
    await _budget(budgets, tenant, calls=2, tokens=1000)
    held = await budgets.reserve(tenant, 10)
    attacks = (
        "UPDATE bastion.budgets SET calls_reserved = calls_reserved + 2",  # past the limit
        "UPDATE bastion.budgets SET tokens_reserved = tokens_reserved + 991",
        "UPDATE bastion.budgets SET calls_used = calls_used + 1",  # a call nobody reserved
        "UPDATE bastion.budgets SET calls_used = calls_used + 2, "
        "calls_reserved = calls_reserved - 1",
    )
    for attack in attacks:
        with pytest.raises(psycopg.errors.CheckViolation):
            async with wide_db.tenant_tx(tenant, None, "system") as tx:
                await tx.execute(attack)
    assert await budgets.settle(held, 7) is True
    for attack in (
        "UPDATE bastion.budgets SET calls_used = 0, tokens_used = 0",  # usage forgotten
        "UPDATE bastion.budget_reservations SET status = 'held'",  # reopened, to free twice
        "UPDATE bastion.budget_reservations SET status = 'released'",
    ):
        with pytest.raises(psycopg.errors.CheckViolation):
            async with wide_db.tenant_tx(tenant, None, "system") as tx:
                await tx.execute(attack)
    state = await budgets.state(tenant)
    assert state is not None
    assert (state.calls_used, state.calls_reserved, state.tokens_used) == (1, 0, 7)
    # A plan downgrade may still lower the limit below what is used.
    await _budget_limits(budgets, tenant, state, calls=0)
    lowered = await budgets.state(tenant)
    assert lowered is not None and (lowered.call_limit, lowered.calls_used) == (0, 1)
    with pytest.raises(OverBudget):
        await budgets.reserve(tenant, 1)


async def _budget_limits(
    budgets: BudgetService, tenant: UUID, state: BudgetState, *, calls: int
) -> None:
    await budgets.set_budget(
        tenant,
        period_start=state.period_start,
        period_end=state.period_end,
        call_limit=calls,
        token_limit=state.token_limit,
    )
