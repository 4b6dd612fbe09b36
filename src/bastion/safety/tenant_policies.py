"""A tenant's safety configuration in the database (migration 0028, under RLS):
its prompt-injection screen policy and its PII allow-list.

* **Screen policy** (issue 15, item 5): per surface — the user's input,
  retrieved documents, tool results — the score from which the screen acts
  and what it does (:class:`~bastion.safety.injection.ScreenPolicy`: block
  the turn, drop the chunk, or flag only). No row: Bastion's defaults.
* **PII allow-list** (issue 16, item 2): values of one kind the tenant keeps
  in clear (product names, staff names, its support address), stored
  normalised (:func:`bastion.safety.pii.normalize`) and matched exactly.

Owners change them (the routes add MFA and Cedar ``safety:configure``),
each change audited in its own transaction with what it was and what it
became; owners and auditors read them. The audit events of the allow-list
name entries by id and kind, never by value: a staff name is personal data,
and the trail outlives the entry (and a shred of the tenant); the list
itself shows the values to those who may read it.

The gateway and ingestion read a tenant's configuration as the system role
through :meth:`SafetyPolicies.screen_policy` and
:attr:`SafetyPolicies.pii_allow_lists`, kept ``ttl_seconds`` per process: a
change reaches every process within that time (and the process that made it
at once). A read that fails raises :class:`SafetyPolicyUnavailable` or
:class:`~bastion.safety.pii_allow.PiiAllowListUnavailable` (503): the caller
refuses, it never falls back to the defaults or an empty list.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast
from uuid import UUID

from bastion import audit
from bastion.db.pool import Database
from bastion.errors import BastionError, Kind
from bastion.safety.injection import DEFAULT_POLICY, SANITIZE_AT, ScreenPolicy, Source
from bastion.safety.pii import KINDS, normalize
from bastion.safety.pii_allow import (
    MAX_ENTRIES,
    MAX_ENTRY_CHARS,
    AllowItem,
    PiiAllowLists,
)
from bastion.safety.pii_patterns import DEFAULT_REGIONS
from bastion.safety.tenant_cache import TenantCache

__all__ = [
    "DEFAULT_TENANT_POLICY",
    "MAX_BATCH",
    "InvalidSafetyPolicy",
    "PiiAllowEntryNotFound",
    "SafetyConfig",
    "SafetyPolicies",
    "SafetyPolicyUnavailable",
    "StoredAllowEntry",
    "TenantScreenPolicy",
]

MAX_BATCH = 100  # allow-list entries added in one change

Surface = Literal["user", "retrieved", "tool"]
SURFACES: tuple[Surface, ...] = ("user", "retrieved", "tool")


class InvalidSafetyPolicy(BastionError):
    slug = "invalid-safety-policy"
    title = "Not a valid safety policy or PII allow-list entry"
    kind = Kind.INVALID


class PiiAllowEntryNotFound(BastionError):
    slug = "pii-allow-entry-not-found"
    title = "No such PII allow-list entry"
    kind = Kind.NOT_FOUND


class SafetyPolicyUnavailable(BastionError):
    slug = "safety-policy-unavailable"
    title = "The tenant's screen policy could not be read"
    kind = Kind.UNAVAILABLE


# -- the screen policy ---------------------------------------------------------------


@dataclass(frozen=True)
class TenantScreenPolicy:
    """The screen's policy for each surface a text comes from (picklable: it
    travels to the screening processes with the texts)."""

    user: ScreenPolicy = DEFAULT_POLICY
    retrieved: ScreenPolicy = DEFAULT_POLICY
    tool: ScreenPolicy = DEFAULT_POLICY

    def for_source(self, source: Source) -> ScreenPolicy:
        """The policy of texts from ``source`` (a model's output: the defaults)."""
        if source == "retrieved":
            return self.retrieved
        if source == "tool":
            return self.tool
        return self.user if source == "user" else DEFAULT_POLICY

    def public(self) -> dict[str, Any]:
        user, retrieved, tool = self.user, self.retrieved, self.tool
        return {
            "user": {"block_at": user.block_at, "action": user.user_action},
            "retrieved": {
                "sanitize_at": retrieved.sanitize_at,
                "block_at": retrieved.block_at,
                "action": retrieved.retrieved_action,
            },
            "tool": {
                "sanitize_at": tool.sanitize_at,
                "block_at": tool.block_at,
                "action": tool.retrieved_action,
            },
        }

    @classmethod
    def from_public(cls, surfaces: Mapping[str, Mapping[str, Any]]) -> TenantScreenPolicy:
        """The policy :meth:`public` describes; raise :class:`InvalidSafetyPolicy`."""
        try:
            user, retrieved, tool = (surfaces[name] for name in SURFACES)
            return cls(
                _user_policy(int(user["block_at"]), str(user["action"])),
                _content_policy(
                    int(retrieved["sanitize_at"]),
                    int(retrieved["block_at"]),
                    str(retrieved["action"]),
                ),
                _content_policy(
                    int(tool["sanitize_at"]), int(tool["block_at"]), str(tool["action"])
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidSafetyPolicy(
                "each surface needs 1 <= sanitize_at <= block_at <= 100 and one of its "
                "actions (user: block or flag; retrieved and tool: block, drop or flag)",
                reason="bad-policy",
            ) from error


def _user_policy(block_at: int, action: str) -> ScreenPolicy:
    # A user turn is never sanitized: sanitize_at only has to be valid.
    return ScreenPolicy(
        block_at=block_at,
        sanitize_at=min(SANITIZE_AT, block_at),
        user_action=cast(Literal["block", "flag"], action),
    )


def _content_policy(sanitize_at: int, block_at: int, action: str) -> ScreenPolicy:
    if action not in ("block", "drop", "flag"):
        raise ValueError("a retrieved text is blocked, dropped or flagged")
    return ScreenPolicy(
        block_at=block_at,
        sanitize_at=sanitize_at,
        retrieved_action=cast(Literal["block", "drop", "flag"], action),
    )


DEFAULT_TENANT_POLICY = TenantScreenPolicy()


# -- the PII allow-list --------------------------------------------------------------


@dataclass(frozen=True)
class StoredAllowEntry:
    id: UUID
    kind: str
    value: str
    created_by: UUID | None
    created_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "kind": self.kind,
            "value": self.value,
            "created_by": str(self.created_by) if self.created_by else None,
            "created_at": self.created_at.isoformat(),
        }


def normalised_entry(kind: str, value: str, regions: Sequence[str] = DEFAULT_REGIONS) -> str:
    """``value`` as it is kept (normalised as values of ``kind`` are compared);
    raise :class:`InvalidSafetyPolicy` for a kind Bastion does not recognise or
    a value that is empty, too long, or holds control or unpaired surrogate
    characters (nothing is echoed back)."""
    if kind not in KINDS:
        raise InvalidSafetyPolicy(f"kind is one of {', '.join(KINDS)}", reason="bad-kind")
    if not 1 <= len(value) <= MAX_ENTRY_CHARS:
        raise InvalidSafetyPolicy(
            f"a value has 1 to {MAX_ENTRY_CHARS} characters", reason="bad-value"
        )
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise InvalidSafetyPolicy(
            "a value holds no control or surrogate characters", reason="bad-value"
        )
    stored = normalize(kind, value.strip(), regions)
    if not stored.strip() or len(stored) > MAX_ENTRY_CHARS:
        raise InvalidSafetyPolicy(f"not a value of kind {kind}", reason="bad-value")
    return stored


# -- the service ---------------------------------------------------------------------


@dataclass(frozen=True)
class SafetyConfig:
    """A tenant's configuration as owners and auditors read it."""

    screen: TenantScreenPolicy
    screen_set_by: UUID | None  # None: the defaults (no row)
    screen_updated_at: datetime | None
    pii_allow: tuple[StoredAllowEntry, ...]

    def public(self) -> dict[str, Any]:
        return {
            "screen": {
                **self.screen.public(),
                "default": self.screen_updated_at is None,
                "set_by": str(self.screen_set_by) if self.screen_set_by else None,
                "updated_at": self.screen_updated_at.isoformat()
                if self.screen_updated_at
                else None,
            },
            "pii_allow": [entry.public() for entry in self.pii_allow],
        }


_POLICY_COLUMNS = (
    "user_block_at, user_action, retrieved_sanitize_at, retrieved_block_at, retrieved_action, "
    "tool_sanitize_at, tool_block_at, tool_action"
)


def _policy_of(row: Mapping[str, Any] | None) -> TenantScreenPolicy:
    if row is None:
        return DEFAULT_TENANT_POLICY
    return TenantScreenPolicy(
        _user_policy(row["user_block_at"], row["user_action"]),
        _content_policy(
            row["retrieved_sanitize_at"], row["retrieved_block_at"], row["retrieved_action"]
        ),
        _content_policy(row["tool_sanitize_at"], row["tool_block_at"], row["tool_action"]),
    )


def _policy_params(policy: TenantScreenPolicy) -> tuple[Any, ...]:
    user, retrieved, tool = policy.user, policy.retrieved, policy.tool
    return (
        user.block_at, user.user_action,
        retrieved.sanitize_at, retrieved.block_at, retrieved.retrieved_action,
        tool.sanitize_at, tool.block_at, tool.retrieved_action,
    )  # fmt: skip


class _AllowListTable:
    """The :class:`~bastion.safety.pii_allow.AllowListStore` of the tenants' table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def values(self, tenant_id: UUID) -> Sequence[AllowItem]:
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            rows = await (
                await tx.execute(
                    "SELECT kind, value FROM bastion.pii_allow_entries LIMIT %s",
                    (MAX_ENTRIES + 1,),  # more is a bug the reader refuses
                )
            ).fetchall()
        return [(r["kind"], r["value"]) for r in rows]


class SafetyPolicies:
    """Tenants' screen policies and PII allow-lists: read on the hot path
    (cached, failing closed), changed and listed by people (audited)."""

    def __init__(
        self,
        db: Database,
        ttl_seconds: float = 5.0,
        *,
        regions: Sequence[str] = DEFAULT_REGIONS,
    ) -> None:
        self.db = db
        self.regions = tuple(regions)
        self._cache: TenantCache[TenantScreenPolicy] = TenantCache(ttl_seconds)
        self.pii_allow_lists = PiiAllowLists(
            _AllowListTable(db), ttl_seconds=ttl_seconds, regions=self.regions
        )
        """The tenants' allow-lists as a :class:`~bastion.safety.vault.PiiVault` reads them."""

    # -- the hot path --------------------------------------------------------------------

    @property
    def ttl_seconds(self) -> float:
        """How long a tenant's value is kept (0: read on every call)."""
        return self._cache.ttl_seconds

    @ttl_seconds.setter
    def ttl_seconds(self, seconds: float) -> None:
        self._cache.ttl_seconds = seconds

    async def screen_policy(self, tenant_id: UUID) -> TenantScreenPolicy:
        """The tenant's screen policy (cached ``ttl_seconds``); raise
        :class:`SafetyPolicyUnavailable` when it cannot be read."""
        try:
            return await self._cache.get(tenant_id, lambda: self._screen_policy(tenant_id))
        except Exception as error:  # any failure: refuse, never the defaults
            raise SafetyPolicyUnavailable(
                "the tenant's screen policy could not be read", retry_after=5
            ) from error

    async def _screen_policy(self, tenant_id: UUID) -> TenantScreenPolicy:
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            row = await (
                await tx.execute(f"SELECT {_POLICY_COLUMNS} FROM bastion.screen_policies")
            ).fetchone()
        return _policy_of(row)

    def forget(self, tenant_id: UUID) -> None:
        """Drop this process's cached configuration of the tenant (others wait for the TTL)."""
        self._cache.forget(tenant_id)
        self.pii_allow_lists.forget(tenant_id)

    # -- owners and auditors -------------------------------------------------------------

    async def config(self, tenant_id: UUID, actor: UUID, role: str) -> SafetyConfig:
        """The tenant's configuration as ``actor`` reads it (RLS: their tenant only)."""
        async with self.db.tenant_tx(tenant_id, actor, role) as tx:
            row = await (
                await tx.execute(
                    f"SELECT {_POLICY_COLUMNS}, set_by, updated_at FROM bastion.screen_policies"
                )
            ).fetchone()
            rows = await (
                await tx.execute(
                    "SELECT id, kind, value, created_by, created_at "
                    "FROM bastion.pii_allow_entries ORDER BY created_at, id"
                )
            ).fetchall()
        entries = tuple(
            StoredAllowEntry(r["id"], r["kind"], r["value"], r["created_by"], r["created_at"])
            for r in rows
        )
        return SafetyConfig(
            _policy_of(row),
            row["set_by"] if row else None,
            row["updated_at"] if row else None,
            entries,
        )

    async def set_screen_policy(
        self, tenant_id: UUID, actor: UUID, policy: TenantScreenPolicy, reason: str
    ) -> TenantScreenPolicy:
        """Replace the tenant's screen policy as the owner ``actor``; audited
        (``safety.screen.configure``: the policy before and after, and why)."""
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            old = await (
                await tx.execute(
                    f"SELECT {_POLICY_COLUMNS} FROM bastion.screen_policies FOR UPDATE"
                )
            ).fetchone()
            await tx.execute(
                f"INSERT INTO bastion.screen_policies ({_POLICY_COLUMNS}, set_by) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant_id) DO UPDATE SET "
                "user_block_at = excluded.user_block_at, user_action = excluded.user_action, "
                "retrieved_sanitize_at = excluded.retrieved_sanitize_at, "
                "retrieved_block_at = excluded.retrieved_block_at, "
                "retrieved_action = excluded.retrieved_action, "
                "tool_sanitize_at = excluded.tool_sanitize_at, "
                "tool_block_at = excluded.tool_block_at, tool_action = excluded.tool_action, "
                "set_by = excluded.set_by, updated_at = now()",
                (*_policy_params(policy), actor),
            )
            await audit.record(
                tx,
                actor=f"user:{actor}",
                action="safety.screen.configure",
                target=f"tenant:{tenant_id}",
                details={
                    "old": _policy_of(old).public(),
                    "old_default": old is None,
                    "new": policy.public(),
                    "reason": reason,
                },
            )
        self.forget(tenant_id)
        return policy

    async def allow_pii(
        self, tenant_id: UUID, actor: UUID, entries: Iterable[tuple[str, str]]
    ) -> list[StoredAllowEntry]:
        """Add ``(kind, value)`` entries as the owner ``actor``, all or none;
        audited (``safety.pii_allow.add``: ids and kinds). Raises
        :class:`InvalidSafetyPolicy` (nothing written) for an entry
        :func:`normalised_entry` refuses, more than :data:`MAX_BATCH` at once, or
        past :data:`~bastion.safety.pii_allow.MAX_ENTRIES` for the tenant. An
        entry already there is returned as it is (no change, no event)."""
        wanted = list(entries)
        if not 1 <= len(wanted) <= MAX_BATCH:
            raise InvalidSafetyPolicy(f"add 1 to {MAX_BATCH} entries at a time", reason="too-many")
        stored = list(
            dict.fromkeys(
                (kind, normalised_entry(kind, value, self.regions)) for kind, value in wanted
            )
        )
        out: list[StoredAllowEntry] = []
        added: list[dict[str, str]] = []
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            # One writer per tenant at a time, so two batches cannot pass the cap together.
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"bastion.pii_allow_entries:{tenant_id}",),
            )
            count = await (
                await tx.execute("SELECT count(*) AS n FROM bastion.pii_allow_entries")
            ).fetchone()
            existing = await (
                await tx.execute(
                    "SELECT id, kind, value, created_by, created_at "
                    "FROM bastion.pii_allow_entries "
                    "WHERE (kind, value) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                    ([k for k, _v in stored], [v for _k, v in stored]),
                )
            ).fetchall()
            known = {(r["kind"], r["value"]): r for r in existing}
            new = [pair for pair in stored if pair not in known]
            if (count["n"] if count else 0) + len(new) > MAX_ENTRIES:
                raise InvalidSafetyPolicy(
                    f"a tenant keeps at most {MAX_ENTRIES} values in clear", reason="too-many"
                )
            for kind, value in stored:
                row = known.get((kind, value))
                if row is None:
                    row = await (
                        await tx.execute(
                            "INSERT INTO bastion.pii_allow_entries (kind, value, created_by) "
                            "VALUES (%s, %s, %s) "
                            "RETURNING id, kind, value, created_by, created_at",
                            (kind, value, actor),
                        )
                    ).fetchone()
                    assert row is not None
                    added.append({"id": str(row["id"]), "kind": kind})
                out.append(
                    StoredAllowEntry(
                        row["id"], row["kind"], row["value"], row["created_by"], row["created_at"]
                    )
                )
            if added:
                await audit.record(
                    tx,
                    actor=f"user:{actor}",
                    action="safety.pii_allow.add",
                    target=f"tenant:{tenant_id}",
                    details={"added": added, "count": len(added)},
                )
        self.forget(tenant_id)
        return out

    async def disallow_pii(self, tenant_id: UUID, actor: UUID, entry_id: UUID) -> None:
        """Remove an entry as the owner ``actor``; audited (``safety.pii_allow.remove``).
        Raises :class:`PiiAllowEntryNotFound` when the tenant has no such entry."""
        async with self.db.tenant_tx(tenant_id, actor, "owner") as tx:
            row = await (
                await tx.execute(
                    "DELETE FROM bastion.pii_allow_entries WHERE id = %s RETURNING kind",
                    (entry_id,),
                )
            ).fetchone()
            if row is None:
                raise PiiAllowEntryNotFound("this tenant has no such entry")
            await audit.record(
                tx,
                actor=f"user:{actor}",
                action="safety.pii_allow.remove",
                target=f"pii_allow_entry:{entry_id}",
                details={"id": str(entry_id), "kind": row["kind"]},
            )
        self.forget(tenant_id)
