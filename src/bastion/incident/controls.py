"""Incident controls: freeze spend, disable tools, serve cached (issue 20, docs/runbook.md).

Each control is a switch in migration 0034's tables, flipped in one
transaction with its audit event (the tenant's trail, or the platform's for a
global switch), idempotent (it returns False, and records nothing, when the
switch was already in the asked state) and reversible. The switches are
enforced where the work happens:

* spend — by the budget reservation's own statement
  (:mod:`bastion.billing.budgets`) and by the gateway before it takes a call
  from a lease it already holds (:mod:`bastion.gateway.incident`);
* tools — by the gateway (a request declaring tools is refused) and by the
  worker's first-run insert (a queued run is not started:
  :mod:`bastion.safety.tools`);
* serve-cached — by the gateway, which calls no provider of that model or
  provider and answers from the tenant's cache (:mod:`bastion.gateway.incident`).

:func:`reverted_on_exit` undoes what a drill (or a script) switched, however
it ends — also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Literal
from uuid import UUID

from bastion import audit
from bastion.db.pool import Database
from bastion.errors import BastionError, Kind
from bastion.logs import get_logger

_log = get_logger("bastion.incident")

PLATFORM = UUID(int=0)  # the platform tenant (migration 0029): the global switches
RouteKind = Literal["model", "provider"]
_SWITCHES = ("spend_frozen", "tools_disabled")  # the columns a switch may name
MAX_NAME = 200


class InvalidIncidentTarget(BastionError):
    slug = "invalid-incident-target"
    title = "Not a model or provider name"
    kind = Kind.INVALID


class IncidentControls:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def freeze_spend(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool:
        """No paid call for the tenant (None: everyone) until unfrozen."""
        return await self._switch(tenant_id, "spend_frozen", True, actor, reason)

    async def unfreeze_spend(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool:
        """Lift a freeze of the tenant (None: the global one; a tenant's own stays)."""
        return await self._switch(tenant_id, "spend_frozen", False, actor, reason)

    async def disable_tools(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool:
        """No tool run for the tenant (None: everyone): requests declaring tools are
        refused, queued runs are not started."""
        return await self._switch(tenant_id, "tools_disabled", True, actor, reason)

    async def enable_tools(self, tenant_id: UUID | None, *, actor: str, reason: str) -> bool:
        return await self._switch(tenant_id, "tools_disabled", False, actor, reason)

    async def serve_cached(self, kind: RouteKind, name: str, *, actor: str, reason: str) -> bool:
        """Answer the model (or every model of the provider) from the cache only."""
        _check_route(kind, name)
        async with self._db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "INSERT INTO bastion.incident_cached_routes (tenant_id, kind, name, set_by) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (kind, name) DO NOTHING RETURNING 1",
                (PLATFORM, kind, name, actor[:MAX_NAME]),
            )
            changed = await cur.fetchone() is not None
            if changed:
                await audit.record(
                    tx,
                    actor=actor,
                    action="incident.serve_cached",
                    target=f"{kind}:{name}",
                    details={"reason": reason[:500]},
                )
        return changed

    async def serve_live(self, kind: RouteKind, name: str, *, actor: str, reason: str) -> bool:
        """Call the model's (or provider's) providers again."""
        _check_route(kind, name)
        async with self._db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "DELETE FROM bastion.incident_cached_routes WHERE kind = %s AND name = %s "
                "RETURNING 1",
                (kind, name),
            )
            changed = await cur.fetchone() is not None
            if changed:
                await audit.record(
                    tx,
                    actor=actor,
                    action="incident.serve_live",
                    target=f"{kind}:{name}",
                    details={"reason": reason[:500]},
                )
        return changed

    async def _switch(
        self, tenant_id: UUID | None, column: str, on: bool, actor: str, reason: str
    ) -> bool:
        assert column in _SWITCHES  # spliced into SQL: a known column only
        tenant = PLATFORM if tenant_id is None else tenant_id
        async with self._db.tenant_tx(tenant, None, "system") as tx:
            if on:
                cur = await tx.execute(
                    f"INSERT INTO bastion.incident_controls (tenant_id, {column}, updated_by) "
                    "VALUES (%(t)s, true, %(actor)s) ON CONFLICT (tenant_id) DO UPDATE "
                    f"SET {column} = true, updated_by = %(actor)s, updated_at = now() "
                    f"WHERE NOT bastion.incident_controls.{column} RETURNING 1",
                    {"t": tenant, "actor": actor[:MAX_NAME]},
                )
            else:
                cur = await tx.execute(
                    f"UPDATE bastion.incident_controls SET {column} = false, "
                    "updated_by = %(actor)s, updated_at = now() "
                    f"WHERE tenant_id = %(t)s AND {column} RETURNING 1",
                    {"t": tenant, "actor": actor[:MAX_NAME]},
                )
            changed = await cur.fetchone() is not None
            if changed:
                action = {
                    ("spend_frozen", True): "incident.spend_frozen",
                    ("spend_frozen", False): "incident.spend_unfrozen",
                    ("tools_disabled", True): "incident.tools_disabled",
                    ("tools_disabled", False): "incident.tools_enabled",
                }[column, on]
                await audit.record(
                    tx,
                    actor=actor,
                    action=action,
                    target="platform" if tenant_id is None else f"tenant:{tenant}",
                    details={
                        "scope": "global" if tenant_id is None else "tenant",
                        "reason": reason[:500],
                    },
                )
        return changed


def _check_route(kind: str, name: str) -> None:
    if kind not in ("model", "provider") or not 1 <= len(name) <= MAX_NAME:
        raise InvalidIncidentTarget("a model or provider name of 1 to 200 characters")


class Reverts:
    """What to undo when the block ends, newest first (see :func:`reverted_on_exit`)."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        self.restored: list[str] = []  # what was undone, in order
        self.failed: list[str] = []  # what could not be undone (logged)

    def push(self, what: str, undo: Callable[[], Awaitable[object]]) -> None:
        """Undo with ``undo()`` on exit; ``what`` says what it restores."""
        self._undo.append((what, undo))


@asynccontextmanager
async def reverted_on_exit() -> AsyncIterator[Reverts]:
    """Undo, however the block ends (an error, a cancellation: Ctrl-C), what was
    pushed in it, newest first, each on its own::

        async with reverted_on_exit() as reverts:
            await controls.freeze_spend(t, actor=a, reason=r)
            reverts.push("spend unfrozen", lambda: controls.unfreeze_spend(t, actor=a, reason=r))
            ...  # the drill
        print(reverts.restored)

    The undo calls are idempotent controls, so one already undone is harmless.
    """
    reverts = Reverts()
    try:
        yield reverts
    finally:
        while reverts._undo:
            what, undo = reverts._undo.pop()
            try:
                # Shielded: a second Ctrl-C must not leave a switch half-undone.
                await asyncio.shield(undo())
            except Exception as error:
                reverts.failed.append(what)
                _log.error("incident_revert_failed", what=what, error=type(error).__name__)
            else:
                reverts.restored.append(what)
                _log.info("incident_reverted", what=what)
