"""Security errors of the identity domain. Messages never carry secrets."""

from __future__ import annotations


class IdentityError(Exception):
    """Base class of identity errors."""


class WeakPassword(IdentityError):
    """The password is common, guessable (zxcvbn score < 3) or too short/long."""


class PasswordReused(IdentityError):
    """The password is one of the user's last N passwords."""


class PasswordChanged(IdentityError):
    """The password changed between a check of the new one and its writing."""


class Throttled(IdentityError):
    """Too many failed attempts for this account or client address."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed attempts; try again later")
        self.retry_after = retry_after


class MfaError(IdentityError):
    """A TOTP or recovery code was wrong, reused, or the factor is missing."""


class LastFactorRequired(IdentityError):
    """A holder of an admin-grade role cannot remove their last MFA factor."""


class InvalidToken(IdentityError):
    """An access token failed verification; ``reason`` says which check."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidDpopProof(IdentityError):
    """A DPoP proof failed verification (RFC 9449 section 4.3).

    ``error`` is the RFC's error code: ``invalid_dpop_proof`` or
    ``use_dpop_nonce`` (the client must retry with ``nonce``).
    """

    def __init__(
        self, reason: str, *, error: str = "invalid_dpop_proof", nonce: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.nonce = nonce
