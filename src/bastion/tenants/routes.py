"""Tenant-scoped HTTP routes. The tenant is the token's; a path naming another
tenant is answered 404, so its identifiers cannot be confirmed. Each route's
guard authenticates the caller and asks Cedar for its action."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Depends

from bastion.access.guard import Guard
from bastion.db.pool import Database
from bastion.identity.auth import Principal


def build_router(db: Database, guard: Guard) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant_id}")

    @router.get("/members")
    async def members(
        tenant_id: UUID, principal: Principal = Depends(guard("member:list", "Member"))
    ) -> dict[str, Any]:
        """The tenant's members and their roles."""
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            rows = await (
                await tx.execute(
                    "SELECT u.id, u.email, m.role FROM bastion.memberships m "
                    "JOIN bastion.users u ON u.id = m.user_id ORDER BY u.email, m.role"
                )
            ).fetchall()
        return {
            "members": [
                {"user_id": str(r["id"]), "email": r["email"], "role": r["role"]} for r in rows
            ]
        }

    @router.get("/audit")
    async def audit_events(
        tenant_id: UUID, principal: Principal = Depends(guard("audit:read", "AuditLog"))
    ) -> dict[str, Any]:
        """The tenant's audit trail: owners and auditors, with MFA (Cedar decides)."""
        # The database holds the line too: only these roles read audit rows.
        role = "owner" if "owner" in principal.roles else "auditor"
        async with db.tenant_tx(principal.tenant_id, principal.user_id, role) as tx:
            rows = await (
                await tx.execute(
                    "SELECT seq, at, actor, action, target FROM bastion.audit_events "
                    "ORDER BY seq DESC LIMIT 100"
                )
            ).fetchall()
        return {"events": [{**r, "at": r["at"].isoformat()} for r in rows]}

    return router
