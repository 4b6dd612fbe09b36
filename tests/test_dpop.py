"""DPoP proofs (RFC 9449): binding, replay, freshness, nonces; real keys and signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import warnings
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey

from bastion.identity.dpop import (
    DpopKey,
    DpopVerifier,
    MemoryReplayCache,
    access_token_hash,
    jwk_thumbprint,
    normalize_htu,
)
from bastion.identity.errors import InvalidDpopProof

URL = "https://api.bastion.test/v1/tenants/t/documents"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"  # opaque to DPoP


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(clock: Clock) -> DpopVerifier:
    return DpopVerifier(MemoryReplayCache(clock=clock), nonce_secret=b"s" * 32, clock=clock)


@pytest.fixture
def key() -> DpopKey:
    return DpopKey.generate()


def payload(clock: Clock, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "jti": "jti-1",
        "htm": "GET",
        "htu": URL,
        "iat": int(clock()),
        "ath": access_token_hash(TOKEN),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def refused(verifier: DpopVerifier, proof: str, **kwargs: Any) -> InvalidDpopProof:
    args: dict[str, Any] = {"method": "GET", "url": URL, "access_token": TOKEN, **kwargs}
    with pytest.raises(InvalidDpopProof) as info:
        verifier.verify(proof, **args)
    return info.value


# -- happy path ---------------------------------------------------------------------


def test_happy_path_returns_the_thumbprint(verifier: DpopVerifier, key: DpopKey) -> None:
    proof = key.proof("GET", URL, access_token=TOKEN)
    jkt = verifier.verify(
        proof, method="GET", url=URL, access_token=TOKEN, expected_jkt=key.thumbprint
    )
    assert jkt == key.thumbprint
    # The thumbprint is RFC 7638's, as joserfc computes it too.
    assert jkt == ECKey.import_key(key.public_jwk).thumbprint()  # type: ignore[arg-type]


def test_proof_without_token_for_the_token_endpoint(verifier: DpopVerifier, key: DpopKey) -> None:
    proof = key.proof("POST", "https://id.bastion.test/oauth/token")
    assert verifier.verify(proof, method="POST", url="https://id.bastion.test/oauth/token") == (
        key.thumbprint
    )


@pytest.mark.parametrize("alg", ["Ed25519", "EdDSA"])
def test_ed25519_proofs_are_accepted(verifier: DpopVerifier, clock: Clock, alg: str) -> None:
    okp = OKPKey.generate_key("Ed25519")
    public = dict(okp.as_dict(private=False))
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": public}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc flags the name "EdDSA" (RFC 9864)
        proof = jwt.encode(header, payload(clock), okp, algorithms=[alg])
    assert verifier.verify(proof, method="GET", url=URL, access_token=TOKEN) == okp.thumbprint()


# -- binding ------------------------------------------------------------------------


def test_stolen_token_replayed_with_another_key(verifier: DpopVerifier, key: DpopKey) -> None:
    thief = DpopKey.generate()
    proof = thief.proof("GET", URL, access_token=TOKEN)  # valid proof, wrong key
    error = refused(verifier, proof, expected_jkt=key.thumbprint)
    assert error.reason == "proof key does not match the token's cnf.jkt"
    assert error.error == "invalid_dpop_proof"


def test_same_proof_twice_is_a_replay(verifier: DpopVerifier, key: DpopKey) -> None:
    proof = key.proof("GET", URL, access_token=TOKEN)
    assert verifier.verify(proof, method="GET", url=URL, access_token=TOKEN)
    assert refused(verifier, proof).reason == "proof replayed"


def test_same_jti_from_another_key_is_not_a_replay(verifier: DpopVerifier, clock: Clock) -> None:
    a, b = DpopKey.generate(), DpopKey.generate()
    now = int(clock())
    for k in (a, b):
        proof = k.proof("GET", URL, access_token=TOKEN, jti="same", iat=now)
        assert verifier.verify(proof, method="GET", url=URL, access_token=TOKEN) == k.thumbprint


def test_a_refused_proof_does_not_burn_its_jti(verifier: DpopVerifier, key: DpopKey) -> None:
    proof = key.proof("GET", URL, access_token=TOKEN)
    assert refused(verifier, proof, method="POST").reason == "htm does not match the request method"
    assert verifier.verify(proof, method="GET", url=URL, access_token=TOKEN)


def test_other_url_and_other_method(verifier: DpopVerifier, key: DpopKey) -> None:
    proof = key.proof("GET", "https://api.bastion.test/v1/other", access_token=TOKEN)
    assert refused(verifier, proof).reason == "htu does not match the request URI"
    proof = key.proof("GET", "https://evil.example/v1/tenants/t/documents", access_token=TOKEN)
    assert refused(verifier, proof).reason == "htu does not match the request URI"
    proof = key.proof("GET", URL.replace("https:", "http:"), access_token=TOKEN)
    assert refused(verifier, proof).reason == "htu does not match the request URI"
    proof = key.proof("DELETE", URL, access_token=TOKEN)
    assert refused(verifier, proof).reason == "htm does not match the request method"
    proof = key.proof("get", URL, access_token=TOKEN)  # methods are case-sensitive
    assert refused(verifier, proof).reason == "htm does not match the request method"


def test_htu_ignores_query_and_fragment_and_normalises(
    verifier: DpopVerifier, key: DpopKey
) -> None:
    proof = key.proof("GET", URL + "?page=2#top", access_token=TOKEN)
    assert verifier.verify(proof, method="GET", url=URL + "?page=3", access_token=TOKEN)
    upper = "HTTPS://API.Bastion.TEST:443/v1/tenants/t/documents"
    proof = key.proof("GET", upper, access_token=TOKEN)
    assert verifier.verify(proof, method="GET", url=URL, access_token=TOKEN)
    # The path is case-sensitive: another resource.
    proof = key.proof("GET", URL.replace("documents", "Documents"), access_token=TOKEN)
    assert refused(verifier, proof).reason == "htu does not match the request URI"


def test_normalize_htu() -> None:
    assert normalize_htu("HTTP://Example.COM:80") == "http://example.com/"
    assert normalize_htu("https://example.com:8443/a?b#c") == "https://example.com:8443/a"
    assert normalize_htu("https://[::1]:443/x") == "https://[::1]/x"
    for bad in ("ftp://example.com/", "/relative", "https://example.com:99999/"):
        with pytest.raises(ValueError):
            normalize_htu(bad)


def test_stale_and_future_iat(verifier: DpopVerifier, key: DpopKey, clock: Clock) -> None:
    now = int(clock())
    stale = key.proof("GET", URL, access_token=TOKEN, iat=now - 120)
    assert refused(verifier, stale).reason == "proof iat is too old"
    future = key.proof("GET", URL, access_token=TOKEN, iat=now + 120)
    assert refused(verifier, future).reason == "proof iat is in the future"
    edge = key.proof("GET", URL, access_token=TOKEN, iat=now - 55)
    assert verifier.verify(edge, method="GET", url=URL, access_token=TOKEN)


def test_missing_and_wrong_ath(verifier: DpopVerifier, key: DpopKey) -> None:
    assert refused(verifier, key.proof("GET", URL)).reason == "missing ath"
    other = key.proof("GET", URL, access_token=TOKEN + "x")
    assert refused(verifier, other).reason == "ath does not match the access token"


def test_ath_is_base64url_sha256_of_the_token() -> None:
    expected = b64(hashlib.sha256(TOKEN.encode()).digest())
    assert access_token_hash(TOKEN) == expected


# -- malformed and hostile proofs ----------------------------------------------------


def test_private_key_in_jwk_header(verifier: DpopVerifier, clock: Clock) -> None:
    ec = ECKey.generate_key("P-256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(ec.as_dict(private=True))}
    proof = jwt.encode(header, payload(clock), ec, algorithms=["ES256"])
    assert refused(verifier, proof).reason == "jwk header contains a private key"


def test_missing_jwk_and_wrong_curve(verifier: DpopVerifier, clock: Clock) -> None:
    ec = ECKey.generate_key("P-256")
    proof = jwt.encode(
        {"typ": "dpop+jwt", "alg": "ES256"}, payload(clock), ec, algorithms=["ES256"]
    )
    assert refused(verifier, proof).reason == "missing jwk header"
    p384 = ECKey.generate_key("P-384")
    header = {"typ": "dpop+jwt", "alg": "ES384", "jwk": dict(p384.as_dict(private=False))}
    proof = jwt.encode(header, payload(clock), p384, algorithms=["ES384"])
    assert refused(verifier, proof).reason == "unsupported alg"
    # ES256 claimed, but the header's key is an Ed25519 one.
    okp = OKPKey.generate_key("Ed25519")
    forged_header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(okp.as_dict(private=False))}
    proof = jwt.encode(forged_header, payload(clock), ec, algorithms=["ES256"])
    assert refused(verifier, proof).reason == "ES256 requires a EC P-256 jwk"


def test_signed_by_another_key_than_the_header_names(
    verifier: DpopVerifier, key: DpopKey, clock: Clock
) -> None:
    attacker = ECKey.generate_key("P-256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.public_jwk}
    proof = jwt.encode(header, payload(clock), attacker, algorithms=["ES256"])
    assert refused(verifier, proof).reason == "bad signature"


def test_hs256_and_none_proofs(verifier: DpopVerifier, key: DpopKey, clock: Clock) -> None:
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": key.public_jwk}
    signing_input = f"{b64json(header)}.{b64json(payload(clock))}"
    secret = json.dumps(key.public_jwk).encode()
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert refused(verifier, f"{signing_input}.{b64(mac)}").reason == "unsupported alg"
    none = {"typ": "dpop+jwt", "alg": "none", "jwk": key.public_jwk}
    assert refused(verifier, f"{b64json(none)}.{b64json(payload(clock))}.").reason == (
        "unsupported alg"
    )


def test_wrong_typ(verifier: DpopVerifier, clock: Clock) -> None:
    ec = ECKey.generate_key("P-256")
    public = dict(ec.as_dict(private=False))
    proof = jwt.encode({"typ": "JWT", "alg": "ES256", "jwk": public}, payload(clock), ec)
    assert refused(verifier, proof).reason == "typ is not dpop+jwt"


def test_missing_claims(verifier: DpopVerifier, clock: Clock) -> None:
    ec = ECKey.generate_key("P-256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(ec.as_dict(private=False))}
    for claim, reason in (("jti", "missing jti"), ("iat", "missing iat")):
        proof = jwt.encode(header, payload(clock, **{claim: None}), ec, algorithms=["ES256"])
        assert refused(verifier, proof).reason == reason
    proof = jwt.encode(header, payload(clock, htm=None), ec, algorithms=["ES256"])
    assert refused(verifier, proof).reason == "htm does not match the request method"


def test_oversized_and_malformed(verifier: DpopVerifier, key: DpopKey) -> None:
    assert refused(verifier, "a" * 5000).reason == "proof too large"
    assert refused(verifier, "a.b").reason == "not a compact JWS"
    assert refused(verifier, "a.b.c").reason == "not a compact JWS"
    proof = key.proof("GET", URL, access_token=TOKEN)
    h, p, s = proof.split(".")
    assert refused(verifier, f"{h}.{p}.{s[:-4]}AAAA").reason == "bad signature"


# -- nonces -------------------------------------------------------------------------


def test_nonce_flow(verifier: DpopVerifier, key: DpopKey, clock: Clock) -> None:
    first = key.proof("GET", URL, access_token=TOKEN, iat=int(clock()))
    error = refused(verifier, first, nonce_required=True)
    assert error.error == "use_dpop_nonce"
    assert error.nonce
    retry = key.proof("GET", URL, access_token=TOKEN, nonce=error.nonce, iat=int(clock()))
    assert verifier.verify(
        retry, method="GET", url=URL, access_token=TOKEN, nonce_required=True
    ) == (key.thumbprint)

    # The nonce still holds in the next bucket (it may have been issued just
    # before a bucket boundary)...
    clock.now += 300
    again = key.proof("GET", URL, access_token=TOKEN, nonce=error.nonce, iat=int(clock()))
    assert verifier.verify(again, method="GET", url=URL, access_token=TOKEN, nonce_required=True)
    # ...but not after that.
    clock.now += 300
    old = key.proof("GET", URL, access_token=TOKEN, nonce=error.nonce, iat=int(clock()))
    stale = refused(verifier, old, nonce_required=True)
    assert stale.error == "use_dpop_nonce"
    assert stale.nonce and stale.nonce != error.nonce


def test_nonce_from_another_secret_is_refused(key: DpopKey, clock: Clock) -> None:
    ours = DpopVerifier(MemoryReplayCache(), nonce_secret=b"a" * 32, clock=clock)
    theirs = DpopVerifier(MemoryReplayCache(), nonce_secret=b"b" * 32, clock=clock)
    proof = key.proof("GET", URL, access_token=TOKEN, nonce=theirs.new_nonce())
    with pytest.raises(InvalidDpopProof) as info:
        ours.verify(proof, method="GET", url=URL, access_token=TOKEN, nonce_required=True)
    assert info.value.error == "use_dpop_nonce"


# -- replay cache and client key ------------------------------------------------------


def test_replay_cache_expires_and_is_bounded() -> None:
    clock = Clock()
    cache = MemoryReplayCache(max_entries=3, clock=clock)
    assert cache.seen("a", clock.now + 10) is False
    assert cache.seen("a", clock.now + 10) is True
    clock.now += 11
    assert cache.seen("a", clock.now + 10) is False  # expired, so recorded afresh
    for name in ("b", "c", "d", "e"):
        cache.seen(name, clock.now + 5)
    assert len(cache) == 3


def test_replay_cache_is_thread_safe() -> None:
    cache = MemoryReplayCache()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(cache.seen("k", time.time() + 60))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] + [True] * 7


def test_dpop_key_json_round_trip(key: DpopKey, verifier: DpopVerifier) -> None:
    text = key.to_json()
    assert json.loads(text)["d"]
    again = DpopKey.from_json(text)
    assert again.thumbprint == key.thumbprint
    proof = again.proof("GET", URL, access_token=TOKEN)
    assert verifier.verify(proof, method="GET", url=URL, access_token=TOKEN) == key.thumbprint
    with pytest.raises(ValueError):
        DpopKey.from_json(json.dumps(key.public_jwk))
    with pytest.raises(ValueError):
        DpopKey.from_json("not json")


def test_jwk_thumbprint_ignores_extra_members(key: DpopKey) -> None:
    extended = {**key.public_jwk, "kid": "x", "alg": "ES256", "use": "sig"}
    assert jwk_thumbprint(extended) == key.thumbprint
    with pytest.raises(ValueError):
        jwk_thumbprint({"kty": "oct", "k": "c2VjcmV0"})
