"""The audit chain's published checkpoints over HTTP.

    GET /tenants/{t}/audit/checkpoints         audit:read (owners, auditors; MFA)
    GET /.well-known/bastion-audit-keys        public (a JWK Set)

A tenant's owners and auditors read the tenant's signed heads (compact JWS,
RFC 7515, ``alg: Ed25519``) and check them against the published keys
(RFC 8037 OKP JWKs): anyone holding an exported trail can then prove it is the
one the platform signed. Only the tenant's own statements are served: the
global statement names the digests of every tenant that grew in a run, which
would tell one tenant how busy the others are.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from bastion.access.guard import Guard
from bastion.api.declare import PUBLIC_ROUTE
from bastion.audit.checkpoints import KEYS_PATH, MAX_PAGE, AuditKeys, tenant_checkpoints
from bastion.db.pool import Database
from bastion.identity.auth import Principal


class JwkSetResponse(JSONResponse):
    """A JWK Set, as its media type says (RFC 7517 section 8.5); so documented."""

    media_type = "application/jwk-set+json"


def build_router(db: Database, guard: Guard) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant_id}/audit")

    @router.get("/checkpoints")
    async def audit_checkpoints(
        after: Annotated[
            int, Query(ge=0, le=2**62, description="checkpoints after this number")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        principal: Principal = Depends(guard("audit:read", "AuditLog")),
    ) -> dict[str, Any]:
        """The tenant's signed heads, oldest first: owners and auditors, with MFA."""
        # The database holds the line too: only these roles read checkpoint rows.
        role = "owner" if "owner" in principal.roles else "auditor"
        rows = await tenant_checkpoints(
            db, principal.tenant_id, principal.user_id, role, after=after, limit=limit
        )
        return {
            "keys": KEYS_PATH,
            "checkpoints": [
                {"number": r.number, "seq": r.seq, "hash": r.hash.hex(), "jws": r.jws} for r in rows
            ],
        }

    return router


def build_keys_router(keys: AuditKeys) -> APIRouter:
    """The public JWK Set of the checkpoint-signing keys (anyone may verify)."""
    router = APIRouter()

    @router.get(KEYS_PATH, response_class=JwkSetResponse, **PUBLIC_ROUTE)
    async def audit_keys() -> Response:
        return JwkSetResponse(keys.jwks(), headers={"Cache-Control": "public, max-age=300"})

    return router
