"""The incident switches as the gateway sees them (issue 20, ``bastion incident …``).

* **serve-cached** (a model, or a provider): the gateway calls no provider
  for it; the answer comes from the tenant's answer cache, marked
  ``Bastion-Cache: stale-fallback``, and a miss is the usual 503
  ``provider-unavailable``.
* **freeze-spend** (a tenant, or everyone): no paid call. The database refuses
  every new reservation or lease (:mod:`bastion.billing.budgets`); this side
  stops the calls a lease the gateway already holds would still cover.
* **disable-tools** (a tenant, or everyone): a request that declares tools is
  refused before anything is screened, reserved or called.

The switches are read through migration 0034's functions and kept
``ttl_seconds`` (1 s by default) per process: a command reaches every gateway
within that, and a call costs a dictionary look-up, not a query (the reads
of concurrent callers are shared, :class:`~bastion.safety.tenant_cache.TenantCache`).
A read that fails (the database away) keeps the last state read, until the
next read: the gateway goes on serving from the leases it holds, as it does
without the switches, and the database still enforces a freeze on every new
lease and a tool switch on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from bastion.db.pool import Database
from bastion.gateway.routing import Target
from bastion.logs import get_logger
from bastion.safety.tenant_cache import TenantCache

_log = get_logger("bastion.gateway")

PLATFORM = UUID(int=0)
MAX_KEPT = 10_000  # tenants' last states kept for a failed read (tenants are authenticated)


@dataclass(frozen=True)
class TenantSwitches:
    spend_frozen: bool = False
    tools_disabled: bool = False


class IncidentSwitches:
    def __init__(self, db: Database, *, ttl_seconds: float = 1.0) -> None:
        self._db = db
        self._tenants: TenantCache[TenantSwitches] = TenantCache(ttl_seconds)
        self._routes: TenantCache[frozenset[str]] = TenantCache(ttl_seconds)
        # What was last read, kept through a failed read.
        self._last_tenant: dict[UUID, TenantSwitches] = {}
        self._last_routes: frozenset[str] = frozenset()

    async def of_tenant(self, tenant_id: UUID) -> TenantSwitches:
        """The tenant's switches, the global ones applied."""

        async def read() -> TenantSwitches:
            try:
                async with self._db.tenant_tx(tenant_id, None, "system") as tx:
                    cur = await tx.execute(
                        "SELECT bastion.spend_frozen(%(t)s) AS spend, "
                        "bastion.tools_disabled(%(t)s) AS tools",
                        {"t": tenant_id},
                    )
                    row = await cur.fetchone()
            except Exception as error:
                _log.warning("incident_switches_unreadable", error=type(error).__name__)
                return self._last_tenant.get(tenant_id, TenantSwitches())
            assert row is not None
            switches = TenantSwitches(bool(row["spend"]), bool(row["tools"]))
            if len(self._last_tenant) >= MAX_KEPT:
                self._last_tenant.clear()
            self._last_tenant[tenant_id] = switches
            return switches

        return await self._tenants.get(tenant_id, read)

    async def served_cached(self) -> frozenset[str]:
        """The routes answered from the cache only: ``model:<name>``, ``provider:<name>``."""

        async def read() -> frozenset[str]:
            try:
                async with self._db.tenant_tx(PLATFORM, None, "system") as tx:
                    cur = await tx.execute("SELECT bastion.served_cached() AS routes")
                    row = await cur.fetchone()
            except Exception as error:
                _log.warning("incident_switches_unreadable", error=type(error).__name__)
                return self._last_routes
            assert row is not None
            self._last_routes = frozenset(row["routes"])
            return self._last_routes

        return await self._routes.get(PLATFORM, read)


def cached_only(routes: frozenset[str], model: str, target: Target) -> bool:
    """Whether ``target`` of ``model`` must not be called: its model or its
    provider (its upstream host, ``local``, or the target's own name) is served
    from the cache."""
    return bool(routes) and (
        f"model:{model}" in routes
        or f"provider:{target.name}" in routes
        or (bool(target.provider_name) and f"provider:{target.provider_name}" in routes)
    )
