"""Login throttling against the real database, including 50 parallel attempts."""

from __future__ import annotations

from uuid import UUID, uuid4

import anyio
import pytest

from bastion.db.pool import Database
from bastion.identity.errors import Throttled
from bastion.identity.throttle import LoginThrottle, account_key
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

PLATFORM = UUID(int=0)


def fresh_ip() -> str:
    """A documentation-range address of this test alone (the module's database is shared)."""
    n = uuid4().int
    return f"2001:db8::{n % 65536:x}:{(n >> 16) % 65536:x}"


def fresh_account() -> str:
    return f"user-{uuid4().hex[:10]}@example.test"


async def outcome(db: Database, throttle: LoginThrottle, account: str, ip: str) -> int | None:
    """Run one attempt in its own transaction; None if allowed, else retry_after."""
    try:
        async with db.tenant_tx(PLATFORM, None, "system") as tx:
            await throttle.attempt(tx, account, ip)
    except Throttled as exc:
        return exc.retry_after
    return None


async def test_sixth_attempt_is_throttled_with_retry_after(db: Database) -> None:
    throttle = LoginThrottle()
    account, ip = fresh_account(), fresh_ip()
    results = [await outcome(db, throttle, account, ip) for _ in range(7)]
    assert results[:5] == [None] * 5
    assert results[5] is not None and 0 < results[5] <= 15 * 60
    assert results[6] is not None and results[6] > 0
    # The lock is stored, not only computed: it holds for another address too.
    assert await outcome(db, throttle, account, fresh_ip()) is not None


async def test_throttled_message_carries_nothing_of_the_account(db: Database) -> None:
    throttle = LoginThrottle(account_limit=1)
    account, ip = fresh_account(), fresh_ip()
    assert await outcome(db, throttle, account, ip) is None
    with pytest.raises(Throttled) as info:
        async with db.tenant_tx(PLATFORM, None, "system") as tx:
            await throttle.attempt(tx, account, ip)
    assert account not in str(info.value) and ip not in str(info.value)


async def test_unknown_account_is_throttled_like_an_existing_one(db: Database) -> None:
    suffix = uuid4().hex[:8]
    svc = TenantService(db)
    tenant = await svc.create_tenant(f"th-{suffix}", "Throttle")
    existing = f"real-{suffix}@example.test"
    await svc.add_member(tenant.id, existing, "viewer")
    missing = f"ghost-{suffix}@example.test"
    throttle = LoginThrottle()
    seen = {}
    for account in (existing, missing):
        ip = fresh_ip()
        results = [await outcome(db, throttle, account, ip) for _ in range(6)]
        seen[account] = [r is None for r in results]
        assert results[5] is not None and results[5] > 0
    assert seen[existing] == seen[missing] == [True] * 5 + [False]


async def test_account_key_is_normalised(db: Database) -> None:
    throttle = LoginThrottle(account_limit=2)
    base = fresh_account()
    assert account_key(f"  {base.upper()} ") == account_key(base) == f"acct:{base}"
    assert await outcome(db, throttle, base.upper(), fresh_ip()) is None
    assert await outcome(db, throttle, f" {base} ", fresh_ip()) is None
    assert await outcome(db, throttle, base.title(), fresh_ip()) is not None


async def test_success_resets_the_account_counter(db: Database) -> None:
    throttle = LoginThrottle()
    account, ip = fresh_account(), fresh_ip()
    for _ in range(5):  # the fifth reservation sets the lock; its success lifts it
        assert await outcome(db, throttle, account, ip) is None
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        await throttle.succeeded(tx, account)
    results = [await outcome(db, throttle, account, ip) for _ in range(6)]
    assert results[:5] == [None] * 5
    assert results[5] is not None


async def test_counter_resets_when_window_and_lockout_have_passed(db: Database) -> None:
    throttle = LoginThrottle()
    account, ip = fresh_account(), fresh_ip()
    for _ in range(5):
        await outcome(db, throttle, account, ip)
    assert await outcome(db, throttle, account, ip) is not None
    # Let the lockout and the window end, as if 16 minutes had passed.
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        await tx.execute(
            "UPDATE bastion.login_throttle SET locked_until = now() - interval '1 second', "
            "window_start = now() - interval '16 minutes' WHERE key = %s",
            (account_key(account),),
        )
    results = [await outcome(db, throttle, account, ip) for _ in range(6)]
    assert results == [None] * 5 + [results[5]]
    assert results[5] is not None


async def test_ip_limit_applies_across_accounts(db: Database) -> None:
    throttle = LoginThrottle(account_limit=5, ip_limit=3)
    ip = fresh_ip()
    assert [await outcome(db, throttle, fresh_account(), ip) for _ in range(3)] == [None] * 3
    fourth = await outcome(db, throttle, fresh_account(), ip)
    assert fourth is not None and fourth > 0
    # Another address is unaffected, and success does not lift the address lock.
    assert await outcome(db, throttle, fresh_account(), fresh_ip()) is None
    account = fresh_account()
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        await throttle.succeeded(tx, account)
    assert await outcome(db, throttle, account, ip) is not None


async def test_throttle_rows_are_out_of_reach_without_system_role(db: Database) -> None:
    throttle = LoginThrottle()
    account = fresh_account()
    assert await outcome(db, throttle, account, fresh_ip()) is None
    async with db.tenant_tx(PLATFORM, None, "owner") as tx:
        rows = await (await tx.execute("SELECT key FROM bastion.login_throttle")).fetchall()
        cur = await tx.execute("DELETE FROM bastion.login_throttle")
    assert rows == [] and cur.rowcount == 0


async def test_fifty_parallel_attempts_let_at_most_five_through(database: DbHandles) -> None:
    throttle = LoginThrottle()
    account = fresh_account()
    allowed: list[int] = []
    refused: list[int] = []
    async with Database(database.app, database.context_key, min_size=20, max_size=20) as big:
        start = anyio.Event()

        async def one(i: int) -> None:
            await start.wait()
            try:
                async with big.tenant_tx(PLATFORM, None, "system") as tx:
                    await throttle.attempt(tx, account, fresh_ip())
                    # Hold the reservation a moment, as a password check would.
                    await anyio.sleep(0.01)
            except Throttled as exc:
                assert exc.retry_after > 0
                refused.append(i)
            else:
                allowed.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
            await anyio.sleep(0.05)  # every task is waiting on the same event
            start.set()
    assert len(allowed) == 5
    assert len(refused) == 45
    assert set(allowed) | set(refused) == set(range(50))
