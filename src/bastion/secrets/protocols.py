"""What Bastion needs from a secret store: the :class:`Keystore` and :class:`KMS` protocols.

Every module outside :mod:`bastion.secrets` is typed against these two, never
against a backend, so a backend plugs in at one place
(:func:`bastion.secrets.backends.open_key_ring`). The local backend is
:class:`~bastion.secrets.store.LocalKeystore` and
:class:`~bastion.secrets.kms.LocalKMS`; OpenBao/Vault (KV v2 and the transit
engine) and AWS KMS implement the same protocols.

A :class:`KeyContext` is the *encryption context* of a wrapped data key (the
term of AWS KMS and of OpenBao's transit engine): whose key it is and what it
is for. The backend picks the tenant's key-encryption key from it and binds
the wrapped blob to all of it as associated data (NIST SP 800-38D), so a blob
presented under another tenant, purpose or version does not unwrap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from uuid import UUID


@dataclass(frozen=True)
class SecretVersionInfo:
    """Metadata of one version of a secret; never its value, nor a plain hash of it."""

    version: int
    created_at: str
    state: str
    fingerprint: str  # 64 bits of a keyed HMAC of the value, never a plain hash


class Keystore(Protocol):
    """Named, versioned secrets (signing keys, webhook secrets, API keys, KEKs).

    Every method may raise :class:`~bastion.secrets.errors.SecretsError`
    subclasses; a backend fails closed (never falls back to an empty store).
    """

    def get(self, name: str, version: int | None = None) -> bytes:
        """The value of ``name`` (its current version unless ``version``);
        raise :class:`~bastion.secrets.errors.SecretNotFound`."""
        ...

    def current(self, name: str) -> tuple[int, bytes]:
        """``(version, value)`` of the current version, read together."""
        ...

    def current_version(self, name: str) -> int:
        """The current (newest active) version number of ``name``."""
        ...

    def versions(self, name: str) -> list[SecretVersionInfo]:
        """Metadata (never values) of every version of ``name``, oldest first."""
        ...

    def list(self) -> list[str]:
        """The names of all secrets, sorted."""
        ...

    def set(self, name: str, value: bytes) -> int:
        """Add ``value`` as the new current version of ``name``; return its version."""
        ...

    def rotate(self, name: str, value: bytes | None = None) -> int:
        """Add a new version (random 32 bytes unless ``value``); return it."""
        ...

    def retire(self, name: str, version: int) -> None:
        """Mark ``version`` retired: still readable by number, never current."""
        ...

    def ensure(self, name: str, generate: Callable[[], bytes]) -> bytes:
        """The current value of ``name``, created with ``generate()`` if there is
        none; concurrent callers agree on one value."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name`` and all its versions; raise ``SecretNotFound`` if absent."""
        ...


@dataclass(frozen=True)
class KeyContext:
    """The encryption context of one wrapped data key: tenant, purpose, version."""

    tenant_id: UUID
    purpose: str  # e.g. "data-key", "pii-token-key"
    version: int = 1

    def encode(self) -> bytes:
        """The context as associated data; the spelling every stored blob was bound to."""
        return f"tenant={self.tenant_id};purpose={self.purpose};version={self.version}".encode()


class KMS(Protocol):
    """Envelope encryption of data keys under per-tenant key-encryption keys (KEKs).

    The KEK never leaves the KMS; wrapped data keys are stored next to the
    data. Destroying a tenant's KEK makes every data key wrapped under it, and
    so every copy of the tenant's ciphertext, unreadable (crypto-shredding).
    """

    def wrap(self, data_key: bytes, context: KeyContext) -> bytes:
        """``data_key`` encrypted under the tenant's current KEK, bound to ``context``."""
        ...

    def unwrap(self, blob: bytes, context: KeyContext) -> bytes:
        """The data key in ``blob``; raise :class:`~bastion.secrets.errors.KMSError`
        if it does not verify (altered, another context, or the KEK is gone)."""
        ...

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, bytes]:
        """``(data_key, blob)``: a fresh random 32-byte key and its wrapped form."""
        ...

    def destroy_tenant(self, tenant_id: UUID) -> None:
        """Destroy the tenant's KEK for good (crypto-shred); no-op if it has none."""
        ...


@runtime_checkable
class RotatesKEKs(Protocol):
    """A KMS whose tenant KEKs are rotated inside the backend (OpenBao transit,
    AWS KMS): a new key version wraps from then on, older versions keep
    unwrapping (a backup's blobs), and a data key is re-wrapped without its
    plaintext leaving the backend."""

    def tenant_keks(self) -> list[UUID]:
        """The tenants that have a KEK in this backend."""
        ...

    def kek_versions(self, tenant_id: UUID) -> list[SecretVersionInfo]:
        """The versions of the tenant's KEK, oldest first (no fingerprint: the
        key material never leaves the backend)."""
        ...

    def rotate_kek(self, tenant_id: UUID) -> int:
        """Add a new version of the tenant's KEK and return its number."""
        ...

    def rewrap(self, blob: bytes, context: KeyContext) -> bytes:
        """``blob`` re-wrapped under the KEK's newest version, bound to the same
        ``context``; raise :class:`~bastion.secrets.errors.KMSError` as unwrap does."""
        ...


@runtime_checkable
class ReadsReferences(Protocol):
    """A keystore that also reads its backend's own references
    (``bao://kv/<path>#<field>``, ``awskms://alias/<name>#<ciphertext>``)."""

    def read_reference(self, scheme: str, name: str, fragment: str | None) -> bytes:
        """The value; raise :class:`~bastion.secrets.errors.InvalidSecretRef` or
        :class:`~bastion.secrets.errors.SecretNotFound` naming the reference only."""
        ...


class MasterKeySealer(Protocol):
    """Wraps the local keystore's master key under a key held by a KMS, so the
    master key file holds only a ciphertext (``master_key_ref``)."""

    def seal(self, master_key: bytes) -> bytes:
        """The master key encrypted under the KMS key."""
        ...

    def unseal(self, sealed: bytes) -> bytes:
        """The master key; raise :class:`~bastion.secrets.errors.KMSError` if it does not open."""
        ...
