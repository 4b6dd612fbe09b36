"""Creating tenants and adding members, each change audited in its transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg

from bastion import audit
from bastion.access import ROLES
from bastion.db.pool import Conn, Database
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
                await tx.execute(
                    "SELECT u.id, u.email, m.role FROM bastion.memberships m "
                    "JOIN bastion.users u ON u.id = m.user_id ORDER BY u.email, m.role"
                )
            ).fetchall()
        return [Member(r["id"], r["email"], r["role"]) for r in rows]

    async def audit_trail(
        self, tenant_id: UUID, user_id: UUID, db_role: str
    ) -> list[dict[str, Any]]:
        """Return the tenant's newest audit events; RLS lets only owners and auditors read."""
        async with self.db.tenant_tx(tenant_id, user_id, db_role) as tx:
            return await audit.recent(tx)

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
            new_id = uuid4()
            await tx.execute(
                "INSERT INTO bastion.users (id, email, display_name) VALUES (%s, %s, %s) "
                "ON CONFLICT (email) DO NOTHING",
                (new_id, email, display_name),
            )
            user_id = await self._user_id(tx, email, new_id)
            await tx.execute(
                "INSERT INTO bastion.memberships (tenant_id, user_id, role) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (tenant_id, user_id, role),
            )
            await audit.record(
                tx,
                actor=actor,
                action="member.add",
                target=f"user:{user_id}",
                details={"role": role},
            )
        return user_id

    async def _user_id(self, tx: Conn, email: str, new_id: UUID) -> UUID:
        row = await (
            await tx.execute("SELECT id FROM bastion.users WHERE email = %s", (email,))
        ).fetchone()
        return new_id if row is None else UUID(str(row["id"]))
