"""Access tokens from external OIDC issuers (Keycloak, Auth0, Entra ID, ...).

An operator configures each trusted issuer by its issuer URL and the audience
its tokens must name. Keys are never configured by hand nor taken from a
token: they come from the issuer's own metadata, found by OpenID Connect
Discovery 1.0 section 4 / RFC 8414 section 3 (``{issuer}/.well-known/
openid-configuration``, whose ``issuer`` must equal the configured one
exactly, section 4.3 / RFC 8414 section 3.3), and its JWK Set (RFC 7517
section 5) at the advertised ``jwks_uri``.

Tokens are JWTs (RFC 7519) signed with an asymmetric algorithm from a
per-issuer allow-list (RFC 8725 section 3.1): ``none`` and the HMAC family
can never be configured, so a public key can never be used as an HMAC secret.
The unverified ``iss`` claim is read only to choose which issuer's keys and
rules apply; every claim is trusted only after the signature verified.

Key material is cached (``jwks_ttl``) and never fetched on a request's path:
:meth:`ExternalIssuers.verify` does no I/O and answers from the keys it has.
A token naming an unknown ``kid`` (a key rotation at the issuer, or a made-up
one) is refused at once and schedules a refetch in a background thread; so do
stale keys (which keep verifying meanwhile) and no keys at all. Refetches are
throttled to one per ``min_refetch_interval`` per issuer, with at most one
under way, so a flood of made-up ``kid`` values, anonymous or not, neither
stalls the event loop of the api or gateway (a slow issuer costs a waiting
background thread, never a request) nor turns Bastion into a traffic
amplifier. If the issuer cannot be reached, cached keys keep working for up to
24 hours; with no keys cached, tokens are refused (fail closed).

Verified tokens become :class:`AccessClaims` like our own: the tenant comes
from a configured claim (optionally through a ``tenant_map``), roles from a
configured claim through an optional ``role_map``, and the subject becomes a
UUID derived from issuer and ``sub`` so two issuers' users never collide.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from bastion import jsonsafe
from bastion.encoding import b64url_decode
from bastion.identity import compact_jws
from bastion.identity.errors import InvalidToken
from bastion.identity.tokens import (
    AccessClaims,
    TokenVerifier,
    numeric_date,
    verified_payload,
)
from bastion.logs import get_logger

# The roles Bastion knows (strongest first, as in Principal.db_role).
BASTION_ROLES = ("owner", "billing-admin", "auditor", "contributor", "viewer")

# Asymmetric JWS algorithms (RFC 7518 section 3.1, RFC 8037, RFC 9864) and the
# key each needs: (kty, allowed curves or None). Nothing else can be configured.
_KEY_FOR_ALG: Mapping[str, tuple[str, frozenset[str] | None]] = MappingProxyType(
    {
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "ES256": ("EC", frozenset({"P-256"})),
        "ES384": ("EC", frozenset({"P-384"})),
        "ES512": ("EC", frozenset({"P-521"})),
        "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
        "Ed25519": ("OKP", frozenset({"Ed25519"})),
    }
)
SUPPORTED_ALGORITHMS = frozenset(_KEY_FOR_ALG)

# Header members that would let a token choose its own verification key (RFC
# 7515 sections 4.1.2-4.1.6) or demand extensions we do not implement (4.1.11).
_FORBIDDEN_HEADER = ("jku", "x5u", "jwk", "x5c", "crit")
# RFC 9068 section 2.1 asks for "at+jwt"; most IdPs still send "JWT" or nothing.
# Other types (dpop+jwt, logout+jwt, secevent+jwt...) are not access tokens.
_ACCEPTED_TYP = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
_LOOPBACK_HOSTS = frozenset({"localhost"})
_MAX_KID_LENGTH = 128
_MAX_SUB_LENGTH = 255
_MAX_CLAIM_VALUE_LENGTH = 255
_MAX_JWKS_KEYS = 64
_MIN_RSA_BITS = 2048
MAX_RESPONSE_BYTES = 1024 * 1024
# A fetch (discovery or JWKS) that has not finished by then is abandoned,
# however slowly the issuer keeps trickling bytes in under the read timeout.
FETCH_DEADLINE_SECONDS = 10.0
# Beyond this age cached keys are no longer used, even if the issuer is down:
# keys an issuer has revoked must eventually stop verifying.
HARD_EXPIRY_SECONDS = 24 * 3600.0
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Private members of RSA (RFC 7518 6.3.2), EC/OKP (6.2.2, RFC 8037 2), oct (6.4.1).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_VerificationKey = RSAKey | ECKey | OKPKey
_log = get_logger("bastion.identity")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(url: str, what: str) -> None:
    """Raise ValueError unless ``url`` is https, or http on a loopback host (tests)."""
    parts = urlsplit(url)
    secure = parts.scheme == "https" and bool(parts.hostname)
    if not secure and not (parts.scheme == "http" and _is_loopback(parts.hostname)):
        raise ValueError(f"{what} must be an https URL (http only on loopback): {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} must not carry credentials")
    if parts.fragment or "#" in url:
        raise ValueError(f"{what} must not have a fragment")


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted external OIDC issuer and how its tokens map onto Bastion.

    Raises :class:`ValueError` on construction for an unusable or unsafe
    configuration (non-https issuer, ``none``/HMAC/unknown algorithms, a role
    map onto unknown Bastion roles...).
    """

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    tenant_claim: str = "tenant_id"
    tenant_map: Mapping[str, UUID] = field(default_factory=dict)
    roles_claim: str = "roles"
    role_map: Mapping[str, str] = field(default_factory=dict)
    leeway_seconds: int = 30
    max_token_bytes: int = 8192

    def __post_init__(self) -> None:
        _check_url(self.issuer, "issuer")
        # OIDC Discovery 1.0 section 4.1: the issuer has no query (nor fragment).
        if urlsplit(self.issuer).query:
            raise ValueError("issuer must not have a query")
        if not self.audience:
            raise ValueError("audience must be non-empty")
        algorithms = tuple(self.algorithms)
        if not algorithms:
            raise ValueError("at least one algorithm must be allowed")
        for alg in algorithms:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                # RFC 8725 sections 2.1 and 3.1: unsigned tokens, and HMAC keyed
                # with a published public key, are the classic JWT forgeries.
                raise ValueError(f"algorithm {alg!r} is never allowed for external tokens")
            if alg not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"unsupported algorithm {alg!r}")
        object.__setattr__(self, "algorithms", algorithms)
        if not self.tenant_claim or not self.roles_claim:
            raise ValueError("tenant_claim and roles_claim must be non-empty")
        for key, tenant in self.tenant_map.items():
            if not isinstance(key, str) or not isinstance(tenant, UUID):
                raise ValueError("tenant_map maps claim values (str) to tenant ids (UUID)")
        for external, role in self.role_map.items():
            if not isinstance(external, str) or role not in BASTION_ROLES:
                raise ValueError(f"role_map value {role!r} is not a Bastion role")
        if not 0 <= self.leeway_seconds <= 300:
            raise ValueError("leeway_seconds must be within [0, 300]")
        if self.max_token_bytes <= 0:
            raise ValueError("max_token_bytes must be positive")
        # Frozen means frozen: copies, so the caller's dicts cannot change us later.
        object.__setattr__(self, "tenant_map", MappingProxyType(dict(self.tenant_map)))
        object.__setattr__(self, "role_map", MappingProxyType(dict(self.role_map)))

    @property
    def discovery_url(self) -> str:
        """Return the OIDC Discovery URL (section 4: trailing ``/`` removed first)."""
        return self.issuer.rstrip("/") + DISCOVERY_PATH


@dataclass(frozen=True)
class _KeyCache:
    """An immutable snapshot of one issuer's keys; replaced, never mutated."""

    keys: Mapping[str, tuple[_CachedKey, ...]]  # kid -> the keys with that kid
    fetched_at: float  # clock time of the successful fetch


class _IssuerState:
    """Per-issuer mutable state: the key snapshot and the refetch throttle.

    ``lock`` guards the fields below and is held for a few instructions at a
    time, never during I/O: a request's thread never waits for a fetch.
    """

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.registry = JWSRegistry(algorithms=list(config.algorithms), strict_check_header=False)
        self.lock = threading.Lock()
        self.cache: _KeyCache | None = None
        self.jwks_uri: str | None = None
        self.discovered_at: float | None = None
        self.last_attempt: float | None = None
        self.refreshing = False  # a background refetch is under way


class _FetchError(Exception):
    """The issuer's metadata or keys could not be fetched or were unusable."""


def _decode_segment(part: str) -> dict[str, Any]:
    """Return the JSON object of one base64url segment; raise InvalidToken.

    Strict: only the base64url alphabet, no padding, pad bits clear (RFC 7515
    section 2, :func:`bastion.encoding.b64url_decode`), so this reads exactly
    what joserfc will later verify.
    """
    try:
        value = jsonsafe.loads(b64url_decode(part))
    except ValueError:
        raise InvalidToken("not a compact JWS") from None
    if not isinstance(value, dict):
        raise InvalidToken("not a compact JWS")
    return value


def unverified_issuer(token: str, *, max_bytes: int = 16384) -> str:
    """Return the ``iss`` claim of ``token`` WITHOUT verifying anything.

    Only for routing a token to the verifier that will check it. Raises
    :class:`InvalidToken` for an oversized or malformed token or a missing
    ``iss``.
    """
    if not isinstance(token, str) or len(token) > max_bytes:
        raise InvalidToken("token too long")
    parts = compact_jws.segments(token)
    if parts is None:
        raise InvalidToken("not a compact JWS")
    iss = _decode_segment(parts[1]).get("iss")
    if not isinstance(iss, str) or not iss:
        raise InvalidToken("missing iss")
    return iss


def _claim(payload: Mapping[str, Any], name: str) -> Any:
    """Return claim ``name``: a top-level member, else a dotted path ("org.id").

    The literal name is tried first because namespaced claims are often URLs
    full of dots (Auth0's ``https://example.com/roles``).
    """
    if name in payload:
        return payload[name]
    node: Any = payload
    for step in name.split("."):
        if not isinstance(node, dict) or step not in node:
            return None
        node = node[step]
    return node


def _string_list(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


@dataclass(frozen=True)
class _CachedKey:
    """A parsed public key and the ``alg`` its JWK was published for, if any."""

    key: _VerificationKey
    alg: str | None


def _key_matches(entry: _CachedKey, alg: str) -> bool:
    """True if the key may verify ``alg``: key type, curve, and the JWK's own ``alg``."""
    kty, curves = _KEY_FOR_ALG[alg]
    key = entry.key
    if key.key_type != kty:
        return False
    if curves is not None and (not isinstance(key, ECKey | OKPKey) or key.curve_name not in curves):
        return False
    # RFC 7517 section 4.4: a key published for one algorithm is not used for another.
    return entry.alg is None or entry.alg == alg


class ExternalIssuers:
    """Verifies access tokens of the configured external OIDC issuers.

    ``http`` is the client used for discovery and JWKS requests (default: one
    with a 5 s timeout), from background threads and :meth:`refresh` only.
    ``clock`` returns epoch seconds and drives both token times and cache
    ages. Thread-safe; :meth:`verify` never does I/O nor waits for it.
    """

    def __init__(
        self,
        configs: Sequence[IssuerConfig],
        *,
        http: httpx.Client | None = None,
        jwks_ttl: float = 300,
        min_refetch_interval: float = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Raise :class:`ValueError` if two configs name the same issuer, or for
        a ``jwks_ttl`` outside (0, 24 h] or a negative ``min_refetch_interval``.
        """
        if not 0 < jwks_ttl <= HARD_EXPIRY_SECONDS or min_refetch_interval < 0:
            raise ValueError("jwks_ttl must be in (0, 24 h]; min_refetch_interval >= 0")
        self._states: dict[str, _IssuerState] = {}
        for config in configs:
            if config.issuer in self._states:
                raise ValueError(f"issuer configured twice: {config.issuer}")
            self._states[config.issuer] = _IssuerState(config)
        # Fetches run in background threads (see _schedule_refresh), never on a
        # request's path; short timeouts still free those threads quickly.
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=5.0)
        self._jwks_ttl = jwks_ttl
        self._min_refetch = min_refetch_interval
        self._clock = clock
        self._max_bytes = max((c.max_token_bytes for c in configs), default=8192)
        self._threads_lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    @property
    def issuers(self) -> frozenset[str]:
        """Return the configured issuer identifiers."""
        return frozenset(self._states)

    def verify(self, token: str) -> AccessClaims:
        """Return the claims of a valid access token from a configured issuer.

        Raises :class:`InvalidToken` whose ``reason`` names the failed check:
        size, structure, unknown issuer, header (alg allow-list, key-carrying
        members, typ, kid), key availability, signature, then the claims (iss,
        aud, exp, nbf, iat, sub, tenant, roles, cnf).
        """
        iss = unverified_issuer(token, max_bytes=self._max_bytes)
        state = self._states.get(iss)
        if state is None:
            raise InvalidToken("unknown issuer")
        config = state.config
        if len(token) > config.max_token_bytes:
            raise InvalidToken("token too long")
        # The header is read here, not by joserfc, so that its checks come first
        # and each refusal says why; the algorithm before anything else (RFC
        # 8725 section 3.1), and before any key is looked up.
        header = _decode_segment(token.split(".", 1)[0])
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            raise InvalidToken("unsupported alg")
        for name in _FORBIDDEN_HEADER:
            if name in header:
                raise InvalidToken(f"forbidden header {name}")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
            raise InvalidToken("typ is not an access token type")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LENGTH:
            raise InvalidToken("missing kid")
        try:
            obj = jws.extract_compact(token.encode("ascii"), registry=state.registry)
        except (JoseError, ValueError, TypeError, UnicodeError):
            raise InvalidToken("not a compact JWS") from None
        now = self._clock()
        key = self._key(state, kid, alg, now)
        return self._claims(config, verified_payload(obj, key, state.registry), token, now)

    def close(self) -> None:
        """Close the HTTP client if this object created it (a background refetch
        still under way then fails, and is logged)."""
        if self._owns_http:
            self._http.close()

    def refresh(self, issuer: str | None = None) -> None:
        """Fetch discovery and JWKS now and wait for them (at startup, in a
        thread: this blocks), ignoring the throttle.

        ``issuer`` limits it to one configured issuer. Raises
        :class:`InvalidToken` ("issuer keys unavailable") if a fetch failed;
        any previously cached keys are kept in that case. Raises
        :class:`ValueError` for an issuer that is not configured.
        """
        for state in self._selected(issuer):
            now = self._clock()
            with state.lock:
                state.last_attempt = now
            try:
                self._fetch(state, now, rediscover=True)
            except _FetchError:
                raise InvalidToken("issuer keys unavailable") from None

    def prefetch(self, issuer: str | None = None) -> None:
        """Start fetching every (or one) issuer's keys in the background; return at once.

        For a process that must not wait for its issuers at startup; subject
        to the throttle like any refetch. Raises :class:`ValueError` for an
        issuer that is not configured.
        """
        for state in self._selected(issuer):
            self._schedule_refresh(state, self._clock())

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for the background refetches under way; True if none is left.

        For shutdown and tests: requests never wait for a refetch.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._threads_lock:
                running = next(iter(self._threads), None)
            if running is None:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            running.join(left)

    def _selected(self, issuer: str | None) -> list[_IssuerState]:
        if issuer is not None and issuer not in self._states:
            raise ValueError(f"issuer not configured: {issuer}")
        return [self._states[issuer]] if issuer is not None else list(self._states.values())

    # -- keys ---------------------------------------------------------------------

    def _key(self, state: _IssuerState, kid: str, alg: str, now: float) -> _VerificationKey:
        """Return the issuer's cached key ``kid`` usable with ``alg``; never waits.

        Stale keys, an unknown kid or no keys at all schedule a background
        refetch (throttled) and are answered from the cache as it is now: a
        request that names a key we lack fails at once rather than waiting for
        the issuer, which an attacker may have made slow.
        """
        cache = state.cache  # one read: a consistent snapshot without the lock
        key = self._pick(cache, kid, alg) if cache is not None else None
        if key is None or cache is None or now - cache.fetched_at >= self._jwks_ttl:
            self._schedule_refresh(state, now)
        if cache is None or now - cache.fetched_at >= HARD_EXPIRY_SECONDS:
            raise InvalidToken("issuer keys unavailable")
        if key is None:
            raise InvalidToken("unknown kid")
        return key

    def _schedule_refresh(self, state: _IssuerState, now: float) -> None:
        """Start a background refetch of ``state``'s keys unless one is under way
        or the last attempt is less than ``min_refetch_interval`` old."""
        with state.lock:
            if state.refreshing:
                return
            if state.last_attempt is not None and now - state.last_attempt < self._min_refetch:
                return
            state.last_attempt = now
            state.refreshing = True
        thread = threading.Thread(
            target=self._refresh_in_background,
            args=(state, now),
            name="bastion-jwks-refresh",
            daemon=True,  # never keeps a stopping process alive
        )
        with self._threads_lock:
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            self._refresh_done(state, thread)
            raise

    def _refresh_in_background(self, state: _IssuerState, now: float) -> None:
        try:
            # Re-discover only when the metadata itself is old: a kid miss is a
            # key rotation, and jwks_uri rarely moves.
            discovered = state.discovered_at
            rediscover = discovered is None or now - discovered >= self._jwks_ttl
            self._fetch(state, now, rediscover=rediscover)
        except Exception as exc:  # never raised: a thread has no caller to tell
            # The cache, if any, keeps serving within its hard expiry. A
            # _FetchError says what failed; anything else (a client closed at
            # shutdown) is named by its type only.
            error = str(exc) if isinstance(exc, _FetchError) else type(exc).__name__
            _log.warning("external_issuer_refresh_failed", issuer=state.config.issuer, error=error)
        finally:
            self._refresh_done(state, threading.current_thread())

    def _refresh_done(self, state: _IssuerState, thread: threading.Thread) -> None:
        with state.lock:
            state.refreshing = False
        with self._threads_lock:
            self._threads.discard(thread)

    @staticmethod
    def _pick(cache: _KeyCache, kid: str, alg: str) -> _VerificationKey | None:
        for entry in cache.keys.get(kid, ()):
            if _key_matches(entry, alg):
                return entry.key
        return None

    def _fetch(self, state: _IssuerState, now: float, *, rediscover: bool) -> None:
        """Fetch (discovery if due, then) the JWKS; replace the snapshot on success.

        Raises :class:`_FetchError`; the old snapshot is then left untouched.
        Does I/O, so never called with ``state.lock`` held.
        """
        config = state.config
        with state.lock:
            jwks_uri = state.jwks_uri
        if rediscover or jwks_uri is None:
            meta = self._get_json(config.discovery_url)
            # OIDC Discovery 1.0 section 4.3 / RFC 8414 section 3.3: exactly equal,
            # or an attacker-controlled document could vouch for another issuer.
            if meta.get("issuer") != config.issuer:
                raise _FetchError("discovery issuer mismatch")
            jwks_uri = meta.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise _FetchError("discovery has no jwks_uri")
            try:
                _check_url(jwks_uri, "jwks_uri")
            except ValueError:
                raise _FetchError("jwks_uri is not https") from None
            with state.lock:
                state.jwks_uri = jwks_uri
                state.discovered_at = now
        keys = _parse_jwks(self._get_json(jwks_uri))
        with state.lock:
            # Two fetches may overlap (refresh() and a background one): the
            # snapshot of the later attempt wins, whichever finished last.
            if state.cache is None or state.cache.fetched_at <= now:
                state.cache = _KeyCache(keys=keys, fetched_at=now)

    def _get_json(self, url: str) -> dict[str, Any]:
        """GET ``url`` and return its JSON object body; raise :class:`_FetchError`.

        No redirects (a redirect could leave https), at most MAX_RESPONSE_BYTES
        read, whatever Content-Length claims, within FETCH_DEADLINE_SECONDS.
        """
        deadline = time.monotonic() + FETCH_DEADLINE_SECONDS
        try:
            with self._http.stream(
                "GET", url, headers={"Accept": "application/json"}, follow_redirects=False
            ) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise _FetchError("response too large")
                    if time.monotonic() > deadline:
                        raise _FetchError("response too slow")
        except httpx.HTTPError:
            raise _FetchError("request failed") from None
        try:
            document = jsonsafe.loads(body)
        except ValueError:
            raise _FetchError("response is not JSON") from None
        if not isinstance(document, dict):
            raise _FetchError("response is not a JSON object")
        return document

    # -- claims -------------------------------------------------------------------

    def _claims(
        self, config: IssuerConfig, p: Mapping[str, Any], token: str, now: float
    ) -> AccessClaims:
        """Check the registered claims (RFC 7519 section 4.1) and map the rest."""
        if p.get("iss") != config.issuer:
            raise InvalidToken("wrong issuer")
        aud = p.get("aud")
        # RFC 7519 section 4.1.3: a string or an array of strings.
        if not (aud == config.audience or (isinstance(aud, list) and config.audience in aud)):
            raise InvalidToken("wrong audience")
        exp = numeric_date(p, "exp", required=True)
        iat = numeric_date(p, "iat", required=True)
        nbf = numeric_date(p, "nbf", required=False)
        assert exp is not None and iat is not None
        leeway = config.leeway_seconds
        if now >= exp + leeway:
            raise InvalidToken("token expired")
        if nbf is not None and nbf > now + leeway:
            raise InvalidToken("token not yet valid")
        if iat > now + leeway:
            raise InvalidToken("token issued in the future")
        sub = p.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUB_LENGTH:
            raise InvalidToken("missing sub")
        jti = p.get("jti")
        if not isinstance(jti, str) or not jti:
            # Not every IdP sets jti; the hash of what was signed identifies the
            # token as well. Not the whole token: an ECDSA signature has a
            # second valid spelling (s and n - s), the signed part has one.
            signed = token.rpartition(".")[0]
            jti = "sha256:" + hashlib.sha256(signed.encode("ascii")).hexdigest()
        cnf = p.get("cnf")
        jkt: str | None = None
        if cnf is not None:
            if not isinstance(cnf, dict):
                raise InvalidToken("malformed cnf")
            if "jkt" in cnf:
                if not isinstance(cnf["jkt"], str) or not cnf["jkt"]:
                    raise InvalidToken("malformed cnf")
                jkt = cnf["jkt"]
        return AccessClaims(
            iss=config.issuer,
            aud=config.audience,
            # Namespaced by issuer: two IdPs may both have a user "42".
            sub=uuid.uuid5(uuid.NAMESPACE_URL, config.issuer + "#" + sub),
            tenant_id=_tenant(config, p),
            roles=_roles(config, p),
            amr=_string_list(p.get("amr")) or (),
            jti=jti,
            iat=iat,
            exp=exp,
            jkt=jkt,
            scope=_scope(p),
            auth_time=numeric_date(p, "auth_time", required=False),
        )


def _tenant(config: IssuerConfig, p: Mapping[str, Any]) -> UUID:
    """Return the Bastion tenant of a verified payload; raise InvalidToken."""
    value = _claim(p, config.tenant_claim)
    if not isinstance(value, str) or not value or len(value) > _MAX_CLAIM_VALUE_LENGTH:
        raise InvalidToken("missing tenant")
    if config.tenant_map:
        # With a map, only mapped values count, even ones that look like UUIDs:
        # a token never reaches a tenant it was not explicitly mapped to.
        tenant = config.tenant_map.get(value)
        if tenant is None:
            raise InvalidToken("tenant not mapped")
        return tenant
    try:
        parsed = UUID(value)
    except ValueError:
        raise InvalidToken("malformed tenant") from None
    if str(parsed) != value:  # only the canonical form: one spelling per tenant
        raise InvalidToken("malformed tenant")
    return parsed


def _roles(config: IssuerConfig, p: Mapping[str, Any]) -> tuple[str, ...]:
    """Return the Bastion roles of a verified payload (unmapped ones dropped)."""
    value = _claim(p, config.roles_claim)
    if value is None:
        return ()
    names = _string_list(value)
    if names is None:
        raise InvalidToken("roles is not a list of strings")
    roles: list[str] = []
    for name in names:
        role = config.role_map.get(name) if config.role_map else name
        if role in BASTION_ROLES and role not in roles:
            roles.append(role)
    return tuple(roles)


def _scope(p: Mapping[str, Any]) -> str:
    """Return the space-separated scope (RFC 8693 ``scope``; Entra's ``scp``)."""
    for name in ("scope", "scp"):
        value = p.get(name)
        if isinstance(value, str):
            return value
        names = _string_list(value)
        if names is not None:
            return " ".join(names)
    return ""


def _parse_jwks(document: Mapping[str, Any]) -> dict[str, tuple[_CachedKey, ...]]:
    """Return the usable public signing keys of a JWK Set (RFC 7517 section 5), by kid.

    Keys without a kid, not for signatures, of an unknown type, private, or
    RSA under 2048 bits are skipped. Raises :class:`_FetchError` if the
    document is not a JWK Set.
    """
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise _FetchError("not a JWK Set")
    keys: dict[str, list[_CachedKey]] = {}
    for entry in entries[:_MAX_JWKS_KEYS]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LENGTH:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        ops = entry.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        # A published private key is a misconfiguration; do not use it at all.
        if _PRIVATE_MEMBERS.intersection(entry):
            continue
        alg = entry.get("alg")
        if alg is not None and not isinstance(alg, str):
            continue
        key = _import_key(entry)
        if key is not None:
            keys.setdefault(kid, []).append(_CachedKey(key, alg))
    return {kid: tuple(found) for kid, found in keys.items()}


def _import_key(entry: Mapping[str, Any]) -> _VerificationKey | None:
    kty = entry.get("kty")
    key: _VerificationKey
    try:
        if kty == "RSA":
            key = RSAKey.import_key(dict(entry))
            if key.raw_value.key_size < _MIN_RSA_BITS:
                return None
        elif kty == "EC":
            key = ECKey.import_key(dict(entry))
        elif kty == "OKP":
            key = OKPKey.import_key(dict(entry))
        else:
            return None  # "oct" and anything unknown: never a verification key here
    except (JoseError, ValueError, TypeError, KeyError):
        return None
    return key


class CombinedVerifier:
    """Routes a token to our own verifier or to the external issuers by its ``iss``.

    Has the same ``verify`` signature as :class:`TokenVerifier`, so the
    Authenticator can take either.
    """

    def __init__(self, local: TokenVerifier, external: ExternalIssuers) -> None:
        """Raise :class:`ValueError` if an external issuer is our own issuer."""
        if local.issuer in external.issuers:
            raise ValueError("an external issuer cannot be Bastion's own issuer")
        self._local = local
        self._external = external

    def verify(self, token: str) -> AccessClaims:
        """Return the verified claims; raise :class:`InvalidToken` otherwise.

        The unverified ``iss`` only chooses the verifier, which then checks
        everything, ``iss`` included. An issuer that is neither ours nor
        configured is refused ("unknown issuer").
        """
        iss = unverified_issuer(token)
        if iss == self._local.issuer:
            return self._local.verify(token)
        if iss in self._external.issuers:
            return self._external.verify(token)
        raise InvalidToken("unknown issuer")
