"""DPoP: proof of possession of a client key on every request (RFC 9449).

A DPoP proof is a JWS compact serialisation (RFC 7515) with ``typ: dpop+jwt``
that carries its own public key in the ``jwk`` header and is signed by the
matching private key. :class:`DpopVerifier` runs the checks of RFC 9449
section 4.3, binds the proof to the access token (``ath``, section 4.2) and to
the key named by the token's ``cnf.jkt`` (section 6.1), refuses replays
(section 11.1) and issues stateless server nonces (section 8).

:class:`DpopKey` is the client side, for tests and the CLI.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from joserfc import jws, jwt
from joserfc.errors import JoseError, UnsupportedAlgorithmError
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import ECKey, OKPKey
from joserfc.jws import JWSRegistry

from bastion import jsonsafe
from bastion.encoding import b64url_decode
from bastion.identity import compact_jws
from bastion.identity.errors import InvalidDpopProof

PROOF_TYPE = "dpop+jwt"
# The reason a proof used twice is refused with (the request guard audits it).
REPLAYED = "proof replayed"
# Asymmetric algorithms only (RFC 9449 section 4.3, step 5). "Ed25519" is the
# fully-specified name of EdDSA over Ed25519 (RFC 9864).
ALGORITHMS = frozenset({"ES256", "EdDSA", "Ed25519"})
_KEY_TYPES = {"ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519"), "Ed25519": ("OKP", "Ed25519")}
# RFC 7638 section 3.2: the required members, per key type, that a thumbprint hashes.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}
# The public coordinates of the allowed keys: 32 bytes each on P-256 and Ed25519.
_COORDINATES = {"EC": ("x", "y"), "OKP": ("x",)}
_COORDINATE_BYTES = 32
# Private members of EC/OKP (RFC 7518 6.2.2, RFC 8037 2), RSA (6.3.2), oct (6.4.1).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_JTI_LENGTH = 256
_NONCE_BUCKET_SECONDS = 300
_KEY_CACHE_SIZE = 4096


def b64url(data: bytes) -> str:
    """Return unpadded base64url (RFC 7515 section 2) of ``data``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """Return the RFC 7638 SHA-256 thumbprint of a public JWK, base64url-encoded.

    Only the required members of the key type are hashed, in lexicographic
    order, without whitespace (section 3.2), so extra members such as ``kid``
    or ``alg`` do not change it. Raises :class:`ValueError` for an unknown key
    type or a missing member.
    """
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError("unsupported key type for a thumbprint")
    subset = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"JWK member {name} is missing")
        subset[name] = value
    canonical = json.dumps(subset, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def access_token_hash(access_token: str) -> str:
    """Return the ``ath`` value for ``access_token`` (RFC 9449 section 4.2)."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def normalize_htu(url: str) -> str:
    """Return ``url`` without query and fragment, scheme/host lowercased, default port dropped.

    That is the comparison of RFC 9449 section 4.3 step 9, with the syntax-based
    normalisation of RFC 3986 section 6.2.2 for scheme and host. Raises
    :class:`ValueError` for a URL that is not absolute http(s).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname  # lowercased, brackets of an IPv6 literal removed
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError("not an absolute http(s) URL")
    port = parts.port  # raises ValueError for a malformed port
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


class ReplayCache(Protocol):
    """Remembers proof identifiers until they expire (RFC 9449 section 11.1)."""

    def seen(self, key: str, expires_at: float) -> bool:
        """Return True if ``key`` was recorded and has not expired; else record it."""
        ...


class MemoryReplayCache:
    """An in-process :class:`ReplayCache`: a dict plus an expiry heap, thread-safe.

    Entries are dropped once they expire. At most ``max_entries`` are held;
    beyond that the entries closest to expiry are evicted first. Size it above
    peak proofs per second times the acceptance window. Several processes need
    a shared cache instead (each process only sees its own proofs).
    """

    def __init__(
        self, max_entries: int = 500_000, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._max = max_entries
        self._clock = clock
        self._entries: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()

    def seen(self, key: str, expires_at: float) -> bool:
        """Return True if ``key`` is known and unexpired; otherwise record it, False."""
        # A digest keeps memory per entry small whatever the key's length.
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:16]
        now = self._clock()
        with self._lock:
            self._sweep(now)
            known = self._entries.get(digest)
            if known is not None and known > now:
                return True
            self._entries[digest] = expires_at
            heapq.heappush(self._heap, (expires_at, digest))
            while len(self._entries) > self._max:
                self._evict_one()
            return False

    def __len__(self) -> int:
        return len(self._entries)

    def _sweep(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            self._evict_one()

    def _evict_one(self) -> None:
        expires_at, digest = heapq.heappop(self._heap)
        # The entry may have been re-recorded with a later expiry since.
        if self._entries.get(digest) == expires_at:
            del self._entries[digest]


class _AllowListRegistry(JWSRegistry):
    """A JWS registry that allows exactly ``names`` and warns about none of them.

    joserfc flags the polymorphic "EdDSA" name as deprecated (RFC 9864) with a
    warning on every use; RFC 9449 clients still send it, and accepting it is a
    deliberate choice here, so the allow-list is checked without the warning.
    """

    def __init__(self, names: Collection[str]) -> None:
        super().__init__(algorithms=list(names))
        self._names = frozenset(names)

    def get_alg(self, name: str) -> JWSAlgModel:
        """Return the algorithm ``name``; raise UnsupportedAlgorithmError if not allowed."""
        if name not in self._names or name not in self.algorithms:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        return self.algorithms[name]


@dataclass(frozen=True)
class AcceptedProof:
    """A proof :meth:`DpopVerifier.accept` let through: its key's thumbprint, and
    the single-use key it was recorded under (RFC 9449 section 11.1) with the
    Unix time until which a replay must be refused — for the caller to hand to
    a store shared by several processes (:mod:`bastion.identity.replay`)."""

    jkt: str
    replay_key: str
    expires_at: float


class DpopVerifier:
    """Verifies DPoP proofs (RFC 9449 section 4.3); failures are InvalidDpopProof."""

    def __init__(
        self,
        replay_cache: ReplayCache,
        *,
        iat_window_seconds: int = 60,
        max_proof_bytes: int = 4096,
        nonce_secret: bytes | None = None,
        nonce_bucket_seconds: int = _NONCE_BUCKET_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``nonce_secret`` must be shared by all servers of a deployment; if
        None, a random one is made (nonces then only hold in this process)."""
        self._replay = replay_cache
        self._window = iat_window_seconds
        self._max_bytes = max_proof_bytes
        self._nonce_secret = nonce_secret if nonce_secret is not None else secrets.token_bytes(32)
        self._bucket = nonce_bucket_seconds
        self._clock = clock
        self._registry = _AllowListRegistry(ALGORITHMS)
        # Parsed proof keys by thumbprint: a client signs every request with
        # one key, and importing a JWK (point validation) costs as much as
        # half a signature check.
        self._keys: OrderedDict[str, ECKey | OKPKey] = OrderedDict()
        self._keys_lock = threading.Lock()

    # -- nonces (RFC 9449 section 8) ------------------------------------------------

    def new_nonce(self) -> str:
        """Return a server nonce valid for this and the next time bucket."""
        return self._nonce_for(int(self._clock() // self._bucket))

    def _nonce_for(self, bucket: int) -> str:
        # Stateless: an HMAC of the time bucket, so any server sharing the
        # secret accepts it and nothing needs to be stored.
        mac = hmac.new(
            self._nonce_secret, b"bastion-dpop-nonce|" + str(bucket).encode(), hashlib.sha256
        )
        return b64url(mac.digest()[:18])

    def _nonce_ok(self, nonce: object) -> bool:
        if not isinstance(nonce, str) or len(nonce) > 64:
            return False
        bucket = int(self._clock() // self._bucket)
        # Both are computed and compared in constant time.
        current = hmac.compare_digest(nonce, self._nonce_for(bucket))
        previous = hmac.compare_digest(nonce, self._nonce_for(bucket - 1))
        return current or previous

    # -- verification -------------------------------------------------------------

    def verify(
        self,
        proof: str,
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        expected_jkt: str | None = None,
        nonce_required: bool = False,
    ) -> str:
        """Return the RFC 7638 thumbprint (jkt) of the key that signed ``proof``
        (:meth:`accept`, for a caller with no shared replay store)."""
        return self.accept(
            proof,
            method=method,
            url=url,
            access_token=access_token,
            expected_jkt=expected_jkt,
            nonce_required=nonce_required,
        ).jkt

    def accept(
        self,
        proof: str,
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        expected_jkt: str | None = None,
        nonce_required: bool = False,
    ) -> AcceptedProof:
        """Verify ``proof``; return its key's RFC 7638 thumbprint (jkt) and the
        single-use key it was recorded under in this process's replay cache.

        ``method`` and ``url`` are the request's; ``access_token`` binds the
        proof to the token (``ath``); ``expected_jkt`` is the token's
        ``cnf.jkt``. Raises :class:`InvalidDpopProof` for any failed check, with
        ``error="use_dpop_nonce"`` and a fresh ``nonce`` when a nonce is
        required and missing or stale. The proof's ``jti`` is recorded only
        once every other check has passed.
        """
        if not isinstance(proof, str) or len(proof) > self._max_bytes:
            raise InvalidDpopProof("proof too large")
        obj = compact_jws.parse(proof, self._registry)
        if obj is None:
            raise InvalidDpopProof("not a compact JWS")
        header = obj.protected
        # Step 4-5: type, then an asymmetric algorithm from the allow-list.
        if header.get("typ") != PROOF_TYPE:
            raise InvalidDpopProof("typ is not dpop+jwt")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise InvalidDpopProof("unsupported alg")
        if "crit" in header:
            raise InvalidDpopProof("crit header not supported")
        jkt, key = self._proof_key(header.get("jwk"), alg)
        # Step 6: the signature, with the key from the header.
        try:
            valid = jws.validate_compact(obj, key, registry=self._registry)
        except (JoseError, ValueError, TypeError):
            valid = False
        if not valid:
            raise InvalidDpopProof("bad signature")
        claims = self._claims(obj.payload)
        # Step 8: the method; step 9: the URI without query and fragment.
        if claims.get("htm") != method:
            raise InvalidDpopProof("htm does not match the request method")
        htu = claims.get("htu")
        try:
            same_uri = isinstance(htu, str) and normalize_htu(htu) == normalize_htu(url)
        except ValueError:
            same_uri = False
        if not same_uri:
            raise InvalidDpopProof("htu does not match the request URI")
        # Step 10: the server nonce, when one is demanded.
        if nonce_required and not self._nonce_ok(claims.get("nonce")):
            raise InvalidDpopProof(
                "a fresh DPoP nonce is required", error="use_dpop_nonce", nonce=self.new_nonce()
            )
        # Step 11: freshness.
        iat = claims["iat"]
        now = self._clock()
        if iat < now - self._window:
            raise InvalidDpopProof("proof iat is too old")
        if iat > now + self._window:
            raise InvalidDpopProof("proof iat is in the future")
        # Step 12: binding to the access token and to its confirmed key.
        if access_token is not None:
            ath = claims.get("ath")
            if not isinstance(ath, str):
                raise InvalidDpopProof("missing ath")
            if not hmac.compare_digest(ath, access_token_hash(access_token)):
                raise InvalidDpopProof("ath does not match the access token")
        if expected_jkt is not None and not hmac.compare_digest(jkt, expected_jkt):
            raise InvalidDpopProof("proof key does not match the token's cnf.jkt")
        # Section 11.1: a proof is single-use. Remember it for as long as its
        # iat would still be accepted; keyed by key so clients cannot collide,
        # and on signed content, never the proof's text: an ES256 signature
        # (r, s) has a second valid spelling (r, n - s).
        replay_key, expires_at = f"{jkt}:{claims['jti']}", iat + self._window
        if self._replay.seen(replay_key, expires_at):
            raise InvalidDpopProof(REPLAYED)
        return AcceptedProof(jkt, replay_key, expires_at)

    def _proof_key(self, jwk: object, alg: str) -> tuple[str, ECKey | OKPKey]:
        """Return ``(thumbprint, public key)`` of the header's ``jwk``.

        Raises InvalidDpopProof if it is missing, carries private members
        (step 7), or does not suit ``alg``.
        """
        if not isinstance(jwk, dict):
            raise InvalidDpopProof("missing jwk header")
        if not _PRIVATE_MEMBERS.isdisjoint(jwk):
            raise InvalidDpopProof("jwk header contains a private key")
        kty, crv = _KEY_TYPES[alg]
        if jwk.get("kty") != kty or jwk.get("crv") != crv:
            raise InvalidDpopProof(f"{alg} requires a {kty} {crv} jwk")
        try:
            jkt = jwk_thumbprint(jwk)
        except ValueError:
            raise InvalidDpopProof("malformed jwk") from None
        key = self._keys.get(jkt)
        if key is not None:  # the same strings as a key checked below (same hash)
            return jkt, key
        try:
            # Full-length coordinates, strictly spelt (RFC 7518 section 6.2.1.2,
            # RFC 8037 section 2): one key, one thumbprint. joserfc would also
            # take x with a leading zero byte: the same key under another jkt.
            for name in _COORDINATES[kty]:
                b64url_decode(jwk[name], size=_COORDINATE_BYTES)
        except ValueError:
            raise InvalidDpopProof("malformed jwk") from None
        # Only the key material is imported: "use", "alg" or "key_ops" members
        # from the client have no say in how we verify.
        material = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[kty]}
        try:
            key = ECKey.import_key(material) if kty == "EC" else OKPKey.import_key(material)
        except (JoseError, ValueError, TypeError):
            raise InvalidDpopProof("malformed jwk") from None
        with self._keys_lock:
            self._keys[jkt] = key
            while len(self._keys) > _KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        return jkt, key

    def _claims(self, payload: bytes) -> dict[str, Any]:
        """Return the payload, checked for the claims of RFC 9449 section 4.2."""
        try:
            claims = jsonsafe.loads(payload)
        except ValueError:  # not JSON, or nested too deep to read
            raise InvalidDpopProof("payload is not JSON") from None
        if not isinstance(claims, dict):
            raise InvalidDpopProof("payload is not a JSON object")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI_LENGTH:
            raise InvalidDpopProof("missing jti")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise InvalidDpopProof("missing iat")
        if isinstance(iat, float) and not math.isfinite(iat):
            raise InvalidDpopProof("malformed iat")
        return claims


class DpopKey:
    """A client's DPoP key pair (ES256) that signs proofs (RFC 9449 section 4.2)."""

    def __init__(self, key: ECKey) -> None:
        """Raise :class:`ValueError` unless ``key`` is a P-256 private key."""
        if not key.is_private or key.curve_name != "P-256":
            raise ValueError("a DPoP key must be a P-256 private key")
        self._key = key
        public = key.as_dict(private=False)
        self.public_jwk: dict[str, str] = {
            "kty": "EC",
            "crv": "P-256",
            "x": str(public["x"]),
            "y": str(public["y"]),
        }
        self.thumbprint = jwk_thumbprint(self.public_jwk)

    @classmethod
    def generate(cls) -> DpopKey:
        """Return a new random P-256 key."""
        return cls(ECKey.generate_key("P-256"))

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: int | None = None,
        jti: str | None = None,
    ) -> str:
        """Return a signed DPoP proof for one request.

        ``url`` loses its query and fragment (``htu``, RFC 9449 section 4.2);
        ``access_token`` adds ``ath``; ``nonce`` echoes a server nonce.
        """
        parts = urlsplit(url)
        claims: dict[str, Any] = {
            "jti": jti if jti is not None else secrets.token_urlsafe(18),
            "htm": method,
            "htu": f"{parts.scheme}://{parts.netloc}{parts.path}",
            "iat": int(time.time()) if iat is None else iat,
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        header = {"typ": PROOF_TYPE, "alg": "ES256", "jwk": self.public_jwk}
        return jwt.encode(header, claims, self._key, algorithms=["ES256"])

    def to_json(self) -> str:
        """Return the private JWK as JSON. It is a secret: store it 0600."""
        return json.dumps(self._key.as_dict(private=True), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DpopKey:
        """Return the key saved by :meth:`to_json`.

        Raises :class:`ValueError` unless it is a P-256 private JWK.
        """
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError("not a JSON JWK") from None
        if not isinstance(data, dict) or data.get("kty") != "EC" or "d" not in data:
            raise ValueError("not an EC private JWK")
        try:
            key = ECKey.import_key(data)
        except JoseError as error:
            raise ValueError("not a valid EC private JWK") from error
        return cls(key)
