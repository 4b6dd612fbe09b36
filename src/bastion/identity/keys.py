"""The JWT signing key ring: ES256 (P-256) keys kept in the keystore.

Every version of the secret ``jwt/signing`` holds one private key as PKCS#8
PEM. A key's ``kid`` is its RFC 7638 JWK thumbprint: stable across processes
and restarts, derived from the public key alone, and never a file name or a
version number that a crafted ``kid`` header could point somewhere else.

Rotation follows the usual publish-then-sign schedule:

1. :meth:`SigningKeys.rotate` adds a new version. It is in :meth:`jwks` at once
   but is not used to sign until it has been published for ``publish_ahead``,
   so relying parties that cache the JWKS learn it before they see tokens.
2. The previous key keeps verifying the tokens it signed.
3. :meth:`SigningKeys.retire_expired` retires it once its last token has
   expired (``publish_ahead + token_lifetime`` after it was superseded).

Parsed keys are cached in memory per version so that verification never parses
PEM on the request path; the version list is re-read at most once per second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from joserfc.jwk import ECKey, KeyParameters

from bastion.secrets.errors import SecretNotFound
from bastion.secrets.store import LocalKeystore

SECRET_NAME = "jwt/signing"  # noqa: S105 - a secret's name, not a secret
ALGORITHM = "ES256"
CURVE = "P-256"

# The keystore records ``created_at`` with one-second precision (rounded down),
# so a version may really be up to a second younger than it says: count it as
# published one second later to never sign with a key earlier than promised.
_CREATED_AT_PRECISION = 1.0
# Extra time before retiring a superseded key: covers the verifiers' clock
# leeway (30 s by default) and skew between the issuing hosts.
_RETIRE_MARGIN = timedelta(seconds=60)
_REFRESH_INTERVAL = 1.0
_MAX_KID_LENGTH = 128


@dataclass(frozen=True)
class _Version:
    """One parsed version of the key ring."""

    version: int
    kid: str
    private: ECKey
    public: ECKey
    published_at: float  # epoch seconds, conservative (see _CREATED_AT_PRECISION)
    active: bool


def generate_signing_pem() -> bytes:
    """Return a fresh P-256 private key as PKCS#8 PEM bytes."""
    return ECKey.generate_key(CURVE).as_pem(private=True)


class SigningKeys:
    """ES256 signing keys with publish-ahead rotation, backed by the keystore.

    ``clock`` returns the wall-clock time in epoch seconds; tests inject one to
    step through a rotation without sleeping.
    """

    def __init__(
        self,
        keystore: LocalKeystore,
        *,
        publish_ahead: timedelta = timedelta(minutes=5),
        token_lifetime: timedelta = timedelta(minutes=15),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if publish_ahead < timedelta(0) or token_lifetime <= timedelta(0):
            raise ValueError("publish_ahead must be >= 0 and token_lifetime > 0")
        self._keystore = keystore
        self._publish_ahead = publish_ahead.total_seconds()
        self._token_lifetime = token_lifetime.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()
        # Replaced as a whole under the lock; readers use the reference they got.
        self._versions: dict[int, _Version] = {}
        self._active_by_kid: dict[str, _Version] = {}
        self._next_refresh = 0.0  # time.monotonic() deadline

    # -- reading -----------------------------------------------------------------

    def current(self) -> tuple[str, ECKey]:
        """Return ``(kid, private key)`` of the key to sign new tokens with.

        That is the newest active version published for at least
        ``publish_ahead``; if none is that old yet (a brand-new ring), the
        oldest active one, which has been in the JWKS longest. The first key is
        created on first use. Raises :class:`RuntimeError` if the ring holds no
        usable P-256 key, and the keystore's errors if it cannot be read.
        """
        self._maybe_refresh()
        if not self._active_by_kid:
            self._keystore.ensure(SECRET_NAME, generate_signing_pem)
            self.refresh()
        chosen = self._signing_version(self._clock())
        return chosen.kid, chosen.private

    def jwks(self) -> dict[str, list[dict[str, object]]]:
        """Return the public JWK Set (RFC 7517 section 5) of every active version.

        Each key carries ``kid``, ``alg`` ES256 and ``use`` sig; private members
        are never included.
        """
        self._maybe_refresh()
        keys: list[dict[str, object]] = []
        for entry in sorted(self._active_by_kid.values(), key=lambda v: v.version):
            jwk: dict[str, object] = dict(entry.public.as_dict(private=False))
            jwk.pop("d", None)  # belt and braces: the public key has no "d" anyway
            keys.append(jwk)
        return {"keys": keys}

    def public_key(self, kid: object) -> ECKey | None:
        """Return the public key of the active version ``kid``, or None.

        ``kid`` is untrusted header input: it is only ever a dictionary key, so a
        path or SQL string is simply unknown.
        """
        if not isinstance(kid, str) or len(kid) > _MAX_KID_LENGTH:
            return None
        self._maybe_refresh()
        entry = self._active_by_kid.get(kid)
        return None if entry is None else entry.public

    # -- writing -----------------------------------------------------------------

    def rotate(self) -> str:
        """Add a new key version and return its kid.

        On an empty ring this creates the first key (which signs at once);
        otherwise the new key is published now and signs after ``publish_ahead``.
        """
        if not self._has_active():
            self._keystore.ensure(SECRET_NAME, generate_signing_pem)
            self.refresh()
            return self._signing_version(self._clock()).kid
        version = self._keystore.rotate(SECRET_NAME, generate_signing_pem())
        self.refresh()
        entry = self._versions.get(version)
        if entry is None:  # pragma: no cover - the keystore just returned it
            raise RuntimeError(f"{SECRET_NAME} version {version} is unreadable")
        return entry.kid

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

    def refresh(self) -> None:
        """Re-read the version list now and parse versions not cached yet.

        Raises the keystore's errors (it fails closed) if it cannot be read.
        """
        with self._lock:
            try:
                infos = self._keystore.versions(SECRET_NAME)
            except SecretNotFound:
                infos = []
            versions: dict[int, _Version] = {}
            for info in infos:
                cached = self._versions.get(info.version)
                active = info.state == "active"
                if cached is None:
                    cached = self._parse(info.version, info.created_at, active)
                    if cached is None:
                        continue
                elif cached.active != active:
                    cached = _Version(
                        cached.version,
                        cached.kid,
                        cached.private,
                        cached.public,
                        cached.published_at,
                        active,
                    )
                versions[info.version] = cached
            self._versions = versions
            self._active_by_kid = {v.kid: v for v in versions.values() if v.active}
            self._next_refresh = time.monotonic() + _REFRESH_INTERVAL

    # -- internals ----------------------------------------------------------------

    def _maybe_refresh(self) -> None:
        # The keystore decrypts its whole file per read: throttle to once a
        # second so that the verification hot path stays a dictionary lookup.
        if time.monotonic() >= self._next_refresh:
            self.refresh()

    def _has_active(self) -> bool:
        self.refresh()
        return bool(self._active_by_kid)

    def _signing_version(self, now: float) -> _Version:
        active = sorted(self._active_by_kid.values(), key=lambda v: v.version)
        if not active:
            raise RuntimeError(f"{SECRET_NAME} holds no usable ES256 (P-256) signing key")
        ready = [v for v in active if v.published_at + self._publish_ahead <= now]
        return ready[-1] if ready else active[0]

    def _parse(self, version: int, created_at: str, active: bool) -> _Version | None:
        """Parse one version's PEM; None if it is not a P-256 private key.

        A foreign value in ``jwt/signing`` must never sign or verify anything,
        so it is left out rather than trusted.
        """
        pem = self._keystore.get(SECRET_NAME, version)
        try:
            private = ECKey.import_key(pem)
        except (ValueError, TypeError):
            return None
        if not private.is_private or private.curve_name != CURVE:
            return None
        raw = private.private_key
        if raw is None:  # pragma: no cover - is_private was checked above
            return None
        kid = private.thumbprint()
        params: KeyParameters = {"kid": kid, "alg": ALGORITHM, "use": "sig"}
        # Built from the raw public key: the JWK can hold no private member.
        public = ECKey.import_key(raw.public_key(), params)
        private = ECKey.import_key(raw, params)
        try:
            published = datetime.fromisoformat(created_at).timestamp() + _CREATED_AT_PRECISION
        except ValueError:
            published = self._clock()  # unknown age: count it as published just now
        return _Version(version, kid, private, public, published, active)
