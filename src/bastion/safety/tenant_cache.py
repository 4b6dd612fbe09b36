"""A tenant's configuration read on the hot path: kept a few seconds, read once.

The egress allow-lists, the screen policy and the PII allow-lists are read
from the database for every call and change rarely. Each process keeps a
tenant's value for ``ttl_seconds``; when it expires, the calls that arrive
while it is being read wait for that one read instead of each starting its
own (under load, a miss would otherwise cost one query per waiting request).
A read that fails is shared by its waiters and never kept: the caller fails
closed. ``forget`` (a change made in this process) makes the next call read
again, and a read already under way when it was called is not kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar
from uuid import UUID

T = TypeVar("T")

MAX_TENANTS = 10_000  # kept before the cache is emptied (tenants are authenticated)


class TenantCache(Generic[T]):
    def __init__(self, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self._values: dict[UUID, tuple[float, T]] = {}
        self._reads: dict[UUID, asyncio.Future[T]] = {}
        self._generation: dict[UUID, int] = {}

    async def get(self, tenant_id: UUID, read: Callable[[], Awaitable[T]]) -> T:
        """The tenant's value: kept, or read by ``read`` (shared with concurrent
        callers). Raises whatever ``read`` raises."""
        kept = self._values.get(tenant_id)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        pending = self._reads.get(tenant_id)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = asyncio.ensure_future(self._read(tenant_id, read))
            self._reads[tenant_id] = pending
        # A caller that is cancelled must not cancel the read the others wait for.
        return await asyncio.shield(pending)

    async def _read(self, tenant_id: UUID, read: Callable[[], Awaitable[T]]) -> T:
        generation = self._generation.get(tenant_id, 0)
        try:
            value = await read()
        finally:
            if self._reads.get(tenant_id) is asyncio.current_task():
                del self._reads[tenant_id]
        if self._generation.get(tenant_id, 0) == generation:
            if len(self._values) >= MAX_TENANTS:
                self._values.clear()
                self._generation.clear()
            self._values[tenant_id] = (time.monotonic() + self.ttl_seconds, value)
        return value

    def forget(self, tenant_id: UUID) -> None:
        """Read the tenant's value again on the next call."""
        self._values.pop(tenant_id, None)
        self._reads.pop(tenant_id, None)
        self._generation[tenant_id] = self._generation.get(tenant_id, 0) + 1
