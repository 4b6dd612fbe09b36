"""LiveRoles: members' roles kept in memory, dropped when the database announces a
change (migration 0011), and never trusted while the listener is not listening."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.access.approvals import ApprovalService
from bastion.access.roles import CHANNEL, LiveRoles
from bastion.db.pool import Database
from bastion.tenants.service import TenantMembers, TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio


class CountingDatabase(Database):
    """The real pool, counting the role reads that reach PostgreSQL; a read can be
    held open (after it ran) until ``release`` is set."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads = 0
        self.hold: asyncio.Event | None = None
        self.read_done = asyncio.Event()

    async def member_roles(self, tenant_id: UUID, user_id: UUID) -> frozenset[str]:
        roles = await super().member_roles(tenant_id, user_id)
        self.reads += 1
        self.read_done.set()
        if self.hold is not None:
            await self.hold.wait()
        return roles


@pytest.fixture
async def counting(database: DbHandles) -> AsyncIterator[CountingDatabase]:
    async with CountingDatabase(database.app, database.context_key, max_size=4) as db:
        yield db


async def _member(db: Database) -> tuple[UUID, UUID, UUID]:
    tenants = TenantService(db)
    tenant = (await tenants.create_tenant(f"r-{uuid4().hex[:8]}", "roles")).id
    owner = await tenants.add_member(tenant, f"owner-{uuid4().hex[:6]}@r.test", "owner")
    user = await tenants.add_member(tenant, f"c-{uuid4().hex[:6]}@r.test", "contributor")
    return tenant, owner, user


async def _listening(roles: LiveRoles) -> None:
    roles.start()
    for _ in range(200):
        if roles.listening:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the listener did not start")


async def _until(condition: object, seconds: float = 3.0) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > seconds:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)
    return time.monotonic() - started


async def test_roles_are_kept_between_calls_while_listening(counting: CountingDatabase) -> None:
    tenant, _owner, user = await _member(counting)
    roles = LiveRoles(counting)
    await _listening(roles)
    try:
        for _ in range(5):
            assert await roles(tenant, user) == {"contributor"}
        assert counting.reads == 1
    finally:
        await roles.aclose()


async def test_before_listening_every_call_reads_the_database(counting: CountingDatabase) -> None:
    tenant, _owner, user = await _member(counting)
    roles = LiveRoles(counting)  # never started
    for _ in range(3):
        assert await roles(tenant, user) == {"contributor"}
    assert counting.reads == 3


async def test_a_revoked_role_is_dropped_within_milliseconds(counting: CountingDatabase) -> None:
    tenant, owner, user = await _member(counting)
    roles = LiveRoles(counting, ttl_seconds=300)  # only the announcement can drop it
    await _listening(roles)
    try:
        assert await roles(tenant, user) == {"contributor"}
        approvals = ApprovalService(counting, TenantMembers())
        assert await approvals.revoke(tenant, owner, user, "contributor")
        revoked = time.monotonic()
        while await roles(tenant, user):
            assert time.monotonic() - revoked < 1.0, "the revocation never arrived"
            await asyncio.sleep(0.001)
        # Measured: a few milliseconds on this machine; 1 s is the test's bound.
        assert counting.reads >= 2
    finally:
        await roles.aclose()


async def test_an_announcement_during_a_read_keeps_that_read_out(
    counting: CountingDatabase,
) -> None:
    tenant, owner, user = await _member(counting)
    roles = LiveRoles(counting, ttl_seconds=300)
    await _listening(roles)
    try:
        # The read runs (and sees "contributor"), then is held before it returns.
        counting.hold = asyncio.Event()
        in_flight = asyncio.create_task(roles(tenant, user))
        await counting.read_done.wait()
        generation = roles._generation
        approvals = ApprovalService(counting, TenantMembers())
        assert await approvals.revoke(tenant, owner, user, "contributor")
        await _until(lambda: roles._generation > generation)
        counting.hold.set()
        assert await in_flight == {"contributor"}  # what that read saw, for that request
        counting.hold = None
        # ...but it was not kept: the next call reads the revocation.
        assert await roles(tenant, user) == frozenset()
        assert counting.reads == 2
    finally:
        await roles.aclose()


async def test_a_lost_listener_stops_the_cache_until_it_is_back(
    counting: CountingDatabase, database: DbHandles
) -> None:
    tenant, _owner, user = await _member(counting)
    roles = LiveRoles(counting, ttl_seconds=300, retry_seconds=0.2)
    await _listening(roles)
    try:
        await roles(tenant, user)
        with psycopg.connect(database.superuser, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = %s",
                (f"LISTEN {CHANNEL}",),
            ).fetchone()
        assert killed is not None and killed[0] == 1
        await _until(lambda: not roles.listening)
        reads = counting.reads
        await roles(tenant, user)
        assert counting.reads == reads + 1  # nothing kept was trusted
        await _until(lambda: roles.listening)  # reconnected
        await roles(tenant, user)
        await roles(tenant, user)
        assert counting.reads == reads + 2  # kept again
    finally:
        await roles.aclose()


async def test_entries_expire_after_their_ttl(counting: CountingDatabase) -> None:
    tenant, _owner, user = await _member(counting)
    now = [1000.0]
    roles = LiveRoles(counting, ttl_seconds=5, clock=lambda: now[0])
    await _listening(roles)
    try:
        await roles(tenant, user)
        await roles(tenant, user)
        assert counting.reads == 1
        now[0] += 5.1
        await roles(tenant, user)
        assert counting.reads == 2
    finally:
        await roles.aclose()


async def test_a_forged_announcement_can_only_cause_a_read(
    counting: CountingDatabase, database: DbHandles
) -> None:
    # Anyone may NOTIFY on the channel: an odd payload drops everything, nothing more.
    tenant, _owner, user = await _member(counting)
    roles = LiveRoles(counting, ttl_seconds=300)
    await _listening(roles)
    try:
        await roles(tenant, user)
        generation = roles._generation
        with psycopg.connect(database.app, autocommit=True) as app:
            app.execute("SELECT pg_notify(%s, %s)", (CHANNEL, "'; DROP TABLE x; --"))
        await _until(lambda: roles._generation > generation)
        assert await roles(tenant, user) == {"contributor"}
        assert counting.reads == 2
    finally:
        await roles.aclose()
