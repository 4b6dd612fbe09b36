"""Revealing vault tokens: ``POST /tenants/{tenant_id}/pii/reveal`` (Cedar ``pii:reveal``).

The tenant is the token's (a path naming another is 404); the vault is read
under row-level security as the caller's database role, so a token of
another tenant is simply not found. Every answer is ``Cache-Control: no-store``:
it carries originals.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bastion.access.guard import Guard
from bastion.db.pool import Database
from bastion.identity.auth import Principal
from bastion.safety.vault import MAX_REVEAL, PiiVault, Revealed

Token = Annotated[str, Field(pattern=r"^⟦[A-Z][A-Z_]{1,30}_[0-9a-f]{16}⟧$", max_length=60)]


class RevealRequest(BaseModel):
    """Either ``tokens`` or a ``text`` containing tokens, and always a ``reason``."""

    model_config = ConfigDict(extra="forbid")
    tokens: list[Token] | None = Field(default=None, min_length=1, max_length=MAX_REVEAL)
    text: str | None = Field(default=None, min_length=1, max_length=100_000)
    # Why: goes to the audit event. Long enough to say something.
    reason: str = Field(min_length=8, max_length=500)

    @model_validator(mode="after")
    def _one_input(self) -> RevealRequest:
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of tokens and text")
        return self


def _revealed(items: list[Revealed]) -> list[dict[str, str]]:
    return [{"token": r.token, "kind": r.kind, "value": r.value} for r in items]


def build_router(vault: PiiVault, db: Database, guard: Guard) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant_id}/pii")

    @router.post("/reveal")
    async def reveal(
        body: RevealRequest,
        principal: Principal = Depends(guard("pii:reveal", "PiiVault")),
    ) -> JSONResponse:
        """Restore the originals behind vault tokens; audited with who, what and why."""
        common: dict[str, Any] = {
            "user_id": principal.user_id,
            "role": principal.db_role,
            "reason": body.reason,
        }
        if body.tokens is not None:
            items = await vault.detokenize(db, principal.tenant_id, body.tokens, **common)
            payload: dict[str, Any] = {"values": _revealed(items)}
        else:
            text, items = await vault.reveal_text(
                db, principal.tenant_id, body.text or "", **common
            )
            payload = {"text": text, "values": _revealed(items)}
        return JSONResponse(payload, headers={"Cache-Control": "no-store"})

    return router
