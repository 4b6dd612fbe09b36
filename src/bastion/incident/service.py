"""Incident runbook actions on credentials and tenants (issue 20): revoke keys,
revoke sessions, rotate a leaked secret, lock a tenant down.

Each action is idempotent (a repeat changes nothing and says so), writes one
audit event per change in the same transaction as the change where the change
is in the database (the key ring is not: its events follow the key ring's
write, as in :mod:`bastion.rotation`), and is reversible where that makes
sense (a lockdown is lifted; revoked keys and sessions are replaced, not
restored).

* Keys: unlike a scheduled rotation (NIST SP 800-57 part 1, 5.3: the
  successor is published before it signs, the predecessor verifies through an
  overlap), a revocation assumes the old key is in the wrong hands: the new
  version signs at once and every older one is retired at once. Verifiers
  re-read their key lists every second (:mod:`bastion.identity.keys`,
  :data:`bastion.safety.signing.KEY_REFRESH_SECONDS`), so within about a
  second every process refuses what the old keys signed and accepts the new.
  Receipt keys are not revoked: receipts must verify for years.
* Sessions: refresh families revoked (no new access tokens) and a cut-off
  that refuses access tokens already issued (:mod:`bastion.access.restrictions`).
* Lockdown: the tenant is read-only in every process until an operator lifts
  it. Only an operator lifts it (this service is reached from the command line
  and the detectors, never from a tenant's routes): an owner whose tenant was
  locked because their own account may be compromised must not undo it.
"""

from __future__ import annotations

import re
from uuid import UUID

from bastion.access import restrictions
from bastion.audit import log as audit
from bastion.db.pool import Database
from bastion.errors import BastionError, Kind
from bastion.identity.sessions import revoke_sessions_scoped
from bastion.logs import get_logger
from bastion.rotation import RotationPlan, RotationRefused
from bastion.secrets.protocols import KMS, Keystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService

_log = get_logger("bastion.incident")

PLATFORM = restrictions.PLATFORM
# What ``revoke-keys`` retires and reissues (receipts verify for years: never).
REVOKED_KINDS = ("jwt", "envelope", "tool")
_ACTOR = re.compile(r"^(operator:[\w.@-]{1,64}|detector:[\w.:-]{1,64}|user:[0-9a-f-]{36})$")
_MAX_REASON = 200


class IncidentRefused(BastionError):
    """A runbook command that cannot run as asked (unknown tenant, bad actor or name)."""

    slug = "incident-refused"
    title = "The incident command was refused"
    kind = Kind.INVALID


class IncidentService:
    """The credential and tenant actions of ``bastion incident``, for operators and detectors."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        keystore: Keystore,
        kms: KMS,
    ) -> None:
        self.db = db
        self.settings = settings
        self.keystore = keystore
        self.plan = RotationPlan(settings, keystore, kms, db)

    # -- keys ---------------------------------------------------------------------------

    async def revoke_keys(self, *, actor: str, reason: str) -> list[str]:
        """Retire every active JWT, envelope and tool-call signing key and issue new
        ones that sign at once; return the kinds revoked. Audited in the
        platform's trail.

        Run twice, it revokes twice: the second run retires the keys the first
        made, so tokens issued in between stop working too. That is safe, and it
        is what an operator who runs it again in an incident means; a repeat
        that quietly did nothing would leave those tokens alive."""
        _check(actor, reason)
        keys = [k for k in self.plan.secret_keys() if k.kind in REVOKED_KINDS]
        events: list[audit.Event] = []
        for key in keys:
            assert key.generate is not None
            old = [v.version for v in key.versions(self.keystore) if v.state == "active"]
            new = self.keystore.rotate(key.name, key.generate())
            for version in old:
                self.keystore.retire(key.name, version)
            events.append(
                (
                    actor,
                    "key.revoke",
                    f"{key.kind}:{key.name}",
                    {"version": new, "retired": old, "reason": reason},
                    None,
                )
            )
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            await audit.record_many(tx, events)
        _log.warning("keys_revoked", kinds=[k.kind for k in keys], actor=actor)
        return [k.kind for k in keys]

    async def rotate_secret(
        self, kind: str, name: str, value: bytes, *, actor: str, reason: str
    ) -> bool:
        """Replace a leaked ``provider`` key or ``webhook`` secret ``name`` with
        ``value`` and retire every other version at once (no overlap: the old
        value is in the wrong hands). False if ``value`` was already the only one."""
        _check(actor, reason)
        if kind not in ("provider", "webhook"):
            raise IncidentRefused("rotate-secret takes a provider key or a webhook secret")
        try:
            results = await self.plan.rotate(kind, name=name, value=value)
        except RotationRefused as exc:
            raise IncidentRefused(str(exc)) from None
        result = results[0]
        current = result.rotated or max(
            v.version
            for v in self.keystore.versions(result.name)
            if v.state == "active" and self.keystore.get(result.name, v.version) == value
        )
        retired = [
            v.version
            for v in self.keystore.versions(result.name)
            if v.state == "active" and v.version != current
        ]
        for version in retired:
            self.keystore.retire(result.name, version)
        if result.rotated is None and not retired:
            return False
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            await audit.record(
                tx,
                actor=actor,
                action="key.revoke",
                target=f"{kind}:{result.name}",
                details={"version": current, "retired": retired, "reason": reason},
            )
        return True

    # -- sessions -----------------------------------------------------------------------

    async def revoke_sessions(
        self,
        *,
        tenant_id: UUID | None = None,
        user_id: UUID | None = None,
        actor: str,
        reason: str,
    ) -> int:
        """End the sessions of a user (in every tenant), of a tenant, of a user in
        a tenant, or of everyone (neither); return the refresh families revoked.

        Access tokens issued until now in the scope are refused from the next
        request on (a cut-off); a repeat moves the cut-off to now (tokens issued
        since are refused too) and revokes the families started since."""
        _check(actor, reason)
        scope = tenant_id if tenant_id is not None else PLATFORM
        if tenant_id is not None and not await TenantService(self.db).exists(tenant_id):
            raise IncidentRefused("no such tenant")
        async with self.db.tenant_tx(scope, None, "system") as tx:
            await restrictions.cut_sessions(tx, scope, user_id)
            revoked = await revoke_sessions_scoped(
                tx, tenant_id=tenant_id, user_id=user_id, reason=reason[:64]
            )
            await audit.record(
                tx,
                actor=actor,
                action="session.revoke_all",
                target=f"user:{user_id}" if user_id else f"tenant:{scope}",
                details={
                    "tenant_id": str(tenant_id) if tenant_id else None,
                    "user_id": str(user_id) if user_id else None,
                    "families": revoked,
                    "reason": reason,
                },
            )
        _log.warning("sessions_revoked", scope=str(scope), families=revoked, actor=actor)
        return revoked

    # -- lockdown -----------------------------------------------------------------------

    async def lockdown(self, tenant_id: UUID, *, actor: str, reason: str) -> bool:
        """Make ``tenant_id`` read-only in every process; False if it already was."""
        _check(actor, reason)
        await self._tenant(tenant_id)
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            changed = await restrictions.set_lockdown(tx, tenant_id, actor=actor, reason=reason)
            if changed:
                await audit.record(
                    tx,
                    actor=actor,
                    action="tenant.lockdown",
                    target=f"tenant:{tenant_id}",
                    details={"reason": reason},
                )
        return changed

    async def lift_lockdown(self, tenant_id: UUID, *, actor: str, reason: str) -> bool:
        """Lift the lockdown of ``tenant_id``; False if it was not locked down."""
        _check(actor, reason)
        await self._tenant(tenant_id)
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            changed = await restrictions.clear_lockdown(tx, tenant_id)
            if changed:
                await audit.record(
                    tx,
                    actor=actor,
                    action="tenant.lockdown_lift",
                    target=f"tenant:{tenant_id}",
                    details={"reason": reason},
                )
        return changed

    async def _tenant(self, tenant_id: UUID) -> None:
        if tenant_id == PLATFORM or not await TenantService(self.db).exists(tenant_id):
            raise IncidentRefused("no such tenant")


def _check(actor: str, reason: str) -> None:
    if not _ACTOR.match(actor):
        raise IncidentRefused("actor must be operator:<name>, detector:<rule> or user:<uuid>")
    if not reason or len(reason) > _MAX_REASON:
        raise IncidentRefused(f"a reason of 1-{_MAX_REASON} characters is required")
