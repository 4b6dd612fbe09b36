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

import hashlib
import time
from collections.abc import Callable
from uuid import UUID

from bastion.db.notify import Listener
from bastion.db.pool import Database

CHANNEL = "bastion_memberships"


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
        self._clock = clock
        # Keyed by the announcement's payload for that membership.
        self._entries: dict[str, tuple[float, frozenset[str]]] = {}
        # Bumped by every announcement: a read that saw it change is not kept.
        self._generation = 0
        self._listening = False
        self._listener = Listener(
            db,  # signs in as the pool does now: a rotated password is followed
            CHANNEL,
            on_notify=self._drop,
            on_ready=self._ready,
            on_lost=self._stop_trusting,
            retry_seconds=retry_seconds,
        )

    @property
    def listening(self) -> bool:
        return self._listening

    def start(self) -> None:
        """Start listening (inside the serving event loop)."""
        self._listener.start()

    async def aclose(self) -> None:
        await self._listener.aclose()

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

    def _ready(self) -> None:
        # Announcements made before LISTEN were never seen: start empty.
        self._entries.clear()
        self._listening = True
