"""The gateway's call ledger on the real database: budget leases from two
"processes" (two ledgers) never overshoot together, a lowered limit holds
within the lease time, failed calls give their share back, and every call's
audit event is written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from bastion.billing.budgets import BudgetService, OverBudget
from bastion.db.pool import Database
from bastion.gateway.ledger import AuditEntry, CallLedger, Slot
from bastion.gateway.providers import Usage
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

USAGE = Usage(30, 20)


@pytest.fixture
async def db(database: DbHandles) -> AsyncIterator[Database]:
    async with Database(database.app, database.context_key, max_size=12) as pool:
        yield pool


async def _tenant_with_budget(db: Database, *, calls: int, tokens: int = 10**9) -> UUID:
    tenant = (await TenantService(db).create_tenant(f"l-{uuid4().hex[:8]}", "ledger")).id
    start = datetime.now(UTC) - timedelta(minutes=1)
    await BudgetService(db).set_budget(
        tenant,
        period_start=start,
        period_end=start + timedelta(hours=1),
        call_limit=calls,
        token_limit=tokens,
    )
    return tenant


def _event(i: int) -> AuditEntry:
    return AuditEntry("user:test", "model.invoke", "m", {"call": i})


async def _call(ledger: CallLedger, tenant: UUID, i: int) -> bool:
    """One call: take, 'call the provider', record. False when over budget."""
    try:
        slot = await ledger.take(tenant, 100)
    except OverBudget:
        return False
    await asyncio.sleep(0.001)
    ledger.record(tenant, slot, USAGE, _event(i))
    return True


async def test_two_processes_leasing_one_budget_never_overshoot(db: Database) -> None:
    tenant = await _tenant_with_budget(db, calls=37)
    first, second = (CallLedger(db, BudgetService(db), lease_calls=16) for _ in range(2))
    outcomes = await asyncio.gather(
        *(_call(first if i % 2 else second, tenant, i) for i in range(200))
    )
    assert outcomes.count(True) == 37
    for ledger in (first, second):
        await ledger.aclose()
    state = await BudgetService(db).state(tenant)
    assert state is not None
    assert (state.calls_used, state.calls_reserved, state.tokens_reserved) == (37, 0, 0)
    assert state.tokens_used == 37 * USAGE.total_tokens


async def test_a_lowered_limit_holds_within_the_lease_time(db: Database) -> None:
    tenant = await _tenant_with_budget(db, calls=1000)
    budgets = BudgetService(db)
    ledger = CallLedger(db, budgets, lease_calls=64, lease_seconds=0.3, flush_seconds=0.05)
    ledger.start()
    try:
        assert all(await asyncio.gather(*(_call(ledger, tenant, i) for i in range(10))))
        state = await budgets.state(tenant)
        assert state is not None and state.calls_reserved == 64  # one lease, held
        # The plan is downgraded: three more calls this period, after the ten made.
        await budgets.set_budget(
            tenant,
            period_start=state.period_start,
            period_end=state.period_end,
            call_limit=13,
            token_limit=10**9,
        )
        await asyncio.sleep(0.3 + 0.15)  # the lease ages out and is settled
        later = [await _call(ledger, tenant, 100 + i) for i in range(10)]
    finally:
        await ledger.aclose()
    final = await budgets.state(tenant)
    assert final is not None and final.calls_reserved == 0
    assert later.count(True) == 3 and final.calls_used == final.call_limit == 13


async def test_a_large_block_of_tokens_is_leased(db: Database) -> None:
    # 64 calls x 5,000 tokens overflows the smallint psycopg would send them as.
    tenant = await _tenant_with_budget(db, calls=10_000)
    ledger = CallLedger(db, BudgetService(db), lease_calls=64)
    slot = await ledger.take(tenant, 5_000)
    assert slot.lease.reservation.tokens == 64 * 5_000
    ledger.record(tenant, slot, USAGE, _event(0))
    await ledger.aclose()


async def test_failed_calls_give_their_share_back(db: Database) -> None:
    tenant = await _tenant_with_budget(db, calls=5)
    ledger = CallLedger(db, BudgetService(db), lease_calls=4)
    for i in range(20):  # far more failed calls than the budget holds
        slot = await ledger.take(tenant, 100)
        ledger.record(tenant, slot, None, _event(i))
    assert await _call(ledger, tenant, 99)
    await ledger.aclose()
    state = await BudgetService(db).state(tenant)
    assert state is not None and (state.calls_used, state.calls_reserved) == (1, 0)


async def test_every_call_s_audit_event_is_written_in_order(db: Database) -> None:
    tenant = await _tenant_with_budget(db, calls=100)
    ledger = CallLedger(db, BudgetService(db), lease_calls=8)
    slots: list[Slot] = [await ledger.take(tenant, 10) for _ in range(30)]
    for i, slot in enumerate(slots):
        ledger.record(tenant, slot, USAGE, _event(i))
    await ledger.flush()  # a periodic flush: events, and the leases that are spent
    await ledger.aclose()
    async with db.tenant_tx(tenant, None, "system") as tx:
        rows = await (
            await tx.execute(
                "SELECT seq, details->>'call' AS call FROM bastion.audit_events"
                " WHERE action = 'model.invoke' ORDER BY seq"
            )
        ).fetchall()
    assert [int(r["call"]) for r in rows] == list(range(30))
    state = await BudgetService(db).state(tenant)
    assert state is not None and (state.calls_used, state.calls_reserved) == (30, 0)
