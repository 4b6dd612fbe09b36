"""The automatic response to a firing, and its undo, through the incident controls.

A firing asks for some of: revoke the sessions involved (the user's refresh
families and access tokens, or the tenant's when no user is named), freeze the
tenant's spending (its budget reservations refused with the 402
``spend-frozen`` problem) and pause its tool runs. The incident package
carries them out (:mod:`bastion.incident.controls`,
:mod:`bastion.incident.service`); each of its actions is idempotent and
audited in the tenant's trail, so a response retried after a crash changes
nothing twice. An undo reverses the freeze and the pause; revoked sessions
are not restored (their users sign in again).
"""

from __future__ import annotations

from typing import Any, Protocol
from uuid import UUID

from bastion.detectors.rules import DISABLE_TOOLS, FREEZE_SPEND, REVOKE_SESSIONS
from bastion.detectors.store import Firing


class Controls(Protocol):
    async def freeze_spend(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool: ...
    async def unfreeze_spend(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool: ...
    async def disable_tools(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool: ...
    async def enable_tools(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool: ...


class Sessions(Protocol):
    async def revoke_sessions(
        self,
        *,
        tenant_id: UUID | None = None,
        user_id: UUID | None = None,
        actor: str,
        reason: str,
    ) -> int: ...


def _reason(firing: Firing) -> str:
    return f"detector firing {firing.id} ({firing.rule})"[:200]


class Responder:
    """Carries out a firing's actions, and reverses them on an undo."""

    def __init__(self, controls: Controls, sessions: Sessions | None) -> None:
        self.controls = controls
        self.sessions = sessions  # None: undo only (the command line)

    async def respond(self, firing: Firing) -> dict[str, Any]:
        """Run every action of ``firing``; return what each did. Raises what an
        action raised (the runner retries the whole response: each is idempotent)."""
        actor = f"detector:{firing.rule}"
        reason = _reason(firing)
        done: dict[str, Any] = {}
        # Revocation first: it is what stops an attacker holding tokens.
        if REVOKE_SESSIONS in firing.actions:
            if self.sessions is None:
                raise RuntimeError("this responder cannot revoke sessions")
            done[REVOKE_SESSIONS] = await self.sessions.revoke_sessions(
                tenant_id=firing.tenant_id, user_id=firing.user_id, actor=actor, reason=reason
            )
        if FREEZE_SPEND in firing.actions:
            done[FREEZE_SPEND] = await self.controls.freeze_spend(
                firing.tenant_id, actor=actor, reason=reason
            )
        if DISABLE_TOOLS in firing.actions:
            done[DISABLE_TOOLS] = await self.controls.disable_tools(
                firing.tenant_id, actor=actor, reason=reason
            )
        return done

    async def undo(self, firing: Firing, *, actor: str) -> dict[str, Any]:
        """Reverse the freeze and the pause ``firing`` asked for; return what changed."""
        reason = f"undo of {_reason(firing)}"[:200]
        undone: dict[str, Any] = {}
        if FREEZE_SPEND in firing.actions:
            undone["unfreeze_spend"] = await self.controls.unfreeze_spend(
                firing.tenant_id, actor=actor, reason=reason
            )
        if DISABLE_TOOLS in firing.actions:
            undone["enable_tools"] = await self.controls.enable_tools(
                firing.tenant_id, actor=actor, reason=reason
            )
        if REVOKE_SESSIONS in firing.actions:
            undone["sessions"] = "not restored: their users sign in again"
        return undone
