"""The JWT signing key ring: ES256 (P-256) keys in the keystore secret ``jwt/signing``.

A :class:`~bastion.secrets.keyring.JwkRing` (kids are RFC 7638 thumbprints;
a new key is published ``publish_ahead`` before it signs; parsed keys are
cached). Tokens live minutes, so a superseded key is retired on a schedule:
:meth:`SigningKeys.retire_expired` retires it once its last token has expired
(``publish_ahead + token_lifetime`` after it was superseded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from joserfc.jwk import ECKey

from bastion.secrets.keyring import JwkRing
from bastion.secrets.protocols import Keystore

SECRET_NAME = "jwt/signing"  # noqa: S105 - a secret's name, not a secret
ALGORITHM = "ES256"
CURVE = "P-256"

# Extra time before retiring a superseded key: covers the verifiers' clock
# leeway (30 s by default) and skew between the issuing hosts.
_RETIRE_MARGIN = timedelta(seconds=60)


class SigningKeys(JwkRing[ECKey]):
    """ES256 signing keys with publish-ahead rotation, backed by the keystore."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        publish_ahead: timedelta = timedelta(minutes=5),
        token_lifetime: timedelta = timedelta(minutes=15),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if token_lifetime <= timedelta(0):
            raise ValueError("publish_ahead must be >= 0 and token_lifetime > 0")
        super().__init__(
            keystore,
            secret_name=SECRET_NAME,
            key_type=ECKey,
            curve=CURVE,
            algorithm=ALGORITHM,
            publish_ahead=publish_ahead,
            clock=clock,
        )
        self._token_lifetime = token_lifetime.total_seconds()

    def retire_expired(self) -> list[str]:
        """Retire versions whose last token has expired; return their kids.

        A version is superseded when a newer one starts signing (its
        ``published_at + publish_ahead``); the last token it signed expires
        ``token_lifetime`` later, plus a margin for verifier leeway. The key
        currently signing is never retired.
        """
        self.refresh()
        now = self._clock()
        active = sorted((v for v in self._versions.values() if v.active), key=lambda v: v.version)
        if not active:
            return []
        signing = self._signing_version(now)
        grace = self._token_lifetime + _RETIRE_MARGIN.total_seconds()
        retired: list[str] = []
        for entry in active:
            if entry.version >= signing.version:
                continue
            newer = [
                v.published_at + self._publish_ahead for v in active if v.version > entry.version
            ]
            superseded_at = min(newer)
            if superseded_at <= now and now >= superseded_at + grace:
                self._keystore.retire(SECRET_NAME, entry.version)
                retired.append(entry.kid)
        if retired:
            self.refresh()
        return retired
