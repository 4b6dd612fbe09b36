"""The answer cache: exact match, partitioned per tenant, TTL, bounded in memory.

**Key** (:meth:`AnswerCache.key`): an HMAC-SHA256 (RFC 2104) under a key
random per process, over a canonical serialisation (JSON with sorted keys and
no insignificant whitespace, after RFC 8785) of

- the tenant, and the user unless the cache is shared within tenants;
- every field of the client's request except :data:`NOT_IN_KEY`: deny by
  default, so a generation parameter (``max_tokens``, ``stop``, ``seed``,
  ``response_format``…), also one this gateway does not know or does not send
  on, makes another key;
- what the provider was sent: the messages after screening and PII
  tokenisation, ``max_tokens``, ``temperature``, ``tools``.

Message text enters the key only as sent (tokenised): the raw text never does.

**Scope.** By default an answer is served again only to the user who asked:
a hit would tell a colleague that someone asked exactly this (the
``Bastion-Cache`` header, the latency), and the answer was made in another
user's session. ``shared_within_tenant`` lets every user of a tenant share it.

**What is stored**: complete answers only (:func:`storable`). A truncated
answer (``finish_reason`` ``length``), one cut by a content filter, and
proposed tool calls (signed per request) are never served again, neither
fresh nor as stale fallback.

**Serving.** A fresh entry (younger than ``ttl_seconds``) answers a repeated
deterministic request; any entry younger than ``stale_seconds`` answers when
every provider of the model is down, marked ``Bastion-Cache: stale-fallback``.

**Capacity.** Each tenant has its own LRU and a quota, in entries and in
bytes: by default the totals divided by the expected number of tenants, with
a floor (:func:`tenant_quota`). A tenant over its quota evicts its own least
recently used entries, so one tenant's flood never evicts another tenant's
answers. The totals hold as well: should more tenants than expected fill
their quotas, the tenant using the largest share of its quota gives up its
least recently used entry first, so a tenant within its fair share (the
totals divided by the tenants holding entries) keeps its entries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from bastion.gateway.providers import Completion

# Fields of a chat request that cannot change the answer: how it is delivered
# (a streamed answer is never cached), not what is asked. Every other field,
# known here or not, is part of the key.
NOT_IN_KEY = frozenset({"stream", "stream_options"})

# Requests nested deeper (a tool's JSON schema needs a dozen levels) are
# answered but not cached: the key's serialisation must not recurse without bound.
MAX_KEY_DEPTH = 64
# A tenant's quota is never below this (unless the totals are).
MIN_TENANT_ENTRIES = 64
MIN_TENANT_BYTES = 256 << 10
# What an entry costs besides its text: key, tuple, completion, usage, LRU node.
ENTRY_OVERHEAD_BYTES = 512


def shred_announcement(tenant_id: UUID) -> str:
    """How migration 0023 announces the shred of ``tenant_id`` on
    ``bastion_tenant_shred``: the SHA-256 of its id (no id in clear)."""
    return hashlib.sha256(str(tenant_id).encode()).hexdigest()


def tenant_quota(total: int, expected_tenants: int, floor: int) -> int:
    """A tenant's share of ``total``: ``total / expected_tenants``, at least
    ``floor``, at most ``total``."""
    return min(total, max(total // max(expected_tenants, 1), floor))


def storable(completion: Completion) -> bool:
    """Whether an answer may be served again: complete (``finish_reason`` ``stop``),
    proposing no tool call."""
    return completion.finish_reason == "stop" and not completion.tool_calls


@dataclass(frozen=True)
class CacheKey:
    tenant_id: UUID
    # None: the request could not be keyed (too deep, not JSON): never stored or found.
    digest: str | None


@dataclass
class _Entry:
    stored_at: float
    completion: Completion
    size: int


@dataclass
class _Partition:
    """One tenant's entries, least recently used first."""

    entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    size: int = 0


# Values that hold nothing: passed over without the (slow) Mapping check.
_LEAVES = frozenset((str, int, float, bool, type(None)))


def _nested_at_most(value: Any, limit: int) -> bool:
    """Whether ``value`` nests mappings and lists at most ``limit`` deep (iteratively)."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if type(item) in _LEAVES:
            continue
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, list | tuple):
            children = list(item)
        else:
            continue
        if depth >= limit:
            return False
        pending.extend((child, depth + 1) for child in children)
    return True


def _asked(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request's fields for the key: all but :data:`NOT_IN_KEY`, and each
    message without its text (the key takes the text as sent)."""
    fields = {name: value for name, value in request.items() if name not in NOT_IN_KEY}
    messages = fields.get("messages")
    if isinstance(messages, list):
        fields["messages"] = [
            {k: v for k, v in m.items() if k != "content"} if isinstance(m, Mapping) else m
            for m in messages
        ]
    return fields


class AnswerCache:
    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 << 20,
        expected_tenants: int = 20,
        tenant_entries: int | None = None,
        tenant_bytes: int | None = None,
        ttl_seconds: float = 300.0,
        stale_seconds: float = 86_400.0,
        shared_within_tenant: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``tenant_entries`` and ``tenant_bytes`` override the quota derived from
        ``expected_tenants``; a zero total turns the cache off."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.tenant_entries = min(
            max_entries,
            tenant_entries or tenant_quota(max_entries, expected_tenants, MIN_TENANT_ENTRIES),
        )
        self.tenant_bytes = min(
            max_bytes, tenant_bytes or tenant_quota(max_bytes, expected_tenants, MIN_TENANT_BYTES)
        )
        self.ttl = ttl_seconds
        self.stale = stale_seconds
        self.shared_within_tenant = shared_within_tenant
        self.clock = clock
        self._secret = secrets.token_bytes(32)
        self._tenants: dict[UUID, _Partition] = {}
        self._entries = 0
        self._bytes = 0

    def key(
        self,
        tenant_id: UUID,
        user_id: UUID,
        *,
        sent: Mapping[str, Any],
        request: Mapping[str, Any] | None = None,
    ) -> CacheKey:
        """The key of a call: ``sent`` is what the provider gets, ``request`` every
        field of the client's request (None: only ``sent`` counts)."""
        scope = None if self.shared_within_tenant else str(user_id)
        material = [str(tenant_id), scope, _asked(request) if request is not None else None, sent]
        if not _nested_at_most(material, MAX_KEY_DEPTH):
            return CacheKey(tenant_id, None)  # answered, but never cached
        try:
            canonical = json.dumps(
                material, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
        except (RecursionError, TypeError, ValueError):  # not JSON: never cached either
            return CacheKey(tenant_id, None)
        data = canonical.encode("utf-8", "surrogatepass")
        return CacheKey(tenant_id, hmac.new(self._secret, data, hashlib.sha256).hexdigest())

    def put(self, key: CacheKey, completion: Completion) -> None:
        """Store ``completion`` if :func:`storable`, evicting the tenant's own least
        recently used entries past its quota, then anyone's past the totals."""
        size = ENTRY_OVERHEAD_BYTES + sys.getsizeof(completion.text)
        if key.digest is None or not storable(completion) or not self.tenant_entries:
            return
        if size > self.tenant_bytes:  # also when the cache is off (0 bytes)
            return
        partition = self._tenants.setdefault(key.tenant_id, _Partition())
        old = partition.entries.pop(key.digest, None)
        if old is not None:
            self._count(partition, -1, -old.size)
        partition.entries[key.digest] = _Entry(self.clock(), completion, size)
        self._count(partition, 1, size)
        while len(partition.entries) > self.tenant_entries or partition.size > self.tenant_bytes:
            self._evict_oldest(key.tenant_id, partition)
        while self._entries > self.max_entries or self._bytes > self.max_bytes:
            tenant_id, largest = max(self._tenants.items(), key=lambda item: self._share(item[1]))
            self._evict_oldest(tenant_id, largest)

    def fresh(self, key: CacheKey) -> Completion | None:
        return self._get(key, self.ttl)

    def stale_fallback(self, key: CacheKey) -> Completion | None:
        return self._get(key, self.stale)

    def forget_tenant(self, tenant_id: UUID) -> None:
        """Drop every entry of the tenant (its data was shredded)."""
        partition = self._tenants.pop(tenant_id, None)
        if partition is not None:
            self._entries -= len(partition.entries)
            self._bytes -= partition.size

    def forget_announced(self, announcement: str) -> None:
        """Drop the entries of the tenant whose shred was announced as ``announcement``
        (:func:`shred_announcement`); anything unexpected drops them all."""
        if len(announcement) != 64:
            self.forget_all()
            return
        for tenant_id in list(self._tenants):
            if hmac.compare_digest(announcement, shred_announcement(tenant_id)):
                self.forget_tenant(tenant_id)

    def forget_all(self) -> None:
        """Drop every entry (shreds may have been announced while nobody listened)."""
        for tenant_id in list(self._tenants):
            self.forget_tenant(tenant_id)

    def entries_of(self, tenant_id: UUID) -> int:
        partition = self._tenants.get(tenant_id)
        return len(partition.entries) if partition else 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._entries

    def _get(self, key: CacheKey, max_age: float) -> Completion | None:
        partition = self._tenants.get(key.tenant_id)
        if partition is None or key.digest is None:
            return None
        entry = partition.entries.get(key.digest)
        if entry is None:
            return None
        age = self.clock() - entry.stored_at
        if age > self.stale:  # of no use any more: free its room now
            del partition.entries[key.digest]
            self._count(partition, -1, -entry.size)
            self._drop_if_empty(key.tenant_id, partition)
            return None
        if age > max_age:
            return None
        partition.entries.move_to_end(key.digest)
        return entry.completion

    def _share(self, partition: _Partition) -> float:
        """How much of its quota a tenant uses (its larger share of entries or bytes)."""
        return max(len(partition.entries) / self.tenant_entries, partition.size / self.tenant_bytes)

    def _count(self, partition: _Partition, entries: int, size: int) -> None:
        partition.size += size
        self._entries += entries
        self._bytes += size

    def _evict_oldest(self, tenant_id: UUID, partition: _Partition) -> None:
        _digest, entry = partition.entries.popitem(last=False)
        self._count(partition, -1, -entry.size)
        self._drop_if_empty(tenant_id, partition)

    def _drop_if_empty(self, tenant_id: UUID, partition: _Partition) -> None:
        if not partition.entries:
            del self._tenants[tenant_id]
