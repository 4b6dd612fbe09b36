"""Tenant-scoped HTTP routes. The tenant is the token's; a path naming another
tenant is answered 404, so its identifiers cannot be confirmed. Each route's
guard authenticates the caller and asks Cedar for its action."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bastion.access.approvals import ApprovalError, ApprovalService
from bastion.access.guard import Guard
from bastion.api.problems import Problem, problem_type
from bastion.db.pool import Database
from bastion.errors import BastionError, Kind
from bastion.identity.auth import Principal
from bastion.safety.pii import mask_email
from bastion.tenants.service import TenantMembers, TenantService


class RoleChangeRefused(BastionError):
    slug = "role-change-refused"
    title = "Role change refused"
    kind = Kind.CONFLICT
    # Raised with the kind of its reason (:func:`_refused`): so documented.
    kinds = (Kind.CONFLICT, Kind.NOT_FOUND, Kind.UNPROCESSABLE, Kind.FORBIDDEN)


class RoleGrant(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    role: str = Field(min_length=1, max_length=32)


_KIND = {
    "not-found": Kind.NOT_FOUND,
    "unknown-user": Kind.NOT_FOUND,
    "unknown-role": Kind.UNPROCESSABLE,
    "self-approval": Kind.FORBIDDEN,
}


def _refused(exc: ApprovalError) -> RoleChangeRefused:
    # One stable type; the reason says which rule refused (self-approval, expired…).
    return RoleChangeRefused(str(exc), kind=_KIND.get(exc.reason, Kind.CONFLICT), reason=exc.reason)


# Changing who holds admin roles needs a recent sign-in, not just an MFA token
# kept alive by refreshes for hours (RFC 9470 max_age).
MFA_FRESHNESS = 600


class FreshSignInRequired(Problem):
    type = problem_type("mfa-required")
    title = "A recent sign-in with a second factor is required"
    status = 403


def _require_fresh(principal: Principal) -> None:
    signed_in = principal.claims.auth_time
    if signed_in is None or time.time() - signed_in > MFA_FRESHNESS:
        problem = FreshSignInRequired(
            f"sign in again with TOTP (within {MFA_FRESHNESS // 60} minutes) to change roles",
            max_age=MFA_FRESHNESS,
        )
        problem.headers = {
            "WWW-Authenticate": 'DPoP error="insufficient_user_authentication", '
            f'error_description="a fresh sign-in is required", max_age={MFA_FRESHNESS}'
        }
        raise problem


def build_router(db: Database, guard: Guard) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant_id}")
    approvals = ApprovalService(db, TenantMembers())
    tenants = TenantService(db)

    @router.post("/members")
    async def grant_role(
        body: RoleGrant, principal: Principal = Depends(guard("member:grant", "Member"))
    ) -> JSONResponse:
        """Grant a role; admin-grade roles wait for a second owner's approval (202)."""
        _require_fresh(principal)
        try:
            grant = await approvals.grant(
                principal.tenant_id, principal.user_id, body.email, body.role
            )
        except ApprovalError as exc:
            raise _refused(exc) from None
        if grant.request_id is None:
            return JSONResponse(
                {"status": "granted", "user_id": str(grant.user_id), "role": grant.role}
            )
        return JSONResponse(
            {"status": "pending", "request_id": str(grant.request_id), "role": grant.role},
            status_code=202,
        )

    @router.post("/role-requests/{request_id}/approve")
    async def approve_role(
        request_id: UUID, principal: Principal = Depends(guard("member:approve", "Approval"))
    ) -> dict[str, str]:
        """Approve a pending admin-role request: a second owner, not the requester."""
        _require_fresh(principal)
        try:
            grant = await approvals.approve(principal.tenant_id, principal.user_id, request_id)
        except ApprovalError as exc:
            raise _refused(exc) from None
        return {"status": "granted", "user_id": str(grant.user_id), "role": grant.role}

    @router.get("/role-requests")
    async def pending_role_requests(
        principal: Principal = Depends(guard("member:requests", "Approval")),
    ) -> dict[str, Any]:
        """The admin-role requests waiting for a second owner (not expired), oldest first."""
        pending = await approvals.pending(principal.tenant_id, principal.user_id)
        return {
            "requests": [
                {
                    "request_id": str(r.id),
                    "user_id": str(r.user_id),
                    "role": r.role,
                    "requested_by": str(r.requested_by),
                    "created_at": r.created_at.isoformat(),
                    "expires_at": r.expires_at.isoformat(),
                }
                for r in pending
            ]
        }

    @router.post("/role-requests/{request_id}/cancel")
    async def cancel_role_request(
        request_id: UUID, principal: Principal = Depends(guard("member:cancel", "Approval"))
    ) -> dict[str, str]:
        """Withdraw a pending admin-role request: its requester or any other owner."""
        try:
            await approvals.cancel(principal.tenant_id, principal.user_id, request_id)
        except ApprovalError as exc:
            raise _refused(exc) from None
        return {"status": "cancelled", "request_id": str(request_id)}

    @router.delete("/members/{user_id}/roles/{role}", status_code=204)
    async def revoke_role(
        user_id: UUID, role: str, principal: Principal = Depends(guard("member:revoke", "Member"))
    ) -> None:
        """Remove a role; it stops working on the holder's very next request."""
        try:
            removed = await approvals.revoke(principal.tenant_id, principal.user_id, user_id, role)
        except ApprovalError as exc:
            raise _refused(exc) from None
        if not removed:
            raise RoleChangeRefused(
                "that member does not hold that role", kind=Kind.NOT_FOUND, reason="not-found"
            )

    @router.get("/members")
    async def members(
        tenant_id: UUID, principal: Principal = Depends(guard("member:list", "Member"))
    ) -> dict[str, Any]:
        """The tenant's members and their roles.

        Others' e-mail addresses are personal data and this list goes to every
        role: they are shown masked (``j***@example.com``); the caller's own in full.
        """
        rows = await tenants.members(principal.tenant_id, principal.user_id, principal.db_role)
        return {
            "members": [
                {
                    "user_id": str(m.user_id),
                    "email": m.email if m.user_id == principal.user_id else mask_email(m.email),
                    "role": m.role,
                }
                for m in rows
            ]
        }

    @router.get("/audit")
    async def audit_events(
        tenant_id: UUID, principal: Principal = Depends(guard("audit:read", "AuditLog"))
    ) -> dict[str, Any]:
        """The tenant's audit trail: owners and auditors, with MFA (Cedar decides)."""
        # The database holds the line too: only these roles read audit rows.
        role = "owner" if "owner" in principal.roles else "auditor"
        rows = await tenants.audit_trail(principal.tenant_id, principal.user_id, role)
        return {"events": [{**r, "at": r["at"].isoformat()} for r in rows]}

    return router
