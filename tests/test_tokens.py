"""Access tokens: the JWT attack suite, key rotation and a mutation property test.

Real keys in a real keystore, real ES256 signatures; attack tokens are crafted
by hand (alg none, HS256 keyed with our public PEM) or signed by attacker keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey

from bastion.identity.errors import InvalidToken
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import MAX_LIFETIME, AccessClaims, TokenIssuer, TokenVerifier
from bastion.secrets.store import LocalKeystore

ISSUER = "https://id.bastion.test"
AUDIENCE = "https://api.bastion.test"


class Clock:
    """A wall clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta.total_seconds()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


@pytest.fixture
def keystore(tmp_path: Path) -> LocalKeystore:
    return LocalKeystore(tmp_path / "keys" / "keystore.bin", tmp_path / "keys" / "master.key")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(keystore: LocalKeystore, clock: Clock) -> SigningKeys:
    return SigningKeys(keystore, clock=clock)


@pytest.fixture
def issuer(keys: SigningKeys, clock: Clock) -> TokenIssuer:
    return TokenIssuer(keys, issuer=ISSUER, audience=AUDIENCE, clock=clock)


@pytest.fixture
def verifier(keys: SigningKeys, clock: Clock) -> TokenVerifier:
    return TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE, clock=clock)


def claims(clock: Clock, **changes: Any) -> dict[str, Any]:
    now = int(clock())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(uuid.uuid4()),
        "tenant_id": str(uuid.uuid4()),
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "jti": "j-1",
        "roles": ["member"],
        "amr": ["pwd"],
        "scope": "",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: ECKey, payload: dict[str, Any], **header: Any) -> str:
    """Sign with joserfc, the header defaulting to a well-formed access token's."""
    return jwt.encode(
        {"alg": "ES256", "typ": "at+jwt", **header}, payload, key, algorithms=["ES256"]
    )


def ours(keys: SigningKeys, payload: dict[str, Any], **header: Any) -> str:
    """A token signed by our own current key (for claim-level attacks)."""
    kid, key = keys.current()
    return sign(key, payload, **{"kid": kid, **header})


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    return info.value.reason


# -- happy path ---------------------------------------------------------------------


def test_round_trip_with_cnf_jkt(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    user, tenant = uuid.uuid4(), uuid.uuid4()
    token, issued = issuer.issue_access(
        user_id=user,
        tenant_id=tenant,
        roles=["admin"],
        amr=["pwd", "otp"],
        jkt="thumb",
        scope="a b",
    )
    got = verifier.verify(token)
    assert got == issued
    assert isinstance(got, AccessClaims)
    assert (got.sub, got.tenant_id, got.roles, got.amr) == (
        user,
        tenant,
        ("admin",),
        ("pwd", "otp"),
    )
    assert got.jkt == "thumb"
    assert got.scope == "a b"
    assert got.exp - got.iat == 15 * 60
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256" and header["kid"]
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["cnf"] == {"jkt": "thumb"}
    assert payload["aud"] == AUDIENCE and payload["iss"] == ISSUER


def test_unbound_token_has_no_jkt(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issuer.issue_access(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), roles=[], amr=["pwd"], jkt=None
    )
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert "cnf" not in payload
    assert verifier.verify(token).jkt is None


def test_id_token_has_client_audience_and_is_not_an_access_token(
    issuer: TokenIssuer, verifier: TokenVerifier, keys: SigningKeys
) -> None:
    id_token = issuer.issue_id_token(
        user_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        client_id="cli",
        nonce="n-1",
        auth_time=1_700_000_000,
        amr=["pwd"],
    )
    kid = json.loads(base64.urlsafe_b64decode(id_token.split(".")[0] + "=="))["kid"]
    public = keys.public_key(kid)
    assert public is not None
    decoded = jwt.decode(id_token, public, algorithms=["ES256"])
    assert decoded.claims["aud"] == "cli"
    assert decoded.claims["nonce"] == "n-1"
    assert decoded.claims["auth_time"] == 1_700_000_000
    assert refused(verifier, id_token) == "typ is not at+jwt"


# -- the attack suite ---------------------------------------------------------------


def test_alg_none_is_refused(verifier: TokenVerifier, keys: SigningKeys, clock: Clock) -> None:
    kid, _ = keys.current()
    token = f"{b64json({'alg': 'none', 'typ': 'at+jwt', 'kid': kid})}.{b64json(claims(clock))}."
    assert refused(verifier, token) == "unsupported alg"
    # Also with the capitalisation tricks some libraries fell for.
    token = f"{b64json({'alg': 'None', 'typ': 'at+jwt', 'kid': kid})}.{b64json(claims(clock))}."
    assert refused(verifier, token) == "unsupported alg"


def test_hs256_keyed_with_our_public_pem_is_refused(
    verifier: TokenVerifier, keys: SigningKeys, clock: Clock
) -> None:
    kid, _ = keys.current()
    public = keys.public_key(kid)
    assert public is not None
    pem = public.as_pem()
    signing_input = (
        f"{b64json({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{b64json(claims(clock))}"
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert refused(verifier, f"{signing_input}.{b64(mac)}") == "unsupported alg"


def test_unknown_kid(verifier: TokenVerifier, clock: Clock) -> None:
    attacker = ECKey.generate_key("P-256")
    assert refused(verifier, sign(attacker, claims(clock), kid="no-such-kid")) == "unknown kid"


@pytest.mark.parametrize("kid", ["../../etc/passwd", "' OR 1=1 --", "/dev/zero", "x" * 300])
def test_hostile_kid_is_just_unknown(verifier: TokenVerifier, clock: Clock, kid: str) -> None:
    attacker = ECKey.generate_key("P-256")
    assert refused(verifier, sign(attacker, claims(clock), kid=kid)) == "unknown kid"


def test_missing_kid(verifier: TokenVerifier, clock: Clock) -> None:
    attacker = ECKey.generate_key("P-256")
    assert refused(verifier, sign(attacker, claims(clock))) == "missing kid"


@pytest.mark.parametrize("member", ["jku", "x5u"])
def test_key_url_headers_are_refused(
    verifier: TokenVerifier, keys: SigningKeys, clock: Clock, member: str
) -> None:
    attacker = ECKey.generate_key("P-256")
    url = "https://attacker.example/jwks.json"
    # Pointing elsewhere with the attacker's own kid, and with ours.
    forged = sign(attacker, claims(clock), kid=attacker.thumbprint(), **{member: url})
    assert refused(verifier, forged) == f"forbidden header {member}"
    kid, _ = keys.current()
    forged = sign(attacker, claims(clock), kid=kid, **{member: url})
    assert refused(verifier, forged) == f"forbidden header {member}"
    # Even a correctly signed token of ours is refused with such a member.
    assert refused(verifier, ours(keys, claims(clock), **{member: url})) == (
        f"forbidden header {member}"
    )


def test_embedded_jwk_and_x5c_are_refused(verifier: TokenVerifier, clock: Clock) -> None:
    attacker = ECKey.generate_key("P-256")
    public = dict(attacker.as_dict(private=False))
    forged = sign(attacker, claims(clock), kid=attacker.thumbprint(), jwk=public)
    assert refused(verifier, forged) == "forbidden header jwk"
    forged = sign(attacker, claims(clock), kid=attacker.thumbprint(), x5c=["MIIB"])
    assert refused(verifier, forged) == "forbidden header x5c"


def test_crit_header_is_refused(verifier: TokenVerifier, keys: SigningKeys, clock: Clock) -> None:
    kid, key = keys.current()
    header = {"alg": "ES256", "typ": "at+jwt", "kid": kid, "crit": ["kid"]}
    token = jwt.encode(header, claims(clock), key, algorithms=["ES256"])
    assert refused(verifier, token) == "forbidden header crit"


def test_other_key_with_our_kid_is_a_bad_signature(
    verifier: TokenVerifier, keys: SigningKeys, clock: Clock
) -> None:
    kid, _ = keys.current()
    attacker = ECKey.generate_key("P-256")
    assert refused(verifier, sign(attacker, claims(clock), kid=kid)) == "bad signature"


def test_expired(issuer: TokenIssuer, verifier: TokenVerifier, clock: Clock) -> None:
    token, _ = issuer.issue_access(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), roles=[], amr=["pwd"], jkt=None
    )
    assert verifier.verify(token).sub  # valid now (and now cached)
    clock.advance(timedelta(minutes=15, seconds=31))
    assert refused(verifier, token) == "token expired"


def test_within_leeway_is_accepted(
    keys: SigningKeys, verifier: TokenVerifier, clock: Clock
) -> None:
    now = int(clock())
    assert verifier.verify(ours(keys, claims(clock, exp=now - 10, iat=now - 600)))
    assert verifier.verify(ours(keys, claims(clock, nbf=now + 10, iat=now + 10, exp=now + 600)))


def test_nbf_and_iat_in_the_future(
    keys: SigningKeys, verifier: TokenVerifier, clock: Clock
) -> None:
    now = int(clock())
    assert refused(verifier, ours(keys, claims(clock, nbf=now + 300))) == "token not yet valid"
    future = claims(clock, iat=now + 300, nbf=None, exp=now + 900)
    assert refused(verifier, ours(keys, future)) == "token issued in the future"


def test_lifetime_over_the_maximum_is_refused(
    keys: SigningKeys, verifier: TokenVerifier, clock: Clock
) -> None:
    now = int(clock())
    payload = claims(clock, exp=now + int(MAX_LIFETIME.total_seconds()) + 60)
    assert refused(verifier, ours(keys, payload)) == "lifetime exceeds the maximum"


def test_wrong_issuer_and_audience(
    keys: SigningKeys, verifier: TokenVerifier, clock: Clock
) -> None:
    assert refused(verifier, ours(keys, claims(clock, iss="https://evil"))) == "wrong issuer"
    assert refused(verifier, ours(keys, claims(clock, aud="https://other"))) == "wrong audience"
    assert refused(verifier, ours(keys, claims(clock, aud=["https://other"]))) == "wrong audience"
    assert verifier.verify(ours(keys, claims(clock, aud=["https://other", AUDIENCE])))


def test_missing_and_malformed_claims(
    keys: SigningKeys, verifier: TokenVerifier, clock: Clock
) -> None:
    cases = {
        "missing tenant_id": claims(clock, tenant_id=None),
        "missing sub": claims(clock, sub=None),
        "missing jti": claims(clock, jti=None),
        "missing exp": claims(clock, exp=None),
        "missing iat": claims(clock, iat=None),
        "malformed tenant_id": claims(clock, tenant_id="not-a-uuid"),
        "malformed sub": claims(clock, sub="{" + str(uuid.uuid4()) + "}"),
        "roles is not a list of strings": claims(clock, roles=["admin", 1]),
        "missing roles": claims(clock, roles=None),
        "malformed cnf": claims(clock, cnf={"jkt": 5}),
        "malformed exp": claims(clock, exp="tomorrow"),
    }
    for reason, payload in cases.items():
        assert refused(verifier, ours(keys, payload)) == reason, reason
    assert refused(verifier, ours(keys, claims(clock, roles="admin"))) == (
        "roles is not a list of strings"
    )


def test_session_id_round_trips_and_is_checked(
    issuer: TokenIssuer, verifier: TokenVerifier, keys: SigningKeys, clock: Clock
) -> None:
    family = str(uuid.uuid4())
    token, _ = issuer.issue_access(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), roles=["viewer"], amr=[], jkt=None, sid=family
    )
    assert verifier.verify(token).sid == family
    for bad in (5, "", "x" * 65, [family]):
        assert refused(verifier, ours(keys, claims(clock, sid=bad))) == "malformed sid"


def test_swapped_payload_is_a_bad_signature(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    victim, _ = issuer.issue_access(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), roles=["member"], amr=["pwd"], jkt=None
    )
    admin, _ = issuer.issue_access(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), roles=["admin"], amr=["pwd"], jkt=None
    )
    h, _, s = victim.split(".")
    assert refused(verifier, f"{h}.{admin.split('.')[1]}.{s}") == "bad signature"
    # A hand-edited payload (roles escalated) likewise.
    payload = json.loads(base64.urlsafe_b64decode(victim.split(".")[1] + "=="))
    payload["roles"] = ["owner"]
    assert refused(verifier, f"{h}.{b64json(payload)}.{s}") == "bad signature"


def test_oversized_and_malformed_tokens(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issuer.issue_access(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), roles=["x" * 9000], amr=[], jkt=None
    )
    assert len(token) > 8192
    assert refused(verifier, token) == "token too long"
    assert refused(verifier, "a.b") == "not a compact JWS"
    assert refused(verifier, "a.b.c.d.e") == "not a compact JWS"
    assert refused(verifier, "...") == "not a compact JWS"
    assert refused(verifier, "é.é.é") == "not a compact JWS"


# -- key rotation -------------------------------------------------------------------


def kid_of(token: str) -> str:
    kid = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]
    assert isinstance(kid, str)
    return kid


def issue(issuer: TokenIssuer) -> str:
    token, _ = issuer.issue_access(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), roles=[], amr=["pwd"], jkt=None
    )
    return token


def test_rotation_publishes_ahead_and_keeps_old_tokens_valid(
    keystore: LocalKeystore,
    keys: SigningKeys,
    issuer: TokenIssuer,
    verifier: TokenVerifier,
    clock: Clock,
) -> None:
    old_token = issue(issuer)
    old_kid = kid_of(old_token)
    new_kid = keys.rotate()
    assert new_kid != old_kid
    # Published at once, but not signing yet: relying parties learn it first.
    assert {k["kid"] for k in keys.jwks()["keys"]} == {old_kid, new_kid}
    assert kid_of(issue(issuer)) == old_kid
    assert verifier.verify(old_token)

    clock.advance(timedelta(minutes=5, seconds=5))
    assert keys.current()[0] == new_kid
    new_token = issue(issuer)
    assert kid_of(new_token) == new_kid
    assert verifier.verify(new_token)
    assert verifier.verify(old_token)  # signed by the old key, still valid

    # Another process sharing the keystore sees the same ring.
    other = SigningKeys(keystore, clock=clock)
    assert other.public_key(new_kid) is not None and other.public_key(old_kid) is not None

    # Not retired before its last token expired...
    clock.advance(timedelta(minutes=10))
    assert keys.retire_expired() == []
    # ...and retired after.
    clock.advance(timedelta(minutes=6, seconds=2))
    assert keys.retire_expired() == [old_kid]
    assert [k["kid"] for k in keys.jwks()["keys"]] == [new_kid]
    assert keys.public_key(old_kid) is None
    versions = keystore.versions("jwt/signing")
    assert [v.state for v in versions] == ["retired", "active"]


def test_retired_key_no_longer_verifies_even_a_cached_token(
    keystore: LocalKeystore, clock: Clock
) -> None:
    keys = SigningKeys(keystore, publish_ahead=timedelta(0), clock=clock)
    issuer = TokenIssuer(keys, issuer=ISSUER, audience=AUDIENCE, clock=clock)
    verifier = TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE, leeway_seconds=0, clock=clock)
    token = issue(issuer)
    assert verifier.verify(token)
    keys.rotate()
    clock.advance(timedelta(seconds=2))
    keystore.retire("jwt/signing", 1)  # an operator revoking the key by hand
    keys.refresh()
    assert refused(verifier, token) == "unknown kid"


def test_tiny_publish_ahead_in_real_time(keystore: LocalKeystore) -> None:
    keys = SigningKeys(keystore, publish_ahead=timedelta(seconds=0.2))
    first = keys.current()[0]
    second = keys.rotate()
    assert keys.current()[0] == first  # the keystore's 1 s timestamps round up
    time.sleep(1.3)
    assert keys.current()[0] == second


def test_jwks_has_no_private_members(keys: SigningKeys) -> None:
    keys.current()
    keys.rotate()
    keys.rotate()
    jwks = keys.jwks()
    assert len(jwks["keys"]) == 3
    private = {"d", "p", "q", "dp", "dq", "qi", "k"}
    for jwk in jwks["keys"]:
        assert private.isdisjoint(jwk)
        assert jwk["alg"] == "ES256" and jwk["use"] == "sig" and jwk["kty"] == "EC"
        assert jwk["crv"] == "P-256"
        assert jwk["kid"] == ECKey.import_key(jwk).thumbprint()  # type: ignore[arg-type]


def test_first_rotate_creates_the_first_key(keystore: LocalKeystore) -> None:
    keys = SigningKeys(keystore)
    kid = keys.rotate()
    assert keys.current()[0] == kid
    assert len(keystore.versions("jwt/signing")) == 1


@pytest.mark.parametrize(
    "lifetime", [MAX_LIFETIME + timedelta(seconds=1), timedelta(hours=24), timedelta(0)]
)
def test_lifetime_outside_limits_refuses_to_start(keys: SigningKeys, lifetime: timedelta) -> None:
    with pytest.raises(ValueError):
        TokenIssuer(keys, issuer=ISSUER, audience=AUDIENCE, lifetime=lifetime)


def test_lifetime_of_exactly_sixty_minutes_is_allowed(keys: SigningKeys) -> None:
    assert TokenIssuer(keys, issuer=ISSUER, audience=AUDIENCE, lifetime=MAX_LIFETIME).lifetime


# -- property: no mutation of a valid token verifies ---------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00é"


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.integers(min_value=0),
            st.sampled_from(_ALPHABET) | st.characters(),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_tokens_never_verify(
    issuer: TokenIssuer, verifier: TokenVerifier, edits: list[tuple[str, int, str]]
) -> None:
    token = issue(issuer)
    mutated = token
    for op, position, char in edits:
        i = position % (len(mutated) + 1)
        if op == "replace" and i < len(mutated):
            mutated = mutated[:i] + char + mutated[i + 1 :]
        elif op == "insert":
            mutated = mutated[:i] + char + mutated[i:]
        elif i < len(mutated):
            mutated = mutated[:i] + mutated[i + 1 :]
    if mutated == token:
        return  # the edits cancelled out: nothing to test
    with pytest.raises(InvalidToken):
        verifier.verify(mutated)
    assert verifier.verify(token)  # the original still verifies
