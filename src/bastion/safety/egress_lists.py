"""A tenant's egress policy in the database: its allow-list entries and its
action (:mod:`bastion.safety.egress`; migration 0027, under RLS).

Owners change them (the route adds MFA and Cedar ``egress:configure``), each
change audited in its own transaction; owners and auditors read them. The
gateway reads a tenant's rules with :meth:`EgressPolicies.rules`, kept
``ttl_seconds`` per process, so a change reaches every gateway within that
time. A read that fails raises :class:`EgressUnavailable`: the caller refuses
(fail closed), it never assumes an empty policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

from bastion import audit
from bastion.db.pool import Database
from bastion.errors import BastionError, Kind
from bastion.safety.egress import (
    ACTIONS,
    ENTRY_KINDS,
    AllowEntry,
    EgressAction,
    EgressRules,
    EntryKind,
    normalise_entry,
)
from bastion.safety.tenant_cache import TenantCache

MAX_ENTRIES = 1_000  # per tenant


class InvalidAllowEntry(BastionError):
    slug = "invalid-egress-entry"
    title = "Not an egress allow-list entry"
    kind = Kind.INVALID


class AllowEntryNotFound(BastionError):
    slug = "egress-entry-not-found"
    title = "No such egress allow-list entry"
    kind = Kind.NOT_FOUND


class EgressUnavailable(BastionError):
    slug = "egress-policy-unavailable"
    title = "The tenant's egress policy could not be read"
    kind = Kind.UNAVAILABLE


@dataclass(frozen=True)
class StoredEntry:
    id: UUID
    kind: EntryKind
    value: str
    tool: str | None
    created_by: UUID | None
    created_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "kind": self.kind,
            "value": self.value,
            "tool": self.tool,
            "created_by": str(self.created_by) if self.created_by else None,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class EgressPolicy:
    action: EgressAction
    entries: tuple[StoredEntry, ...]

    def public(self) -> dict[str, Any]:
        return {"action": self.action, "entries": [e.public() for e in self.entries]}


class EgressPolicies:
    def __init__(self, db: Database, ttl_seconds: float = 5.0) -> None:
        self.db = db
        self._cache: TenantCache[EgressRules] = TenantCache(ttl_seconds)

    # -- the gateway's read --------------------------------------------------------------

    @property
    def ttl_seconds(self) -> float:
        """How long a tenant's value is kept (0: read on every call)."""
        return self._cache.ttl_seconds

    @ttl_seconds.setter
    def ttl_seconds(self, seconds: float) -> None:
        self._cache.ttl_seconds = seconds

    async def rules(self, tenant_id: UUID) -> EgressRules:
        """The tenant's rules (cached ``ttl_seconds``); raise :class:`EgressUnavailable`."""
        try:
            return await self._cache.get(tenant_id, lambda: self._rules(tenant_id))
        except Exception as error:  # any failure: refuse, never an empty policy
            raise EgressUnavailable(
                "the tenant's egress allow-list could not be read", retry_after=5
            ) from error

    async def _rules(self, tenant_id: UUID) -> EgressRules:
        policy = await self._read(tenant_id, None, "system")
        return EgressRules(
            policy.action,
            tuple(AllowEntry(e.kind, e.value, e.tool) for e in policy.entries),
        )

    def forget(self, tenant_id: UUID) -> None:
        """Drop this process's cached rules of the tenant (others wait for the TTL)."""
        self._cache.forget(tenant_id)

    # -- owners and auditors -------------------------------------------------------------

    async def policy(self, tenant_id: UUID, actor: UUID, role: str) -> EgressPolicy:
        """The tenant's policy as ``actor`` reads it (RLS: their tenant only)."""
        return await self._read(tenant_id, actor, role)

    async def _read(self, tenant_id: UUID, actor: UUID | None, role: str) -> EgressPolicy:
        async with self.db.tenant_tx(tenant_id, actor, role) as tx:
            row = await (await tx.execute("SELECT action FROM bastion.egress_policies")).fetchone()
            rows = await (
                await tx.execute(
                    "SELECT id, kind, value, tool, created_by, created_at "
                    "FROM bastion.egress_allow_entries ORDER BY created_at, id"
                )
            ).fetchall()
        action = cast(EgressAction, row["action"]) if row else "block"
        entries = tuple(
            StoredEntry(r["id"], r["kind"], r["value"], r["tool"], r["created_by"], r["created_at"])
            for r in rows
        )
        return EgressPolicy(action, entries)

    async def allow(
        self, tenant_id: UUID, actor: UUID, kind: str, value: str, tool: str | None = None
    ) -> StoredEntry:
        """Add an entry as the owner ``actor``; audited (``egress.allow``). Raises
        :class:`InvalidAllowEntry` (nothing written) for a value that is not one
        of ``kind``, or past :data:`MAX_ENTRIES`. Adding an entry twice returns the first."""
        if kind not in ENTRY_KINDS:
            raise InvalidAllowEntry("kind is one of host, url_prefix, email_domain")
        try:
            stored = normalise_entry(kind, value)
        except ValueError as error:
            raise InvalidAllowEntry(f"not a valid {kind}: {error}", reason="bad-value") from None
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            count = await (
                await tx.execute("SELECT count(*) AS n FROM bastion.egress_allow_entries")
            ).fetchone()
            if count is not None and count["n"] >= MAX_ENTRIES:
                raise InvalidAllowEntry(
                    f"a tenant has at most {MAX_ENTRIES} entries", reason="too-many"
                )
            row = await (
                await tx.execute(
                    "INSERT INTO bastion.egress_allow_entries (kind, value, tool, created_by) "
                    "VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (tenant_id, coalesce(tool, ''), kind, value) DO NOTHING "
                    "RETURNING id, kind, value, tool, created_by, created_at",
                    (kind, stored, tool, actor),
                )
            ).fetchone()
            if row is None:  # already there: no change, no event
                row = await (
                    await tx.execute(
                        "SELECT id, kind, value, tool, created_by, created_at "
                        "FROM bastion.egress_allow_entries WHERE kind = %s AND value = %s "
                        "AND coalesce(tool, '') = coalesce(%s, '')",
                        (kind, stored, tool),
                    )
                ).fetchone()
                assert row is not None
            else:
                await audit.record(
                    tx,
                    actor=f"user:{actor}",
                    action="egress.allow",
                    target=f"egress_entry:{row['id']}",
                    details={"kind": kind, "value": stored, "tool": tool},
                )
        self.forget(tenant_id)
        return StoredEntry(
            row["id"], row["kind"], row["value"], row["tool"], row["created_by"], row["created_at"]
        )

    async def disallow(self, tenant_id: UUID, actor: UUID, entry_id: UUID) -> None:
        """Remove an entry as the owner ``actor``; audited (``egress.disallow``).
        Raises :class:`AllowEntryNotFound` when the tenant has no such entry."""
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            row = await (
                await tx.execute(
                    "DELETE FROM bastion.egress_allow_entries WHERE id = %s "
                    "RETURNING kind, value, tool",
                    (entry_id,),
                )
            ).fetchone()
            if row is None:
                raise AllowEntryNotFound("this tenant has no such entry")
            await audit.record(
                tx,
                actor=f"user:{actor}",
                action="egress.disallow",
                target=f"egress_entry:{entry_id}",
                details={"kind": row["kind"], "value": row["value"], "tool": row["tool"]},
            )
        self.forget(tenant_id)

    async def set_action(self, tenant_id: UUID, actor: UUID, action: str, reason: str) -> str:
        """Set what a violation does (``block`` or ``flag``) as the owner ``actor``;
        audited (``egress.configure``) with the owner's ``reason``."""
        if action not in ACTIONS:
            raise InvalidAllowEntry("the action is block or flag", reason="bad-action")
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            await tx.execute(
                "INSERT INTO bastion.egress_policies (action, set_by) VALUES (%s, %s) "
                "ON CONFLICT (tenant_id) DO UPDATE "
                "SET action = excluded.action, set_by = excluded.set_by, updated_at = now()",
                (action, actor),
            )
            await audit.record(
                tx,
                actor=f"user:{actor}",
                action="egress.configure",
                target=f"tenant:{tenant_id}",
                details={"action": action, "reason": reason},
            )
        self.forget(tenant_id)
        return action
