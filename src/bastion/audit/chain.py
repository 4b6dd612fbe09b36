"""The audit hash chain: the event encoding, and verifying a tenant's trail.

Each event's ``hash`` is ``SHA-256(prev_hash || canonical)``, where
``canonical`` is the RFC 8785 (JCS) serialisation of the event's
``action, actor, at`` (epoch microseconds), ``details, request_id, target``
and ``tenant_id``, and ``prev_hash`` is the tenant's previous event's hash
(32 zero bytes for the first). The database computes it as the event is
inserted (migration 0031), under the tenant's head lock; this module computes
the same bytes to check it. ``seq`` is not hashed: the chain is the order,
and a signed checkpoint binds a ``seq`` to a hash.

:class:`ChainVerifier` walks one tenant's events in ``seq`` order and reports
each :class:`Finding`: an event ``altered`` (its content no longer gives its
hash), ``removed`` (a gap in ``seq``, or a link to an event no longer there),
``inserted`` (a forged event slid between two real ones), ``reordered``
(events in another order than they were chained), ``rewritten`` (the chain
does not end in the hash a signed checkpoint holds) and ``truncated``
(events a checkpoint or the head row counted are gone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson

from bastion.jcs import canonicalize

GENESIS = bytes(32)

FindingKind = Literal[
    "altered", "removed", "inserted", "reordered", "unlinked", "rewritten", "truncated"
]

# The C-accelerated string escaper json.dumps uses with ensure_ascii=False:
# exactly JCS's escaping (RFC 8785 section 3.2.2.2), see bastion.jcs._string.
_string = json.encoder.encode_basestring
_json_details = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _details(value: Any) -> str:
    """``value`` as compact JSON with sorted members: orjson (several times faster
    than json's, which matters at a million events), else json's for what orjson
    refuses (integers past 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return _json_details(value)


def loads_details(text: str | bytes) -> Any:
    """orjson's parser (several times faster than json's: most of reading a
    million events), else json's for what orjson refuses (integers past 64 bits)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class ChainRow(NamedTuple):
    """One stored event, as the verifier reads it (a tuple: built straight from
    a fetched row, a million times per verification)."""

    seq: int
    at_us: int  # epoch microseconds
    actor: str
    action: str
    target: str
    details: Any
    request_id: str | None
    prev_hash: bytes
    hash: bytes


# A row as fetched for :meth:`ChainVerifier.feed_page`: ChainRow's fields, in
# its order, with ``details`` as the JSON text the database returns.
StoredRow = tuple[int, int, str, str, str, str, str | None, bytes, bytes]


@dataclass(frozen=True)
class Anchor:
    """A tenant's head as a signed checkpoint recorded it."""

    number: int  # the global checkpoint's number
    seq: int
    hash: bytes


@dataclass(frozen=True)
class Finding:
    """One place where the stored trail is not the trail that was written."""

    tenant_id: str
    kind: FindingKind
    seq: int
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "kind": self.kind,
            "seq": self.seq,
            "detail": self.detail,
        }


def canonical(tenant_id: str, row: ChainRow, *, strict: bool = False) -> bytes:
    """The JCS bytes of ``row``'s event (what the database hashes).

    The members are fixed and already in JCS order; ``details`` is written by
    orjson with sorted keys unless ``strict``. That is JCS for what audit
    details hold (strings, integers, booleans); :func:`link_holds` retries with
    :func:`bastion.jcs.canonicalize` before calling a mismatch an alteration,
    so the shortcut can never hide one (both encode the same JSON value).
    """
    details = canonicalize(row.details).decode() if strict else _details(row.details)
    request_id = "null" if row.request_id is None else _string(row.request_id)
    return (
        f'{{"action":{_string(row.action)},"actor":{_string(row.actor)},"at":{row.at_us},'
        f'"details":{details},"request_id":{request_id},"target":{_string(row.target)},'
        f'"tenant_id":"{tenant_id}"}}'
    ).encode()


def event_hash(prev_hash: bytes, body: bytes) -> bytes:
    """``SHA-256(prev_hash || body)``: one link of the chain."""
    return hashlib.sha256(prev_hash + body).digest()


def link_holds(tenant_id: str, row: ChainRow) -> bool:
    """True when ``row``'s stored hash is the hash of its content after its ``prev_hash``."""
    if event_hash(row.prev_hash, canonical(tenant_id, row)) == row.hash:
        return True
    try:
        return event_hash(row.prev_hash, canonical(tenant_id, row, strict=True)) == row.hash
    except (ValueError, RecursionError):
        return False


class ChainVerifier:
    """Checks one tenant's rows, fed in ``seq`` order, against the chain rule
    and the signed ``anchors``.

    ``start``: a trusted anchor to begin at (``--since``); the rows fed must
    begin at its ``seq``. Feed every row, then call :meth:`finish` with the
    head row's ``seq`` and, when :attr:`needs_index`, the ``hash -> seq`` of
    every stored row (read only then, to tell an insertion from a reordering
    or a removal).
    """

    def __init__(
        self, tenant_id: str, anchors: Sequence[Anchor] = (), start: Anchor | None = None
    ) -> None:
        self.tenant_id = tenant_id
        self.anchors = tuple(anchors)
        self.start = start
        self.findings: list[Finding] = []
        self.checked = 0
        self._by_seq = {anchor.seq: anchor for anchor in anchors}
        self._expected_prev = GENESIS if start is None else start.hash
        self._last_seq = 0 if start is None else start.seq - 1
        self._last_prev: bytes | None = None
        self._gap_at = -1
        # (seq, its prev_hash, the previous row's prev_hash): links to classify.
        self._broken: list[tuple[int, bytes, bytes | None]] = []

    @property
    def needs_index(self) -> bool:
        return bool(self._broken)

    def feed(self, row: ChainRow) -> None:
        tenant, start = self.tenant_id, self.start
        self.checked += 1
        if start is not None and row.seq == start.seq:
            if row.hash != start.hash:
                self._add("rewritten", row.seq, f"not checkpoint {start.number}'s hash")
            self._advance(row)
            return
        if row.seq != self._last_seq + 1:
            self._add(
                "removed",
                self._last_seq + 1,
                f"events {self._last_seq + 1}..{row.seq - 1} are missing",
            )
            self._gap_at = row.seq
        if not link_holds(tenant, row):
            self._add("altered", row.seq, "its content does not give its hash")
        if row.prev_hash != self._expected_prev and row.seq != self._gap_at:
            self._broken.append((row.seq, row.prev_hash, self._last_prev))
        anchor = self._by_seq.get(row.seq)
        if anchor is not None and row.hash != anchor.hash:
            self._add("rewritten", row.seq, f"not checkpoint {anchor.number}'s hash")
        self._advance(row)

    def feed_page(self, rows: Iterable[StoredRow]) -> None:
        """Feed stored rows as fetched (``details`` still JSON text), in ``seq`` order.

        The same checks as :meth:`feed` with less Python per row (what a
        million-event verification is made of): a row whose ``seq``, link and
        hash all hold (the canonical object written by one orjson call, whose
        string escaping is JCS's) only moves the chain on; any other row — one
        that fails a check, sits on an anchor or the trusted start, or whose
        details orjson cannot read — goes through :meth:`feed` (strict JCS
        before calling it altered), so the shortcut decides nothing
        :meth:`feed` would not.
        """
        tenant, sha256, dumps, loads = self.tenant_id, hashlib.sha256, orjson.dumps, orjson.loads
        slow_seqs = set(self._by_seq)
        if self.start is not None:
            slow_seqs.add(self.start.seq)
        expected, last_seq, last_prev, checked = (
            self._expected_prev,
            self._last_seq,
            self._last_prev,
            self.checked,
        )
        for stored in rows:
            seq, at_us, actor, action, target, details, request_id, prev, digest = stored
            if seq == last_seq + 1 and prev == expected and seq not in slow_seqs:
                try:
                    body = dumps(
                        {
                            "action": action,
                            "actor": actor,
                            "at": at_us,
                            "details": loads(details),
                            "request_id": request_id,
                            "target": target,
                            "tenant_id": tenant,
                        },
                        option=orjson.OPT_SORT_KEYS,
                    )
                except (orjson.JSONDecodeError, TypeError):
                    body = b""
                if sha256(prev + body).digest() == digest:
                    expected, last_seq, last_prev, checked = digest, seq, prev, checked + 1
                    continue
            self._expected_prev, self._last_seq, self._last_prev, self.checked = (
                expected,
                last_seq,
                last_prev,
                checked,
            )
            self.feed(ChainRow(*stored[:5], loads_details(details), *stored[6:]))
            expected, last_seq, last_prev, checked = (
                self._expected_prev,
                self._last_seq,
                self._last_prev,
                self.checked,
            )
        self._expected_prev, self._last_seq, self._last_prev, self.checked = (
            expected,
            last_seq,
            last_prev,
            checked,
        )

    def finish(
        self, head_seq: int | None = None, index: Mapping[bytes, int] | None = None
    ) -> list[Finding]:
        """All findings, in ``seq`` order (empty: the trail is intact)."""
        if self._broken:
            self.findings.extend(_classify(self.tenant_id, self._broken, index or {}))
        counted = max([a.seq for a in self.anchors] + [head_seq or 0])
        if counted > self._last_seq:
            self._add(
                "truncated",
                self._last_seq + 1,
                f"the trail ends at {self._last_seq}; it was signed or counted to {counted}",
            )
        return sorted(self.findings, key=lambda f: (f.seq, f.kind))

    def _advance(self, row: ChainRow) -> None:
        self._expected_prev, self._last_seq, self._last_prev = row.hash, row.seq, row.prev_hash

    def _add(self, kind: FindingKind, seq: int, detail: str) -> None:
        self.findings.append(Finding(self.tenant_id, kind, seq, detail))


def _classify(
    tenant_id: str, broken: list[tuple[int, bytes, bytes | None]], known: Mapping[bytes, int]
) -> list[Finding]:
    """Name each broken link by where its ``prev_hash`` points."""
    findings: list[Finding] = []
    for seq, prev, previous_rows_prev in broken:
        points_to = known.get(prev) if prev != GENESIS else 0
        if points_to is None:
            findings.append(
                _finding(
                    tenant_id,
                    "unlinked",
                    seq,
                    "links to an event no longer there (removed or rehashed)",
                )
            )
        elif points_to == seq - 2 and previous_rows_prev == prev:
            findings.append(
                _finding(tenant_id, "inserted", seq - 1, "an event was slid in before this one")
            )
        else:
            findings.append(
                _finding(tenant_id, "reordered", seq, f"was chained after event {points_to}")
            )
    return findings


def _finding(tenant_id: str, kind: FindingKind, seq: int, detail: str) -> Finding:
    return Finding(tenant_id, kind, seq, detail)


__all__ = [
    "GENESIS",
    "Anchor",
    "ChainRow",
    "ChainVerifier",
    "Finding",
    "StoredRow",
    "canonical",
    "event_hash",
    "link_holds",
    "loads_details",
]
