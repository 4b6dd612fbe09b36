"""Key management: wrapping data keys under a key-encryption key (envelope encryption).

Envelope encryption: data is encrypted under a per-object *data key*, and only
the data key is encrypted ("wrapped") under a *key-encryption key* (KEK) held
by the KMS. The KEK never leaves the KMS, wrapped data keys can be stored next
to the data, and rotating the KEK touches no data: old blobs name the KEK
version that wrapped them, so they keep unwrapping during the overlap window.

The local implementation keeps versioned KEKs in the keystore and wraps with
AES-256-GCM (NIST SP 800-38D, "Recommendation for Block Cipher Modes of
Operation: Galois/Counter Mode (GCM) and GMAC"), with a fresh random 96-bit
nonce per wrap (SP 800-38D section 8.2.2).

Blob: 1-byte format version || 4-byte big-endian KEK version || 12-byte nonce
|| ciphertext+tag. The associated data is the caller's context, prefixed by
the 5-byte header so the format and KEK version are authenticated as well: a
blob presented under another context, or with any byte altered, is refused.

:class:`LocalKMS` is the :class:`~bastion.secrets.protocols.KMS` of the local
backend: each tenant's KEK is the keystore secret ``kms/tenants/<tenant id>``
(a :class:`LocalKEK`), and the associated data is the encoded
:class:`~bastion.secrets.protocols.KeyContext`. OpenBao/Vault and AWS KMS
backends implement the same protocol.
"""

from __future__ import annotations

import contextlib
import secrets
import struct
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.secrets.errors import KMSError, SecretNotFound
from bastion.secrets.protocols import KeyContext, Keystore

_FORMAT = 1
_HEADER = struct.Struct(">BI")  # format version, KEK version


class LocalKEK:
    """One versioned KEK in the keystore (the secret ``kek_name``), wrapping data
    keys bound to a caller-given context."""

    def __init__(self, keystore: Keystore, kek_name: str = "kms/kek") -> None:
        self.keystore = keystore
        self.kek_name = kek_name

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Return ``data_key`` wrapped under the current KEK (created on first use).

        ``context`` (e.g. ``b"tenant=42;purpose=chunks"``) must be given again
        to unwrap. Keystore errors (:class:`KeystoreLocked`, ...) propagate.
        """
        self.keystore.ensure(self.kek_name, lambda: secrets.token_bytes(32))
        # Version and key read together: a rotation in between must not label
        # a blob with a version whose key did not wrap it.
        version, kek = self.keystore.current(self.kek_name)
        nonce = secrets.token_bytes(12)
        header = _HEADER.pack(_FORMAT, version)
        return header + nonce + AESGCM(kek).encrypt(nonce, data_key, header + context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        """Return the data key in ``blob``, using the KEK version the blob names.

        Raises :class:`KMSError` if the blob is truncated, of an unknown format,
        names an unknown KEK version, was altered, or ``context`` differs.
        """
        if len(blob) < _HEADER.size + 12 + 16:
            raise KMSError("wrapped key is truncated")
        fmt, version = _HEADER.unpack_from(blob)
        if fmt != _FORMAT:
            raise KMSError(f"unknown wrapped-key format {fmt}")
        header, nonce = blob[: _HEADER.size], blob[_HEADER.size : _HEADER.size + 12]
        try:
            kek = self.keystore.get(self.kek_name, version)
            return AESGCM(kek).decrypt(nonce, blob[_HEADER.size + 12 :], header + context)
        except (InvalidTag, SecretNotFound):
            raise KMSError("wrapped key does not verify (altered, or another context)") from None

    def generate_data_key(self, context: bytes) -> tuple[bytes, bytes]:
        """Return ``(data_key, blob)``: a fresh random 32-byte key and its wrapped form.

        Keep the blob, use the key, then forget it; :meth:`unwrap` recovers it.
        """
        data_key = secrets.token_bytes(32)
        return data_key, self.wrap(data_key, context)


class LocalKMS:
    """The :class:`~bastion.secrets.protocols.KMS` on the local keystore: one
    :class:`LocalKEK` per tenant, the secret ``kms/tenants/<tenant id>``."""

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore

    @staticmethod
    def kek_name(tenant_id: UUID) -> str:
        """The keystore secret holding the tenant's KEK."""
        return f"kms/tenants/{tenant_id}"

    def _kek(self, tenant_id: UUID) -> LocalKEK:
        return LocalKEK(self.keystore, kek_name=self.kek_name(tenant_id))

    def wrap(self, data_key: bytes, context: KeyContext) -> bytes:
        """``data_key`` wrapped under the tenant's current KEK (created on first use)."""
        return self._kek(context.tenant_id).wrap(data_key, context.encode())

    def unwrap(self, blob: bytes, context: KeyContext) -> bytes:
        """The data key in ``blob``; raise :class:`KMSError` if it does not verify
        (altered, another context, or the tenant's KEK was destroyed)."""
        return self._kek(context.tenant_id).unwrap(blob, context.encode())

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, bytes]:
        """``(data_key, blob)``: a fresh random 32-byte key and its wrapped form."""
        return self._kek(context.tenant_id).generate_data_key(context.encode())

    def destroy_tenant(self, tenant_id: UUID) -> None:
        """Delete the tenant's KEK, every version of it; no-op if it has none."""
        with contextlib.suppress(SecretNotFound):
            self.keystore.delete(self.kek_name(tenant_id))
