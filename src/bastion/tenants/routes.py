"""Tenant-scoped HTTP routes. The tenant is the token's; a path naming another
tenant is answered 404, so its identifiers cannot be confirmed."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Depends

from bastion.access.declare import action
from bastion.api.problems import Problem, problem_type
from bastion.db.pool import Database
from bastion.identity.auth import (
    Authenticator,
    Principal,
    require_mfa_for_admin,
    require_tenant,
)


class Forbidden(Problem):
    type = problem_type("forbidden")
    title = "Forbidden"
    status = 403


def build_router(db: Database, authenticator: Authenticator) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant_id}")

    @router.get("/members", **action("member:list"))
    async def members(
        tenant_id: UUID, principal: Principal = Depends(authenticator)
    ) -> dict[str, Any]:
        """The tenant's members and their roles."""
        require_tenant(principal, tenant_id)
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

    @router.get("/audit", **action("audit:read"))
    async def audit_events(
        tenant_id: UUID, principal: Principal = Depends(authenticator)
    ) -> dict[str, Any]:
        """The tenant's audit trail: owners and auditors, with MFA."""
        require_tenant(principal, tenant_id)
        if not {"owner", "auditor"} & set(principal.roles):
            raise Forbidden("reading the audit trail needs the owner or auditor role")
        require_mfa_for_admin(principal)
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
