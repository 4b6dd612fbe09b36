"""The built-in provider over real HTTP: code flow with PKCE, DPoP-bound
tokens, refresh rotation, MFA step-up, tenant paths. Every refusal case is
its own request, checked for the refusal and for what was (not) written."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit
from uuid import UUID, uuid4

import httpx
import psycopg
import pyotp
import pytest

from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.identity.client import DpopAuth, LoginFailed, TokenSet, login, refresh
from bastion.identity.dpop import DpopKey
from bastion.identity.passwords import PasswordService
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, s256
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery staple 42"


@dataclass
class Stack:
    url: str
    superuser: str  # conninfo that sees every row, to check what was written
    identity: Identity
    tenants: dict[str, UUID]
    users: dict[str, UUID]
    keystore: LocalKeystore


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    """The api app (identity routes) on uvicorn, in its own thread and loop."""
    tenants: dict[str, UUID] = {}
    users: dict[str, UUID] = {}

    async def seed(db: Database, identity: Identity) -> None:
        await identity.service.register_client("other-app", "Other", ["http://127.0.0.1/other"])
        service = TenantService(db)
        for slug in ("acme", "globex"):
            tenants[slug] = (await service.create_tenant(f"{slug}-{uuid4().hex[:6]}", slug)).id
        for key, slug, role in (
            ("viewer", "acme", "viewer"),
            ("owner", "acme", "owner"),
            ("globex", "globex", "viewer"),
        ):
            user_id = await service.add_member(tenants[slug], f"{key}@{slug}.test", role)
            async with db.tenant_tx(tenants[slug], None, "system") as tx:
                await PasswordService().set_password(tx, user_id, PASSWORD)
            users[key] = user_id

    with api_server(database, keystore, seed) as (url, _app, identity):
        yield Stack(url, database.superuser, identity, tenants, users, keystore)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
        yield client


async def _login(
    stack: Stack,
    http: httpx.AsyncClient,
    who: str = "viewer",
    tenant: str = "acme",
    totp: str | None = None,
) -> TokenSet:
    return await login(
        http,
        stack.url,
        tenant=_slugs[tenant],
        email=f"{who}@{tenant}.test",
        password=PASSWORD,
        totp=totp,
    )


_slugs: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _tenant_slugs(stack: Stack, database: DbHandles) -> None:
    if not _slugs:
        with psycopg.connect(database.superuser) as conn:
            for name, tenant_id in stack.tenants.items():
                row = conn.execute(
                    "SELECT slug FROM bastion.tenants WHERE id = %s", (tenant_id,)
                ).fetchone()
                assert row is not None
                _slugs[name] = row[0]


def _authorize_params(**overrides: str) -> dict[str, str]:
    verifier = secrets.token_urlsafe(48)
    params = {
        "response_type": "code",
        "client_id": CLI_CLIENT_ID,
        "redirect_uri": CLI_REDIRECT_URI,
        "scope": "openid",
        "state": "st-123",
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
        "tenant": _slugs["acme"],
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v != "<omit>"}


async def _code(stack: Stack, http: httpx.AsyncClient, verifier: str, **overrides: str) -> str:
    params = _authorize_params(code_challenge=s256(verifier), **overrides)
    answer = await http.post(
        f"{stack.url}/authorize", data={**params, "email": "viewer@acme.test", "password": PASSWORD}
    )
    assert answer.status_code == 303, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    return query["code"][0]


async def _redeem(
    stack: Stack,
    http: httpx.AsyncClient,
    code: str,
    verifier: str,
    key: DpopKey | None = None,
    **overrides: str,
) -> httpx.Response:
    key = key or DpopKey.generate()
    url = f"{stack.url}/token"
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": CLI_CLIENT_ID,
        "redirect_uri": CLI_REDIRECT_URI,
        "code_verifier": verifier,
        **overrides,
    }
    # DpopAuth answers the token endpoint's nonce challenge (RFC 9449 section 8).
    return await http.post(url, data=form, auth=DpopAuth(key))


async def _refresh_tokens(stack: Stack) -> int:
    with psycopg.connect(stack.superuser) as conn:
        row = conn.execute("SELECT count(*) FROM bastion.refresh_tokens").fetchone()
    assert row is not None
    return int(row[0])


# -- the happy path ------------------------------------------------------------------


async def test_discovery_and_jwks(stack: Stack, http: httpx.AsyncClient) -> None:
    config = (await http.get(f"{stack.url}/.well-known/openid-configuration")).json()
    assert config["issuer"] == stack.url
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert "implicit" not in str(config) and "password" not in config["grant_types_supported"]
    jwks = (await http.get(config["jwks_uri"])).json()
    assert jwks["keys"] and all("d" not in key for key in jwks["keys"])


async def test_full_code_flow_with_pkce_gives_dpop_bound_tokens(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tokens = await _login(stack, http)
    me = await http.get(
        f"{stack.url}/userinfo", headers=tokens.headers("GET", f"{stack.url}/userinfo")
    )
    assert me.status_code == 200, me.text
    body = me.json()
    assert body["sub"] == str(stack.users["viewer"])
    assert body["tenant_id"] == str(stack.tenants["acme"])
    assert body["roles"] == ["viewer"] and body["amr"] == ["pwd"]
    header, payload, _sig = tokens.access_token.split(".")
    claims = _b64json(payload)
    assert claims["cnf"]["jkt"] == tokens.key.thumbprint
    assert claims["exp"] - claims["iat"] <= 15 * 60
    assert _b64json(header)["alg"] == "ES256"


def _b64json(segment: str) -> dict[str, object]:
    import json

    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))  # type: ignore[no-any-return]


# -- /authorize refusals ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"code_challenge": "<omit>", "code_challenge_method": "<omit>"}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": "<omit>"}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        # 43 base64url characters, but pad bits set: no SHA-256 is spelt so.
        ({"code_challenge": "A" * 42 + "B"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "openid " + "x" * 5000}, "invalid_scope"),
    ],
)
async def test_bad_authorization_requests_are_refused(
    stack: Stack, http: httpx.AsyncClient, override: dict[str, str], expected: str
) -> None:
    before = await _codes(stack)
    answer = await http.get(f"{stack.url}/authorize", params=_authorize_params(**override))
    assert answer.status_code == 303
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["error"] == [expected]
    assert query["state"] == ["st-123"]
    assert answer.headers["location"].startswith(CLI_REDIRECT_URI)
    assert await _codes(stack) == before


async def _codes(stack: Stack) -> int:
    with psycopg.connect(stack.superuser) as conn:
        row = conn.execute("SELECT count(*) FROM bastion.auth_codes").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "override",
    [
        {"redirect_uri": CLI_REDIRECT_URI + "/evil"},
        {"redirect_uri": "http://127.0.0.1/callback?x=1"},
        {"redirect_uri": "https://attacker.example/callback"},
        {"client_id": "no-such-client"},
    ],
)
async def test_unregistered_redirect_or_client_is_shown_not_redirected(
    stack: Stack, http: httpx.AsyncClient, override: dict[str, str]
) -> None:
    answer = await http.get(f"{stack.url}/authorize", params=_authorize_params(**override))
    assert answer.status_code == 400
    assert "location" not in answer.headers
    assert "attacker" not in answer.text


async def test_wrong_password_is_generic_and_issues_nothing(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    before = await _codes(stack)
    answers = []
    params = _authorize_params()
    for email in ("viewer@acme.test", "nobody@acme.test"):
        answers.append(
            await http.post(
                f"{stack.url}/authorize",
                data={**params, "email": email, "password": "wrong password 123!"},
            )
        )
    assert [a.status_code for a in answers] == [401, 401]
    assert "invalid tenant, e-mail or password" in answers[0].text
    assert answers[0].text.replace("nobody", "viewer") == answers[1].text.replace(
        "nobody", "viewer"
    )
    assert await _codes(stack) == before


# -- /token refusals ---------------------------------------------------------------------


async def test_wrong_verifier_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    verifier = secrets.token_urlsafe(48)
    code = await _code(stack, http, verifier)
    before = await _refresh_tokens(stack)
    answer = await _redeem(stack, http, code, secrets.token_urlsafe(48))
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    assert await _refresh_tokens(stack) == before


async def test_code_reused_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    verifier = secrets.token_urlsafe(48)
    code = await _code(stack, http, verifier)
    assert (await _redeem(stack, http, code, verifier)).status_code == 200
    before = await _refresh_tokens(stack)
    again = await _redeem(stack, http, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert await _refresh_tokens(stack) == before


async def test_code_from_another_client_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    verifier = secrets.token_urlsafe(48)
    code = await _code(
        stack, http, verifier, client_id="other-app", redirect_uri="http://127.0.0.1/other"
    )
    answer = await _redeem(stack, http, code, verifier)  # redeemed as bastion-cli
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


async def test_redirect_uri_mismatch_at_token_is_refused(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    verifier = secrets.token_urlsafe(48)
    code = await _code(stack, http, verifier)
    answer = await _redeem(stack, http, code, verifier, redirect_uri="http://127.0.0.1/other")
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


async def test_token_without_dpop_proof_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    verifier = secrets.token_urlsafe(48)
    code = await _code(stack, http, verifier)
    answer = await http.post(
        f"{stack.url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": CLI_CLIENT_ID,
            "redirect_uri": CLI_REDIRECT_URI,
            "code_verifier": verifier,
        },
    )
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_dpop_proof"


@pytest.mark.parametrize("grant", ["password", "implicit", "client_credentials"])
async def test_other_grants_are_refused(stack: Stack, http: httpx.AsyncClient, grant: str) -> None:
    key = DpopKey.generate()
    url = f"{stack.url}/token"
    answer = await http.post(
        url,
        data={
            "grant_type": grant,
            "username": "viewer@acme.test",
            "password": PASSWORD,
            "client_id": CLI_CLIENT_ID,
        },
        auth=DpopAuth(key),
    )
    assert answer.status_code == 400 and answer.json()["error"] == "unsupported_grant_type"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"grant_type=authorization_code&code=%FF%FE", "application/x-www-form-urlencoded"),
        (b'{"grant_type": "authorization_code"}', "application/json"),
        (b"grant_type=a&grant_type=b", "application/x-www-form-urlencoded"),
        (b"scope=" + b"x" * 10_000, "application/x-www-form-urlencoded"),
    ],
)
async def test_malformed_token_requests_are_400(
    stack: Stack, http: httpx.AsyncClient, body: bytes, content_type: str
) -> None:
    answer = await http.post(
        f"{stack.url}/token", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 400
    assert answer.json()["error"] in ("invalid_request", "invalid_dpop_proof")


# -- refresh rotation ------------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_family(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    first = await _login(stack, http)
    second = await refresh(http, stack.url, first)
    assert second.refresh_token != first.refresh_token
    with pytest.raises(LoginFailed, match="invalid_grant"):
        await refresh(http, stack.url, first)  # reuse of the old one
    with pytest.raises(LoginFailed, match="invalid_grant"):
        await refresh(http, stack.url, second)  # the family is gone, the new one too
    async with db.tenant_tx(stack.tenants["acme"], None, "auditor") as tx:
        events = await (
            await tx.execute(
                "SELECT action FROM bastion.audit_events WHERE action = 'refresh_token.reuse'"
            )
        ).fetchall()
    assert events


async def test_refresh_with_another_key_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    tokens = await _login(stack, http)
    stolen = TokenSet(tokens.access_token, tokens.refresh_token, 0, DpopKey.generate())
    with pytest.raises(LoginFailed, match="invalid_grant"):
        await refresh(http, stack.url, stolen)
    assert (await refresh(http, stack.url, tokens)).access_token  # the owner still can


# -- using tokens -------------------------------------------------------------------------


async def test_stolen_token_with_another_key_is_refused(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tokens = await _login(stack, http)
    thief = DpopKey.generate()
    url = f"{stack.url}/userinfo"
    answer = await http.get(
        url,
        headers={
            "Authorization": f"DPoP {tokens.access_token}",
            "DPoP": thief.proof("GET", url, access_token=tokens.access_token),
        },
    )
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    assert "DPoP" in answer.headers["www-authenticate"]


async def test_bearer_use_of_a_dpop_token_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    tokens = await _login(stack, http)
    answer = await http.get(
        f"{stack.url}/userinfo", headers={"Authorization": f"Bearer {tokens.access_token}"}
    )
    assert answer.status_code == 401


async def test_replayed_proof_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    tokens = await _login(stack, http)
    url = f"{stack.url}/userinfo"
    headers = tokens.headers("GET", url)
    assert (await http.get(url, headers=headers)).status_code == 200
    assert (await http.get(url, headers=headers)).status_code == 401


async def test_proof_for_another_url_is_refused(stack: Stack, http: httpx.AsyncClient) -> None:
    tokens = await _login(stack, http)
    answer = await http.get(
        f"{stack.url}/userinfo", headers=tokens.headers("GET", f"{stack.url}/token")
    )
    assert answer.status_code == 401


async def test_tenant_a_token_on_tenant_b_path_is_404(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    tokens = await _login(stack, http)
    own = f"{stack.url}/tenants/{stack.tenants['acme']}/members"
    other = f"{stack.url}/tenants/{stack.tenants['globex']}/members"
    mine = await http.get(own, headers=tokens.headers("GET", own))
    assert mine.status_code == 200
    assert "globex" not in mine.text
    theirs = await http.get(other, headers=tokens.headers("GET", other))
    assert theirs.status_code == 404
    assert "globex" not in theirs.text


# -- MFA ------------------------------------------------------------------------------------


async def test_admin_without_mfa_gets_step_up_then_with_totp_gets_in(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    audit_url = f"{stack.url}/tenants/{stack.tenants['acme']}/audit"
    plain = await _login(stack, http, who="owner")
    refused = await http.get(audit_url, headers=plain.headers("GET", audit_url))
    assert refused.status_code == 403
    assert refused.json()["type"].endswith("/mfa-required")
    assert "insufficient_user_authentication" in refused.headers["www-authenticate"]
    mfa = stack.identity.service.mfa
    async with db.tenant_tx(stack.tenants["acme"], None, "system") as tx:
        secret, _uri = await mfa.enroll(tx, stack.users["owner"], "owner@acme.test")
        await mfa.confirm(tx, stack.users["owner"], pyotp.TOTP(secret).now())
    with pytest.raises(LoginFailed, match="TOTP"):
        await _login(stack, http, who="owner")
    # A time step's code is accepted once; the next step's is within the ±1 window.
    next_code = pyotp.TOTP(secret).at(int(time.time()) + 30)
    strong = await _login(stack, http, who="owner", totp=next_code)
    allowed = await http.get(audit_url, headers=strong.headers("GET", audit_url))
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["events"]


def test_access_token_lifetime_over_60_minutes_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="60 minutes"):
        Settings(access_token_minutes=61)


def test_sha256_pkce_helper_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert hashlib.sha256(verifier.encode()).digest()  # ascii only
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", s256(verifier))


async def test_totp_guessing_is_throttled(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    service = TenantService(db)
    user_id = await service.add_member(stack.tenants["acme"], "guessed@acme.test", "contributor")
    async with db.tenant_tx(stack.tenants["acme"], None, "system") as tx:
        await PasswordService().set_password(tx, user_id, PASSWORD)
        secret, _uri = await stack.identity.service.mfa.enroll(tx, user_id, "guessed@acme.test")
        await stack.identity.service.mfa.confirm(tx, user_id, pyotp.TOTP(secret).now())
    answer = await http.post(
        f"{stack.url}/authorize",
        data={**_authorize_params(), "email": "guessed@acme.test", "password": PASSWORD},
    )
    ticket = re.search(r'name=ticket value="([^"]+)"', answer.text)
    assert ticket is not None
    statuses = []
    for guess in range(8):
        wrong = await http.post(
            f"{stack.url}/authorize/mfa", data={"ticket": ticket.group(1), "code": f"{guess:06d}"}
        )
        statuses.append(wrong.status_code)
    assert statuses[:5] == [401] * 5
    assert set(statuses[5:]) == {429}
    right = await http.post(
        f"{stack.url}/authorize/mfa",
        data={"ticket": ticket.group(1), "code": pyotp.TOTP(secret).now()},
    )
    assert right.status_code == 429  # locked: even the right code waits out the lockout
    # One audit event for the lockout (none per refused attempt); no code was issued.
    async with db.tenant_tx(stack.tenants["acme"], None, "system") as tx:
        locked = await (
            await tx.execute(
                "SELECT count(*) AS n FROM bastion.audit_events "
                "WHERE action = 'mfa.locked' AND target = %s",
                (f"user:{user_id}",),
            )
        ).fetchone()
        codes = await (
            await tx.execute(
                "SELECT count(*) AS n FROM bastion.auth_codes WHERE user_id = %s", (user_id,)
            )
        ).fetchone()
    assert locked is not None and locked["n"] == 1
    assert codes is not None and codes["n"] == 0


async def test_key_rotation_fails_no_request_and_publishes_before_use(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    from bastion.identity.keys import SigningKeys

    before = await _login(stack, http)
    old_kid = _b64json(before.access_token.split(".")[0])["kid"]
    new_kid = SigningKeys(stack.keystore).rotate()
    assert new_kid != old_kid
    url = f"{stack.url}/userinfo"
    statuses = []
    deadline = time.monotonic() + 1.5  # across the verifier's key-list reload
    while time.monotonic() < deadline:
        statuses.append((await http.get(url, headers=before.headers("GET", url))).status_code)
    assert statuses and set(statuses) == {200}
    jwks = (await http.get(f"{stack.url}/.well-known/jwks.json")).json()
    assert {old_kid, new_kid} <= {key["kid"] for key in jwks["keys"]}
    after = await _login(stack, http)
    # Published now, used for signing only once relying parties could have fetched it.
    assert _b64json(after.access_token.split(".")[0])["kid"] == old_kid
    assert (await http.get(url, headers=after.headers("GET", url))).status_code == 200


# -- account self-service -----------------------------------------------------------------


async def _as(
    stack: Stack,
    http: httpx.AsyncClient,
    tokens: TokenSet,
    method: str,
    path: str,
    **kwargs: object,
) -> httpx.Response:
    url = f"{stack.url}{path}"
    return await http.request(method, url, headers=tokens.headers(method, url), **kwargs)  # type: ignore[arg-type]


async def _member_with_password(db: Database, stack: Stack, email: str, role: str) -> UUID:
    user_id = await TenantService(db).add_member(stack.tenants["acme"], email, role)
    async with db.tenant_tx(stack.tenants["acme"], None, "system") as tx:
        await PasswordService().set_password(tx, user_id, PASSWORD)
    return user_id


async def test_totp_enrolment_over_http_and_last_factor_rule(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    await _member_with_password(db, stack, "auditor2@acme.test", "auditor")
    tokens = await login(
        http, stack.url, tenant=_slugs["acme"], email="auditor2@acme.test", password=PASSWORD
    )
    enrolled = await _as(stack, http, tokens, "POST", "/me/mfa/totp")
    assert enrolled.status_code == 200 and enrolled.headers["cache-control"] == "no-store"
    secret = enrolled.json()["secret"]
    wrong = await _as(stack, http, tokens, "POST", "/me/mfa/totp/confirm", json={"code": "000000"})
    assert wrong.status_code == 403
    confirmed = await _as(
        stack, http, tokens, "POST", "/me/mfa/totp/confirm", json={"code": pyotp.TOTP(secret).now()}
    )
    assert confirmed.status_code == 200 and len(confirmed.json()["recovery_codes"]) == 10
    removed = await _as(stack, http, tokens, "DELETE", "/me/mfa/totp")
    assert removed.status_code == 409
    assert removed.json()["type"].endswith("/last-factor-required")
    with pytest.raises(LoginFailed, match="TOTP"):  # the factor is still there
        await login(
            http, stack.url, tenant=_slugs["acme"], email="auditor2@acme.test", password=PASSWORD
        )


async def test_password_change_refuses_weak_and_reused(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    await _member_with_password(db, stack, "changer@acme.test", "contributor")
    tokens = await login(
        http, stack.url, tenant=_slugs["acme"], email="changer@acme.test", password=PASSWORD
    )
    for new, status in (("password1", 422), (PASSWORD, 422)):
        answer = await _as(
            stack,
            http,
            tokens,
            "POST",
            "/me/password",
            json={"current_password": PASSWORD, "new_password": new},
        )
        assert answer.status_code == status
        assert new not in answer.text
    wrong = await _as(
        stack,
        http,
        tokens,
        "POST",
        "/me/password",
        json={"current_password": "not it at all", "new_password": "x"},
    )
    assert wrong.status_code == 403
    better = "violet anchor meadow 73 drifting"
    changed = await _as(
        stack,
        http,
        tokens,
        "POST",
        "/me/password",
        json={"current_password": PASSWORD, "new_password": better},
    )
    assert changed.status_code == 204
    assert await login(
        http, stack.url, tenant=_slugs["acme"], email="changer@acme.test", password=better
    )
