"""Billing routes: provider webhooks (public, signature-verified) and the tenant's plan.

Webhook endpoints are public in the Cedar sense (the caller is Stripe or
Adyen, proven by the signature, not a user): they read at most
:data:`MAX_BODY_BYTES`, verify, store and answer. Nothing is stored or changed
before the signature verifies; a stored event is applied by the worker.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from bastion.access.guard import Guard
from bastion.api.declare import public
from bastion.billing.card_routes import refuse_card_numbers
from bastion.billing.errors import EventTooLarge, NoSubscription
from bastion.billing.plans import PlanCatalogue
from bastion.billing.service import BillingService
from bastion.billing.webhooks import MAX_BODY_BYTES, WebhookIntake
from bastion.billing.webhooks.adyen import ACK, AdyenWebhook
from bastion.billing.webhooks.stripe import StripeWebhook
from bastion.identity.auth import Principal
from bastion.safety.pii import scan_output


class PlanChangeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    reason: str = Field(min_length=1, max_length=1000)


async def _bounded_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes the cap, never read whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise EventTooLarge(f"webhook bodies are limited to {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise EventTooLarge(f"webhook bodies are limited to {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


_EVENT_BODY = {"type": "string", "format": "binary", "maxLength": MAX_BODY_BYTES}
# The webhooks read their raw bodies (the signature covers the exact bytes).
_STRIPE_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "Stripe-Signature",
            "in": "header",
            "required": True,
            "description": "t=<timestamp>,v1=<HMAC-SHA256 of 't.body'> (Stripe's scheme); "
            "checked against every active secret, with a timestamp tolerance.",
            "schema": {"type": "string"},
        }
    ],
    "requestBody": {
        "required": True,
        "description": f"A Stripe event, as Stripe sent it; at most {MAX_BODY_BYTES} bytes.",
        "content": {"application/json": {"schema": _EVENT_BODY}},
    },
}
_ADYEN_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An Adyen notification batch; every item carries its HMAC-SHA256 "
        "signature in additionalData.hmacSignature. At most "
        f"{MAX_BODY_BYTES} bytes.",
        "content": {"application/json": {"schema": _EVENT_BODY}},
    },
    "responses": {
        "200": {
            "description": "Accepted (Adyen's acknowledgement)",
            "content": {"text/plain": {"schema": {"type": "string", "const": ACK}}},
        }
    },
}


def build_webhook_router(
    intake: WebhookIntake, stripe_hook: StripeWebhook, adyen_hook: AdyenWebhook
) -> APIRouter:
    router = APIRouter(prefix="/webhooks")

    @router.post("/stripe", **public(_STRIPE_OPENAPI))
    async def stripe_webhook(request: Request) -> JSONResponse:
        """A Stripe event: verified (``Stripe-Signature``), stored once, acknowledged."""
        body = await _bounded_body(request)
        event = stripe_hook.verify(body, request.headers.get("stripe-signature"))
        (stored,) = await intake.store([event])
        return JSONResponse({"received": True, "duplicate": stored.duplicate})

    @router.post("/adyen", **public(_ADYEN_OPENAPI))
    async def adyen_webhook(request: Request) -> PlainTextResponse:
        """An Adyen notification batch: every item's HMAC verified, stored once."""
        body = await _bounded_body(request)
        events = adyen_hook.verify(body)
        await intake.store(events)
        return PlainTextResponse(ACK)

    return router


def build_router(service: BillingService, catalogue: PlanCatalogue, guard: Guard) -> APIRouter:
    # A card number in any billing request is refused before anything reads it (P4).
    router = APIRouter(
        prefix="/tenants/{tenant_id}/billing", dependencies=[Depends(refuse_card_numbers)]
    )

    @router.get("/subscription")
    async def subscription(
        principal: Principal = Depends(guard("billing:read", "Billing")),
    ) -> dict[str, Any]:
        """The tenant's subscription and the entitlements it gives now."""
        try:
            sub = await service.subscription(principal.tenant_id, principal.db_role)
        except NoSubscription:
            out = None
        else:
            out = _json(asdict(sub))
            out.pop("source_version", None)
            out.pop("source_event_id", None)
        entitlements = await service.entitlements(principal.tenant_id)
        return {"subscription": out, "entitlements": _json(asdict(entitlements))}

    @router.get("/plans")
    async def plans(
        principal: Principal = Depends(guard("billing:read", "Billing")),
    ) -> dict[str, Any]:
        return {"plans": [_json(asdict(p)) for p in await catalogue.list() if p.active]}

    @router.put("/plan")
    async def change_plan(
        body: PlanChangeRequest,
        principal: Principal = Depends(guard("plan:change", "Plan")),
    ) -> dict[str, Any]:
        """Move the tenant down to a plan that costs and gives no more, now (who/what/
        when/why recorded; budget follows). An upgrade is bought through checkout:
        403 ``plan-upgrade-needs-payment``; an inactive plan is 422 ``plan-inactive``."""
        sub = await service.change_plan(
            principal.tenant_id,
            body.plan,
            actor=f"user:{principal.user_id}",
            reason=body.reason,
            user_id=principal.user_id,
        )
        return {"plan": sub.plan_code, "status": sub.status}

    @router.get("/plan-changes")
    async def plan_changes(
        principal: Principal = Depends(guard("billing:read", "Billing")),
    ) -> dict[str, Any]:
        changes = await service.plan_changes(principal.tenant_id, principal.db_role)
        # A reason is free text typed by an admin, read by every billing reader:
        # personal data in it is masked ([EMAIL], ...), never shown as typed.
        return {
            "changes": [_json({**asdict(c), "reason": scan_output(c.reason).text}) for c in changes]
        }

    return router
