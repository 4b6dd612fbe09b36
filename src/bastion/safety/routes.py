"""Safety routes.

Revealing vault tokens: ``POST /tenants/{tenant_id}/pii/reveal`` (Cedar
``pii:reveal``). The tenant is the token's (a path naming another is 404); the
vault is read under row-level security as the caller's database role, so a
token of another tenant is simply not found. Every answer is
``Cache-Control: no-store``: it carries originals.

The tenant's egress policy (:mod:`bastion.safety.egress_lists`): ``GET
/tenants/{tenant_id}/egress`` (``egress:read``: owners, auditors);
``POST /tenants/{tenant_id}/egress/allow`` with ``{kind, value, tool?}``,
``DELETE /tenants/{tenant_id}/egress/allow/{entry_id}`` and ``PUT
/tenants/{tenant_id}/egress/action`` with ``{action, reason}``
(``egress:configure``: owners with MFA). Thin: each change is audited by the service.

The tenant's safety configuration (:mod:`bastion.safety.tenant_policies`):
``GET /tenants/{tenant_id}/safety`` (``safety:read``: owners, auditors) — the
screen policy per surface and the PII allow-list; ``PUT
/tenants/{tenant_id}/safety/screen`` with ``{user, retrieved, tool,
reason}``, ``POST /tenants/{tenant_id}/safety/pii-allow`` with ``{entries:
[{kind, value}]}`` and ``DELETE /tenants/{tenant_id}/safety/pii-allow/{entry_id}``
(``safety:configure``: owners with MFA).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self
from uuid import UUID

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from bastion.access.guard import Guard
from bastion.db.pool import Database
from bastion.identity.auth import Principal
from bastion.safety.egress_lists import EgressPolicies
from bastion.safety.pii_allow import MAX_ENTRY_CHARS
from bastion.safety.tenant_policies import MAX_BATCH, SafetyPolicies, TenantScreenPolicy
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


class AllowBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["host", "url_prefix", "email_domain"]
    value: str = Field(min_length=1, max_length=2048)
    # One tool (a function name as OpenAI allows them), or every tool when absent.
    tool: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["block", "flag"]
    # Why: goes to the audit event.
    reason: str = Field(min_length=8, max_length=500)


Score = Annotated[StrictInt, Field(ge=1, le=100)]


class UserSurface(BaseModel):
    """A user's turn: refused (``block``) or passed marked (``flag``) from ``block_at``."""

    model_config = ConfigDict(extra="forbid")
    block_at: Score
    action: Literal["block", "flag"]


class ContentSurface(BaseModel):
    """Retrieved documents or tool results: sanitized from ``sanitize_at``; from
    ``block_at`` (still, once sanitized) dropped, the turn refused, or flagged."""

    model_config = ConfigDict(extra="forbid")
    sanitize_at: Score
    block_at: Score
    action: Literal["block", "drop", "flag"]

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.sanitize_at > self.block_at:
            raise ValueError("sanitize_at is at most block_at")
        return self


class ScreenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: UserSurface
    retrieved: ContentSurface
    tool: ContentSurface
    # Why: goes to the audit event.
    reason: str = Field(min_length=8, max_length=500)


class PiiAllowEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern=r"^[a-z][a-z_]{0,31}$")
    value: str = Field(min_length=1, max_length=MAX_ENTRY_CHARS)


class PiiAllowBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entries: list[PiiAllowEntry] = Field(min_length=1, max_length=MAX_BATCH)


def _revealed(items: list[Revealed]) -> list[dict[str, str]]:
    return [{"token": r.token, "kind": r.kind, "value": r.value} for r in items]


def build_router(
    vault: PiiVault,
    db: Database,
    guard: Guard,
    egress: EgressPolicies | None = None,
    *,
    safety: SafetyPolicies | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant_id}")
    policies = egress if egress is not None else EgressPolicies(db)
    tenant_safety = safety if safety is not None else SafetyPolicies(db)
    may_read_egress = guard("egress:read", "EgressPolicy")
    may_configure_egress = guard("egress:configure", "EgressPolicy")
    may_read_safety = guard("safety:read", "SafetyPolicy")
    may_configure_safety = guard("safety:configure", "SafetyPolicy")

    @router.get("/safety")
    async def read_safety(principal: Principal = Depends(may_read_safety)) -> JSONResponse:
        """The tenant's screen policy per surface (the defaults until set) and PII allow-list."""
        config = await tenant_safety.config(
            principal.tenant_id, principal.user_id, principal.db_role
        )
        return JSONResponse(config.public(), headers={"Cache-Control": "no-store"})

    @router.put("/safety/screen")
    async def set_screen(
        body: ScreenBody, principal: Principal = Depends(may_configure_safety)
    ) -> JSONResponse:
        """Replace the screen policy: per surface, its thresholds and action."""
        policy = TenantScreenPolicy.from_public(body.model_dump(exclude={"reason"}))
        stored = await tenant_safety.set_screen_policy(
            principal.tenant_id, principal.user_id, policy, body.reason
        )
        return JSONResponse(stored.public())

    @router.post("/safety/pii-allow", status_code=201)
    async def allow_pii(
        body: PiiAllowBody, principal: Principal = Depends(may_configure_safety)
    ) -> JSONResponse:
        """Keep these values (each of one kind) in clear; all added, or none."""
        entries = await tenant_safety.allow_pii(
            principal.tenant_id, principal.user_id, [(e.kind, e.value) for e in body.entries]
        )
        return JSONResponse(
            {"entries": [e.public() for e in entries]},
            status_code=201,
            headers={"Cache-Control": "no-store"},
        )

    @router.delete("/safety/pii-allow/{entry_id}", status_code=204)
    async def disallow_pii(
        entry_id: UUID, principal: Principal = Depends(may_configure_safety)
    ) -> None:
        """Remove an allow-list entry (its values are tokenized again); 404 when none."""
        await tenant_safety.disallow_pii(principal.tenant_id, principal.user_id, entry_id)

    @router.get("/egress")
    async def read_egress(principal: Principal = Depends(may_read_egress)) -> JSONResponse:
        """The tenant's egress action (``block`` until set) and allow-list."""
        policy = await policies.policy(principal.tenant_id, principal.user_id, principal.db_role)
        return JSONResponse(policy.public())

    @router.post("/egress/allow", status_code=201)
    async def allow(
        body: AllowBody, principal: Principal = Depends(may_configure_egress)
    ) -> JSONResponse:
        """Allow tool calls (all, or ``tool``'s) to send tainted data to a destination."""
        entry = await policies.allow(
            principal.tenant_id, principal.user_id, body.kind, body.value, body.tool
        )
        return JSONResponse(entry.public(), status_code=201)

    @router.delete("/egress/allow/{entry_id}", status_code=204)
    async def disallow(
        entry_id: UUID, principal: Principal = Depends(may_configure_egress)
    ) -> None:
        """Remove an allow-list entry; 404 when the tenant has none with this id."""
        await policies.disallow(principal.tenant_id, principal.user_id, entry_id)

    @router.put("/egress/action")
    async def set_action(
        body: ActionBody, principal: Principal = Depends(may_configure_egress)
    ) -> JSONResponse:
        """``block`` (refuse) or ``flag`` (sign, audit) a call that breaks the allow-list."""
        action = await policies.set_action(
            principal.tenant_id, principal.user_id, body.action, body.reason
        )
        return JSONResponse({"action": action})

    @router.post("/pii/reveal")
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
