"""Strict decoding everywhere: every byte string has exactly one accepted spelling.

First the decoders of :mod:`bastion.encoding` (base64url, base64, hex, UUID),
as properties over arbitrary bytes and arbitrary text. Then every decoder in
the codebase that reads a signature, token, ticket, key id or key: given a
valid value, each other spelling of the same bytes (padding, whitespace, a
stray character, pad bits set, ``+``/``/`` for ``-``/``_``; see
:mod:`tests.spellings`) and each single-character edit is refused. joserfc,
which decodes our JWTs, DPoP proofs and receipts, is held to the same
property; where a JWS still has a second valid spelling (ECDSA's ``(r, n - s)``),
the tests show nothing is keyed on the spelling.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey

from bastion.billing.receipts import (
    ReceiptInvalid,
    ReceiptKeys,
    jwks_lookup,
    jws_b64decode,
    sign_receipt,
    verify_receipt,
)
from bastion.encoding import (
    EncodingError,
    b64_decode,
    b64_encode,
    b64url_decode,
    b64url_encode,
    hex_decode,
    parse_uuid,
)
from bastion.identity.dpop import DpopKey, DpopVerifier, MemoryReplayCache
from bastion.identity.errors import InvalidDpopProof, InvalidToken
from bastion.identity.issuers import unverified_issuer
from bastion.identity.keys import SigningKeys
from bastion.identity.oidc import LoginTickets
from bastion.identity.service import AuthorizationRequest, LoginResult, _tenant_of
from bastion.identity.tokens import TokenIssuer, TokenVerifier
from bastion.safety.signing import EnvelopeInvalid, EnvelopeSigner, ToolCall, ToolCallSigner
from bastion.secrets import LocalKeystore
from bastion.secrets.errors import KeystoreLocked
from tests.conftest import short_tempdir
from tests.spellings import ecdsa_twin, respellings

FAST = settings(max_examples=60, deadline=None, database=None)
WIDE = settings(max_examples=400, deadline=None, database=None)

# Everything a lenient decoder skips or maps, next to the alphabet itself.
_NOISE = "=+/!. \t\n\r\x0b\x0c\u00a0\u2028\u00e9\uff10\uff21"
B64URL_TEXT = st.text(
    alphabet=st.sampled_from(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" + _NOISE
    ),
    max_size=24,
)
HEX_TEXT = st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF x:-\n"), max_size=16)


# -- bastion.encoding: one spelling per value --------------------------------------------


@WIDE
@given(st.binary(max_size=64))
def test_b64url_round_trips_every_byte_string(data: bytes) -> None:
    text = b64url_encode(data)
    assert b64url_decode(text) == data == b64url_decode(text.encode())
    assert "=" not in text


@WIDE
@given(B64URL_TEXT)
def test_b64url_accepts_only_the_spelling_its_encoder_writes(text: str) -> None:
    try:
        data = b64url_decode(text)
    except EncodingError:
        return
    assert b64url_encode(data) == text


@WIDE
@given(st.binary(min_size=1, max_size=64))
def test_b64url_refuses_every_other_spelling_of_the_same_bytes(data: bytes) -> None:
    for name, variant in respellings(b64url_encode(data)).items():
        with pytest.raises(EncodingError):
            b64url_decode(variant)
        assert name


def test_b64url_refuses_the_review_s_examples() -> None:
    assert b64url_decode("AA") == b"\x00"
    for text in ("AB", "AA=", "AA==", "A!A", "A A", "AA\n", "AAB", "A", "+w", "/w", "_w=="):
        with pytest.raises(EncodingError):
            b64url_decode(text)
    assert b64url_decode("_w") == b"\xff"
    with pytest.raises(EncodingError):
        b64url_decode(b64url_encode(b"x" * 31), size=32)
    with pytest.raises(EncodingError):
        b64url_decode("\uff21\uff21".encode())  # fullwidth "AA": not ASCII


@WIDE
@given(st.binary(max_size=64))
def test_padded_b64_round_trips_and_refuses_other_spellings(data: bytes) -> None:
    text = b64_encode(data)
    assert b64_decode(text) == data
    others = [text + "=", text.rstrip("="), " " + text, text + "\n", text[:1] + "!" + text[1:]]
    unused = {1: 2, 2: 4}.get(len(data) % 3)  # pad bits of the last data character
    if unused:
        last = text.rstrip("=")[-1]
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        flipped = alphabet[alphabet.index(last) | 1]
        others.append(text.rstrip("=")[:-1] + flipped + "=" * text.count("="))
    for variant in others:
        if variant == text:
            continue
        with pytest.raises(EncodingError):
            b64_decode(variant)


@WIDE
@given(B64URL_TEXT)
def test_padded_b64_accepts_only_the_spelling_its_encoder_writes(text: str) -> None:
    try:
        data = b64_decode(text)
    except EncodingError:
        return
    assert b64_encode(data) == text


@WIDE
@given(st.binary(max_size=32))
def test_hex_round_trips_in_lower_case_only(data: bytes) -> None:
    assert hex_decode(data.hex()) == data
    if any(c in "abcdef" for c in data.hex()):
        with pytest.raises(EncodingError):
            hex_decode(data.hex().upper())
    for variant in (" " + data.hex(), data.hex() + "\n", "0x" + data.hex(), data.hex() + "0"):
        with pytest.raises(EncodingError):
            hex_decode(variant)


@WIDE
@given(HEX_TEXT)
def test_hex_accepts_only_the_spelling_hexdigest_writes(text: str) -> None:
    try:
        data = hex_decode(text)
    except EncodingError:
        return
    assert data.hex() == text


@FAST
@given(st.uuids())
def test_a_uuid_has_one_spelling(value: UUID) -> None:
    assert parse_uuid(str(value)) == value
    for variant in (
        str(value).upper(),
        "{" + str(value) + "}",
        "urn:uuid:" + str(value),
        value.hex,
        str(value) + "\n",
    ):
        if variant == str(value):
            continue
        with pytest.raises(EncodingError):
            parse_uuid(variant)


# -- every decoder of the codebase ----------------------------------------------------------


def _edits(text: str, position: int, character: str) -> list[str]:
    """``text`` with ``character`` inserted at, and replacing the one at, ``position``."""
    at = position % (len(text) + 1)
    edits = [text[:at] + character + text[at:]]
    if at < len(text) and text[at] != character:
        edits.append(text[:at] + character + text[at + 1 :])
    return edits


EDIT = st.tuples(st.integers(min_value=0), st.sampled_from(_NOISE + "AQgw-_"))


def _parts_respelt(token: str) -> list[tuple[str, str]]:
    """Every respelling of every dot-separated part of ``token``, named."""
    parts = token.split(".")
    found = []
    for index, part in enumerate(parts):
        for name, variant in respellings(part).items():
            respelt = ".".join([*parts[:index], variant, *parts[index + 1 :]])
            found.append((f"part {index}: {name}", respelt))
    return found


def _refuses_all(
    accepts: Callable[[str], bool],
    token: str,
    edit: tuple[int, str],
    same: Callable[[str], bool] | None = None,
) -> None:
    """``accepts`` takes ``token`` and no other spelling or edit of it (other than
    those ``same`` says are the token itself)."""
    assert accepts(token)
    candidates = _parts_respelt(token) + [("edit", e) for e in _edits(token, *edit)]
    for name, variant in candidates:
        assert not accepts(variant) or (same is not None and same(variant)), name


@pytest.fixture(scope="module")
def signing_keystore() -> LocalKeystore:
    base = short_tempdir("bastion-strict-")
    return LocalKeystore(base / "keystore.bin", base / "master.key")


TENANT, USER = uuid.uuid4(), uuid.uuid4()


@FAST
@given(st.binary(max_size=200), EDIT)
def test_api_envelopes_have_one_spelling(
    signing_keystore: LocalKeystore, body: bytes, edit: tuple[int, str]
) -> None:
    signer = EnvelopeSigner(signing_keystore)
    envelope = signer.sign(tenant_id=TENANT, user_id=USER, body=body)

    def accepts(text: str) -> bool:
        try:
            signer.tokens.check(text)  # signature and freshness, not single use
        except EnvelopeInvalid as refused:
            assert refused.reason in ("malformed", "bad-signature", "unknown-key"), text
            return False
        return True

    _refuses_all(accepts, envelope, edit)


@FAST
@given(st.text(max_size=80), EDIT)
def test_tool_call_signatures_have_one_spelling(
    signing_keystore: LocalKeystore, arguments: str, edit: tuple[int, str]
) -> None:
    call = ToolCall("call_1", "calculate", arguments)
    tool = {"type": "function", "function": {"name": "calculate"}}
    signer = ToolCallSigner(signing_keystore)
    signature = signer.sign(call, tenant_id=TENANT, user_id=USER, declaration=tool)

    def accepts(text: str) -> bool:
        try:  # a fresh verifier each time: no memory of nonces to hide behind
            ToolCallSigner(signing_keystore).verify(call, text, tenant_id=TENANT, declaration=tool)
        except EnvelopeInvalid:
            return False
        return True

    _refuses_all(accepts, signature, edit)


@FAST
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), EDIT)
def test_login_tickets_have_one_spelling(state: str, edit: tuple[int, str]) -> None:
    tickets = LoginTickets(b"k" * 32)
    login = LoginResult(USER, TENANT, ("owner",), True)
    request = AuthorizationRequest("cli", "http://127.0.0.1/cb", state, "openid", None, "c", "t")
    ticket = tickets.seal(login, request)
    assert tickets.open(ticket) == (login, request)
    _refuses_all(lambda text: tickets.open(text) is not None, ticket, edit)


@FAST
@given(st.text(max_size=40), EDIT)
def test_external_tokens_are_routed_only_from_their_one_spelling(
    issuer: str, edit: tuple[int, str]
) -> None:
    # The issuer is read before any key is chosen: strictly, as joserfc reads.
    header = b64url_encode(b'{"alg":"ES256"}')
    token = f"{header}.{b64url_encode(json.dumps({'iss': 'https://idp/' + issuer}).encode())}.c2ln"

    def accepts(text: str) -> bool:
        try:
            return unverified_issuer(text) == "https://idp/" + issuer
        except InvalidToken:
            return False

    assert accepts(token)
    payload = token.split(".")[1]
    for name, variant in respellings(payload).items():
        assert not accepts(token.replace(payload, variant)), name


@dataclass
class Jose:
    """Our JWT issuer/verifier and a receipt key ring on one keystore."""

    issuer: TokenIssuer
    verifier: TokenVerifier
    receipts: ReceiptKeys


@pytest.fixture(scope="module")
def jose(signing_keystore: LocalKeystore) -> Jose:
    keys = SigningKeys(signing_keystore)
    return Jose(
        TokenIssuer(keys, issuer="https://id.test", audience="https://api.test"),
        # No cache: every spelling is verified from scratch.
        TokenVerifier(keys, issuer="https://id.test", audience="https://api.test", cache_size=0),
        ReceiptKeys(signing_keystore),
    )


@FAST
@given(st.sampled_from(["viewer", "owner", "auditor"]), EDIT)
def test_access_tokens_have_one_spelling_where_it_matters(
    jose: Jose, role: str, edit: tuple[int, str]
) -> None:
    token, claims = jose.issuer.issue_access(
        user_id=USER, tenant_id=TENANT, roles=[role], amr=["pwd"], jkt=None
    )

    def accepts(text: str) -> bool:
        try:
            return jose.verifier.verify(text).jti == claims.jti
        except InvalidToken:
            return False

    _refuses_all(accepts, token, edit)
    # ECDSA's second signature of the same claims verifies (joserfc, like every
    # verifier, takes high s); it is the same token: same jti, same claims.
    header_payload, _, signature = token.rpartition(".")
    assert jose.verifier.verify(f"{header_payload}.{ecdsa_twin(signature)}") == claims


@FAST
@given(st.integers(min_value=0, max_value=10**9), EDIT)
def test_receipts_have_one_spelling(jose: Jose, amount: int, edit: tuple[int, str]) -> None:
    _kid, compact = sign_receipt(jose.receipts, {"kind": "invoice", "amount": amount})
    lookup = jwks_lookup(jose.receipts.jwks())

    def accepts(text: str) -> bool:
        try:
            return bool(verify_receipt(text, lookup).payload["amount"] == amount)
        except ReceiptInvalid:
            return False

    # A receipt file may end in a newline: whitespace around the whole document
    # is the file's, not the JWS's (nothing is keyed on a receipt file's text).
    _refuses_all(accepts, compact, edit, same=lambda text: text.strip() == compact)
    payload = compact.split(".")[1]
    assert json.loads(jws_b64decode(payload))["amount"] == amount
    for name, variant in respellings(payload).items():
        with pytest.raises(ValueError):
            jws_b64decode(variant)
        assert name


@FAST
@given(st.binary(min_size=1, max_size=100), st.sampled_from(["ES256", "Ed25519"]))
def test_joserfc_refuses_every_other_spelling_of_a_compact_jws(payload: bytes, alg: str) -> None:
    # What joserfc is trusted with: it decodes each part strictly itself, so
    # no pre-check in front of it is needed (checked here, per release).
    key = ECKey.generate_key("P-256") if alg == "ES256" else OKPKey.generate_key("Ed25519")
    compact = jws.serialize_compact({"alg": alg}, payload, key, algorithms=[alg])

    def accepts(text: str) -> bool:
        try:
            return jws.deserialize_compact(text, key, algorithms=[alg]).payload == payload
        except (JoseError, ValueError, binascii.Error):
            return False

    assert accepts(compact)
    for name, variant in _parts_respelt(compact):
        assert not accepts(variant), name


# -- DPoP: proofs, keys and the replay record ---------------------------------------------


URL = "https://api.bastion.test/v1/x"


@FAST
@given(EDIT)
def test_dpop_proofs_have_one_spelling(edit: tuple[int, str]) -> None:
    verifier = DpopVerifier(MemoryReplayCache())
    key = DpopKey.generate()
    proof = key.proof("GET", URL)
    respelt = _parts_respelt(proof) + [("edit", e) for e in _edits(proof, *edit)]
    for name, variant in respelt:
        with pytest.raises(InvalidDpopProof):
            verifier.verify(variant, method="GET", url=URL)
        assert name
    assert verifier.verify(proof, method="GET", url=URL) == key.thumbprint


def test_a_dpop_proof_s_ecdsa_twin_is_a_replay_of_it() -> None:
    # The replay record is keyed on the key and the signed jti, never the text.
    verifier = DpopVerifier(MemoryReplayCache())
    key = DpopKey.generate()
    proof = key.proof("GET", URL)
    head, _, signature = proof.rpartition(".")
    twin = f"{head}.{ecdsa_twin(signature)}"
    assert verifier.verify(twin, method="GET", url=URL) == key.thumbprint  # a valid proof
    with pytest.raises(InvalidDpopProof, match="replayed"):
        verifier.verify(proof, method="GET", url=URL)


def _proof_with_jwk(jwk: dict[str, str], private: ECKey) -> str:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}
    claims = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": URL, "iat": int(time.time())}
    return jws.serialize_compact(header, json.dumps(claims).encode(), private)


def test_a_dpop_key_has_one_thumbprint() -> None:
    # A coordinate with a leading zero byte is the same key to joserfc, under
    # another thumbprint: refused (RFC 7518 section 6.2.1.2: full length).
    private = ECKey.generate_key("P-256")
    public = dict(DpopKey(private).public_jwk)
    x = b64url_decode(public["x"])
    verifier = DpopVerifier(MemoryReplayCache())
    for name, jwk in (
        ("leading zero byte", {**public, "x": b64url_encode(b"\x00" + x)}),
        ("padded", {**public, "y": public["y"] + "="}),
        ("pad bits set", {**public, "x": respellings(public["x"])["pad bits set"]}),
    ):
        with pytest.raises(InvalidDpopProof, match="malformed jwk"):
            verifier.verify(_proof_with_jwk(jwk, private), method="GET", url=URL)
        assert name
    assert verifier.verify(_proof_with_jwk(public, private), method="GET", url=URL)


# -- opaque tokens, PKCE challenges, the keystore -----------------------------------------


@FAST
@given(st.uuids())
def test_an_opaque_token_names_its_tenant_in_lower_case_hex_only(tenant: UUID) -> None:
    secret = "s" * 43
    assert _tenant_of(f"{tenant.hex}.{secret}") == tenant
    upper = tenant.hex.upper()
    if upper != tenant.hex:
        assert _tenant_of(f"{upper}.{secret}") is None


def test_a_keystore_value_has_one_spelling(tmp_path: Any) -> None:
    keystore = LocalKeystore(tmp_path / "keystore.bin", tmp_path / "master.key")
    keystore.set("app/key", b"\xff" * 31)
    assert keystore.get("app/key") == b"\xff" * 31
    canonical = base64.b64encode(b"\xff" * 31).decode()
    for variant in (canonical.rstrip("="), canonical + "=", " " + canonical, canonical[:-2] + "9="):
        with keystore._writing() as doc:  # what a corrupted file would hold
            doc["app/key"][0]["value"] = variant
        with pytest.raises(KeystoreLocked):
            keystore.get("app/key")
