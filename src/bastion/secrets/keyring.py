"""Versioned signing keys in the keystore, published before they sign (RFC 7517, 7638).

Every version of one keystore secret holds one private key as PKCS#8 PEM. A
key's ``kid`` is its RFC 7638 JWK thumbprint: stable across processes and
restarts, derived from the public key alone, and never a file name or a
version number that a crafted ``kid`` header could point somewhere else.

:meth:`JwkRing.rotate` adds a version. It is in :meth:`JwkRing.jwks` at once
but signs only once it has been published for ``publish_ahead``, so relying
parties that cache the key set learn it before they see anything it signed;
older versions keep verifying until they are retired. Parsed keys are cached
per version, so verifying never parses PEM; the version list is re-read at
most once per second. The JWT keys (:mod:`bastion.identity.keys`) and the
receipt keys (:mod:`bastion.billing.receipts`) are two such rings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from joserfc.jwk import ECKey, KeyParameters, OKPKey

from bastion.secrets.errors import SecretNotFound
from bastion.secrets.protocols import Keystore

K = TypeVar("K", ECKey, OKPKey)

# The keystore records ``created_at`` with one-second precision (rounded down),
# so a version may really be up to a second younger than it says: count it as
# published one second later to never sign with a key earlier than promised.
_CREATED_AT_PRECISION = 1.0
_REFRESH_INTERVAL = 1.0
MAX_KID_LENGTH = 128


@dataclass(frozen=True)
class KeyVersion(Generic[K]):
    """One parsed version of the ring."""

    version: int
    kid: str
    private: K
    public: K
    published_at: float  # epoch seconds, conservative (see _CREATED_AT_PRECISION)
    active: bool


class JwkRing(Generic[K]):
    """The keys of keystore secret ``secret_name``: ``key_type`` keys on ``curve``,
    signing with ``algorithm``. ``clock`` returns epoch seconds (tests step it)."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        secret_name: str,
        key_type: type[K],
        curve: str,
        algorithm: str,
        publish_ahead: timedelta = timedelta(minutes=5),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if publish_ahead < timedelta(0):
            raise ValueError("publish_ahead must be >= 0")
        self.secret_name = secret_name
        self._key_type: type[K] = key_type
        self._curve = curve
        self._algorithm = algorithm
        self._keystore = keystore
        self._publish_ahead = publish_ahead.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()
        # Replaced as a whole under the lock; readers use the reference they got.
        self._versions: dict[int, KeyVersion[K]] = {}
        self._active_by_kid: dict[str, KeyVersion[K]] = {}
        self._next_refresh = 0.0  # time.monotonic() deadline

    def generate_pem(self) -> bytes:
        """A fresh private key of this ring's kind, as PKCS#8 PEM bytes."""
        pem: bytes = self._key_type.generate_key(self._curve).as_pem(  # type: ignore[arg-type]
            private=True
        )
        return pem

    # -- reading -----------------------------------------------------------------

    def current(self) -> tuple[str, K]:
        """Return ``(kid, private key)`` to sign with now.

        That is the newest active version published for at least
        ``publish_ahead``; if none is that old yet (a brand-new ring), the
        oldest active one, which has been in the key set longest. The first key
        is created on first use. Raises :class:`RuntimeError` if the ring holds
        no usable key, and the keystore's errors if it cannot be read.
        """
        self._maybe_refresh()
        if not self._active_by_kid:
            self._keystore.ensure(self.secret_name, self.generate_pem)
            self.refresh()
        chosen = self._signing_version(self._clock())
        return chosen.kid, chosen.private

    def jwks(self) -> dict[str, list[dict[str, object]]]:
        """The public JWK Set (RFC 7517 section 5) of every active version; each key
        carries ``kid``, ``alg`` and ``use: sig``, never a private member."""
        self._maybe_refresh()
        keys: list[dict[str, object]] = []
        for entry in sorted(self._active_by_kid.values(), key=lambda v: v.version):
            jwk: dict[str, object] = dict(entry.public.as_dict(private=False))
            jwk.pop("d", None)  # belt and braces: the public key has no "d" anyway
            keys.append(jwk)
        return {"keys": keys}

    def public_key(self, kid: object) -> K | None:
        """The public key of the active version ``kid``, or None.

        ``kid`` is untrusted header input: it is only ever a dictionary key, so a
        path or SQL string is simply unknown.
        """
        if not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH:
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
        self.refresh()
        if not self._active_by_kid:
            return self.current()[0]
        version = self._keystore.rotate(self.secret_name, self.generate_pem())
        self.refresh()
        entry = self._versions.get(version)
        if entry is None:  # pragma: no cover - the keystore just returned it
            raise RuntimeError(f"{self.secret_name} version {version} is unreadable")
        return entry.kid

    def refresh(self) -> None:
        """Re-read the version list now and parse versions not cached yet.

        Raises the keystore's errors (it fails closed) if it cannot be read.
        """
        with self._lock:
            try:
                infos = self._keystore.versions(self.secret_name)
            except SecretNotFound:
                infos = []
            versions: dict[int, KeyVersion[K]] = {}
            for info in infos:
                cached = self._versions.get(info.version)
                active = info.state == "active"
                if cached is None:
                    cached = self._parse(info.version, info.created_at, active)
                    if cached is None:
                        continue
                elif cached.active != active:
                    cached = replace(cached, active=active)
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

    def _signing_version(self, now: float) -> KeyVersion[K]:
        active = sorted(self._active_by_kid.values(), key=lambda v: v.version)
        if not active:
            raise RuntimeError(
                f"{self.secret_name} holds no usable {self._algorithm} ({self._curve}) key"
            )
        ready = [v for v in active if v.published_at + self._publish_ahead <= now]
        return ready[-1] if ready else active[0]

    def _parse(self, version: int, created_at: str, active: bool) -> KeyVersion[K] | None:
        """Parse one version's PEM; None unless it is a private key of this ring's
        curve: a foreign value must never sign or verify anything."""
        pem = self._keystore.get(self.secret_name, version)
        try:
            private = self._key_type.import_key(pem)
        except (ValueError, TypeError):
            return None
        if not private.is_private or private.curve_name != self._curve:
            return None
        raw = private.private_key
        if raw is None:  # pragma: no cover - is_private was checked above
            return None
        kid = private.thumbprint()
        params: KeyParameters = {"kid": kid, "alg": self._algorithm, "use": "sig"}
        # Built from the raw public key: the JWK can hold no private member.
        public = self._key_type.import_key(raw.public_key(), params)
        private = self._key_type.import_key(raw, params)
        try:
            published = datetime.fromisoformat(created_at).timestamp() + _CREATED_AT_PRECISION
        except ValueError:
            published = self._clock()  # unknown age: count it as published just now
        return KeyVersion(version, kid, private, public, published, active)
