"""Access tokens (JWT, RFC 7519, in the RFC 9068 profile) and OIDC ID tokens.

Access tokens are ES256-signed JWS compact serialisations (RFC 7515) with
``typ: at+jwt`` (RFC 9068 section 2.1). The verifier is deliberately narrow:
one algorithm, keys only from our own key ring, no key material or key URLs
taken from the header, and every claim checked for presence and type.

Verification is on every request's path, so it is kept cheap: keys are parsed
once (see :mod:`bastion.identity.keys`) and a token that verified is remembered
(by its exact bytes) until it expires, so a client that presents the same token
on many requests pays for one ECDSA verification, not one per request.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jws import JWSRegistry

from bastion import jsonsafe
from bastion.identity import compact_jws
from bastion.identity.errors import InvalidToken
from bastion.identity.keys import ALGORITHM, SigningKeys

MAX_LIFETIME = timedelta(minutes=60)
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret

# Header members an access token of ours may carry; anything else is refused.
_ALLOWED_HEADER = frozenset({"alg", "typ", "kid"})
# Members that would let the token choose its own verification key (RFC 7515
# sections 4.1.2-4.1.6) or demand extensions we do not implement (4.1.11).
_FORBIDDEN_HEADER = ("jku", "x5u", "jwk", "x5c", "crit")
_MAX_KID_LENGTH = 128
_MAX_SID_LENGTH = 64


@dataclass(frozen=True)
class AccessClaims:
    """The verified claims of an access token (RFC 9068 section 2.2)."""

    iss: str
    aud: str
    sub: UUID
    tenant_id: UUID
    roles: tuple[str, ...]
    amr: tuple[str, ...]
    jti: str
    iat: int
    exp: int
    jkt: str | None  # RFC 9449 section 6.1: cnf.jkt, the bound DPoP key's thumbprint
    scope: str
    auth_time: int | None = None  # when the user last authenticated (OIDC Core 2)
    # The session (our refresh-token family) the token was issued in: the
    # ``sid`` claim of OpenID Connect Back-Channel Logout 1.0 section 2.1.
    sid: str | None = None


class AccessTokenVerifier(Protocol):
    """Anything that turns an access token into verified claims (ours, external)."""

    def verify(self, token: str) -> AccessClaims:
        """Return the token's claims; raise :class:`InvalidToken` if it does not verify."""
        ...


class TokenIssuer:
    """Signs access tokens and ID tokens with the current key of the ring."""

    def __init__(
        self,
        keys: SigningKeys,
        *,
        issuer: str,
        audience: str,
        lifetime: timedelta = timedelta(minutes=15),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Raise :class:`ValueError` if ``lifetime`` is not in (0, 60 min]."""
        if lifetime <= timedelta(0) or lifetime > MAX_LIFETIME:
            raise ValueError(
                f"access token lifetime must be > 0 and <= {MAX_LIFETIME}; got {lifetime}"
            )
        if not issuer or not audience:
            raise ValueError("issuer and audience must be non-empty")
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self._lifetime_s = int(lifetime.total_seconds())
        self._clock = clock

    def issue_access(
        self,
        *,
        user_id: UUID,
        tenant_id: UUID,
        roles: Iterable[str],
        amr: Iterable[str],
        jkt: str | None,
        scope: str = "",
        auth_time: int | None = None,
        sid: str | None = None,
    ) -> tuple[str, AccessClaims]:
        """Return ``(token, claims)`` of a new access token.

        ``auth_time`` (seconds) is when the user signed in; a refreshed token
        keeps it, so endpoints can ask for a recent sign-in (MFA freshness).
        ``sid`` names the session (refresh-token family) it belongs to, so
        "end my other sessions" knows which one to keep.

        With ``jkt`` the token is DPoP-bound: ``cnf.jkt`` (RFC 9449 section 6.1)
        names the only key whose proofs may accompany it.
        """
        now = int(self._clock())
        claims = AccessClaims(
            iss=self.issuer,
            aud=self.audience,
            sub=user_id,
            tenant_id=tenant_id,
            roles=tuple(roles),
            amr=tuple(amr),
            jti=secrets.token_urlsafe(18),
            iat=now,
            exp=now + self._lifetime_s,
            jkt=jkt,
            scope=scope,
            auth_time=auth_time,
            sid=sid,
        )
        payload: dict[str, Any] = {
            "iss": claims.iss,
            "aud": claims.aud,
            "sub": str(claims.sub),
            "exp": claims.exp,
            "iat": claims.iat,
            "nbf": claims.iat,
            "jti": claims.jti,
            "tenant_id": str(claims.tenant_id),
            "roles": list(claims.roles),
            "amr": list(claims.amr),
            "scope": claims.scope,
        }
        if jkt is not None:
            payload["cnf"] = {"jkt": jkt}
        if auth_time is not None:
            payload["auth_time"] = auth_time
        if sid is not None:
            payload["sid"] = sid
        kid, key = self._keys.current()
        header = {"alg": ALGORITHM, "typ": ACCESS_TOKEN_TYPE, "kid": kid}
        token = jwt.encode(header, payload, key, algorithms=[ALGORITHM])
        return token, claims

    def issue_id_token(
        self,
        *,
        user_id: UUID,
        tenant_id: UUID,
        client_id: str,
        nonce: str | None,
        auth_time: int,
        amr: Iterable[str],
    ) -> str:
        """Return a signed OIDC ID token (OpenID Connect Core 1.0 section 2).

        Its audience is the client, not the API; it is never an access token
        (``typ`` is JWT, so :class:`TokenVerifier` refuses it).
        """
        now = int(self._clock())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": str(user_id),
            "aud": client_id,
            "exp": now + self._lifetime_s,
            "iat": now,
            "auth_time": int(auth_time),
            "amr": list(amr),
            "tenant_id": str(tenant_id),
        }
        if nonce is not None:
            payload["nonce"] = nonce
        kid, key = self._keys.current()
        header = {"alg": ALGORITHM, "typ": "JWT", "kid": kid}
        return jwt.encode(header, payload, key, algorithms=[ALGORITHM])


class TokenVerifier:
    """Verifies access tokens; every failure is an :class:`InvalidToken`."""

    def __init__(
        self,
        keys: SigningKeys,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: int = 30,
        max_token_bytes: int = 8192,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``cache_size`` bounds the verified-token cache; 0 disables it."""
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self._leeway = leeway_seconds
        self._max_bytes = max_token_bytes
        self._clock = clock
        # An allow-list of exactly one algorithm: joserfc refuses any other
        # "alg" before a key is touched (RFC 8725 section 3.1).
        self._registry = JWSRegistry(algorithms=[ALGORITHM])
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[str, AccessClaims, int | None]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def verify(self, token: str) -> AccessClaims:
        """Return the claims of a valid access token.

        Raises :class:`InvalidToken` whose ``reason`` names the failed check:
        size, structure, header (alg, typ, key-carrying members, kid), signature,
        then the claims (iss, aud, exp, nbf, iat, sub, tenant_id, jti, roles...).
        """
        if not isinstance(token, str) or len(token) > self._max_bytes:
            raise InvalidToken("token too long")
        now = self._clock()
        cached = self._cache.get(token) if self._cache_size else None
        if cached is not None:
            kid, claims, nbf = cached
            # The key may have been retired since; times move on.
            if self._keys.public_key(kid) is None:
                raise InvalidToken("unknown kid")
            self._check_times(claims.exp, claims.iat, nbf, now)
            return claims
        claims, kid, nbf = self._verify_uncached(token, now)
        if self._cache_size:
            with self._cache_lock:
                self._cache[token] = (kid, claims, nbf)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return claims

    # -- internals ----------------------------------------------------------------

    def _verify_uncached(self, token: str, now: float) -> tuple[AccessClaims, str, int | None]:
        obj = compact_jws.parse(token, self._registry)
        if obj is None:
            raise InvalidToken("not a compact JWS")
        header = obj.protected
        # Algorithm first, before anything else in the header is looked at.
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("unsupported alg")
        for name in _FORBIDDEN_HEADER:
            if name in header:
                raise InvalidToken(f"forbidden header {name}")
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise InvalidToken("typ is not at+jwt")
        if not _ALLOWED_HEADER.issuperset(header):
            raise InvalidToken("unexpected header member")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("missing kid")
        key = self._keys.public_key(kid) if len(kid) <= _MAX_KID_LENGTH else None
        if key is None:
            raise InvalidToken("unknown kid")
        payload = verified_payload(obj, key, self._registry)
        claims, nbf = self._check_claims(payload, now)
        return claims, kid, nbf

    def _check_claims(self, p: Mapping[str, Any], now: float) -> tuple[AccessClaims, int | None]:
        """Check the registered (RFC 7519 section 4.1) and our private claims."""
        if p.get("iss") != self.issuer:
            raise InvalidToken("wrong issuer")
        aud = p.get("aud")
        # RFC 7519 section 4.1.3: a string or an array of strings.
        if not (aud == self.audience or (isinstance(aud, list) and self.audience in aud)):
            raise InvalidToken("wrong audience")
        exp = numeric_date(p, "exp", required=True)
        iat = numeric_date(p, "iat", required=True)
        nbf = numeric_date(p, "nbf", required=False)
        assert exp is not None and iat is not None
        if exp - iat > MAX_LIFETIME.total_seconds():
            raise InvalidToken("lifetime exceeds the maximum")
        self._check_times(exp, iat, nbf, now)
        sub = _uuid(p, "sub")
        tenant_id = _uuid(p, "tenant_id")
        jti = p.get("jti")
        if not isinstance(jti, str) or not jti:
            raise InvalidToken("missing jti")
        roles = _strings(p, "roles", required=True)
        amr = _strings(p, "amr", required=False)
        scope = p.get("scope", "")
        if not isinstance(scope, str):
            raise InvalidToken("scope is not a string")
        jkt: str | None = None
        if "cnf" in p:
            cnf = p["cnf"]
            if not isinstance(cnf, dict) or not isinstance(cnf.get("jkt"), str):
                raise InvalidToken("malformed cnf")
            jkt = cnf["jkt"]
        auth_time = numeric_date(p, "auth_time", required=False)
        sid = p.get("sid")
        if sid is not None and not (isinstance(sid, str) and 0 < len(sid) <= _MAX_SID_LENGTH):
            raise InvalidToken("malformed sid")
        claims = AccessClaims(
            iss=self.issuer,
            aud=self.audience,
            sub=sub,
            tenant_id=tenant_id,
            roles=roles,
            amr=amr,
            jti=jti,
            iat=iat,
            exp=exp,
            jkt=jkt,
            scope=scope,
            auth_time=auth_time,
            sid=sid,
        )
        return claims, nbf

    def _check_times(self, exp: int, iat: int, nbf: int | None, now: float) -> None:
        # RFC 7519 sections 4.1.4-4.1.6, with a small leeway for clock skew.
        if now >= exp + self._leeway:
            raise InvalidToken("token expired")
        if nbf is not None and nbf > now + self._leeway:
            raise InvalidToken("token not yet valid")
        if iat > now + self._leeway:
            raise InvalidToken("token issued in the future")


def verified_payload(obj: Any, key: Any, registry: Any) -> dict[str, Any]:
    """Check a compact JWS's signature (RFC 7515 5.2); return its JSON object payload.

    Raises InvalidToken for a bad signature or a payload that is not a JSON object.
    """
    try:
        valid = jws.validate_compact(obj, key, registry=registry)
    except (JoseError, ValueError, TypeError):
        valid = False
    if not valid:
        raise InvalidToken("bad signature")
    try:
        payload = jsonsafe.loads(obj.payload)
    except ValueError:
        raise InvalidToken("payload is not JSON") from None
    if not isinstance(payload, dict):
        raise InvalidToken("payload is not a JSON object")
    return payload


def numeric_date(p: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    """Return claim ``name`` as an int NumericDate; raise InvalidToken if malformed."""
    value = p.get(name)
    if value is None:
        if required:
            raise InvalidToken(f"missing {name}")
        return None
    # bool is an int subclass; NaN/inf floats are not dates.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"malformed {name}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidToken(f"malformed {name}")
    return int(value)


def _uuid(p: Mapping[str, Any], name: str) -> UUID:
    """Return claim ``name`` as a UUID; only the canonical hyphenated form is accepted."""
    value = p.get(name)
    if not isinstance(value, str):
        raise InvalidToken(f"missing {name}")
    try:
        parsed = UUID(value)
    except ValueError:
        raise InvalidToken(f"malformed {name}") from None
    if str(parsed) != value:
        raise InvalidToken(f"malformed {name}")
    return parsed


def _strings(p: Mapping[str, Any], name: str, *, required: bool) -> tuple[str, ...]:
    """Return claim ``name`` as a tuple of strings; raise InvalidToken otherwise."""
    if name not in p:
        if required:
            raise InvalidToken(f"missing {name}")
        return ()
    value = p[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken(f"{name} is not a list of strings")
    return tuple(value)
