"""Provider webhooks: verify, store encrypted, acknowledge (CHECKLIST P2).

The intake does as little as it can before answering: verify the signature
with the provider's own library (:mod:`.stripe`, :mod:`.adyen`), seal the raw
event with AES-256-GCM, and store it with one call of
``bastion.webhook_receive`` — unique per (provider, event_id), routed to its
tenant by customer id, its tenant's drain job enqueued in the same
transaction. The worker applies it later (:mod:`bastion.billing.service`).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.billing.errors import WebhooksUnavailable
from bastion.billing.models import PLATFORM
from bastion.db.pool import Database
from bastion.logs import get_logger
from bastion.secrets.errors import SecretNotFound
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import SecretRef, resolve_ref

# Larger than any Stripe or Adyen event; anything bigger is refused unread (413).
MAX_BODY_BYTES = 256 * 1024
# Events stored per transaction at most (a group commit).
MAX_BATCH = 200
_log = get_logger("bastion.billing")
EVENT_KEY = "billing/webhook-events"
_NONCE = 12
# Rotated webhook secrets are picked up this soon; between, the key ring (one
# file decryption) is not read on every delivery.
SECRET_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class IncomingEvent:
    """A verified event, reduced to what routing needs; ``raw`` is what is stored."""

    provider: str
    event_id: str
    event_type: str
    handled: bool
    customer: str | None
    tenant_hint: UUID | None
    object_id: str | None
    version: int
    raw: bytes


@dataclass(frozen=True)
class Stored:
    row_id: int
    status: str
    duplicate: bool


class ActiveSecrets:
    """Every active version of a key-ring secret: several during a rotation."""

    def __init__(self, keystore: Keystore, ref: str) -> None:
        self.keystore = keystore
        self.ref = SecretRef.parse(ref)
        self.name = self.ref.name
        self._lock = threading.Lock()
        self._cached: tuple[float, tuple[bytes, ...]] | None = None

    def values(self) -> tuple[bytes, ...]:
        """Return the active versions, newest first; empty if none is configured."""
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < SECRET_CACHE_SECONDS:
                return self._cached[1]
        if self.ref.scheme != "local":
            # bao:// or awskms://: the one value the reference names (rotate
            # it in the store; the overlap of several is a local:// feature).
            active: tuple[bytes, ...] = (resolve_ref(self.keystore, self.ref),)
        else:
            try:
                infos = self.keystore.versions(self.name)
            except SecretNotFound:
                infos = []
            active = tuple(
                self.keystore.get(self.name, info.version)
                for info in sorted(infos, key=lambda i: -i.version)
                if info.state == "active"
            )
        with self._lock:
            self._cached = (now, active)
        return active


class EventCipher:
    """Seals raw events (AES-256-GCM, NIST SP 800-38D) bound to provider and event id."""

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        self._keys: dict[int, bytes] = {}
        self._current: tuple[int, bytes] | None = None

    def _current_key(self) -> tuple[int, bytes]:
        if self._current is None:
            self.keystore.ensure(EVENT_KEY, lambda: secrets.token_bytes(32))
            self._current = self.keystore.current(EVENT_KEY)
        return self._current

    @staticmethod
    def _aad(provider: str, event_id: str) -> bytes:
        return f"bastion/webhook-event|{provider}|{event_id}".encode()

    def seal(self, provider: str, event_id: str, raw: bytes) -> tuple[int, bytes]:
        version, key = self._current_key()
        nonce = secrets.token_bytes(_NONCE)
        return version, nonce + AESGCM(key).encrypt(nonce, raw, self._aad(provider, event_id))

    def open(self, provider: str, event_id: str, version: int, blob: bytes) -> bytes:
        """Return the raw event; raise ValueError if it does not open (altered, moved)."""
        key = self._keys.get(version)
        if key is None:
            key = self._keys[version] = self.keystore.get(EVENT_KEY, version)
        try:
            return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], self._aad(provider, event_id))
        except (InvalidTag, ValueError):
            raise ValueError(f"stored event {provider}/{event_id} does not open") from None


class WebhookIntake:
    """Stores verified events durably before they are acknowledged.

    Group commit: deliveries arriving while a transaction commits wait and
    are stored together in the next one. An acknowledgement still means the
    event is on disk (its own transaction committed), but the WAL flush —
    what bounds a durable intake (about 275 commits/s on this machine's disk)
    — is shared by every delivery of the batch.
    """

    def __init__(self, db: Database, cipher: EventCipher, *, max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.cipher = cipher
        self.max_batch = max_batch
        self._pending: list[tuple[list[IncomingEvent], str, asyncio.Future[list[Stored]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def store(self, events: list[IncomingEvent], *, via: str = "webhook") -> list[Stored]:
        """Store ``events`` (all or none, with whatever shares their batch); a
        known (provider, event_id) is reported as a duplicate and changes nothing.
        Raises :class:`WebhooksUnavailable` if the database cannot store them
        (the provider retries a 503)."""
        future: asyncio.Future[list[Stored]] = asyncio.get_running_loop().create_future()
        self._pending.append((events, via, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch: list[tuple[list[IncomingEvent], str, asyncio.Future[list[Stored]]]] = []
            size = 0
            while self._pending and (
                not batch or size + len(self._pending[0][0]) <= self.max_batch
            ):
                item = self._pending.pop(0)
                batch.append(item)
                size += len(item[0])
            # Any failure (database, key ring) answers 503, never leaves a delivery hanging.
            try:
                results = await self._store_batch(batch)
            except Exception as exc:
                _log.error("webhook_store_failed", error=type(exc).__name__, batch=len(batch))
                if len(batch) > 1:
                    # One bad delivery must not fail the others: each alone.
                    for item in batch:
                        await self._store_alone(item)
                else:
                    self._fail(batch[0][2])
                continue
            for (_events, _via, future), stored in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(stored)

    async def _store_alone(
        self, item: tuple[list[IncomingEvent], str, asyncio.Future[list[Stored]]]
    ) -> None:
        try:
            (stored,) = await self._store_batch([item])
        except Exception as exc:
            _log.error("webhook_store_failed", error=type(exc).__name__, batch=1)
            self._fail(item[2])
            return
        if not item[2].done():
            item[2].set_result(stored)

    @staticmethod
    def _fail(future: asyncio.Future[list[Stored]]) -> None:
        if not future.done():
            future.set_exception(WebhooksUnavailable("the event could not be stored; retry later"))

    async def _store_batch(
        self, batch: list[tuple[list[IncomingEvent], str, asyncio.Future[list[Stored]]]]
    ) -> list[list[Stored]]:
        """Store the batch in one transaction and one statement (a row per event,
        in order, through ``bastion.webhook_receive``)."""
        flat = [(event, via) for events, via, _future in batch for event in events]
        sealed = [self.cipher.seal(e.provider, e.event_id, e.raw) for e, _via in flat]
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT r.event_row, r.event_status, r.duplicate FROM unnest("
                "%s::text[], %s::text[], %s::text[], %s::boolean[], %s::text[], %s::uuid[], "
                "%s::text[], %s::bigint[], %s::bytea[], %s::integer[], %s::text[]) "
                "WITH ORDINALITY AS u(provider, event_id, kind, handled, customer, hint, "
                "object_id, version, payload, key_version, via, n) "
                "CROSS JOIN LATERAL bastion.webhook_receive(u.provider, u.event_id, u.kind, "
                "u.handled, u.customer, u.hint, u.object_id, u.version, u.payload, "
                "u.key_version, u.via) AS r ORDER BY u.n",
                (
                    [e.provider for e, _ in flat],
                    [e.event_id for e, _ in flat],
                    [e.event_type for e, _ in flat],
                    [e.handled for e, _ in flat],
                    [e.customer for e, _ in flat],
                    [e.tenant_hint for e, _ in flat],
                    [e.object_id for e, _ in flat],
                    [e.version for e, _ in flat],
                    [blob for _version, blob in sealed],
                    [version for version, _blob in sealed],
                    [via for _, via in flat],
                ),
            )
            rows = await cur.fetchall()
        stored = iter(Stored(r["event_row"], r["event_status"], r["duplicate"]) for r in rows)
        return [[next(stored) for _ in events] for events, _via, _future in batch]
