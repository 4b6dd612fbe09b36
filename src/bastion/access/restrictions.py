"""Incident restrictions every guarded request obeys: tenant lockdowns and session cut-offs.

Two operator controls of the incident runbook (``bastion incident lockdown``,
``bastion incident revoke-sessions``) must hold in every process at once,
without a database round trip per request:

* a *locked* tenant is read-only: only the actions in :data:`READ_ACTIONS`
  pass; everything else (writes, spending, tool runs, new keys) is refused.
  An action missing from the list counts as a write: a new action is refused
  under lockdown until someone decides it only reads.
* a *cut-off* refuses access tokens issued (``iat``) before it, for one
  person everywhere, for one tenant, or for everyone. Refresh families are
  revoked with it (``bastion.revoke_sessions_scoped``); the cut-off is what
  stops the DPoP-bound access tokens already out, which otherwise live out
  their minutes. ``iat`` has one-second precision, so a token issued in the
  same second as the cut-off (before or after it) is refused too: fail closed.

The whole state is small (locked tenants; cut-offs younger than the longest
token lifetime), so each process keeps it in memory as one snapshot
(``bastion.access_restrictions()``, migration 0035) and re-reads it when
PostgreSQL announces a change on ``bastion_restrictions`` (LISTEN/NOTIFY,
milliseconds after the commit). It fails closed like
:class:`bastion.access.roles.LiveRoles`: while the listener is not connected
every check re-reads the snapshot, and even while it is, a snapshot is kept
at most ``ttl_seconds``.

This module owns ``bastion.tenant_lockdowns`` and ``bastion.session_cutoffs``:
the incident service changes them through :func:`set_lockdown`,
:func:`clear_lockdown` and :func:`cut_sessions`, inside its own transaction.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from bastion.db.notify import Listener
from bastion.db.pool import Conn, Database

CHANNEL = "bastion_restrictions"
PLATFORM = UUID(int=0)  # the platform tenant: a cut-off there reaches every tenant

# Actions that only read a tenant's data: what a locked tenant may still do.
READ_ACTIONS: frozenset[str] = frozenset(
    {
        "document:read",
        "member:list",
        "member:requests",
        "audit:read",
        "billing:read",
        "usage:read",
        "account:read",
        "sampling:read",
        "egress:read",
        "safety:read",
        # Ending one's own other sessions only takes access away: allowed in an incident.
        "account:sessions",
    }
)

_SNAPSHOT = "SELECT kind, tenant_id, user_id, since FROM bastion.access_restrictions()"


@dataclass(frozen=True)
class Snapshot:
    """Locked tenants, and cut-offs as whole epoch seconds keyed by (tenant, user|None)."""

    locked: frozenset[UUID] = frozenset()
    cutoffs: dict[tuple[UUID, UUID | None], int] = field(default_factory=dict)

    def cutoff_for(self, tenant_id: UUID, user_id: UUID) -> int | None:
        found = [
            self.cutoffs.get(key)
            for key in (
                (PLATFORM, None),
                (PLATFORM, user_id),
                (tenant_id, None),
                (tenant_id, user_id),
            )
        ]
        values = [v for v in found if v is not None]
        return max(values) if values else None


class LiveRestrictions:
    """``await restrictions.snapshot()``: the lockdowns and cut-offs in force now."""

    def __init__(
        self,
        db: Database,
        *,
        ttl_seconds: float = 5.0,
        retry_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._ttl = ttl_seconds
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._expires = 0.0
        self._generation = 0  # bumped by every announcement
        self._listening = False
        self._lock: asyncio.Lock | None = None
        self._listener = Listener(
            db,
            CHANNEL,
            on_notify=self._changed,
            on_ready=self._ready,
            on_lost=self._stop_trusting,
            retry_seconds=retry_seconds,
        )
        self._started = False

    @property
    def listening(self) -> bool:
        return self._listening

    def start(self) -> None:
        """Start listening (inside the serving event loop); idempotent."""
        if not self._started:
            self._started = True
            self._listener.start()

    async def aclose(self) -> None:
        await self._listener.aclose()
        self._started = False

    async def snapshot(self) -> Snapshot:
        """The restrictions now: kept while listening (and younger than the TTL),
        re-read otherwise."""
        self.start()
        current = self._snapshot
        if current is not None and self._listening and self._clock() < self._expires:
            return current
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            current = self._snapshot
            if current is not None and self._listening and self._clock() < self._expires:
                return current  # another request re-read it meanwhile
            generation = self._generation
            fresh = await self._read()
            if self._listening and generation == self._generation:
                self._snapshot, self._expires = fresh, self._clock() + self._ttl
            else:
                self._snapshot = None  # an announcement overlapped the read: not kept
            return fresh

    async def _read(self) -> Snapshot:
        # Across tenants: the platform context (the function returns nothing in any other).
        async with self._db.tenant_tx(PLATFORM, None, "system") as tx:
            rows = await (await tx.execute(_SNAPSHOT)).fetchall()
        locked: set[UUID] = set()
        cutoffs: dict[tuple[UUID, UUID | None], int] = {}
        for row in rows:
            if row["kind"] == "lockdown":
                locked.add(row["tenant_id"])
            else:
                # Rounded up: an iat in the cut-off's own second is refused too (fail closed).
                cutoffs[(row["tenant_id"], row["user_id"])] = math.ceil(row["since"].timestamp())
        return Snapshot(frozenset(locked), cutoffs)

    def _changed(self, _payload: str) -> None:
        self._generation += 1
        self._snapshot = None

    def _ready(self) -> None:
        self._generation += 1
        self._snapshot = None
        self._listening = True

    def _stop_trusting(self) -> None:
        self._listening = False
        self._generation += 1
        self._snapshot = None


# -- writes (the incident service's, inside its transaction) ---------------------------


async def set_lockdown(tx: Conn, tenant_id: UUID, *, actor: str, reason: str) -> bool:
    """Lock ``tenant_id`` (``tx``: its ``system`` context); False if it already was."""
    cursor = await tx.execute(
        "INSERT INTO bastion.tenant_lockdowns (tenant_id, locked_by, reason)"
        " VALUES (%s, %s, %s) ON CONFLICT (tenant_id) DO NOTHING",
        (tenant_id, actor[:128], reason[:200]),
    )
    return cursor.rowcount == 1


async def clear_lockdown(tx: Conn, tenant_id: UUID) -> bool:
    """Lift the lockdown of ``tenant_id``; False if it was not locked."""
    cursor = await tx.execute(
        "DELETE FROM bastion.tenant_lockdowns WHERE tenant_id = %s", (tenant_id,)
    )
    return cursor.rowcount == 1


async def is_locked(tx: Conn, tenant_id: UUID) -> bool:
    row = await (
        await tx.execute(
            "SELECT 1 AS locked FROM bastion.tenant_lockdowns WHERE tenant_id = %s", (tenant_id,)
        )
    ).fetchone()
    return row is not None


async def cut_sessions(tx: Conn, tenant_id: UUID, user_id: UUID | None) -> None:
    """Refuse the access tokens issued until now in the scope (``tx``: the scope
    tenant's ``system`` context; :data:`PLATFORM` for a person or for everyone)."""
    await tx.execute(
        "INSERT INTO bastion.session_cutoffs (tenant_id, user_id, not_before)"
        " VALUES (%s, %s, clock_timestamp())"
        " ON CONFLICT (tenant_id, user_id) DO UPDATE SET not_before = EXCLUDED.not_before",
        (tenant_id, user_id),
    )
