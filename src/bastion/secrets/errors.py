"""Errors of the key ring. None of them ever carries key material."""

from __future__ import annotations

from bastion.errors import BastionError, Kind

# How long a caller is told to wait when the secret store is down.
BACKEND_RETRY_AFTER_SECONDS = 5


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


class SecretsBackendUnavailable(SecretsError, BastionError):
    """The secret store (OpenBao/Vault) cannot be reached: fail closed, retry later.

    Raised at start-up (nothing falls back to a local or plaintext key) and
    while running once no cached data key covers the call; the HTTP edge
    answers 503 with ``Retry-After``.
    """

    slug = "secrets-backend-unavailable"
    title = "The secret store is unavailable"
    kind = Kind.UNAVAILABLE

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after=BACKEND_RETRY_AFTER_SECONDS)


class SecretsBackendRefused(SecretsError, BastionError):
    """The secret store refused Bastion: wrong credentials, a revoked token, a
    missing mount or a policy that does not grant the path. Not retried blindly."""

    slug = "secrets-backend-refused"
    title = "The secret store refused the request"
    kind = Kind.UNAVAILABLE
