"""The per-tenant cache behind the egress lists, the screen policy and the PII
allow-lists: concurrent misses share one read, a failed read is never kept,
and a read overtaken by a change is not kept either."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from bastion.safety.tenant_cache import TenantCache

pytestmark = pytest.mark.anyio


async def test_fifty_concurrent_misses_make_one_read() -> None:
    cache: TenantCache[int] = TenantCache(ttl_seconds=60)
    tenant, reads = uuid4(), []

    async def read() -> int:
        reads.append(1)
        await asyncio.sleep(0.05)
        return 7

    values = await asyncio.gather(*(cache.get(tenant, read) for _ in range(50)))
    assert values == [7] * 50
    assert len(reads) == 1  # before: one database read per waiting request
    assert await cache.get(tenant, read) == 7 and len(reads) == 1  # kept


async def test_a_failed_read_fails_every_waiter_and_is_not_kept() -> None:
    cache: TenantCache[int] = TenantCache(ttl_seconds=60)
    tenant, reads = uuid4(), []

    async def broken() -> int:
        reads.append(1)
        await asyncio.sleep(0.01)
        raise OSError("database down")

    results = await asyncio.gather(
        *(cache.get(tenant, broken) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, OSError) for r in results) and len(reads) == 1

    async def working() -> int:
        return 3

    assert await cache.get(tenant, working) == 3  # the failure was not kept


async def test_a_read_overtaken_by_a_change_is_not_kept() -> None:
    cache: TenantCache[str] = TenantCache(ttl_seconds=60)
    tenant = uuid4()
    started = asyncio.Event()

    async def old() -> str:
        started.set()
        await asyncio.sleep(0.05)
        return "old"

    async def new() -> str:
        return "new"

    first = asyncio.create_task(cache.get(tenant, old))
    await started.wait()
    cache.forget(tenant)  # an owner changed the policy while the read was under way
    assert await cache.get(tenant, new) == "new"
    assert await first == "old"  # its caller gets what it read…
    assert await cache.get(tenant, old) == "new"  # …but the change is what is kept


async def test_a_cancelled_caller_does_not_cancel_the_shared_read() -> None:
    cache: TenantCache[int] = TenantCache(ttl_seconds=60)
    tenant = uuid4()

    async def read() -> int:
        await asyncio.sleep(0.05)
        return 1

    impatient = asyncio.create_task(cache.get(tenant, read))
    patient = asyncio.create_task(cache.get(tenant, read))
    await asyncio.sleep(0.01)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert await patient == 1
