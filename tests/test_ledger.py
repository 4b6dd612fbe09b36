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

from bastion.billing.budgets import BudgetService, OverBudget, Reservation
from bastion.db.pool import Conn, Database
from bastion.gateway.ledger import AuditEntry, CallLedger, Slot
from bastion.gateway.providers import Usage
from bastion.tenants.service import TenantService
from tests.conftest import Captured, DbHandles

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


class _LandingBudgets(BudgetService):
    """Sets ``landed`` the moment a lease comes back from the database: a request
    whose own await finishes in that same turn of the event loop runs next."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.landed = asyncio.Event()

    async def lease(
        self, tenant_id: UUID, *, calls: int, tokens_per_call: int, min_tokens: int
    ) -> Reservation:
        reservation = await super().lease(
            tenant_id, calls=calls, tokens_per_call=tokens_per_call, min_tokens=min_tokens
        )
        self.landed.set()
        return reservation


async def _take(ledger: CallLedger, tenant: UUID) -> Slot | None:
    try:
        return await ledger.take(tenant, 100)
    except OverBudget:
        return None


async def _held_reservations(db: Database, tenant: UUID) -> int:
    async with db.tenant_tx(tenant, None, "system") as tx:
        cur = await tx.execute(
            "SELECT count(*) AS n FROM bastion.budget_reservations WHERE status = 'held'"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def test_a_call_arriving_as_a_lease_lands_cannot_overdraw_it(db: Database) -> None:
    # Finding 8's interleaving: the caller that opened a one-call lease resumes a
    # loop turn after the lease is published; a request arriving in between took
    # the call, the opener took it again (calls_free -1): two upstream calls on a
    # budget of one, and the lease could never settle (calls_used > calls).
    tenant = await _tenant_with_budget(db, calls=1)
    budgets = _LandingBudgets(db)
    ledger = CallLedger(db, budgets, lease_calls=16)

    async def arriving() -> Slot | None:
        await budgets.landed.wait()
        return await _take(ledger, tenant)

    async with asyncio.timeout(10):
        late = asyncio.create_task(arriving())
        opener = await _take(ledger, tenant)
        slots = [slot for slot in (opener, await late) if slot is not None]
    assert len(slots) == 1  # a budget of one call admits one call
    for i, slot in enumerate(slots):
        ledger.record(tenant, slot, USAGE, _event(i))
    await ledger.aclose()
    state = await budgets.state(tenant)
    assert state is not None
    assert (state.calls_used, state.calls_reserved, state.tokens_reserved) == (1, 0, 0)
    assert await _held_reservations(db, tenant) == 0


async def test_the_sweeper_leaves_a_lease_whose_call_is_in_flight(db: Database) -> None:
    # A call (a long stream, say) outlives the hold its lease was taken with.
    # The sweeper gave the lease back, another process spent the freed call,
    # and the long call's settlement then changed nothing: two calls on a
    # budget of one, one of them never counted.
    tenant = await _tenant_with_budget(db, calls=1)
    budgets = BudgetService(db, hold_seconds=2)
    ledger = CallLedger(db, budgets, lease_calls=4, flush_seconds=0.05)
    ledger.start()
    other = CallLedger(db, BudgetService(db), lease_calls=4)
    try:
        slot = await ledger.take(tenant, 100)
        await asyncio.sleep(2.5)  # past the hold the lease was taken with
        assert await budgets.release_expired(tenant) == 0
        assert await _take(other, tenant) is None  # the budget's one call is in flight
        ledger.record(tenant, slot, USAGE, _event(0))
    finally:
        await ledger.aclose()
        await other.aclose()
    state = await budgets.state(tenant)
    assert state is not None and (state.calls_used, state.calls_reserved) == (1, 0)
    assert await _held_reservations(db, tenant) == 0


class _SlowSettling(BudgetService):
    """Settles only once ``go`` is set: a flush caught mid-transaction."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.settling = asyncio.Event()
        self.go = asyncio.Event()

    async def settle(
        self,
        reservation: Reservation,
        tokens_used: int,
        *,
        calls_used: int = 1,
        tx: Conn | None = None,
    ) -> bool:
        self.settling.set()
        await self.go.wait()
        return await super().settle(reservation, tokens_used, calls_used=calls_used, tx=tx)


async def test_closing_the_ledger_mid_flush_drops_no_lease(db: Database) -> None:
    # Closing cancelled the periodic flush in its transaction: the leases it
    # had taken to settle were dropped, held in the database and uncounted.
    tenant = await _tenant_with_budget(db, calls=3)
    budgets = _SlowSettling(db)
    ledger = CallLedger(db, budgets, lease_calls=1, flush_seconds=0.01)
    ledger.start()
    slot = await ledger.take(tenant, 100)
    ledger.record(tenant, slot, USAGE, _event(0))
    async with asyncio.timeout(10):
        await budgets.settling.wait()  # the periodic flush is settling the spent lease
        closing = asyncio.create_task(ledger.aclose())
        await asyncio.sleep(0.05)
        budgets.go.set()
        await closing
    state = await budgets.state(tenant)
    assert state is not None and (state.calls_used, state.calls_reserved) == (1, 0)
    assert await _held_reservations(db, tenant) == 0


async def test_a_lease_given_back_behind_the_ledger_s_back_takes_no_more_calls(
    db: Database, logs: Captured
) -> None:
    # Its hold was released while the process could not renew it (cut off
    # from the database longer than the hold): the calls it still had are no
    # longer the process's to give, and the loss is logged.
    tenant = await _tenant_with_budget(db, calls=16)
    budgets = BudgetService(db, hold_seconds=1)
    ledger = CallLedger(db, budgets, lease_calls=4, lease_seconds=30, flush_seconds=0.05)
    first = await ledger.take(tenant, 100)
    assert first.lease.calls_free == 3
    assert await budgets.release(first.lease.reservation) is True  # the sweeper's doing
    ledger.start()
    try:
        await asyncio.sleep(0.6)  # a renewal is due after a third of the hold
        second = await ledger.take(tenant, 100)
        assert second.lease is not first.lease  # a new lease, reserved in the database
        for i, slot in enumerate((first, second)):
            ledger.record(tenant, slot, USAGE, _event(i))
    finally:
        await ledger.aclose()
    assert any(r["event"] == "budget_lease_lost" for r in logs.records())
    state = await budgets.state(tenant)
    assert state is not None and (state.calls_used, state.calls_reserved) == (1, 0)
    assert await _held_reservations(db, tenant) == 0
