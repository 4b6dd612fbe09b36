"""Signed envelopes for prompts the api sends to the gateway (CHECKLIST M1).

The api builds the final prompt (system + retrieved context + user turn) and
signs an envelope over it: HMAC-SHA256 (RFC 2104) of the canonical JSON of
``{kid, tenant_id, user_id, action, ts, nonce, body_sha256}`` — ``action`` is
the Cedar action the api checked for the user (``question:ask``), which the
gateway checks again. The gateway refuses
an unsigned, altered (any byte of the body or the envelope), expired or
replayed request. Keys live in the key ring and rotate with overlap: the
envelope names the key version (``kid``) that signed it, and every version
not retired still verifies.

Wire form, in the ``Bastion-Envelope`` header: ``base64url(canonical JSON)
"." base64url(mac)``. Canonical JSON here is sorted keys, no whitespace,
ASCII only: the claims are strings and integers, so this matches RFC 8785.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from bastion.secrets.errors import SecretNotFound
from bastion.secrets.store import LocalKeystore

HEADER = "Bastion-Envelope"
KEY_NAME = "gateway/envelope-key"
MAX_AGE_SECONDS = 60
CLOCK_SKEW_SECONDS = 5
# A rotation or retirement reaches the verifier within this long.
KEY_REFRESH_SECONDS = 5.0


class EnvelopeInvalid(Exception):
    """The envelope does not verify; ``reason`` is a short stable slug."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    tenant_id: UUID
    user_id: UUID
    action: str
    nonce: str
    issued_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(claims: dict[str, Any]) -> bytes:
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class EnvelopeSigner:
    """Signs (api) and verifies (gateway) envelopes with the key ring's versioned key."""

    def __init__(
        self,
        keystore: LocalKeystore,
        *,
        max_age: int = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keystore = keystore
        self.max_age = max_age
        self.clock = clock
        # Nonces seen within the validity window; older ones expire with their
        # envelopes, so the set stays bounded by the request rate.
        self._seen: dict[str, float] = {}
        self._keys: dict[int, bytes] = {}
        self._keys_read_at = float("-inf")

    def sign(
        self, *, tenant_id: UUID, user_id: UUID, body: bytes, action: str = "model:invoke"
    ) -> str:
        """The ``Bastion-Envelope`` header value for sending ``body`` on behalf of the user."""
        self.keystore.ensure(KEY_NAME, lambda: secrets.token_bytes(32))
        kid, key = self.keystore.current(KEY_NAME)
        claims = {
            "kid": kid,
            "tenant_id": str(tenant_id),
            "user_id": str(user_id),
            "action": action,
            "ts": int(self.clock()),
            "nonce": secrets.token_urlsafe(16),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        payload = canonical(claims)
        return f"{_b64(payload)}.{_b64(hmac.new(key, payload, hashlib.sha256).digest())}"

    def verify(self, header: str | None, body: bytes) -> Envelope:
        """Return the envelope's claims; raise :class:`EnvelopeInvalid` with the reason."""
        if not header:
            raise EnvelopeInvalid("unsigned")
        try:
            encoded, _, mac_text = header.partition(".")
            payload, mac = _unb64(encoded), _unb64(mac_text)
            claims = json.loads(payload)
            kid = claims["kid"]
            if not isinstance(kid, int) or isinstance(kid, bool):
                raise ValueError("kid")
        except (ValueError, KeyError, TypeError):
            raise EnvelopeInvalid("malformed") from None
        key = self._verification_keys().get(kid)
        if key is None and time.monotonic() - self._keys_read_at > 1.0:
            # A key rotated in just now; at most one extra read per second.
            self._keys_read_at = float("-inf")
            key = self._verification_keys().get(kid)
        if key is None:
            raise EnvelopeInvalid("unknown-key")  # never issued, or retired
        if not hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).digest(), mac):
            raise EnvelopeInvalid("bad-signature")
        if payload != canonical(claims):
            raise EnvelopeInvalid("malformed")  # signed, but not by our canonical encoder
        try:
            issued = int(claims["ts"])
            nonce = str(claims["nonce"])
            envelope = Envelope(
                UUID(claims["tenant_id"]),
                UUID(claims["user_id"]),
                str(claims["action"]),
                nonce,
                issued,
            )
            digest = str(claims["body_sha256"])
        except (KeyError, ValueError, TypeError):
            raise EnvelopeInvalid("malformed") from None
        now = self.clock()
        if issued > now + CLOCK_SKEW_SECONDS or now - issued > self.max_age:
            raise EnvelopeInvalid("expired")
        if not hmac.compare_digest(digest, hashlib.sha256(body).hexdigest()):
            raise EnvelopeInvalid("body-altered")
        self._forget_expired(now)
        if nonce in self._seen:
            raise EnvelopeInvalid("replayed")
        self._seen[nonce] = issued
        return envelope

    def _verification_keys(self) -> dict[int, bytes]:
        """The active key versions, re-read from the key ring every few seconds."""
        now = time.monotonic()
        if now - self._keys_read_at > KEY_REFRESH_SECONDS:
            try:
                versions = self.keystore.versions(KEY_NAME)
            except SecretNotFound:
                versions = []
            self._keys = {
                v.version: self.keystore.get(KEY_NAME, v.version)
                for v in versions
                if v.state == "active"
            }
            self._keys_read_at = now
        return self._keys

    def _forget_expired(self, now: float) -> None:
        if len(self._seen) < 1024:
            return
        horizon = now - self.max_age - CLOCK_SKEW_SECONDS
        self._seen = {n: t for n, t in self._seen.items() if t >= horizon}
