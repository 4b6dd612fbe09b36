"""An owner's undo of a detector's response, over HTTP.

``POST /tenants/{tenant_id}/detector-firings/{firing_id}/undo`` with
``{"reason": "..."}`` (Cedar ``incident:manage``: owners, with MFA). The
tenant is the token's; a firing of another tenant is 404, one about the
caller themself is 403. Lifts the spend freeze and the tool pause the firing
set, audited; revoked sessions stay revoked. Thin: the logic is in
:class:`~bastion.detectors.runner.DetectorService`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bastion.access.guard import Guard
from bastion.detectors.runner import DetectorService
from bastion.identity.auth import Principal


class UndoBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(min_length=1, max_length=200)]


def build_router(service: DetectorService, guard: Guard) -> APIRouter:
    router = APIRouter()
    may_manage = guard("incident:manage", "Incident")

    @router.post("/tenants/{tenant_id}/detector-firings/{firing_id}/undo")
    async def undo(
        body: UndoBody,
        firing_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
        principal: Principal = Depends(may_manage),
    ) -> JSONResponse:
        """Undo a detector's response in the caller's tenant (owners with MFA); audited."""
        done = await service.undo_as_owner(
            principal.tenant_id, principal.user_id, firing_id, reason=body.reason
        )
        return JSONResponse({"firing": firing_id, "undone": done})

    return router
