"""Per-tenant PII allow-lists: values a tenant wants kept in clear (issue 16).

A tenant's product names, staff names or support address
(``support@acme.example``) are not anyone's secret, and tokenizing them
makes answers harder to read. A value on the tenant's allow-list is left as
it is by :class:`~bastion.safety.vault.PiiVault` (so in the gateway's
prompts and in ingested documents alike); every other value of its kind is
still tokenized. Matching is on the normalised value
(:func:`bastion.safety.pii.normalize`: ``Support@ACME.example`` is
``support@acme.example``, ``+33 1 23 45 67 89`` is ``01 23 45 67 89``), never a
prefix or a pattern, so an entry keeps exactly one value.

The lists come from an :class:`AllowListStore`: in Bastion's processes the
tenant's table (``pii_allow_entries``, entries of one kind each, written by
owners through the safety routes:
:class:`bastion.safety.tenant_policies.SafetyPolicies`); in tests also
:class:`StaticAllowLists`. :class:`PiiAllowLists` reads a tenant's list
through the store, keeps it ``ttl_seconds`` per process, and fails closed: a
read that fails raises :class:`PiiAllowListUnavailable` (503), it never falls
back to an empty or a stale list silently mid-request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

from bastion.errors import BastionError, Kind
from bastion.safety.pii import KINDS, Entity, normalize
from bastion.safety.pii_patterns import DEFAULT_REGIONS
from bastion.safety.tenant_cache import TenantCache

MAX_ENTRIES = 1_000  # per tenant
MAX_ENTRY_CHARS = 320  # an e-mail address at most (RFC 5321 4.5.3.1: 64 + 1 + 255)


class PiiAllowListUnavailable(BastionError):
    slug = "pii-allow-list-unavailable"
    title = "The tenant's PII allow-list could not be read"
    kind = Kind.UNAVAILABLE


AllowItem = str | tuple[str, str]
"""An allow-listed value: of any kind (a string), or of one kind (``(kind, value)``)."""


class AllowListStore(Protocol):
    """Where tenants' allow-lists are kept."""

    async def values(self, tenant_id: UUID) -> Sequence[AllowItem]:
        """The tenant's allow-listed values (any error: the caller fails closed)."""
        ...


class StaticAllowLists:
    """Allow-lists given in memory, by tenant (tests; the processes read the
    tenant's table, :mod:`bastion.safety.tenant_policies`)."""

    def __init__(self, lists: Mapping[UUID, Iterable[str]] | None = None) -> None:
        self._lists = {tenant: tuple(values) for tenant, values in (lists or {}).items()}

    async def values(self, tenant_id: UUID) -> Sequence[str]:
        return self._lists.get(tenant_id, ())

    def replace(self, tenant_id: UUID, values: Iterable[str]) -> None:
        """Set the tenant's list (readers see it within their cache's TTL)."""
        self._lists[tenant_id] = tuple(values)


@dataclass(frozen=True)
class AllowList:
    """One tenant's allow-list, normalised per kind; picklable (sent to scanning processes)."""

    values: tuple[str, ...] = ()
    regions: tuple[str, ...] = DEFAULT_REGIONS
    entries: tuple[tuple[str, str], ...] = ()
    """Values kept for one kind only: ``(kind, value)`` (the database's entries)."""
    _by_kind: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for kind in {*KINDS, *(k for k, _v in self.entries)}:
            self._by_kind[kind] = self._wanted(kind)

    def _wanted(self, kind: str) -> frozenset[str]:
        kinded = (v for k, v in self.entries if k == kind)
        return frozenset(normalize(kind, v, self.regions) for v in (*self.values, *kinded))

    def keeps(self, entity: Entity) -> bool:
        """Whether ``entity``'s value is on the list (compared normalised, as its kind is)."""
        if not self.values and not self.entries:
            return False
        wanted = self._by_kind.get(entity.kind)
        if wanted is None:  # a kind added later: normalised the generic way
            wanted = self._wanted(entity.kind)
        return normalize(entity.kind, entity.value, self.regions) in wanted

    def filter(self, entities: Iterable[Entity]) -> list[Entity]:
        """``entities`` without the ones the list keeps."""
        return [e for e in entities if not self.keeps(e)]


EMPTY = AllowList()


def _valid(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_ENTRY_CHARS


class PiiAllowLists:
    """Tenants' allow-lists as the vault reads them: cached, failing closed."""

    def __init__(
        self,
        store: AllowListStore,
        *,
        ttl_seconds: float = 5.0,
        regions: Sequence[str] = DEFAULT_REGIONS,
    ) -> None:
        self.store = store
        self.regions = tuple(regions)
        self._cache: TenantCache[AllowList] = TenantCache(ttl_seconds)

    @property
    def ttl_seconds(self) -> float:
        """How long a tenant's value is kept (0: read on every call)."""
        return self._cache.ttl_seconds

    @ttl_seconds.setter
    def ttl_seconds(self, seconds: float) -> None:
        self._cache.ttl_seconds = seconds

    async def for_tenant(self, tenant_id: UUID) -> AllowList:
        """The tenant's list (cached ``ttl_seconds``); raise :class:`PiiAllowListUnavailable`."""
        try:
            return await self._cache.get(tenant_id, lambda: self._read(tenant_id))
        except PiiAllowListUnavailable:
            raise
        except Exception as error:  # any failure: refuse, never an empty list
            raise PiiAllowListUnavailable(
                "the tenant's PII allow-list could not be read", retry_after=5
            ) from error

    async def _read(self, tenant_id: UUID) -> AllowList:
        items = tuple(await self.store.values(tenant_id))
        values = tuple(v for v in items if isinstance(v, str))
        entries = tuple(v for v in items if isinstance(v, tuple) and len(v) == 2)
        # Oversized entries or lists are a store's bug: refuse rather than guess.
        if (
            len(items) > MAX_ENTRIES
            or len(values) + len(entries) != len(items)
            or not all(_valid(v) for v in (*values, *(v for _k, v in entries)))
        ):
            raise PiiAllowListUnavailable("the tenant's PII allow-list is not valid", retry_after=5)
        return AllowList(values, self.regions, entries) if items else EMPTY

    def forget(self, tenant_id: UUID) -> None:
        """Drop this process's cached list of the tenant (others wait for the TTL)."""
        self._cache.forget(tenant_id)
