"""Signed envelopes for prompts the api sends to the gateway (CHECKLIST M1).

The api builds the final prompt (system + retrieved context + user turn) and
signs an envelope over it: HMAC-SHA256 (RFC 2104) of the canonical JSON of
``{kid, tenant_id, user_id, action, ts, nonce, body_sha256}`` — ``action`` is
the Cedar action the api checked for the user (``question:ask``), which the
gateway checks again. The gateway refuses
an unsigned, altered (any byte of the body or the envelope), expired or
replayed request. Keys live in the key ring and rotate with overlap: the
envelope names the key version (``kid``) that signed it, and every version
not retired still verifies. A new version signs only once it has been in the
key ring for :data:`PUBLISH_AHEAD_SECONDS`, longer than any verifier caches
the version list: a verifier in another process never meets a ``kid`` it
has not loaded yet (an "unknown-key" refusal mid-rotation).

Tool calls a model proposes come back from the gateway signed the same way
(:class:`ToolCallSigner`), after a policy check; whatever executes them
verifies signature, expiry, tenant, name, arguments and single use first.
Each signed call carries a ``run_id`` (a random UUID) that names the one run
its signature permits: single use is keyed on it, never on the token's text.
A call is signed only for a tool the request declared (its ``tools``), and the
signature binds ``tool_sha256``, the SHA-256 of that declaration in RFC 8785
canonical form (:mod:`bastion.jcs`): the executor is handed the declaration
with the call and refuses one that is missing or differs.

Wire form, in the ``Bastion-Envelope`` header: ``base64url(canonical JSON)
"." base64url(mac)``. Canonical JSON here is sorted keys, no whitespace,
ASCII only: the claims are strings and integers, so this matches RFC 8785.
Both parts are decoded strictly (:mod:`bastion.encoding`: no padding, no
character outside the alphabet, pad bits clear), so a token has exactly one
spelling: ``token + "="`` or a ``!`` slipped in is "malformed", not the same token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from bastion.encoding import b64url_decode, b64url_encode, parse_uuid
from bastion.jcs import canonicalize
from bastion.secrets.errors import SecretNotFound
from bastion.secrets.protocols import Keystore

HEADER = "Bastion-Envelope"
KEY_NAME = "gateway/envelope-key"
TOOL_KEY_NAME = "gateway/tool-call-key"
MAX_AGE_SECONDS = 60
# A proposed tool call must be executed within this long after the answer.
TOOL_CALL_MAX_AGE_SECONDS = 300
CLOCK_SKEW_SECONDS = 5
# A rotation or retirement reaches the verifier within this long. One second:
# ``bastion incident revoke-keys`` retires keys with no grace, and every process
# must refuse what they signed within 2 s (issue 20); a re-read is one keystore
# read per second per process, never per request.
KEY_REFRESH_SECONDS = 1.0
# A new key version signs only after this long in the key ring: every verifier
# has re-read the version list by then (twice its refresh interval, plus the
# keystore's one-second ``created_at`` precision).
PUBLISH_AHEAD_SECONDS = 2 * KEY_REFRESH_SECONDS + 1
# How long the signer keeps its choice of version before looking again.
_SIGNER_REFRESH_SECONDS = 1.0
MAC_BYTES = 32  # HMAC-SHA256


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


def canonical(claims: dict[str, Any]) -> bytes:
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class SignedTokens:
    """HMAC-SHA256 tokens ``base64url(canonical claims) "." base64url(mac)`` over the key
    ring's versioned key ``key_name``; single-use nonces within ``max_age``."""

    def __init__(
        self,
        keystore: Keystore,
        key_name: str,
        *,
        max_age: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keystore = keystore
        self.key_name = key_name
        self.max_age = max_age
        self.clock = clock
        # Nonces seen within the validity window, oldest use first; older ones
        # expire with their tokens, so the set stays bounded by the request rate.
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._keys: dict[int, bytes] = {}
        self._keys_read_at = float("-inf")
        self._signing: tuple[int, bytes] | None = None
        self._signing_read_at = float("-inf")

    def issue(self, claims: dict[str, Any]) -> str:
        """Sign ``claims`` (strings and integers) adding ``kid``, ``ts`` and ``nonce``."""
        kid, key = self._signing_key()
        payload = canonical(
            {**claims, "kid": kid, "ts": int(self.clock()), "nonce": secrets.token_urlsafe(16)}
        )
        mac = hmac.new(key, payload, hashlib.sha256).digest()
        return f"{b64url_encode(payload)}.{b64url_encode(mac)}"

    def check(self, token: str | None) -> dict[str, Any]:
        """The claims of a valid, fresh token; raise :class:`EnvelopeInvalid` (unsigned,
        malformed, unknown-key, bad-signature, expired). :meth:`consume` marks it used."""
        if not token:
            raise EnvelopeInvalid("unsigned")
        try:
            encoded, _, mac_text = token.partition(".")
            # Strict: only the spelling our encoder writes (EncodingError is a ValueError).
            payload, mac = b64url_decode(encoded), b64url_decode(mac_text, size=MAC_BYTES)
            claims: dict[str, Any] = json.loads(payload)
            kid, issued, nonce = claims["kid"], claims["ts"], claims["nonce"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (kid, issued)):
                raise ValueError("kid/ts")
            if not isinstance(nonce, str):
                raise ValueError("nonce")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
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
        now = self.clock()
        if issued > now + CLOCK_SKEW_SECONDS or now - issued > self.max_age:
            raise EnvelopeInvalid("expired")
        return claims

    def consume(self, claims: dict[str, Any]) -> None:
        """Mark the token's nonce used; raise :class:`EnvelopeInvalid` ("replayed")."""
        self._forget_expired(self.clock())
        if claims["nonce"] in self._seen:
            raise EnvelopeInvalid("replayed")
        self._seen[claims["nonce"]] = claims["ts"]

    def _signing_key(self) -> tuple[int, bytes]:
        """``(version, key)`` to sign with: the newest active version that has been
        in the key ring for :data:`PUBLISH_AHEAD_SECONDS`; if none has (a new
        ring), the oldest active one. The first key is created on first use."""
        now = time.monotonic()
        if self._signing is not None and now - self._signing_read_at < _SIGNER_REFRESH_SECONDS:
            return self._signing
        self.keystore.ensure(self.key_name, lambda: secrets.token_bytes(32))
        active = [v for v in self.keystore.versions(self.key_name) if v.state == "active"]
        if not active:  # pragma: no cover - ensure() just made one
            raise SecretNotFound(f"{self.key_name} has no active version")
        wall = self.clock()
        ready = [v for v in active if _created_at(v.created_at) + PUBLISH_AHEAD_SECONDS <= wall]
        chosen = max(ready, key=lambda v: v.version) if ready else active[0]
        self._signing = (chosen.version, self.keystore.get(self.key_name, chosen.version))
        self._signing_read_at = now
        return self._signing

    def _verification_keys(self) -> dict[int, bytes]:
        """The active key versions, re-read from the key ring every few seconds."""
        now = time.monotonic()
        if now - self._keys_read_at > KEY_REFRESH_SECONDS:
            try:
                versions = self.keystore.versions(self.key_name)
            except SecretNotFound:
                versions = []
            self._keys = {
                v.version: self.keystore.get(self.key_name, v.version)
                for v in versions
                if v.state == "active"
            }
            self._keys_read_at = now
        return self._keys

    def _forget_expired(self, now: float) -> None:
        """Drop expired nonces from the oldest use on, stopping at the first one
        still valid: amortised O(1) per call (a sweep of every nonce on each call
        cost 3.8 ms at 300 req/s). A nonce behind a younger one waits at most a
        clock skew longer (verify() admitted it within max_age of its use), and
        keeping one longer only refuses a token that has expired anyway."""
        horizon = now - self.max_age - CLOCK_SKEW_SECONDS
        seen = self._seen
        while seen and next(iter(seen.values())) < horizon:
            seen.popitem(last=False)


def _created_at(stamp: str) -> float:
    """Epoch seconds of a version's ``created_at`` (ISO 8601, rounded down to the
    second, so one second is added); an unreadable one counts as brand new."""
    try:
        return datetime.fromisoformat(stamp).timestamp() + 1.0
    except ValueError:
        return float("inf")


class EnvelopeSigner:
    """Signs (api) and verifies (gateway) prompt envelopes."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        max_age: int = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tokens = SignedTokens(keystore, KEY_NAME, max_age=max_age, clock=clock)

    def sign(
        self, *, tenant_id: UUID, user_id: UUID, body: bytes, action: str = "model:invoke"
    ) -> str:
        """The ``Bastion-Envelope`` header value for sending ``body`` on behalf of the user."""
        return self.tokens.issue(
            {
                "tenant_id": str(tenant_id),
                "user_id": str(user_id),
                "action": action,
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    def verify(self, header: str | None, body: bytes) -> Envelope:
        """Return the envelope's claims; raise :class:`EnvelopeInvalid` with the reason."""
        claims = self.tokens.check(header)
        try:
            envelope = Envelope(
                UUID(claims["tenant_id"]),
                UUID(claims["user_id"]),
                str(claims["action"]),
                claims["nonce"],
                claims["ts"],
            )
            digest = str(claims["body_sha256"])
        except (KeyError, ValueError, TypeError, AttributeError):
            raise EnvelopeInvalid("malformed") from None
        if not hmac.compare_digest(digest, hashlib.sha256(body).hexdigest()):
            raise EnvelopeInvalid("body-altered")
        self.tokens.consume(claims)
        return envelope


@dataclass(frozen=True)
class ToolCall:
    id: str  # the model's id for the call (it echoes it back); not unique
    name: str
    arguments: str  # JSON text, as the model wrote it


def declared_tool(tools: Sequence[Any] | None, name: str) -> Mapping[str, Any] | None:
    """The request's declaration of function ``name`` (an OpenAI ``tools`` entry,
    ``{"type": "function", "function": {"name": ...}}``), or None when the request
    declared no such function, or declared it more than once (which one would the
    model have followed?)."""
    found = [
        tool
        for tool in tools or ()
        if isinstance(tool, Mapping)
        and tool.get("type") == "function"
        and isinstance(tool.get("function"), Mapping)
        and tool["function"].get("name") == name
    ]
    return found[0] if len(found) == 1 else None


def declaration_sha256(declaration: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the declaration's RFC 8785 canonical JSON; raises
    ValueError (or RecursionError) for a value JSON cannot hold."""
    return hashlib.sha256(canonicalize(dict(declaration))).hexdigest()


@dataclass(frozen=True)
class VerifiedToolCall:
    """What a valid signature says about a call: who it runs for, the id of the
    one run it permits (unique per signature, chosen by the signer), and the hash
    of the tool declaration it was proposed under."""

    user_id: UUID
    run_id: UUID
    tool_sha256: str


class ToolCallSigner:
    """Signs the tool calls a model proposes (gateway, after the policy check) and
    verifies them before execution (worker, sandbox): a call runs only if its
    signature, expiry and nonce verify and its name and arguments are unchanged.
    Text that merely looks like a tool call — in a document, in a prompt — has
    no signature and is never executed."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        max_age: int = TOOL_CALL_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tokens = SignedTokens(keystore, TOOL_KEY_NAME, max_age=max_age, clock=clock)

    def sign(
        self,
        call: ToolCall,
        *,
        tenant_id: UUID,
        user_id: UUID,
        declaration: Mapping[str, Any],
    ) -> str:
        """The call's signature, bound to ``declaration`` (the request's ``tools``
        entry for the call's name: see :func:`declared_tool`). Raises ValueError
        for a declaration that names another tool or is not JSON."""
        if declared_tool([declaration], call.name) is None:
            raise ValueError("the declaration is not the called tool's")
        return self.tokens.issue(
            {
                "tenant_id": str(tenant_id),
                "user_id": str(user_id),
                "call_id": call.id,
                # The model's call id may repeat (models number their calls);
                # this one never does: it is what single use is keyed on.
                "run_id": str(uuid4()),
                "name": call.name,
                "arguments_sha256": hashlib.sha256(call.arguments.encode()).hexdigest(),
                "tool_sha256": declaration_sha256(declaration),
            }
        )

    def verify(
        self,
        call: ToolCall,
        signature: str | None,
        *,
        tenant_id: UUID,
        declaration: Mapping[str, Any] | None,
    ) -> VerifiedToolCall:
        """Return the user the call runs for and its run id; raise :class:`EnvelopeInvalid`.

        ``declaration`` is the tool's declaration the call was proposed under:
        without one, or with one for another name, the call is "undeclared";
        with one that differs from the signed one, "declaration-altered".
        Single use in this process: a second execution of the same signed call
        is "replayed". Across processes and restarts the executor records the
        run id in the database before it runs anything.
        """
        claims = self.tokens.check(signature)
        expected = hashlib.sha256(call.arguments.encode()).hexdigest()
        if (
            claims.get("tenant_id") != str(tenant_id)
            or claims.get("name") != call.name
            or claims.get("call_id") != call.id
            or not hmac.compare_digest(str(claims.get("arguments_sha256")), expected)
        ):
            raise EnvelopeInvalid("call-altered")
        try:
            user_id, run_id = UUID(str(claims["user_id"])), parse_uuid(claims.get("run_id"))
        except (KeyError, ValueError):  # EncodingError included: no or a misspelt run id
            raise EnvelopeInvalid("malformed") from None
        if declaration is None or declared_tool([declaration], call.name) is None:
            raise EnvelopeInvalid("undeclared")
        try:
            presented = declaration_sha256(declaration)
        except (ValueError, RecursionError):
            raise EnvelopeInvalid("malformed") from None
        if not hmac.compare_digest(str(claims.get("tool_sha256")), presented):
            raise EnvelopeInvalid("declaration-altered")  # or signed before declarations were
        self.tokens.consume(claims)
        return VerifiedToolCall(user_id, run_id, presented)
