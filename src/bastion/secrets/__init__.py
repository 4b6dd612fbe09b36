"""The key ring: the :class:`Keystore` and :class:`KMS` protocols, the local
backend implementing them, and :func:`open_key_ring`, which builds the
configured backend. Per-tenant data keys: :mod:`bastion.secrets.tenant_keys`."""

from bastion.secrets.backends import KeyRing, open_key_ring
from bastion.secrets.errors import (
    InsecurePermissions,
    InvalidSecretRef,
    KeystoreLocked,
    KMSError,
    MasterKeyMissing,
    SecretNotFound,
    SecretsError,
)
from bastion.secrets.kms import LocalKEK, LocalKMS
from bastion.secrets.protocols import KMS, KeyContext, Keystore, SecretVersionInfo
from bastion.secrets.store import LocalKeystore, SecretRef, resolve_ref

__all__ = [
    "KMS",
    "InsecurePermissions",
    "InvalidSecretRef",
    "KMSError",
    "KeyContext",
    "KeyRing",
    "Keystore",
    "KeystoreLocked",
    "LocalKEK",
    "LocalKMS",
    "LocalKeystore",
    "MasterKeyMissing",
    "SecretNotFound",
    "SecretRef",
    "SecretVersionInfo",
    "SecretsError",
    "open_key_ring",
    "resolve_ref",
]
