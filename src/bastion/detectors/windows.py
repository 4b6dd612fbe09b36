"""Sliding time windows over events, keyed (per tenant, per actor, per source...).

Events may arrive slightly out of time order (a transaction's ``at`` is its
start, its ``seq`` its commit order), so entries are kept sorted by time and
the window is cut relative to the newest time seen for the key. Values are
integers (counts, micro-USD).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Entry:
    at: datetime
    ts: float  # at, as a Unix time (compared often)
    seq: int
    value: int
    tag: str


@dataclass(frozen=True, slots=True)
class Span:
    """What a key's window holds after an event: the sum, the count, distinct tags,
    and its first entry (the earliest event of the burst: detection latency starts there)."""

    total: int
    count: int
    tags: int
    first: Entry


def _ts(entry: Entry) -> float:
    return entry.ts


@dataclass
class _Key:
    entries: list[Entry] = field(default_factory=list)
    newest: float | None = None
    total: int = 0  # kept as entries come and go: an add costs no pass over the window
    tags: Counter[str] = field(default_factory=Counter)


class Window:
    """Entries of the last ``seconds`` per key."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self._keys: dict[Hashable, _Key] = {}
        self._adds = 0

    def add(self, key: Hashable, at: datetime, *, seq: int, value: int = 1, tag: str = "") -> Span:
        """Add an entry and return the key's window."""
        slot = self._keys.get(key)
        if slot is None:
            slot = self._keys[key] = _Key()
        entry = Entry(at, at.timestamp(), seq, value, tag)
        if slot.newest is None or entry.ts > slot.newest:
            slot.newest = entry.ts
        if slot.newest - entry.ts <= self.seconds:  # else: already outside
            bisect.insort(slot.entries, entry, key=_ts)
            slot.total += value
            slot.tags[tag] += 1
        cut = bisect.bisect_left(slot.entries, slot.newest - self.seconds, key=_ts)
        for old in slot.entries[:cut]:
            slot.total -= old.value
            slot.tags[old.tag] -= 1
            if not slot.tags[old.tag]:
                del slot.tags[old.tag]
        del slot.entries[:cut]
        self._adds += 1
        if self._adds % 4096 == 0:
            self._forget(slot.newest)
        if not slot.entries:  # a late event, older than the window: on its own
            return Span(total=value, count=1, tags=1, first=entry)
        return Span(
            total=slot.total, count=len(slot.entries), tags=len(slot.tags), first=slot.entries[0]
        )

    def _forget(self, now: float) -> None:
        """Drop keys with nothing inside the window any more (bounded memory)."""
        stale = [
            key
            for key, slot in self._keys.items()
            if slot.newest is None or now - slot.newest > self.seconds
        ]
        for key in stale:
            del self._keys[key]
