"""Prompt sampling over HTTP: the owner's rate and each user's own consent.

* ``GET /tenants/{tenant_id}/prompt-sampling`` (Cedar ``sampling:read``: owners,
  auditors) and ``PUT`` of the same with ``{"rate": 0..1}`` (``sampling:configure``:
  owners, with MFA). The tenant is the token's; a path naming another is 404.
* ``PUT`` / ``DELETE /me/prompt-sampling-consent`` (``account:sampling``): the
  caller's own consent in their token's tenant, never anyone else's.

Thin: the logic and the audit events are in :class:`PromptSampling`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bastion.access.guard import Guard
from bastion.gateway.sampling import PromptSampling, SamplingRate
from bastion.identity.auth import Principal

Rate = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]


class RateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: Rate


def _rate(value: SamplingRate) -> dict[str, object]:
    return {
        "rate": value.rate,
        "set_by": str(value.set_by) if value.set_by else None,
        "updated_at": value.updated_at.isoformat() if value.updated_at else None,
    }


def build_router(sampling: PromptSampling, guard: Guard) -> APIRouter:
    router = APIRouter()
    may_read = guard("sampling:read", "PromptSampling")
    may_configure = guard("sampling:configure", "PromptSampling")
    may_consent = guard("account:sampling", "Account")

    @router.get("/tenants/{tenant_id}/prompt-sampling")
    async def read_rate(principal: Principal = Depends(may_read)) -> JSONResponse:
        """The tenant's sampling rate (0 until an owner sets one)."""
        value = await sampling.rate(principal.tenant_id, principal.user_id, principal.db_role)
        return JSONResponse(_rate(value))

    @router.put("/tenants/{tenant_id}/prompt-sampling")
    async def set_rate(
        body: RateBody, principal: Principal = Depends(may_configure)
    ) -> JSONResponse:
        """Set the share of consenting users' calls whose prompt is logged; audited."""
        value = await sampling.set_rate(principal.tenant_id, principal.user_id, body.rate)
        return JSONResponse(_rate(value))

    @router.put("/me/prompt-sampling-consent")
    async def consent(principal: Principal = Depends(may_consent)) -> JSONResponse:
        """Consent to having one's prompts sampled into the gateway's logs; audited."""
        await sampling.consent(principal.tenant_id, principal.user_id, principal.db_role)
        return JSONResponse({"consented": True})

    @router.delete("/me/prompt-sampling-consent", status_code=204)
    async def withdraw(principal: Principal = Depends(may_consent)) -> None:
        """Withdraw that consent (idempotent); audited when there was one."""
        await sampling.withdraw(principal.tenant_id, principal.user_id, principal.db_role)

    return router
