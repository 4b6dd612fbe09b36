"""Per-tenant data keys and the encryption of document bodies and chunk text.

Envelope encryption (NIST SP 800-57 part 1, section 6.1.2 "key wrapping"):
each tenant has a 256-bit *data key*, stored in ``bastion.data_keys`` only
wrapped by the tenant's own key-encryption key. The KEK lives in the key ring
(``kms/tenants/<tenant id>``), outside the database, so a database dump or
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
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import time
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.db.pool import Conn
from bastion.secrets.errors import KMSError, SecretNotFound
from bastion.secrets.kms import LocalKMS
from bastion.secrets.store import LocalKeystore

_NONCE = 12
# Unwrapped keys are kept this long in memory: long enough to spare the key
# ring on every chunk, short enough that a shred in another process bites soon.
CACHE_SECONDS = 60.0


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
    """The data keys of every tenant, unwrapped on demand and cached briefly."""

    def __init__(self, keystore: LocalKeystore) -> None:
        self.keystore = keystore
        self._cache: dict[tuple[UUID, int], tuple[float, bytes]] = {}

    def _kms(self, tenant_id: UUID) -> LocalKMS:
        return LocalKMS(self.keystore, kek_name=f"kms/tenants/{tenant_id}")

    @staticmethod
    def _context(tenant_id: UUID, version: int) -> bytes:
        return f"tenant={tenant_id};purpose=data-key;version={version}".encode()

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
        key, wrapped = self._kms(tenant_id).generate_data_key(self._context(tenant_id, 1))
        # Two first writers race on the primary key; the loser takes the winner's key.
        cur = await tx.execute(
            "INSERT INTO bastion.data_keys (tenant_id, version, wrapped) VALUES (%s, 1, %s) "
            "ON CONFLICT DO NOTHING RETURNING version",
            (tenant_id, wrapped),
        )
        if await cur.fetchone() is None:
            return await self.current(tx, tenant_id)
        self._cache[(tenant_id, 1)] = (time.monotonic(), key)
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

    def _cached(self, tenant_id: UUID, version: int) -> bytes | None:
        entry = self._cache.get((tenant_id, version))
        if entry is None or time.monotonic() - entry[0] >= CACHE_SECONDS:
            return None
        return entry[1]

    def _unwrap(self, tenant_id: UUID, version: int, wrapped: bytes) -> bytes:
        try:
            key = self._kms(tenant_id).unwrap(wrapped, self._context(tenant_id, version))
        except KMSError:
            raise KeyUnavailable(f"data key {version} of tenant {tenant_id} is unusable") from None
        self._cache[(tenant_id, version)] = (time.monotonic(), key)
        return key

    async def shred(self, tx: Conn, tenant_id: UUID) -> None:
        """Destroy the tenant's KEK and wrapped data keys: its ciphertext is gone for good.

        The key ring deletion comes last, after the rows are deleted in ``tx``;
        if the transaction then fails, the keys are already unrecoverable,
        which is the direction to fail in for a deletion request.
        """
        await tx.execute("DELETE FROM bastion.data_keys WHERE tenant_id = %s", (tenant_id,))
        for cached in [k for k in self._cache if k[0] == tenant_id]:
            del self._cache[cached]
        with contextlib.suppress(SecretNotFound):
            self.keystore.delete(f"kms/tenants/{tenant_id}")
