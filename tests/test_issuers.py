"""External OIDC issuers (CHECKLIST I2): a fake IdP over real HTTP, real signatures.

The fake IdP is a FastAPI app served by uvicorn on 127.0.0.1; it publishes
OIDC discovery and a JWKS of the RS256 and ES256 keys it holds, and counts
the requests it gets per path. Attack tokens are crafted by hand (alg none,
HS256 keyed with the RSA public PEM) or signed by attacker keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from bastion.api.declare import PUBLIC_ROUTE
from bastion.identity.errors import InvalidToken
from bastion.identity.issuers import CombinedVerifier, ExternalIssuers, IssuerConfig
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer, TokenVerifier
from bastion.secrets.store import LocalKeystore
from tests.http_server import running_server
from tests.spellings import ecdsa_twin, respellings

AUDIENCE = "https://api.bastion.test"
TENANT = uuid.UUID("5b0f7c2e-4a57-4d0e-9a43-2c1f3e6b8d11")
OTHER_TENANT = uuid.UUID("0c5e9d1a-7f3b-4e21-8b6c-9d2a4f1e7c30")


class Clock:
    """A wall clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeIdP:
    """An OIDC provider's public face: discovery and a JWKS, with request counts.

    ``stall`` makes the JWKS endpoint hang that many seconds (or until
    ``release`` is set) before answering: an issuer made slow by an attacker.
    """

    def __init__(self) -> None:
        self.issuer = ""  # set once the server has a port
        self.discovery_issuer: str | None = None  # overrides "issuer" in discovery
        self.stall = 0.0
        self.release = threading.Event()
        self.keys: dict[str, RSAKey | ECKey] = {
            "rsa-1": RSAKey.generate_key(2048),
            "ec-1": ECKey.generate_key("P-256"),
        }
        self.hits: Counter[str] = Counter()
        self.app = FastAPI()
        self.app.add_api_route("/.well-known/openid-configuration", self._discovery)
        self.app.add_api_route("/jwks", self._jwks)

    def _discovery(self) -> dict[str, Any]:
        self.hits["discovery"] += 1
        return {
            "issuer": self.discovery_issuer or self.issuer,
            "jwks_uri": self.issuer + "/jwks",
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }

    def _jwks(self) -> Response:
        self.hits["jwks"] += 1
        if self.stall:  # a plain def: FastAPI runs it in a thread, the server goes on
            self.release.wait(self.stall)
        keys = [
            {**key.as_dict(private=False), "kid": kid, "use": "sig"}
            for kid, key in self.keys.items()
        ]
        return Response(json.dumps({"keys": keys}), media_type="application/jwk-set+json")

    def sign(self, payload: dict[str, Any], kid: str = "rsa-1", **header: Any) -> str:
        """Return a JWT signed by this IdP's key ``kid`` (alg from the key type)."""
        key = self.keys[kid]
        alg = header.pop("alg", "RS256" if isinstance(key, RSAKey) else "ES256")
        header = {"alg": alg, "typ": "JWT", "kid": kid, **header}
        return jwt.encode(header, payload, key, algorithms=[alg])

    def reset(self) -> None:
        self.hits.clear()
        self.discovery_issuer = None
        self.stall = 0.0
        self.release = threading.Event()
        self.keys = {kid: key for kid, key in self.keys.items() if kid in ("rsa-1", "ec-1")}


@pytest.fixture(scope="module")
def idp_server() -> Iterator[FakeIdP]:
    idp = FakeIdP()
    with running_server(idp.app) as base_url:
        idp.issuer = base_url
        yield idp


@pytest.fixture
def idp(idp_server: FakeIdP) -> FakeIdP:
    idp_server.reset()
    return idp_server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=2.0) as client:
        yield client


def config(idp: FakeIdP, **changes: Any) -> IssuerConfig:
    return IssuerConfig(issuer=idp.issuer, audience=AUDIENCE, **changes)


@pytest.fixture
def verifier(idp: FakeIdP, clock: Clock, http: httpx.Client) -> Iterator[ExternalIssuers]:
    """A verifier whose keys were fetched at start (as the api does), hits reset."""
    verifier = ExternalIssuers([config(idp)], http=http, clock=clock)
    verifier.refresh()
    idp.hits.clear()
    yield verifier
    assert verifier.settle(10)


def claims(idp: FakeIdP, clock: Clock, **changes: Any) -> dict[str, Any]:
    now = int(clock())
    base: dict[str, Any] = {
        "iss": idp.issuer,
        "aud": [AUDIENCE, "account"],
        "sub": "user-42",
        "exp": now + 300,
        "iat": now,
        "nbf": now,
        "jti": "jti-1",
        "tenant_id": str(TENANT),
        "roles": ["contributor", "superuser"],
        "amr": ["pwd", "mfa"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def refused(verifier: ExternalIssuers | CombinedVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    return info.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def user_uuid(issuer: str, sub: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, issuer + "#" + sub)


# -- happy paths ----------------------------------------------------------------------


def test_rs256_token_verifies_with_tenant_and_roles(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    token = idp.sign(claims(idp, clock, scope="read write"))
    result = verifier.verify(token)
    assert result.iss == idp.issuer
    assert result.aud == AUDIENCE
    assert result.tenant_id == TENANT
    assert result.roles == ("contributor",)  # "superuser" is not a Bastion role
    assert result.amr == ("pwd", "mfa")
    assert result.sub == user_uuid(idp.issuer, "user-42")
    assert result.jti == "jti-1"
    assert result.jkt is None
    assert result.scope == "read write"
    # Cached at start: verifying does no I/O.
    verifier.verify(idp.sign(claims(idp, clock, jti="jti-2")))
    assert verifier.settle(5)
    assert (idp.hits["discovery"], idp.hits["jwks"]) == (0, 0)


def test_es256_keycloak_style_roles_and_tenant_map(
    idp: FakeIdP, clock: Clock, http: httpx.Client
) -> None:
    keycloak = config(
        idp,
        tenant_claim="org.id",
        tenant_map={"acme": TENANT},
        roles_claim="realm_access.roles",
        role_map={"bastion-admin": "owner", "bastion-read": "viewer"},
    )
    verifier = ExternalIssuers([keycloak], http=http, clock=clock)
    verifier.refresh()
    payload = claims(
        idp,
        clock,
        tenant_id=None,
        roles=None,
        jti=None,
        amr="pwd",  # not a list: dropped, not trusted
        org={"id": "acme"},
        realm_access={"roles": ["offline_access", "bastion-read", "bastion-admin", "owner"]},
    )
    token = idp.sign(payload, kid="ec-1")
    result = verifier.verify(token)
    assert result.tenant_id == TENANT
    # Mapped names only, in token order; "owner" itself is unmapped, so dropped.
    assert result.roles == ("viewer", "owner")
    assert result.amr == ()
    # Without a jti, the token is named by what was signed: its other valid
    # spelling (an ES256 signature (r, s) verifies as (r, n - s) too) is the
    # same token, with the same jti.
    signed, _, signature = token.rpartition(".")
    assert result.jti == "sha256:" + hashlib.sha256(signed.encode()).hexdigest()
    assert verifier.verify(f"{signed}.{ecdsa_twin(signature)}").jti == result.jti
    # Any other base64url spelling of any part is refused (joserfc decodes strictly).
    parts = token.split(".")
    for index, part in enumerate(parts):
        for name, variant in respellings(part).items():
            respelt = ".".join([*parts[:index], variant, *parts[index + 1 :]])
            with pytest.raises(InvalidToken):
                verifier.verify(respelt)
            assert name


def test_cnf_jkt_passes_through(idp: FakeIdP, verifier: ExternalIssuers, clock: Clock) -> None:
    token = idp.sign(claims(idp, clock, cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}))
    assert verifier.verify(token).jkt == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    assert refused(verifier, idp.sign(claims(idp, clock, cnf={"jkt": 7}))) == "malformed cnf"


# -- algorithm and header attacks -----------------------------------------------------


def test_alg_none_is_refused(idp: FakeIdP, verifier: ExternalIssuers, clock: Clock) -> None:
    token = f"{b64json({'alg': 'none', 'kid': 'rsa-1'})}.{b64json(claims(idp, clock))}."
    assert refused(verifier, token) == "unsupported alg"
    assert idp.hits["jwks"] == 0  # refused before any key was looked up


def test_hs256_keyed_with_the_rsa_public_pem_is_refused(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    pem = idp.keys["rsa-1"].as_pem(private=False)
    signing_input = f"{b64json({'alg': 'HS256', 'kid': 'rsa-1'})}.{b64json(claims(idp, clock))}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert refused(verifier, f"{signing_input}.{b64(mac)}") == "unsupported alg"


def test_alg_outside_the_allow_list_is_refused(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock, http: httpx.Client
) -> None:
    # PS256 is a fine algorithm and the key is the IdP's own, but not allowed here.
    token = idp.sign(claims(idp, clock), alg="PS256")
    assert refused(verifier, token) == "unsupported alg"
    # And a key type that does not match the alg is no use either.
    rs_verifier = ExternalIssuers([config(idp, algorithms=("RS256",))], http=http, clock=clock)
    assert refused(rs_verifier, idp.sign(claims(idp, clock), kid="ec-1")) == "unsupported alg"


def test_jku_to_an_attacker_server_is_refused_without_contacting_it(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    attacker = FakeIdP()
    with running_server(attacker.app) as attacker_url:
        attacker.issuer = attacker_url
        attacker.keys["rsa-1"] = RSAKey.generate_key(2048)
        token = attacker.sign(
            claims(idp, clock), kid="rsa-1", jku=attacker_url + "/jwks", x5u=attacker_url
        )
        assert refused(verifier, token).startswith("forbidden header")
        jwk_token = attacker.sign(
            claims(idp, clock), jwk=attacker.keys["rsa-1"].as_dict(private=False)
        )
        assert refused(verifier, jwk_token) == "forbidden header jwk"
    assert sum(attacker.hits.values()) == 0


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"crit": ["exp"]}, "forbidden header crit"),
        ({"x5c": ["MIIB"]}, "forbidden header x5c"),
        ({"typ": "dpop+jwt"}, "typ is not an access token type"),
        ({"kid": None}, "missing kid"),
    ],
)
def test_unsafe_headers_are_refused(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock, header: dict[str, Any], reason: str
) -> None:
    payload = b64json(claims(idp, clock))
    base = {"alg": "RS256", "kid": "rsa-1", **header}
    signing_input = f"{b64json({k: v for k, v in base.items() if v is not None})}.{payload}"
    assert refused(verifier, f"{signing_input}.{b64(b'sig')}") == reason
    assert idp.hits["jwks"] == 0


def test_forged_signature_with_the_idps_kid_is_refused(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    forger = RSAKey.generate_key(2048)
    token = jwt.encode({"alg": "RS256", "kid": "rsa-1"}, claims(idp, clock), forger)
    assert refused(verifier, token) == "bad signature"


def test_payload_changed_after_signing_is_refused(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    header, _, signature = idp.sign(claims(idp, clock)).split(".")
    tampered = b64json(claims(idp, clock, tenant_id=str(OTHER_TENANT), roles=["owner"]))
    assert refused(verifier, f"{header}.{tampered}.{signature}") == "bad signature"


# -- claim checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"aud": "https://other.api"}, "wrong audience"),
        ({"aud": ["account"]}, "wrong audience"),
        ({"exp": -60}, "token expired"),
        ({"nbf": 600}, "token not yet valid"),
        ({"iat": 600}, "token issued in the future"),
        ({"exp": None}, "missing exp"),
        ({"sub": None}, "missing sub"),
        ({"sub": ""}, "missing sub"),
        ({"tenant_id": None}, "missing tenant"),
        ({"tenant_id": "not-a-uuid"}, "malformed tenant"),
        ({"tenant_id": str(TENANT).upper()}, "malformed tenant"),
        ({"roles": "owner"}, "roles is not a list of strings"),
    ],
)
def test_claims_are_checked(
    idp: FakeIdP,
    verifier: ExternalIssuers,
    clock: Clock,
    changes: dict[str, Any],
    reason: str,
) -> None:
    now = int(clock())
    # Times are given relative to now; None removes the claim.
    changes = {
        k: now + v if k in ("exp", "nbf", "iat") and v is not None else v
        for k, v in changes.items()
    }
    assert refused(verifier, idp.sign(claims(idp, clock, **changes))) == reason


def test_wrong_issuer_is_refused(idp: FakeIdP, verifier: ExternalIssuers, clock: Clock) -> None:
    # Signed by the IdP's real key, but naming another issuer: routing fails first.
    token = idp.sign(claims(idp, clock, iss="https://evil.example"))
    assert refused(verifier, token) == "unknown issuer"
    # A trailing-slash variant is another issuer too (exact comparison).
    token = idp.sign(claims(idp, clock, iss=idp.issuer + "/"))
    assert refused(verifier, token) == "unknown issuer"


def test_tenant_not_in_tenant_map_is_refused(
    idp: FakeIdP, clock: Clock, http: httpx.Client
) -> None:
    verifier = ExternalIssuers([config(idp, tenant_map={"acme": TENANT})], http=http, clock=clock)
    verifier.refresh()
    assert verifier.verify(idp.sign(claims(idp, clock, tenant_id="acme"))).tenant_id == TENANT
    assert refused(verifier, idp.sign(claims(idp, clock, tenant_id="globex"))) == (
        "tenant not mapped"
    )
    # With a map, even a well-formed tenant UUID is not taken at face value.
    token = idp.sign(claims(idp, clock, tenant_id=str(OTHER_TENANT)))
    assert refused(verifier, token) == "tenant not mapped"


# -- key fetching ---------------------------------------------------------------------


def test_random_kids_cause_at_most_one_refetch_per_interval(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    verifier.verify(idp.sign(claims(idp, clock)))
    clock.advance(31)  # past min_refetch_interval: one refetch is now allowed
    key = idp.keys["rsa-1"]
    for _ in range(20):
        kid = secrets.token_urlsafe(8)
        token = jwt.encode({"alg": "RS256", "kid": kid}, claims(idp, clock), key)
        assert refused(verifier, token) == "unknown kid"
    assert verifier.settle(5)
    assert idp.hits["jwks"] == 1
    assert idp.hits["discovery"] == 0  # a kid miss refetches the JWKS only


def test_unknown_kid_is_refused_at_once_while_a_slow_issuer_is_refetched(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    """A made-up kid never waits for the issuer (which takes 5 s to answer here):
    refused in milliseconds, while one background refetch waits for the issuer."""
    clock.advance(31)
    idp.stall = 5.0
    key = idp.keys["rsa-1"]
    took = []
    for _ in range(10):
        token = jwt.encode(
            {"alg": "RS256", "kid": secrets.token_urlsafe(8)}, claims(idp, clock), key
        )
        started = time.perf_counter()
        assert refused(verifier, token) == "unknown kid"
        took.append(time.perf_counter() - started)
    # Known keys keep verifying meanwhile, as fast.
    started = time.perf_counter()
    assert verifier.verify(idp.sign(claims(idp, clock))).tenant_id == TENANT
    took.append(time.perf_counter() - started)
    assert max(took) < 0.1, took
    deadline = time.monotonic() + 5
    while idp.hits["jwks"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not verifier.settle(0.05)  # the refetch is still waiting for the issuer
    idp.release.set()
    assert verifier.settle(5)
    assert idp.hits["jwks"] == 1  # one refetch for the ten kids


def test_key_rotation_is_picked_up_by_a_refetch(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock
) -> None:
    verifier.verify(idp.sign(claims(idp, clock)))
    idp.keys["rsa-2"] = RSAKey.generate_key(2048)
    del idp.keys["rsa-1"]
    # Within the interval of the last fetch the new kid is not fetched for...
    assert refused(verifier, idp.sign(claims(idp, clock), kid="rsa-2")) == "unknown kid"
    assert verifier.settle(5)
    assert idp.hits["jwks"] == 0
    clock.advance(31)
    # ...after it, the first token is refused at once and a refetch brings it in.
    assert refused(verifier, idp.sign(claims(idp, clock), kid="rsa-2")) == "unknown kid"
    assert verifier.settle(5)
    assert verifier.verify(idp.sign(claims(idp, clock), kid="rsa-2")).tenant_id == TENANT
    assert idp.hits["jwks"] == 1
    # The retired key was dropped with the old JWKS.
    idp.keys["rsa-1"] = RSAKey.generate_key(2048)
    assert refused(verifier, idp.sign(claims(idp, clock), kid="rsa-1")) == "unknown kid"


def test_keys_expire_after_the_ttl(idp: FakeIdP, verifier: ExternalIssuers, clock: Clock) -> None:
    verifier.verify(idp.sign(claims(idp, clock)))
    clock.advance(301)
    idp.keys.pop("rsa-1")
    idp.keys["rsa-1"] = RSAKey.generate_key(2048)  # same kid, new key
    # Stale keys answer while the refetch (discovery too: it is as old) runs.
    assert refused(verifier, idp.sign(claims(idp, clock))) == "bad signature"
    assert verifier.settle(5)
    assert verifier.verify(idp.sign(claims(idp, clock))).tenant_id == TENANT
    assert (idp.hits["discovery"], idp.hits["jwks"]) == (1, 1)


def test_discovery_with_another_issuer_is_refused(
    idp: FakeIdP, clock: Clock, http: httpx.Client
) -> None:
    idp.discovery_issuer = "https://evil.example"
    verifier = ExternalIssuers([config(idp)], http=http, clock=clock)
    with pytest.raises(InvalidToken):
        verifier.refresh()
    assert refused(verifier, idp.sign(claims(idp, clock))) == "issuer keys unavailable"
    assert verifier.settle(5)
    assert idp.hits["jwks"] == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_idp_down_with_nothing_cached_fails_closed(clock: Clock, http: httpx.Client) -> None:
    down = IssuerConfig(issuer=f"http://127.0.0.1:{free_port()}", audience=AUDIENCE)
    verifier = ExternalIssuers([down], http=http, clock=clock)
    key = RSAKey.generate_key(2048)
    payload = {
        "iss": down.issuer,
        "aud": AUDIENCE,
        "sub": "u",
        "exp": int(clock()) + 60,
        "iat": int(clock()),
        "tenant_id": str(TENANT),
    }
    token = jwt.encode({"alg": "RS256", "kid": "k"}, payload, key)
    assert refused(verifier, token) == "issuer keys unavailable"
    assert verifier.settle(5)
    assert refused(verifier, token) == "issuer keys unavailable"  # the refetch failed too
    with pytest.raises(InvalidToken):
        verifier.refresh()


def test_idp_down_after_keys_were_cached_still_verifies(clock: Clock, http: httpx.Client) -> None:
    idp = FakeIdP()
    with running_server(idp.app) as base_url:
        idp.issuer = base_url
        verifier = ExternalIssuers([config(idp)], http=http, clock=clock)
        verifier.refresh()
    # The server is gone now. Past the TTL the refetch fails; the cache still serves.
    clock.advance(3600)
    assert verifier.verify(idp.sign(claims(idp, clock))).tenant_id == TENANT
    assert verifier.settle(5)
    assert verifier.verify(idp.sign(claims(idp, clock))).tenant_id == TENANT
    # But not forever: past the 24 h hard expiry the keys are no longer trusted.
    clock.advance(24 * 3600)
    assert refused(verifier, idp.sign(claims(idp, clock))) == "issuer keys unavailable"


def test_oversized_jwks_is_refused(clock: Clock, http: httpx.Client) -> None:
    idp = FakeIdP()
    idp.app.router.routes = [r for r in idp.app.router.routes if getattr(r, "path", "") != "/jwks"]
    idp.app.add_api_route(
        "/jwks", lambda: Response(b'{"keys": [], "pad": "' + b"x" * (1 << 20) + b'"}')
    )
    with running_server(idp.app) as base_url:
        idp.issuer = base_url
        verifier = ExternalIssuers([config(idp)], http=http, clock=clock)
        with pytest.raises(InvalidToken):
            verifier.refresh()
        assert refused(verifier, idp.sign(claims(idp, clock))) == "issuer keys unavailable"


def test_two_issuers_with_the_same_sub_are_different_users(
    idp: FakeIdP, clock: Clock, http: httpx.Client
) -> None:
    other = FakeIdP()
    with running_server(other.app) as other_url:
        other.issuer = other_url
        verifier = ExternalIssuers([config(idp), config(other)], http=http, clock=clock)
        verifier.refresh()
        first = verifier.verify(idp.sign(claims(idp, clock, sub="alice")))
        second = verifier.verify(other.sign(claims(other, clock, sub="alice")))
        # Each issuer's keys only verify its own tokens.
        forged = other.sign(claims(idp, clock, sub="alice"))
        assert refused(verifier, forged) == "bad signature"
    assert first.sub != second.sub
    assert first.sub == user_uuid(idp.issuer, "alice")
    assert second.sub == user_uuid(other.issuer, "alice")


# -- routing --------------------------------------------------------------------------


def test_combined_verifier_routes_by_issuer(
    idp: FakeIdP, verifier: ExternalIssuers, clock: Clock, tmp_path: Path
) -> None:
    local_iss = "https://id.bastion.test"
    keystore = LocalKeystore(tmp_path / "keystore.bin", tmp_path / "master.key")
    keys = SigningKeys(keystore, clock=clock)
    local = TokenVerifier(keys, issuer=local_iss, audience=AUDIENCE, clock=clock)
    combined = CombinedVerifier(local, verifier)
    issuer = TokenIssuer(keys, issuer=local_iss, audience=AUDIENCE, clock=clock)
    user = uuid.uuid4()
    ours, _ = issuer.issue_access(
        user_id=user, tenant_id=TENANT, roles=["owner"], amr=["pwd"], jkt="abc"
    )
    local_claims = combined.verify(ours)
    assert (local_claims.iss, local_claims.sub) == (local_iss, user)
    theirs = combined.verify(idp.sign(claims(idp, clock)))
    assert (theirs.iss, theirs.sub) == (idp.issuer, user_uuid(idp.issuer, "user-42"))
    stranger = RSAKey.generate_key(2048)
    token = jwt.encode(
        {"alg": "RS256", "kid": "rsa-1"}, claims(idp, clock, iss="https://evil.example"), stranger
    )
    assert refused(combined, token) == "unknown issuer"
    assert refused(combined, "not.a.token") == "not a compact JWS"
    with pytest.raises(ValueError):
        CombinedVerifier(local, ExternalIssuers([IssuerConfig(local_iss, AUDIENCE)]))


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"algorithms": ("HS256",)},
        {"algorithms": ("none",)},
        {"algorithms": ("RS256", "HS512")},
        {"algorithms": ()},
        {"algorithms": ("XX999",)},
        {"issuer": "http://idp.example.com"},
        {"issuer": "https://user:pw@idp.example.com"},
        {"audience": ""},
        {"role_map": {"admin": "root"}},
        {"tenant_claim": ""},
    ],
)
def test_unsafe_config_is_refused(changes: dict[str, Any]) -> None:
    base: dict[str, Any] = {"issuer": "https://idp.example.com/realms/x", "audience": AUDIENCE}
    with pytest.raises(ValueError):
        IssuerConfig(**{**base, **changes})


def test_config_maps_are_copied() -> None:
    tenants = {"acme": TENANT}
    cfg = IssuerConfig("https://idp.example.com", AUDIENCE, tenant_map=tenants)
    tenants["globex"] = OTHER_TENANT
    assert "globex" not in cfg.tenant_map
    assert cfg.discovery_url == "https://idp.example.com/.well-known/openid-configuration"


# -- through the api's request authentication, over real HTTP ---------------------------


def test_external_tokens_through_the_authenticator(idp: FakeIdP, http: httpx.Client) -> None:
    """Bearer external tokens pass; bound ones need their proof; no role, no entry."""
    from fastapi import APIRouter, Depends

    from bastion.api.app import create_app
    from bastion.identity.auth import Authenticator, Principal
    from bastion.identity.dpop import DpopKey, DpopVerifier, MemoryReplayCache

    ours = "http://127.0.0.1:1"  # our own issuer: never the external one
    verifier = ExternalIssuers([config(idp)], http=http)
    verifier.refresh()
    authenticator = Authenticator(verifier, DpopVerifier(MemoryReplayCache()), ours)
    router = APIRouter()

    @router.get("/whoami", **PUBLIC_ROUTE)
    async def whoami(principal: Principal = Depends(authenticator)) -> dict[str, Any]:
        return {"tenant": str(principal.tenant_id), "roles": list(principal.roles)}

    clock = Clock()
    with running_server(create_app(extra_routers=[router])) as base:
        bearer = idp.sign(claims(idp, clock))
        ok = http.get(f"{base}/whoami", headers={"Authorization": f"Bearer {bearer}"})
        assert ok.status_code == 200
        assert ok.json() == {"tenant": str(TENANT), "roles": ["contributor"]}

        key = DpopKey.generate()
        bound = idp.sign(claims(idp, clock, cnf={"jkt": key.thumbprint}, jti="jti-bound"))
        as_bearer = http.get(f"{base}/whoami", headers={"Authorization": f"Bearer {bound}"})
        assert as_bearer.status_code == 401
        # htu is built from our configured issuer, as behind a proxy.
        proof = key.proof("GET", f"{ours}/whoami", access_token=bound)
        with_proof = http.get(
            f"{base}/whoami", headers={"Authorization": f"DPoP {bound}", "DPoP": proof}
        )
        assert with_proof.status_code == 200

        roleless = idp.sign(claims(idp, clock, roles=["superuser"], jti="jti-roleless"))
        refused_role = http.get(f"{base}/whoami", headers={"Authorization": f"Bearer {roleless}"})
        assert refused_role.status_code == 403


def test_unknown_kid_storm_against_a_slow_issuer_does_not_stall_the_api(idp: FakeIdP) -> None:
    """Issue 23 A3: anonymous tokens naming our external issuer with made-up kids,
    while that issuer takes 5 s to serve its JWKS, cost the api nothing.

    Over real HTTP (uvicorn on 127.0.0.1, the verifier's own 5 s client): while
    8 attackers send made-up kids, a victim's /healthz and authenticated
    requests are answered within 250 ms (p90; every one within 1 s), each attack
    is refused with 401 within 100 ms (p50) / 1 s (max), and the issuer sees one refetch.
    Before the fix the first made-up kid froze the event loop for 5 s.
    """
    from fastapi import APIRouter, Depends

    from bastion.api.app import create_app
    from bastion.identity.auth import Authenticator, Principal
    from bastion.identity.dpop import DpopVerifier, MemoryReplayCache

    clock = Clock()
    verifier = ExternalIssuers([config(idp)], clock=clock)  # production's 5 s client
    verifier.refresh()
    authenticator = Authenticator(verifier, DpopVerifier(MemoryReplayCache()), "http://127.0.0.1:1")
    router = APIRouter()

    @router.get("/whoami", **PUBLIC_ROUTE)
    async def whoami(principal: Principal = Depends(authenticator)) -> dict[str, Any]:
        return {"tenant": str(principal.tenant_id)}

    clock.advance(31)  # a refetch is due: the next unknown kid may trigger one
    idp.stall = 5.0
    key = idp.keys["rsa-1"]
    legit = {"Authorization": f"Bearer {idp.sign(claims(idp, clock))}"}
    # The attack lasts 1.5 s, longer on a loaded machine until the victim has asked
    # 20 times (at most 10 s): the bound is on each answer, not on the machine's speed.
    attack_min, attack_max = time.monotonic() + 1.5, time.monotonic() + 10
    stop = threading.Event()
    victim: list[float] = []
    attacks: list[tuple[int, float]] = []

    def victim_loop(base: str) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not stop.is_set():
                now = time.monotonic()
                if now >= attack_max or (now >= attack_min and len(victim) >= 20):
                    stop.set()
                for path, headers in (("/healthz", {}), ("/whoami", legit)):
                    started = time.perf_counter()
                    try:
                        ok = client.get(base + path, headers=headers).status_code == 200
                    except httpx.TimeoutException:
                        ok = False
                    victim.append(time.perf_counter() - started if ok else float("inf"))
                time.sleep(0.01)

    def attacker(base: str) -> None:
        with httpx.Client(timeout=10.0) as client:
            while not stop.is_set():
                kid = secrets.token_urlsafe(8)
                token = jwt.encode({"alg": "RS256", "kid": kid}, claims(idp, clock), key)
                started = time.perf_counter()
                response = client.get(
                    base + "/whoami", headers={"Authorization": f"Bearer {token}"}
                )
                attacks.append((response.status_code, time.perf_counter() - started))

    try:
        with running_server(create_app(extra_routers=[router])) as base:
            threads = [threading.Thread(target=victim_loop, args=(base,))]
            threads += [threading.Thread(target=attacker, args=(base,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(15)
            jwks_hits = idp.hits["jwks"]
            idp.release.set()
    finally:
        idp.release.set()
        assert verifier.settle(10)
        verifier.close()
    victim.sort()
    # The stall this guards against is 5 s; on a loaded 2-core box one answer may
    # wait behind a busy core, so the bound is on the p90 and a max far below 5 s.
    p90, worst = victim[len(victim) * 9 // 10], victim[-1]
    assert p90 < 0.25 and worst < 1.0, f"victim p90 {p90:.3f}s, max {worst:.3f}s"
    assert len(victim) >= 20  # the victim kept asking throughout the attack
    assert attacks and {status for status, _ in attacks} == {401}
    times = sorted(took for _, took in attacks)
    assert times[len(times) // 2] < 0.1 and times[-1] < 1.0, times[-5:]
    assert jwks_hits == 2  # the fetch at start, then one refetch for every made-up kid
