"""Role changes with two-person approval (CHECKLIST R4).

Granting viewer or contributor takes effect at once. Granting an admin-grade
role (owner, billing-admin, auditor) creates a pending request that a
*different* owner of the same tenant must approve before it expires. Every
step writes an audit event in the transaction that makes the change.
Revocation deletes the membership; the guards re-read memberships on every
request, so a revoked role stops working on the very next one.

This module owns ``bastion.role_requests``. Memberships and users belong to
other domains (tenants, identity), which sit above this one: their operations
come in as :class:`Members`, run inside this module's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from uuid import UUID

import psycopg

from bastion import audit
from bastion.access.authorize import ADMIN_ROLES, ROLES
from bastion.db.pool import Conn, Database

REQUEST_LIFETIME = timedelta(hours=24)
# The database's refusal of a statement that leaves a tenant without an owner.
LAST_OWNER_CONSTRAINT = "tenant_keeps_an_owner"


class ApprovalError(Exception):
    """A role change is refused; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """The outcome of a grant: applied now, or waiting for a second owner."""

    user_id: UUID
    role: str
    request_id: UUID | None  # set when pending approval


@dataclass(frozen=True)
class PendingRequest:
    """A role request waiting for a second owner."""

    id: UUID
    user_id: UUID
    role: str
    requested_by: UUID
    created_at: datetime
    expires_at: datetime


class Members(Protocol):
    """The membership operations approvals need, inside the caller's ``tx``
    (implemented by :class:`bastion.tenants.service.TenantMembers`)."""

    async def member_id(self, tx: Conn, email: str) -> UUID | None:
        """The id of the tenant's member with ``email``, or None."""
        ...

    async def grant(
        self, tx: Conn, tenant_id: UUID, user_id: UUID, role: str, granted_by: UUID
    ) -> None:
        """Give ``user_id`` ``role`` (nothing if they hold it already)."""
        ...

    async def revoke(self, tx: Conn, user_id: UUID, role: str) -> bool:
        """Take ``role`` from ``user_id``; True if they held it."""
        ...


class ApprovalService:
    """Grants, approvals and revocations, each inside the acting owner's context."""

    def __init__(
        self, db: Database, members: Members, *, lifetime: timedelta = REQUEST_LIFETIME
    ) -> None:
        self.db = db
        self.members = members
        self.lifetime = lifetime

    async def grant(self, tenant_id: UUID, actor: UUID, email: str, role: str) -> Grant:
        """Grant ``role`` to the member ``email``; admin-grade roles wait for approval.

        Raises :class:`ApprovalError` (``unknown-role``, ``unknown-user``).
        """
        if role not in ROLES:
            raise ApprovalError("unknown-role", "no such role")
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            # RLS shows an owner only this tenant's members.
            user_id = await self.members.member_id(tx, email)
            if user_id is None:
                # Only existing members of this tenant can be granted more.
                raise ApprovalError("unknown-user", "no member of this tenant has that e-mail")
            if role not in ADMIN_ROLES:
                await self.members.grant(tx, tenant_id, user_id, role, actor)
                await audit.record(
                    tx,
                    actor=f"user:{actor}",
                    action="role.grant",
                    target=f"user:{user_id}",
                    details={"role": role},
                )
                return Grant(user_id, role, None)
            request = await (
                await tx.execute(
                    "INSERT INTO bastion.role_requests (user_id, role, requested_by, expires_at) "
                    "VALUES (%s, %s, %s, %s) RETURNING id",
                    (user_id, role, actor, datetime.now(UTC) + self.lifetime),
                )
            ).fetchone()
            assert request is not None
            await audit.record(
                tx,
                actor=f"user:{actor}",
                action="role.request",
                target=f"user:{user_id}",
                details={"role": role, "request": str(request["id"])},
            )
            return Grant(user_id, role, request["id"])

    async def approve(self, tenant_id: UUID, approver: UUID, request_id: UUID) -> Grant:
        """Approve a pending request as a second owner; return the applied grant.

        Raises :class:`ApprovalError`: ``not-found`` (no such request in this
        tenant), ``self-approval``, ``expired``, ``decided``.
        """
        async with self.db.tenant_tx(tenant_id, approver, "owner") as tx:
            row = await (
                await tx.execute(
                    "SELECT user_id, role, requested_by, status, expires_at "
                    "FROM bastion.role_requests WHERE id = %s FOR UPDATE",
                    (request_id,),
                )
            ).fetchone()
            if row is None:
                raise ApprovalError("not-found", "no such role request")
            if row["requested_by"] == approver:
                raise ApprovalError("self-approval", "a second owner must approve this request")
            if row["status"] != "pending":
                raise ApprovalError("decided", "the request was already decided")
            if row["expires_at"] <= datetime.now(UTC):
                raise ApprovalError("expired", "the request has expired; ask again")
            await tx.execute(
                "UPDATE bastion.role_requests SET status = 'approved', decided_by = %s, "
                "decided_at = now() WHERE id = %s",
                (approver, request_id),
            )
            await self.members.grant(tx, tenant_id, row["user_id"], row["role"], approver)
            await audit.record(
                tx,
                actor=f"user:{approver}",
                action="role.approve",
                target=f"user:{row['user_id']}",
                details={"role": row["role"], "request": str(request_id)},
            )
            return Grant(row["user_id"], row["role"], request_id)

    async def pending(self, tenant_id: UUID, actor: UUID) -> list[PendingRequest]:
        """The tenant's requests still waiting for a second owner, oldest first
        (expired ones are not: they can no longer be approved)."""
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            cur = await tx.execute(
                "SELECT id, user_id, role, requested_by, created_at, expires_at "
                "FROM bastion.role_requests WHERE status = 'pending' AND expires_at > now() "
                "ORDER BY created_at, id"
            )
            return [PendingRequest(**row) for row in await cur.fetchall()]

    async def cancel(self, tenant_id: UUID, actor: UUID, request_id: UUID) -> None:
        """Withdraw a pending request (its requester or any other owner); audited.

        Stored as ``rejected``, decided by the canceller (none when the
        requester withdraws their own: no one decides their own request).
        Raises :class:`ApprovalError`: ``not-found``, ``decided``.
        """
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            row = await (
                await tx.execute(
                    "SELECT user_id, role, requested_by, status "
                    "FROM bastion.role_requests WHERE id = %s FOR UPDATE",
                    (request_id,),
                )
            ).fetchone()
            if row is None:
                raise ApprovalError("not-found", "no such role request")
            if row["status"] != "pending":
                raise ApprovalError("decided", "the request was already decided")
            decider = None if row["requested_by"] == actor else actor
            await tx.execute(
                "UPDATE bastion.role_requests SET status = 'rejected', decided_by = %s, "
                "decided_at = now() WHERE id = %s",
                (decider, request_id),
            )
            await audit.record(
                tx,
                actor=f"user:{actor}",
                action="role.cancel",
                target=f"user:{row['user_id']}",
                details={"role": row["role"], "request": str(request_id)},
            )

    async def revoke(self, tenant_id: UUID, actor: UUID, user_id: UUID, role: str) -> bool:
        """Remove ``role`` from ``user_id``; True if they had it.

        Raises :class:`ApprovalError` (``last-owner``) when that would leave
        the tenant without an owner. The database decides (migration 0017),
        under a lock per tenant: a count here would race, and two owners
        removing each other at once would leave none.
        """
        try:
            async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
                revoked = await self.members.revoke(tx, user_id, role)
                if revoked:
                    await audit.record(
                        tx,
                        actor=f"user:{actor}",
                        action="role.revoke",
                        target=f"user:{user_id}",
                        details={"role": role},
                    )
                return revoked
        except psycopg.errors.CheckViolation as exc:
            if exc.diag.constraint_name != LAST_OWNER_CONSTRAINT:
                raise
            raise ApprovalError("last-owner", "a tenant keeps at least one owner") from None
