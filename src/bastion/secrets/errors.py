"""Errors of the key ring. None of them ever carries key material."""

from __future__ import annotations


class SecretsError(Exception):
    """Base class of key-ring errors."""


class KeystoreLocked(SecretsError):
    """The keystore cannot be opened: wrong master key or altered file (fails closed)."""


class MasterKeyMissing(SecretsError):
    """The keystore exists but its master key file does not."""


class InsecurePermissions(SecretsError):
    """A key file is readable or writable by group or others."""


class SecretNotFound(SecretsError):
    """No secret (or no such version) under that name."""


class InvalidSecretRef(SecretsError):
    """A secret reference or name is malformed, or its backend is not configured."""


class KMSError(SecretsError):
    """A wrapped key could not be unwrapped (altered, or another context)."""
