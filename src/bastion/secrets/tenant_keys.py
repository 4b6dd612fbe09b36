"""Per-tenant data keys and the encryption of document bodies and chunk text.

Envelope encryption (NIST SP 800-57 part 1, section 6.1.2 "key wrapping"):
each tenant has a 256-bit *data key*, stored in ``bastion.data_keys`` only
wrapped by the tenant's own key-encryption key. The KEK lives in the KMS
(:class:`~bastion.secrets.protocols.KMS`; locally the key ring's
``kms/tenants/<tenant id>``), outside the database, so a database dump or
backup alone decrypts nothing — and destroying the tenant's KEK
(:meth:`TenantKeys.shred`) makes every copy of its ciphertext unreadable
(crypto-shredding), backups included.

Records are sealed with AES-256-GCM (NIST SP 800-38D) with a fresh 96-bit
nonce; the associated data is the purpose, the tenant id and the row id, so a
ciphertext moved to another row or another tenant fails to open.

Digests of the tenant's text (an upload's, for idempotency; a chunk's, for the
embedding cache) are HMAC-SHA256 (RFC 2104) under a key derived from the data
key with HKDF (RFC 5869), never a plain hash: a plain SHA-256 in the database
or a backup tells anyone holding a candidate file whether the tenant had it;
a keyed one tells nothing once the key is shredded.

The tenant's embedding vectors are stored rotated by a secret orthogonal
matrix derived from its first data key (:mod:`bastion.secrets.vector_transform`);
the matrix is cached here, next to the keys, and forgotten with them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from psycopg import AsyncConnection

from bastion.secrets.errors import KMSError
from bastion.secrets.protocols import KMS, KeyContext, RotatesKEKs
from bastion.secrets.vector_transform import VectorTransform

# A transaction of the tenant: bastion.db.pool.Conn, spelled out here because
# the database package depends on the key ring, never the other way round.
Conn = AsyncConnection[dict[str, Any]]

_NONCE = 12
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Unwrapped keys are kept this long in memory: long enough to spare the key
# ring on every chunk. A shred in another process is announced (see
# :meth:`TenantKeys.forget_announced`); this is the bound if that is missed.
CACHE_SECONDS = 60.0
# Tenants whose vector transform is kept (about 0.6 MB each at 384 dimensions;
# deriving one costs about 50 ms of CPU).
TRANSFORM_CACHE_SIZE = 64


class KeyUnavailable(Exception):
    """The tenant's data key is gone (shredded) or does not verify."""


class DecryptionFailed(Exception):
    """A ciphertext does not open under this tenant and row (altered or moved)."""


def _aad(purpose: str, tenant_id: UUID, row_id: UUID) -> bytes:
    return f"bastion/{purpose}|".encode() + tenant_id.bytes + row_id.bytes


def seal(key: bytes, purpose: str, tenant_id: UUID, row_id: UUID, plaintext: bytes) -> bytes:
    """Return nonce || AES-256-GCM ciphertext+tag of ``plaintext`` bound to the row."""
    nonce = secrets.token_bytes(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(purpose, tenant_id, row_id))


def open_sealed(key: bytes, purpose: str, tenant_id: UUID, row_id: UUID, blob: bytes) -> bytes:
    """Return the plaintext of :func:`seal`'s ``blob``; raise :class:`DecryptionFailed`."""
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], _aad(purpose, tenant_id, row_id))
    except (InvalidTag, ValueError):
        raise DecryptionFailed(f"{purpose} {row_id} does not open for this tenant") from None


def announced_tenants(announced: str, held: Iterable[Any]) -> list[UUID]:
    """The tenants among ``held`` (tenant ids, or tuples starting with one) that
    a shred announcement names: the one whose id's SHA-256 hex is ``announced``,
    or all of them for ``*`` or anything else (an unreadable announcement
    forgets more, never less)."""
    tenants = {key[0] if isinstance(key, tuple) else key for key in held}
    if not _SHA256_HEX.fullmatch(announced):
        return list(tenants)
    return [t for t in tenants if hashlib.sha256(str(t).encode()).hexdigest() == announced]


def keyed_digest(key: bytes, purpose: str, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under a key derived from data key ``key`` for ``purpose``.

    The derived key (HKDF-SHA256, info ``bastion/digest/<purpose>``) keeps the
    AES-GCM key and the MAC key apart (NIST SP 800-57 part 1, 5.2).
    """
    mac_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"bastion/digest/{purpose}".encode()
    ).derive(key)
    return hmac.new(mac_key, data, hashlib.sha256).digest()


class TenantKeys:
    """The data keys of every tenant, wrapped by ``kms``, unwrapped on demand and
    cached briefly."""

    def __init__(self, kms: KMS) -> None:
        self.kms = kms
        # A remote KMS says how long an unwrapped key may outlive an outage
        # (openbao_cache_seconds, awskms_cache_seconds): no cache here keeps it longer.
        self.cache_seconds = min(CACHE_SECONDS, float(getattr(kms, "cache_seconds", CACHE_SECONDS)))
        self._cache: dict[tuple[UUID, int], tuple[float, bytes]] = {}
        # (tenant, dim) -> (fingerprint of the key it was derived from, transform)
        self._transforms: OrderedDict[tuple[UUID, int], tuple[bytes, VectorTransform]] = (
            OrderedDict()
        )
        # Set by a shred listener: while it returns False (not listening), no
        # unwrapped key is kept, since a shred elsewhere would go unseen.
        self.caching_allowed: Callable[[], bool] | None = None

    def may_cache(self) -> bool:
        """Whether unwrapped keys may be kept in memory now (see :attr:`caching_allowed`)."""
        return self.caching_allowed is None or self.caching_allowed()

    def _keep(self, tenant_id: UUID, version: int, key: bytes) -> None:
        if self.may_cache() and self.cache_seconds > 0:
            self._cache[(tenant_id, version)] = (time.monotonic(), key)

    def forget_tenant(self, tenant_id: UUID) -> None:
        """Drop the tenant's unwrapped keys (and vector transforms) from memory."""
        for cached in [k for k in self._cache if k[0] == tenant_id]:
            del self._cache[cached]
        for transform in [k for k in self._transforms if k[0] == tenant_id]:
            del self._transforms[transform]

    def forget_announced(self, announced: str) -> None:
        """Drop the keys of the tenant a shred announcement names (the SHA-256
        hex of its id; ``*`` or anything unexpected: every tenant's)."""
        for tenant_id in announced_tenants(announced, [*self._cache, *self._transforms]):
            self.forget_tenant(tenant_id)

    def forget_all(self) -> None:
        """Drop every unwrapped key (a shred may have gone unseen)."""
        self._cache.clear()
        self._transforms.clear()

    def holds_key_of(self, tenant_id: UUID) -> bool:
        """Whether an unwrapped key (or a vector transform) of the tenant is in
        this process's memory."""
        return any(k[0] == tenant_id for k in (*self._cache, *self._transforms))

    @staticmethod
    def _context(tenant_id: UUID, version: int) -> KeyContext:
        return KeyContext(tenant_id, "data-key", version)

    async def current(self, tx: Conn, tenant_id: UUID) -> tuple[int, bytes]:
        """Return ``(version, key)`` of the tenant's newest data key, creating the first.

        ``tx`` must be a transaction of ``tenant_id`` whose role may write.
        """
        cur = await tx.execute(
            "SELECT version, wrapped FROM bastion.data_keys WHERE tenant_id = %s "
            "ORDER BY version DESC LIMIT 1",
            (tenant_id,),
        )
        row = await cur.fetchone()
        if row is not None:
            version = row["version"]
            return version, self._cached(tenant_id, version) or self._unwrap(
                tenant_id, version, row["wrapped"]
            )
        key, wrapped = self.kms.generate_data_key(self._context(tenant_id, 1))
        # Two first writers race on the primary key; the loser takes the winner's key.
        cur = await tx.execute(
            "INSERT INTO bastion.data_keys (tenant_id, version, wrapped) VALUES (%s, 1, %s) "
            "ON CONFLICT DO NOTHING RETURNING version",
            (tenant_id, wrapped),
        )
        if await cur.fetchone() is None:
            return await self.current(tx, tenant_id)
        self._keep(tenant_id, 1, key)
        return 1, key

    async def get(self, tx: Conn, tenant_id: UUID, version: int) -> bytes:
        """Return data key ``version`` of the tenant; raise :class:`KeyUnavailable`."""
        cached = self._cached(tenant_id, version)
        if cached is not None:
            return cached
        cur = await tx.execute(
            "SELECT wrapped FROM bastion.data_keys WHERE tenant_id = %s AND version = %s",
            (tenant_id, version),
        )
        row = await cur.fetchone()
        if row is None:
            raise KeyUnavailable(f"data key {version} of tenant {tenant_id} does not exist")
        return self._unwrap(tenant_id, version, row["wrapped"])

    async def vector_transform(self, tx: Conn, tenant_id: UUID, dim: int) -> VectorTransform:
        """The tenant's keyed rotation of ``dim``-wide vectors; raise :class:`KeyUnavailable`.

        Derived from data key 1, which a rotation of the data key keeps: every
        vector of the tenant stays in one frame. The key is fetched (cached,
        or unwrapped) on every call, so a shredded key stops the transform as
        soon as it stops the key; the derivation itself runs once per process
        and tenant, off the event loop.
        """
        key = await self.get(tx, tenant_id, 1)
        fingerprint = hashlib.sha256(b"bastion/vector-transform/check|" + key).digest()
        entry = self._transforms.get((tenant_id, dim))
        if entry is not None and hmac.compare_digest(entry[0], fingerprint):
            self._transforms.move_to_end((tenant_id, dim))
            return entry[1]
        transform = await asyncio.to_thread(VectorTransform, key, dim)
        if not self.may_cache():
            return transform
        self._transforms[(tenant_id, dim)] = (fingerprint, transform)
        while len(self._transforms) > TRANSFORM_CACHE_SIZE:
            self._transforms.popitem(last=False)
        return transform

    def _cached(self, tenant_id: UUID, version: int) -> bytes | None:
        entry = self._cache.get((tenant_id, version))
        if entry is None or time.monotonic() - entry[0] >= self.cache_seconds:
            return None
        return entry[1]

    def _unwrap(self, tenant_id: UUID, version: int, wrapped: bytes) -> bytes:
        try:
            key = self.kms.unwrap(wrapped, self._context(tenant_id, version))
        except KMSError:
            raise KeyUnavailable(f"data key {version} of tenant {tenant_id} is unusable") from None
        self._keep(tenant_id, version, key)
        return key

    async def rewrap(self, tx: Conn, tenant_id: UUID) -> int:
        """Re-wrap every data key of the tenant under its current KEK (after a KEK
        rotation); return how many rows changed. The data keys themselves, and
        so every ciphertext under them, stay as they are: nothing is re-encrypted.

        Compare-and-set per row, in ``tx`` (a transaction of ``tenant_id``).
        Raises :class:`KeyUnavailable` if a key does not unwrap.
        """
        cur = await tx.execute(
            "SELECT version, wrapped FROM bastion.data_keys WHERE tenant_id = %s FOR UPDATE",
            (tenant_id,),
        )
        changed = 0
        for row in await cur.fetchall():
            context = self._context(tenant_id, row["version"])
            try:
                if isinstance(self.kms, RotatesKEKs):  # the plaintext stays in the backend
                    rewrapped = self.kms.rewrap(row["wrapped"], context)
                else:
                    rewrapped = self.kms.wrap(self.kms.unwrap(row["wrapped"], context), context)
            except KMSError:
                raise KeyUnavailable(
                    f"data key {row['version']} of tenant {tenant_id} is unusable"
                ) from None
            await tx.execute(
                "UPDATE bastion.data_keys SET wrapped = %s "
                "WHERE tenant_id = %s AND version = %s AND wrapped = %s",
                (rewrapped, tenant_id, row["version"], row["wrapped"]),
            )
            changed += 1
        return changed

    async def shred(self, tx: Conn, tenant_id: UUID) -> None:
        """Destroy the tenant's KEK and wrapped data keys: its ciphertext is gone for good.

        The KEK's destruction comes last, after the rows are deleted in ``tx``;
        if the transaction then fails, the keys are already unrecoverable,
        which is the direction to fail in for a deletion request.
        """
        await tx.execute("DELETE FROM bastion.data_keys WHERE tenant_id = %s", (tenant_id,))
        self.forget_tenant(tenant_id)
        self.kms.destroy_tenant(tenant_id)
