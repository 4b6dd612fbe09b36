"""The answer cache: exact match, per tenant, TTL, size-capped.

The key is a hash of the tenant, the model and the normalised prompt, so one
tenant's answer can never be another's, even for the same prompt. Fresh
entries answer deterministic requests (temperature 0); any entry younger than
``stale_seconds`` answers when every provider of the model is down, marked
``Bastion-Cache: stale-fallback``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from uuid import UUID

from bastion.gateway.providers import Completion, Message


def cache_key(tenant_id: UUID, model: str, messages: Sequence[Message]) -> str:
    normalised = [{"role": m["role"], "content": " ".join(m["content"].split())} for m in messages]
    payload = json.dumps([str(tenant_id), model, normalised], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


class AnswerCache:
    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        ttl_seconds: float = 300.0,
        stale_seconds: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self.stale = stale_seconds
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Completion]] = OrderedDict()

    def put(self, key: str, completion: Completion) -> None:
        self._entries[key] = (self.clock(), completion)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _get(self, key: str, max_age: float) -> Completion | None:
        entry = self._entries.get(key)
        if entry is None or self.clock() - entry[0] > max_age:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def fresh(self, key: str) -> Completion | None:
        return self._get(key, self.ttl)

    def stale_fallback(self, key: str) -> Completion | None:
        return self._get(key, self.stale)

    def __len__(self) -> int:
        return len(self._entries)
