"""A tenant's billing account over HTTP: checkout, usage, receipts, and the receipt keys.

Paths follow the project's convention — the tenant in the path, checked
against the token (another tenant's is 404) — rather than the issue's
shorter ``/billing/checkout`` and ``/billing/usage``:

    POST /tenants/{t}/billing/checkout            billing:manage (MFA)
    GET  /tenants/{t}/billing/usage               usage:read
    GET  /tenants/{t}/billing/receipts            billing:read
    GET  /tenants/{t}/billing/receipts/{id}       billing:read
    GET  /.well-known/bastion-receipt-keys        public (a JWK Set)

Every tenant route refuses a body or query carrying a card number before the
route reads it (:func:`bastion.billing.card_routes.refuse_card_numbers`).
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from bastion.access.guard import Guard
from bastion.api.declare import PUBLIC_ROUTE
from bastion.api.problems import NotFound, Problem, problem_type
from bastion.billing.card_routes import refuse_card_numbers
from bastion.billing.checkout import CheckoutService
from bastion.billing.metering import MeteringService
from bastion.billing.receipts import KEYS_PATH, ReceiptKeys, ReceiptService
from bastion.identity.auth import Principal


class CheckoutNotConfigured(Problem):
    # This deployment does not offer checkout: to a client that is an operation
    # that is not there (404), not a server fault (5xx).
    type = problem_type("checkout-not-configured")
    title = "Checkout is not configured"
    status = 404


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")


class JwkSetResponse(JSONResponse):
    """A JWK Set, as its media type says (RFC 7517 section 8.5); so documented."""

    media_type = "application/jwk-set+json"


def build_keys_router(keys: ReceiptKeys) -> APIRouter:
    """The public JWK Set of the receipt keys (no caller needed: anyone may verify)."""
    router = APIRouter()

    @router.get(KEYS_PATH, response_class=JwkSetResponse, **PUBLIC_ROUTE)
    async def receipt_keys() -> Response:
        return JwkSetResponse(keys.jwks(), headers={"Cache-Control": "public, max-age=300"})

    return router


def build_router(
    guard: Guard,
    *,
    metering: MeteringService,
    receipts: ReceiptService,
    checkout: CheckoutService | None = None,
) -> APIRouter:
    router = APIRouter(
        prefix="/tenants/{tenant_id}/billing", dependencies=[Depends(refuse_card_numbers)]
    )

    @router.post("/checkout", status_code=201)
    async def create_checkout(
        body: CheckoutRequest,
        idempotency_key: Annotated[
            str | None, Header(min_length=8, max_length=200, pattern=r"^[\x21-\x7e]+$")
        ] = None,
        principal: Principal = Depends(guard("billing:manage", "Billing")),
    ) -> dict[str, Any]:
        """A hosted Stripe Checkout page for ``plan``: its URL (the card is typed there)."""
        if checkout is None:
            raise CheckoutNotConfigured("checkout is not configured on this deployment")
        session = await checkout.create(
            principal.tenant_id, principal.user_id, body.plan, idempotency_key=idempotency_key
        )
        return {"id": session.id, "url": session.url}

    @router.get("/usage")
    async def usage(
        periods: Annotated[int, Query(ge=1, le=120)] = 24,
        principal: Principal = Depends(guard("usage:read", "Usage")),
    ) -> dict[str, Any]:
        """Calls and tokens per budget period, from the gateway's own records."""
        found = await metering.usage(
            principal.tenant_id, principal.user_id, principal.db_role, limit=periods
        )
        return {"periods": [p.as_json() for p in found]}

    @router.get("/receipts")
    async def list_receipts(
        principal: Principal = Depends(guard("billing:read", "Billing")),
    ) -> dict[str, Any]:
        found = await receipts.list(principal.tenant_id, principal.user_id, principal.db_role)
        return {"receipts": [r.as_json() for r in found]}

    @router.get("/receipts/{receipt_id}")
    async def get_receipt(
        receipt_id: UUID, principal: Principal = Depends(guard("billing:read", "Billing"))
    ) -> dict[str, Any]:
        """One receipt: its content and the JWS to verify (save ``jws`` as the file)."""
        found = await receipts.get(
            principal.tenant_id, principal.user_id, principal.db_role, receipt_id
        )
        if found is None:
            raise NotFound("no such receipt")
        return found.as_json()

    return router
