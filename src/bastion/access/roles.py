"""Members' roles kept in memory between requests, dropped the moment they change.

The guard checks a token's roles against the memberships as they are now on
every request, so a revoked role stops at once. Reading them costs a database
round trip per request; :class:`LiveRoles` removes it without giving up "at
once": migration 0011 announces every membership change on the
``bastion_memberships`` channel (PostgreSQL LISTEN/NOTIFY) as SHA-256 of
``tenant:user`` (migration 0014: any session may listen, so no ids), and a listener
connection drops the entry when the announcement arrives, milliseconds after
the revoking transaction commits.

It fails safe:
- entries are used only while the listener is connected and listening; before
  that, and whenever the connection is lost, every call reads the database and
  the entries are dropped;
- a read that overlapped any announcement is not kept (the generation check),
  so an announcement that arrives while a read is in flight is never lost;
- each entry also expires after ``ttl_seconds``: a bound on staleness even if
  announcements stopped arriving on a connection that still looks alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from uuid import UUID

import psycopg

from bastion.db.pool import Database
from bastion.logs import get_logger

CHANNEL = "bastion_memberships"

_log = get_logger("bastion.access")


def announced_as(tenant_id: UUID, user_id: UUID) -> str:
    """The payload that announces a change to this membership."""
    return hashlib.sha256(f"{tenant_id}:{user_id}".encode()).hexdigest()


class LiveRoles:
    """``await roles(tenant_id, user_id)``: the member's roles, as the database has them."""

    def __init__(
        self,
        db: Database,
        *,
        ttl_seconds: float = 5.0,
        max_entries: int = 100_000,
        retry_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._retry = retry_seconds
        self._clock = clock
        # Keyed by the announcement's payload for that membership.
        self._entries: dict[str, tuple[float, frozenset[str]]] = {}
        # Bumped by every announcement: a read that saw it change is not kept.
        self._generation = 0
        self._listening = False
        self._task: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._listening

    def start(self) -> None:
        """Start listening (inside the serving event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __call__(self, tenant_id: UUID, user_id: UUID) -> frozenset[str]:
        key = announced_as(tenant_id, user_id)
        if self._listening:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > self._clock():
                return entry[1]
        generation = self._generation
        roles = await self._db.member_roles(tenant_id, user_id)
        if self._listening and generation == self._generation:
            if len(self._entries) >= self._max_entries:
                self._entries.pop(next(iter(self._entries)))  # the oldest
            self._entries[key] = (self._clock() + self._ttl, roles)
        return roles

    def _drop(self, payload: str) -> None:
        self._generation += 1
        if payload in self._entries:
            del self._entries[payload]
        elif len(payload) != 64:  # "*" (a TRUNCATE) or anything unexpected: drop all
            self._entries.clear()

    def _stop_trusting(self) -> None:
        self._listening = False
        self._generation += 1
        self._entries.clear()

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._db.conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Announcements made before LISTEN were never seen: start empty.
                    self._entries.clear()
                    self._listening = True
                    async for notify in conn.notifies():
                        self._drop(notify.payload)
            except (psycopg.Error, OSError) as error:
                _log.warning("roles_listener_lost", error=type(error).__name__)
            finally:
                self._stop_trusting()
            await asyncio.sleep(self._retry)
