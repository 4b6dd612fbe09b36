"""Deeply nested JSON from outside (RFC 8259 section 9) is refused as malformed, over
real HTTP: a 400 with a stable problem type, nothing stored, no stack trace in the
logs — never the parser's RecursionError escaping as a 500 (issue 23, finding 11).

The depth is measured before anything is parsed (:mod:`bastion.jsonsafe`); the
siblings of the webhooks are the other parsers of outside bytes: DPoP proofs
(signed by the client's own key, so any payload at all), request bodies, and
an upstream model provider's answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from uuid import uuid4

import httpx
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.gateway.providers import OpenAICompatible, ProviderError, UpstreamRejected
from bastion.identity.dpop import PROOF_TYPE, DpopKey
from bastion.jsonsafe import MAX_DEPTH, loads, nesting_exceeds
from bastion.secrets import LocalKeystore
from tests.api_stack import api_server
from tests.conftest import Captured, DbHandles
from tests.http_server import running_server
from tests.stripe_double import signed, webhook_api

pytestmark = pytest.mark.anyio

PROBLEM = "https://bastion.dev/problems/"
DEPTH = 100_000
DEEP_ARRAYS = "[" * DEPTH + "]" * DEPTH  # 200 KB: under the webhooks' 256 KiB cap
DEEP_OBJECTS = '{"a":' * 40_000 + "1" + "}" * 40_000
STRIPE_SECRET = f"billing/test-depth-stripe-{uuid4().hex[:8]}"
ADYEN_KEY = f"billing/test-depth-adyen-{uuid4().hex[:8]}"


@dataclass
class Stack:
    webhooks: str
    stripe_secret: str
    api: str


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    secret = f"whsec_depth_{uuid4().hex}"
    keystore.set(STRIPE_SECRET, secret.encode())
    keystore.set(ADYEN_KEY, uuid4().hex.encode() * 2)

    async def seed(_db: Database, _identity: Identity) -> None:
        return None

    with (
        webhook_api(
            database,
            keystore,
            stripe_ref=f"local://{STRIPE_SECRET}",
            adyen_ref=f"local://{ADYEN_KEY}",
        ) as webhooks,
        api_server(database, keystore, seed) as (api, _app, _identity),
    ):
        yield Stack(webhooks, secret, api)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def _count(database: DbHandles, *tables: str) -> list[int]:
    with psycopg.connect(database.superuser) as conn:
        counts = []
        for table in tables:
            row = conn.execute(f"SELECT count(*) FROM bastion.{table}").fetchone()
            assert row is not None
            counts.append(int(row[0]))
        return counts


def _no_traceback(logs: Captured, path: str, status: int, requests: int) -> None:
    """The server logged each request with its status, and no exception at all."""
    logs.wait_for(lambda r: r.get("event") == "request" and r.get("path") == path)
    lines = [r for r in logs.records() if r.get("event") == "request" and r.get("path") == path]
    assert [r["status"] for r in lines] == [status] * requests
    assert "Traceback" not in logs.text and "RecursionError" not in logs.text
    assert not [r for r in logs.records() if r.get("level") in ("error", "critical")]


# -- the webhooks (the finding) --------------------------------------------------------------


async def test_deep_json_to_the_adyen_webhook_is_a_400_that_stores_nothing(
    stack: Stack, database: DbHandles, http: httpx.AsyncClient, logs: Captured
) -> None:
    """Unsigned: Adyen's HMAC sits inside the JSON, so the body is read before any
    signature check — by the depth-checked parser, which refuses it unparsed."""
    before = _count(database, "webhook_events", "audit_events")
    for body in (DEEP_ARRAYS, DEEP_OBJECTS, '{"notificationItems": ' + DEEP_ARRAYS + "}"):
        response = await http.post(
            f"{stack.webhooks}/webhooks/adyen",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"] == PROBLEM + "webhook-malformed"
        assert "[accepted]" not in response.text and "[[" not in response.text
    assert _count(database, "webhook_events", "audit_events") == before
    _no_traceback(logs, "/webhooks/adyen", 400, 3)


async def test_deep_json_to_the_stripe_webhook_is_a_400_that_stores_nothing(
    stack: Stack, database: DbHandles, http: httpx.AsyncClient, logs: Captured
) -> None:
    """Signed with the endpoint's secret (Stripe's body is read only once the
    signature verifies): a verified body nested too deep is malformed, not a 500."""
    before = _count(database, "webhook_events", "audit_events")
    for body in (DEEP_ARRAYS, DEEP_OBJECTS):
        response = await http.post(
            f"{stack.webhooks}/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": signed(body, stack.stripe_secret)},
        )
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"] == PROBLEM + "webhook-malformed"
    assert _count(database, "webhook_events", "audit_events") == before
    _no_traceback(logs, "/webhooks/stripe", 400, 2)


# -- siblings: every other parser of outside bytes ---------------------------------------------


def _deep_dpop_proof(depth: int) -> str:
    """A DPoP proof whose payload is ``depth`` nested arrays, validly signed: the
    client signs its proofs with its own key, so it may sign anything at all."""
    key = DpopKey.generate()
    header = {"typ": PROOF_TYPE, "alg": "ES256", "jwk": key.public_jwk}
    payload = b"[" * depth + b"]" * depth
    return jws.serialize_compact(header, payload, key._key, algorithms=["ES256"])


async def test_a_deep_dpop_proof_at_the_token_endpoint_is_refused_not_a_500(
    stack: Stack, database: DbHandles, http: httpx.AsyncClient, logs: Captured
) -> None:
    """Anonymous: the token endpoint reads the proof's claims before any grant."""
    proof = _deep_dpop_proof(1_300)
    assert len(proof) <= 4096  # under the verifier's size cap: the payload is parsed
    tables = ("refresh_tokens", "refresh_families", "auth_codes", "audit_events")
    before = _count(database, *tables)
    response = await http.post(
        f"{stack.api}/token",
        data={"grant_type": "authorization_code", "code": "x", "client_id": "bastion-cli"},
        headers={"DPoP": proof},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_dpop_proof"
    assert _count(database, *tables) == before
    _no_traceback(logs, "/token", 400, 1)


async def test_a_deep_request_body_is_malformed_json(
    stack: Stack, database: DbHandles, http: httpx.AsyncClient, logs: Captured
) -> None:
    """A JSON body the framework's parser cannot nest that deep is ``malformed-json``,
    as any other body that is not JSON (not a bare ``bad-request``)."""
    path = f"/tenants/{uuid4()}/knowledge/namespaces"
    before = _count(database, "namespaces", "audit_events")
    response = await http.post(
        f"{stack.api}{path}", content=DEEP_ARRAYS, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == PROBLEM + "malformed-json"
    assert _count(database, "namespaces", "audit_events") == before
    _no_traceback(logs, path, 400, 1)


async def test_a_provider_answering_deep_json_is_a_bad_response() -> None:
    """An upstream model server is outside too: its answer, its stream and its error
    body nested too deep are a bad response (or its plain 4xx), never a crash."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        if body.get("stream"):
            return Response(f"data: {DEEP_ARRAYS}\n\n", media_type="text/event-stream")
        if body["messages"][0]["content"] == "error":
            return Response(DEEP_OBJECTS, status_code=400, media_type="application/json")
        return Response(DEEP_ARRAYS, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with running_server(app) as upstream:
        provider = OpenAICompatible(f"{upstream}/v1", "sk-test")
        try:
            hello = [{"role": "user", "content": "hello"}]
            with pytest.raises(ProviderError) as plain:
                await provider.complete("m", hello, max_tokens=5, temperature=0)
            assert plain.value.kind == "bad-response"
            with pytest.raises(ProviderError) as streamed:
                async for _item in provider.stream("m", hello, max_tokens=5, temperature=0):
                    pass
            assert streamed.value.kind == "bad-response"
            error = [{"role": "user", "content": "error"}]
            with pytest.raises(UpstreamRejected) as rejected:
                await provider.complete("m", error, max_tokens=5, temperature=0)
            assert rejected.value.status == 400 and rejected.value.error_type is None
        finally:
            await provider.aclose()


# -- the measure itself ---------------------------------------------------------------------------


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


# Strings full of what the measure must see through: quotes, escapes, brackets.
_TEXT = st.text(alphabet=st.sampled_from(list('ab"\\[]{}é\u2028/')), max_size=6)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(value=_VALUES, limit=st.integers(min_value=0, max_value=10), ascii_only=st.booleans())
def test_the_measure_is_the_true_depth(value: object, limit: int, ascii_only: bool) -> None:
    """Exactly the nesting of arrays and objects counts (brackets and escaped quotes
    inside strings do not), for text and bytes alike."""
    document = json.dumps(value, ensure_ascii=ascii_only)
    too_deep = _depth(value) > limit
    assert nesting_exceeds(document, limit) is too_deep
    assert nesting_exceeds(document.encode(), limit) is too_deep
    if not too_deep:
        assert loads(document, max_depth=limit) == value


def test_the_limit_and_what_is_refused() -> None:
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert _depth(loads(at_limit)) == MAX_DEPTH
    for refused in (
        "[" + at_limit + "]",  # one deeper
        "[" * 300_000,  # never closed
        "[" * 70 + "}" * 70,  # closed by the wrong brackets: still no JSON
        b"\xff" + DEEP_ARRAYS.encode(),
    ):
        with pytest.raises(ValueError):
            loads(refused)
    assert loads(json.dumps({"s": "[" * 10_000})) == {"s": "[" * 10_000}
