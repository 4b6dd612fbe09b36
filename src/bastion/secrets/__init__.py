"""The key ring: a local encrypted keystore and a KMS interface on top of it."""

from bastion.secrets.errors import (
    InsecurePermissions,
    InvalidSecretRef,
    KeystoreLocked,
    KMSError,
    MasterKeyMissing,
    SecretNotFound,
    SecretsError,
)
from bastion.secrets.kms import KMS, LocalKMS
from bastion.secrets.store import LocalKeystore, SecretRef, SecretVersionInfo, resolve_ref

__all__ = [
    "KMS",
    "InsecurePermissions",
    "InvalidSecretRef",
    "KMSError",
    "KeystoreLocked",
    "LocalKMS",
    "LocalKeystore",
    "MasterKeyMissing",
    "SecretNotFound",
    "SecretRef",
    "SecretVersionInfo",
    "SecretsError",
    "resolve_ref",
]
