"""DPoP server nonces (RFC 9449 sections 8 and 9) and single use of proofs at
the token endpoint across processes (section 11.1), over real HTTP.

Three api processes on one database: ``own`` (its own URL as issuer, nonces
asked at resources too) and ``a``/``b`` behind one public issuer URL with
``replay_store = "postgres"``, as two replicas behind a load balancer run.
Clients: the repo's :mod:`bastion.identity.client` and Authlib's httpx client.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID, uuid4

import httpx
import httpx2
import psycopg
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from fastapi import FastAPI

from bastion.compose import DPOP_NONCE_KEY, Overrides, build_api
from bastion.db.pool import Database
from bastion.identity.client import DpopAuth, login, refresh
from bastion.identity.dpop import DpopKey, DpopVerifier, MemoryReplayCache
from bastion.identity.passwords import PasswordService
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, s256
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.http_server import serving

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery staple 42"
ISSUER = "https://api.bastion.test"  # the public URL in front of processes a and b
TOKEN_URL = f"{ISSUER}/token"
NONCE_SLOT_SECONDS = 300


@dataclass
class Stack:
    own: str  # issuer = its own URL; resources ask for nonces too
    a: str
    b: str
    superuser: str
    keystore: LocalKeystore
    slug: str
    email: str


def _process(
    database: DbHandles,
    keystore: LocalKeystore,
    settings: Callable[[str], Settings],
    seed: Callable[[Database], Awaitable[None]] | None = None,
) -> Callable[[str], FastAPI]:
    """How one api process is built: by the composition root, as ``bastion serve api``."""

    def build(url: str) -> FastAPI:
        overrides = Overrides(
            database=Database(database.app, database.context_key, max_size=4),
            keystore=keystore,
            on_start=seed,
        )
        return build_api(settings(url), overrides).app

    return build


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    slug, email = f"nonce-{uuid4().hex[:6]}", "signer@nonce.test"

    async def seed(db: Database) -> None:
        service = TenantService(db)
        tenant = (await service.create_tenant(slug, "nonce")).id
        user = await service.add_member(tenant, email, "contributor")
        async with db.tenant_tx(tenant, None, "system") as tx:
            await PasswordService().set_password(tx, user, PASSWORD)

    def own(url: str) -> Settings:
        # Calls no gateway; plain between processes is development on loopback.
        return Settings(
            issuer=url, dpop_nonce_at_resources=True, internal_mtls=False, dev_mode=True
        )

    def replica(_url: str) -> Settings:
        return Settings(issuer=ISSUER, replay_store="postgres", internal_mtls=False, dev_mode=True)

    with (
        serving(_process(database, keystore, own, seed)) as own_url,
        serving(_process(database, keystore, replica)) as a_url,
        serving(_process(database, keystore, replica)) as b_url,
    ):
        yield Stack(own_url, a_url, b_url, database.superuser, keystore, slug, email)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15, follow_redirects=False) as client:
        yield client


async def _code(stack: Stack, http: httpx.AsyncClient, base: str) -> tuple[str, str]:
    """A fresh authorization code from the process at ``base``, and its verifier."""
    verifier = secrets.token_urlsafe(48)
    answer = await http.post(
        f"{base}/authorize",
        data={
            "response_type": "code",
            "client_id": CLI_CLIENT_ID,
            "redirect_uri": CLI_REDIRECT_URI,
            "scope": "openid",
            "code_challenge": s256(verifier),
            "code_challenge_method": "S256",
            "tenant": stack.slug,
            "email": stack.email,
            "password": PASSWORD,
        },
    )
    assert answer.status_code == 303, answer.text
    return parse_qs(urlsplit(answer.headers["location"]).query)["code"][0], verifier


def _grant(code: str, verifier: str) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": CLI_CLIENT_ID,
        "redirect_uri": CLI_REDIRECT_URI,
        "code_verifier": verifier,
    }


def _written(stack: Stack, code: str) -> tuple[int, bool]:
    """(refresh tokens in the database, whether ``code`` was redeemed)."""
    with psycopg.connect(stack.superuser, autocommit=True) as conn:
        tokens = conn.execute("SELECT count(*) FROM bastion.refresh_tokens").fetchone()
        used = conn.execute(
            "SELECT used_at IS NOT NULL FROM bastion.auth_codes "
            "WHERE code_hash = sha256(convert_to(%s, 'UTF8'))",
            (code,),
        ).fetchone()
    assert tokens is not None and used is not None
    return int(tokens[0]), bool(used[0])


def _nonce_at(stack: Stack, seconds_ago: float, key: bytes | None = None) -> str:
    """The nonce a server with ``key`` (default: the deployment's) issued then."""
    secret = key if key is not None else stack.keystore.get(DPOP_NONCE_KEY)
    verifier = DpopVerifier(
        MemoryReplayCache(), nonce_secret=secret, clock=lambda: time.time() - seconds_ago
    )
    return verifier.new_nonce()


# -- the token endpoint asks for a nonce ---------------------------------------------------


async def test_a_proof_without_a_nonce_gets_use_dpop_nonce_and_writes_nothing(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    code, verifier = await _code(stack, http, stack.own)
    key = DpopKey.generate()
    url = f"{stack.own}/token"
    before = _written(stack, code)
    asked = await http.post(
        url, data=_grant(code, verifier), headers={"DPoP": key.proof("POST", url)}
    )
    assert asked.status_code == 400
    assert asked.json()["error"] == "use_dpop_nonce"
    assert asked.headers["cache-control"] == "no-store"
    nonce = asked.headers["dpop-nonce"]
    assert len(nonce) >= 22  # 128 bits or more, base64url
    assert _written(stack, code) == before == (before[0], False)  # the code is still good

    answered = await http.post(
        url, data=_grant(code, verifier), headers={"DPoP": key.proof("POST", url, nonce=nonce)}
    )
    assert answered.status_code == 200, answered.text
    assert answered.json()["token_type"] == "DPoP"
    assert answered.headers["dpop-nonce"]  # the next one, for the next request (section 8.2)
    assert _written(stack, code) == (before[0] + 1, True)


@pytest.mark.parametrize("which", ["ten minutes old", "another server's key", "made up", "altered"])
async def test_a_stale_or_forged_nonce_is_refused(
    stack: Stack, http: httpx.AsyncClient, which: str
) -> None:
    nonce = {
        "ten minutes old": lambda: _nonce_at(stack, 2 * NONCE_SLOT_SECONDS),
        "another server's key": lambda: _nonce_at(stack, 0, secrets.token_bytes(32)),
        "made up": lambda: secrets.token_urlsafe(18),
        "altered": lambda: _nonce_at(stack, 0) + "A",
    }[which]()
    code, verifier = await _code(stack, http, stack.own)
    key, url = DpopKey.generate(), f"{stack.own}/token"
    before = _written(stack, code)
    refused = await http.post(
        url, data=_grant(code, verifier), headers={"DPoP": key.proof("POST", url, nonce=nonce)}
    )
    assert refused.status_code == 400
    assert refused.json()["error"] == "use_dpop_nonce"
    assert refused.headers["dpop-nonce"] != nonce
    assert _written(stack, code) == before


async def test_last_slots_nonce_still_holds_and_any_process_accepts_it(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    # Issued one slot ago (by whichever process: they share the key).
    nonce = _nonce_at(stack, NONCE_SLOT_SECONDS)
    code, verifier = await _code(stack, http, stack.a)
    key = DpopKey.generate()
    answer = await http.post(
        f"{stack.b}/token",
        data=_grant(code, verifier),
        headers={"DPoP": key.proof("POST", TOKEN_URL, nonce=nonce)},
    )
    assert answer.status_code == 200, answer.text


# -- a proof is used once, across processes --------------------------------------------------


async def test_a_token_proof_replayed_to_a_second_process_is_refused(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    key = DpopKey.generate()
    first, first_verifier = await _code(stack, http, stack.a)
    second, second_verifier = await _code(stack, http, stack.a)
    nonce = _nonce_at(stack, 0)
    proof = key.proof("POST", TOKEN_URL, nonce=nonce)

    accepted = await http.post(
        f"{stack.a}/token", data=_grant(first, first_verifier), headers={"DPoP": proof}
    )
    assert accepted.status_code == 200, accepted.text
    before = _written(stack, second)
    # The same proof, with a code that is still good, at the other replica.
    replayed = await http.post(
        f"{stack.b}/token", data=_grant(second, second_verifier), headers={"DPoP": proof}
    )
    assert replayed.status_code == 400
    assert replayed.json() == {
        "error": "invalid_dpop_proof",
        "error_description": "proof replayed",
    }
    assert _written(stack, second) == before  # the code was not spent
    # The refusal was the replay's: a fresh proof at the same process works.
    fresh = await http.post(
        f"{stack.b}/token",
        data=_grant(second, second_verifier),
        headers={"DPoP": key.proof("POST", TOKEN_URL, nonce=nonce)},
    )
    assert fresh.status_code == 200, fresh.text


# -- resource servers, when switched on ------------------------------------------------------


def test_nonces_are_on_at_the_token_endpoint_and_optional_at_resources() -> None:
    settings = Settings()
    assert settings.dpop_nonce_at_token is True
    assert settings.dpop_nonce_at_resources is False


async def test_a_resource_server_asks_for_a_nonce_when_configured(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tokens = await login(http, stack.own, tenant=stack.slug, email=stack.email, password=PASSWORD)
    url = f"{stack.own}/userinfo"
    asked = await http.get(url, headers=tokens.headers("GET", url))
    assert asked.status_code == 401
    assert asked.headers["content-type"] == "application/problem+json"
    assert 'error="use_dpop_nonce"' in asked.headers["www-authenticate"]
    nonce = asked.headers["dpop-nonce"]
    stale = await http.get(
        url, headers=tokens.headers("GET", url, nonce=_nonce_at(stack, 2 * NONCE_SLOT_SECONDS))
    )
    assert stale.status_code == 401 and "use_dpop_nonce" in stale.headers["www-authenticate"]
    answered = await http.get(url, headers=tokens.headers("GET", url, nonce=nonce))
    assert answered.status_code == 200, answered.text
    # The client's auth flow does the exchange by itself.
    assert (await http.get(url, auth=tokens.auth())).status_code == 200


# -- the clients follow the exchange ----------------------------------------------------------


async def test_the_repo_client_retries_once_then_reuses_the_nonce(stack: Stack) -> None:
    token_requests: list[int] = []

    async def count(response: httpx.Response) -> None:
        if response.request.url.path == "/token":
            token_requests.append(response.status_code)

    async with httpx.AsyncClient(timeout=15, event_hooks={"response": [count]}) as http:
        tokens = await login(
            http, stack.own, tenant=stack.slug, email=stack.email, password=PASSWORD
        )
        assert token_requests == [400, 200]  # asked for a nonce, then answered
        assert tokens.nonce
        rotated = await refresh(http, stack.own, tokens)
        assert token_requests == [400, 200, 200]  # the kept nonce: no second challenge
        assert rotated.access_token != tokens.access_token


class Httpx2DpopAuth(httpx2.Auth):
    """:class:`DpopAuth` for Authlib, whose client is built on httpx2 (same flow
    protocol, another ``Auth`` base class). Authlib has no DPoP of its own."""

    requires_response_body = True

    def __init__(self, inner: DpopAuth) -> None:
        self.inner = inner

    def auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        return self.inner.auth_flow(request)


async def test_authlib_client_with_dpop_auth_gets_and_refreshes_tokens(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    key = DpopKey.generate()
    verifier = secrets.token_urlsafe(48)
    async with AsyncOAuth2Client(
        client_id=CLI_CLIENT_ID,
        redirect_uri=CLI_REDIRECT_URI,
        scope="openid",
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        timeout=15,
    ) as client:
        authorize_url, state = client.create_authorization_url(
            f"{stack.own}/authorize", code_verifier=verifier, tenant=stack.slug
        )
        params = {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}
        signed_in = await http.post(
            f"{stack.own}/authorize", data={**params, "email": stack.email, "password": PASSWORD}
        )
        assert signed_in.status_code == 303, signed_in.text
        auth = DpopAuth(key)
        token: dict[str, Any] = await client.fetch_token(
            f"{stack.own}/token",
            authorization_response=signed_in.headers["location"],
            state=state,
            code_verifier=verifier,
            client_id=CLI_CLIENT_ID,
            auth=Httpx2DpopAuth(auth),
        )
        assert token["token_type"] == "DPoP"
        assert auth.nonce  # learnt from the challenge
        refreshed: dict[str, Any] = await client.refresh_token(
            f"{stack.own}/token",
            refresh_token=token["refresh_token"],
            client_id=CLI_CLIENT_ID,
            auth=Httpx2DpopAuth(auth),
        )
        assert refreshed["access_token"] != token["access_token"]
    url = f"{stack.own}/userinfo"
    me = await http.get(url, auth=DpopAuth(key, access_token=refreshed["access_token"]))
    assert me.status_code == 200, me.text
    assert UUID(me.json()["sub"])
