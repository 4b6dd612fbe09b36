"""Tenants and their memberships, each change audited in its transaction.

This module owns ``bastion.tenants`` and ``bastion.memberships`` (the ownership
map in docs/architecture.md): other domains read and change memberships only
through the functions below, inside their own transaction (``tx``), so their
tenant context, RLS and audit event stay theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg

from bastion import audit
from bastion.access import ROLES
from bastion.db.pool import Conn, Database
from bastion.identity import users
from bastion.tenants.errors import TenantExists, UnknownRole

MEMBER_ROLES = ROLES  # the roles of the Cedar schema


@dataclass(frozen=True)
class Member:
    user_id: UUID
    email: str
    role: str


@dataclass(frozen=True)
class Tenant:
    id: UUID
    slug: str
    name: str


async def roles_of(tx: Conn, user_id: UUID) -> tuple[str, ...]:
    """Return the roles ``user_id`` holds in ``tx``'s tenant, sorted."""
    rows = await (
        await tx.execute(
            "SELECT role FROM bastion.memberships WHERE user_id = %s ORDER BY role",
            (user_id,),
        )
    ).fetchall()
    return tuple(r["role"] for r in rows)


async def grant_role(
    tx: Conn, tenant_id: UUID, user_id: UUID, role: str, *, granted_by: UUID | None = None
) -> None:
    """Give ``user_id`` ``role`` in ``tenant_id`` (nothing if they hold it already)."""
    await tx.execute(
        "INSERT INTO bastion.memberships (tenant_id, user_id, role, granted_by) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (tenant_id, user_id, role, granted_by),
    )


async def revoke_role(tx: Conn, user_id: UUID, role: str) -> bool:
    """Take ``role`` from ``user_id`` in ``tx``'s tenant; True if they held it.

    The database refuses to remove a tenant's last owner (a check violation
    named ``tenant_keeps_an_owner``, migration 0017); that propagates.
    """
    deleted = await tx.execute(
        "DELETE FROM bastion.memberships WHERE user_id = %s AND role = %s", (user_id, role)
    )
    return bool(deleted.rowcount)


class TenantMembers:
    """The membership operations the access domain's role approvals need
    (:class:`bastion.access.approvals.Members`), each inside the caller's ``tx``."""

    async def member_id(self, tx: Conn, email: str) -> UUID | None:
        # RLS shows a member of the tenant only the tenant's members.
        return await users.user_id_by_email(tx, email)

    async def grant(
        self, tx: Conn, tenant_id: UUID, user_id: UUID, role: str, granted_by: UUID
    ) -> None:
        await grant_role(tx, tenant_id, user_id, role, granted_by=granted_by)

    async def revoke(self, tx: Conn, user_id: UUID, role: str) -> bool:
        return await revoke_role(tx, user_id, role)


class TenantService:
    """Provisioning of tenants and memberships; ``db`` is the app role's pool."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_tenant(self, slug: str, name: str, *, actor: str = "operator") -> Tenant:
        """Create a tenant; return it. Raises :class:`TenantExists` on a taken slug."""
        tenant_id = uuid4()
        try:
            async with self.db.tenant_tx(tenant_id, None, "system") as tx:
                await tx.execute(
                    "INSERT INTO bastion.tenants (id, slug, name) VALUES (%s, %s, %s)",
                    (tenant_id, slug, name),
                )
                await audit.record(
                    tx,
                    actor=actor,
                    action="tenant.create",
                    target=f"tenant:{tenant_id}",
                    details={"slug": slug},
                )
        except psycopg.errors.UniqueViolation:
            raise TenantExists(slug) from None
        return Tenant(tenant_id, slug, name)

    async def members(self, tenant_id: UUID, user_id: UUID, db_role: str) -> list[Member]:
        """Return the tenant's members and roles, as ``user_id`` sees them under RLS."""
        async with self.db.tenant_tx(tenant_id, user_id, db_role) as tx:
            rows = await (
                await tx.execute("SELECT user_id, role FROM bastion.memberships ORDER BY role")
            ).fetchall()
            roles: dict[UUID, list[str]] = {}
            for row in rows:
                roles.setdefault(UUID(str(row["user_id"])), []).append(row["role"])
            # Ordered by e-mail, then role; a member whose user row RLS hides is left
            # out, as the inner join this replaces left them out.
            people = await users.emails_by_email_order(tx, list(roles))
        return [
            Member(user_id, email, role) for user_id, email in people for role in roles[user_id]
        ]

    async def audit_trail(
        self, tenant_id: UUID, user_id: UUID, db_role: str
    ) -> list[dict[str, Any]]:
        """Return the tenant's newest audit events; RLS lets only owners and auditors read."""
        async with self.db.tenant_tx(tenant_id, user_id, db_role) as tx:
            return await audit.recent(tx)

    async def exists(self, tenant_id: UUID) -> bool:
        """Whether ``tenant_id`` is a tenant of this database (RLS shows only its row)."""
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            row = await (await tx.execute("SELECT 1 FROM bastion.tenants")).fetchone()
        return row is not None

    async def tenant_id(self, slug: str) -> UUID | None:
        """Return the id of the tenant named ``slug``, or None."""
        async with self.db.pool.connection() as conn:
            row = await (
                await conn.execute("SELECT bastion.tenant_id_by_slug(%s) AS id", (slug,))
            ).fetchone()
        return None if row is None else row["id"]

    async def add_member(
        self,
        tenant_id: UUID,
        email: str,
        role: str,
        *,
        display_name: str = "",
        actor: str = "operator",
    ) -> UUID:
        """Add ``email`` to the tenant with ``role`` (creating the user if new).

        Returns the user's id. Raises :class:`UnknownRole` for a role that is not
        a member role.
        """
        if role not in MEMBER_ROLES:
            raise UnknownRole(role)
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            # Users are global: the person may already belong to another tenant.
            user_id = await users.ensure_user(tx, email, display_name)
            await grant_role(tx, tenant_id, user_id, role)
            await audit.record(
                tx,
                actor=actor,
                action="member.add",
                target=f"user:{user_id}",
                details={"role": role},
            )
        return user_id
