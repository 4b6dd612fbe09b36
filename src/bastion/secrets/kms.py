"""Key management: wrapping data keys under a key-encryption key (envelope encryption).

A data key encrypts data (chunks, webhook payloads); the KMS only ever wraps
and unwraps data keys, so the key-encryption key (KEK) never leaves it. The
local implementation keeps versioned KEKs in the keystore and wraps with
AES-256-GCM (NIST SP 800-38D), the caller's context bound as associated data.
OpenBao/Vault and AWS KMS backends implement the same :class:`KMS` protocol.
"""

from __future__ import annotations

import secrets
import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.secrets.errors import KMSError, SecretNotFound
from bastion.secrets.store import LocalKeystore

_FORMAT = 1
_HEADER = struct.Struct(">BI")  # format version, KEK version


class KMS(Protocol):
    """What Bastion needs from a key management service."""

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Return ``data_key`` encrypted under the current KEK, bound to ``context``."""
        ...

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        """Return the data key in ``blob``; raise :class:`KMSError` if it does not verify."""
        ...


class LocalKMS:
    """:class:`KMS` on the local keystore; the KEK is the secret ``kek_name``."""

    def __init__(self, keystore: LocalKeystore, kek_name: str = "kms/kek") -> None:
        self.keystore = keystore
        self.kek_name = kek_name

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        self.keystore.ensure(self.kek_name, lambda: secrets.token_bytes(32))
        # Version and key read together: a rotation in between must not label
        # a blob with a version whose key did not wrap it.
        version, kek = self.keystore.current(self.kek_name)
        nonce = secrets.token_bytes(12)
        header = _HEADER.pack(_FORMAT, version)
        return header + nonce + AESGCM(kek).encrypt(nonce, data_key, header + context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
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
        """Return a fresh 32-byte data key and its wrapped form."""
        data_key = secrets.token_bytes(32)
        return data_key, self.wrap(data_key, context)
