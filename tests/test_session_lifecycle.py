"""Session lifecycle, attacked over real HTTP and on the real database:

* a password change, an MFA change or "sign out everywhere" ends every other
  session (refresh-token family) of the user, in every tenant, descendants
  and unredeemed codes included; the caller's own session stays;
* a family's revocation and a concurrent rotation take turns on the family's
  row: no token of a revoked family is ever left live;
* changing the second factor needs a sign-in within five minutes (a refresh
  keeps the sign-in's time), refused as problem+json, audited, nothing written;
* a tenant keeps an owner whatever runs at once (two owners revoking each
  other, a downgrade, a user's deletion): the database refuses the rest.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID, uuid4

import httpx
import psycopg
import pyotp
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from bastion.access.approvals import ApprovalError, ApprovalService
from bastion.compose import Identity, build_identity
from bastion.db import provision
from bastion.db.pool import Database
from bastion.identity.client import DpopAuth, LoginFailed, TokenSet, login, refresh
from bastion.identity.dpop import DpopKey
from bastion.identity.passwords import PasswordService
from bastion.identity.service import (
    CLI_CLIENT_ID,
    CLI_REDIRECT_URI,
    AuthorizationRequest,
    IdentityService,
    LoginResult,
    OAuthError,
    s256,
)
from bastion.identity.sessions import revoke_other_sessions
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantMembers, TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery staple 42"
NEW_PASSWORD = "violet anchor meadow 73 drifting"
PROBLEM = "application/problem+json"


@dataclass
class Stack:
    url: str
    superuser: str
    identity: Identity
    slugs: dict[str, str]  # tenant name -> slug
    tenants: dict[str, UUID]


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    tenants: dict[str, UUID] = {}
    slugs: dict[str, str] = {}

    async def seed(db: Database, _identity: Identity) -> None:
        service = TenantService(db)
        for name in ("acme", "globex"):
            slugs[name] = f"{name}-{uuid4().hex[:6]}"
            tenants[name] = (await service.create_tenant(slugs[name], name)).id

    with api_server(database, keystore, seed) as (url, _app, identity):
        yield Stack(url, database.superuser, identity, slugs, tenants)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15, follow_redirects=False) as client:
        yield client


def _sql(stack: Stack, query: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows of ``query`` as the superuser (sees every tenant, changes anything)."""
    with psycopg.connect(stack.superuser, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


async def _person(db: Database, stack: Stack, role: str, *tenants: str) -> tuple[UUID, str]:
    """A user with a password, member of ``tenants`` (acme by default) as ``role``."""
    email = f"{role}-{uuid4().hex[:8]}@people.test"
    service = TenantService(db)
    user_id = None
    for name in tenants or ("acme",):
        user_id = await service.add_member(stack.tenants[name], email, role)
    assert user_id is not None
    async with db.tenant_tx(stack.tenants["acme"], None, "system") as tx:
        await PasswordService().set_password(tx, user_id, PASSWORD)
    return user_id, email


async def _login(
    stack: Stack, http: httpx.AsyncClient, email: str, tenant: str = "acme", **kwargs: Any
) -> TokenSet:
    return await login(
        http,
        stack.url,
        tenant=stack.slugs[tenant],
        email=email,
        password=kwargs.pop("password", PASSWORD),
        **kwargs,
    )


async def _call(
    stack: Stack,
    http: httpx.AsyncClient,
    tokens: TokenSet,
    method: str,
    path: str,
    body: Any = None,
) -> httpx.Response:
    url = f"{stack.url}{path}"
    return await http.request(method, url, json=body, headers=tokens.headers(method, url))


def _live_tokens(stack: Stack, refresh_token: str) -> int:
    """Tokens of ``refresh_token``'s family that are neither used nor revoked."""
    rows = _sql(
        stack,
        "SELECT count(*) FROM bastion.refresh_tokens WHERE revoked_at IS NULL "
        "AND used_at IS NULL AND family_id = (SELECT family_id FROM bastion.refresh_tokens "
        "WHERE token_hash = sha256(convert_to(%s, 'UTF8')))",
        refresh_token,
    )
    return int(rows[0][0])


def _unrevoked_in_family(stack: Stack, refresh_token: str) -> int:
    rows = _sql(
        stack,
        "SELECT count(*) FROM bastion.refresh_tokens WHERE revoked_at IS NULL "
        "AND family_id = (SELECT family_id FROM bastion.refresh_tokens "
        "WHERE token_hash = sha256(convert_to(%s, 'UTF8')))",
        refresh_token,
    )
    return int(rows[0][0])


def _token_rows(stack: Stack) -> int:
    return int(_sql(stack, "SELECT count(*) FROM bastion.refresh_tokens")[0][0])


def _audit(stack: Stack, tenant: UUID, action: str, target: str) -> list[dict[str, Any]]:
    rows = _sql(
        stack,
        "SELECT details FROM bastion.audit_events WHERE tenant_id = %s AND action = %s "
        "AND target = %s ORDER BY seq",
        tenant,
        action,
        target,
    )
    return [row[0] for row in rows]


async def _refused(stack: Stack, http: httpx.AsyncClient, tokens: TokenSet) -> None:
    """``tokens``' refresh token is refused (invalid_grant) and writes no token."""
    before = _token_rows(stack)
    with pytest.raises(LoginFailed, match="invalid_grant"):
        await refresh(http, stack.url, tokens)
    assert _token_rows(stack) == before


async def _pending_code(stack: Stack, http: httpx.AsyncClient, email: str) -> tuple[str, str]:
    """An authorization code issued to ``email`` and not yet redeemed, with its verifier."""
    verifier = secrets.token_urlsafe(48)
    answer = await http.post(
        f"{stack.url}/authorize",
        data={
            "response_type": "code",
            "client_id": CLI_CLIENT_ID,
            "redirect_uri": CLI_REDIRECT_URI,
            "scope": "openid",
            "code_challenge": s256(verifier),
            "code_challenge_method": "S256",
            "tenant": stack.slugs["acme"],
            "email": email,
            "password": PASSWORD,
        },
    )
    assert answer.status_code == 303, answer.text
    return parse_qs(urlsplit(answer.headers["location"]).query)["code"][0], verifier


async def _redeem(
    stack: Stack, http: httpx.AsyncClient, code: str, verifier: str
) -> httpx.Response:
    return await http.post(
        f"{stack.url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": CLI_CLIENT_ID,
            "redirect_uri": CLI_REDIRECT_URI,
            "code_verifier": verifier,
        },
        auth=DpopAuth(DpopKey.generate()),
    )


# -- a password change ends every other session -------------------------------------------


async def test_password_change_ends_every_other_session_in_every_tenant(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    user_id, email = await _person(db, stack, "contributor", "acme", "globex")
    mine = await _login(stack, http, email)
    laptop = await _login(stack, http, email)
    laptop_rotated = await refresh(http, stack.url, laptop)  # a descendant
    elsewhere = await _login(stack, http, email, tenant="globex")
    code, verifier = await _pending_code(stack, http, email)

    changed = await _call(
        stack,
        http,
        mine,
        "POST",
        "/me/password",
        {"current_password": PASSWORD, "new_password": NEW_PASSWORD},
    )
    assert changed.status_code == 204, changed.text

    await _refused(stack, http, laptop_rotated)  # the family's newest token
    await _refused(stack, http, laptop)  # and the one it was rotated from
    await _refused(stack, http, elsewhere)  # another tenant's session of the same person
    for tokens in (laptop, laptop_rotated, elsewhere):
        assert _unrevoked_in_family(stack, tokens.refresh_token) == 0
    # A code issued before the change cannot start a new session after it.
    before = _token_rows(stack)
    late = await _redeem(stack, http, code, verifier)
    assert late.status_code == 400 and late.json()["error"] == "invalid_grant"
    assert _token_rows(stack) == before
    # The caller's own session stays, and the new password signs in.
    assert (await refresh(http, stack.url, mine)).access_token
    assert await _login(stack, http, email, password=NEW_PASSWORD)
    events = _audit(stack, stack.tenants["acme"], "password.change", f"user:{user_id}")
    assert events == [{"sessions_ended": 2}]


async def test_sign_out_everywhere_ends_the_others_and_keeps_this_one(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    user_id, email = await _person(db, stack, "viewer", "acme", "globex")
    other_user, other_email = await _person(db, stack, "viewer")
    mine = await _login(stack, http, email)
    phone = await refresh(http, stack.url, await _login(stack, http, email))
    elsewhere = await _login(stack, http, email, tenant="globex")
    bystander = await _login(stack, http, other_email)

    answer = await _call(stack, http, mine, "DELETE", "/me/sessions")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"sessions_ended": 2}
    assert answer.headers["cache-control"] == "no-store"

    await _refused(stack, http, phone)
    await _refused(stack, http, elsewhere)
    assert (await refresh(http, stack.url, mine)).access_token
    assert (await refresh(http, stack.url, bystander)).access_token  # someone else's: untouched
    events = _audit(stack, stack.tenants["acme"], "sessions.end", f"user:{user_id}")
    assert events == [{"sessions_ended": 2}]
    assert _audit(stack, stack.tenants["acme"], "sessions.end", f"user:{other_user}") == []


async def test_only_the_user_themself_may_end_their_sessions(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    """The database function refuses a context of another user, whatever its
    role there (SQL as bastion_app, an owner of the tenant)."""
    victim, email = await _person(db, stack, "viewer")
    owner, _ = await _person(db, stack, "owner")
    session = await _login(stack, http, email)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="themself"):
        async with db.tenant_tx(stack.tenants["acme"], owner, "owner") as tx:
            await tx.execute("SELECT bastion.revoke_sessions(%s, NULL, 'x')", (victim,))
    assert _live_tokens(stack, session.refresh_token) == 1


# -- revocation and rotation take turns -----------------------------------------------------


@pytest.fixture
async def own_service(
    stack: Stack, database: DbHandles, keystore: LocalKeystore
) -> AsyncIterator[tuple[IdentityService, Database]]:
    """The provider's service on a pool of this test's loop, four connections
    open before any race starts."""
    async with Database(database.app, database.context_key, min_size=4, max_size=4) as db:
        yield build_identity(Settings(issuer=stack.url), db, keystore).service, db


async def _new_family(
    service: IdentityService, user_id: UUID, tenant_id: UUID, key: DpopKey
) -> str:
    """A fresh sign-in's refresh token, issued through the service's own code flow."""
    verifier = secrets.token_urlsafe(48)
    request = AuthorizationRequest(
        CLI_CLIENT_ID, CLI_REDIRECT_URI, None, "openid", None, s256(verifier), ""
    )
    code = await service.issue_code(
        request, LoginResult(user_id, tenant_id, ("viewer",), False), ["pwd"]
    )
    tokens = await service.exchange_code(
        code=code,
        client_id=CLI_CLIENT_ID,
        redirect_uri=CLI_REDIRECT_URI,
        code_verifier=verifier,
        jkt=key.thumbprint,
    )
    return tokens.refresh_token


async def test_revocation_racing_rotation_never_leaves_a_live_token(
    stack: Stack, db: Database, own_service: tuple[IdentityService, Database]
) -> None:
    service, _pool = own_service
    user_id, _email = await _person(db, stack, "viewer")
    key = DpopKey.generate()
    rotated_first = 0
    for round_ in range(50):
        token = await _new_family(service, user_id, stack.tenants["acme"], key)
        rotate = service.refresh(refresh_token=token, client_id=CLI_CLIENT_ID, jkt=key.thumbprint)
        revoke = service.revoke(token, CLI_CLIENT_ID)
        racers = (rotate, revoke) if round_ % 2 else (revoke, rotate)
        results = await asyncio.gather(*racers, return_exceptions=True)
        rotated = [r for r in results if not isinstance(r, BaseException) and r is not None]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, OAuthError) and r.error == "invalid_grant" for r in refused)
        # Whoever won, the family ends revoked: not one of its tokens is live.
        assert _unrevoked_in_family(stack, token) == 0, f"round {round_}"
        for response in rotated:
            rotated_first += 1
            with pytest.raises(OAuthError, match="invalid"):
                await service.refresh(
                    refresh_token=response.refresh_token,  # type: ignore[union-attr]
                    client_id=CLI_CLIENT_ID,
                    jkt=key.thumbprint,
                )
    # Both orders happened: the race was a race.
    assert 0 < rotated_first < 50


async def test_sign_out_everywhere_racing_rotation_never_leaves_a_live_token(
    stack: Stack, db: Database, own_service: tuple[IdentityService, Database]
) -> None:
    service, pool = own_service
    user_id, _email = await _person(db, stack, "viewer")
    key = DpopKey.generate()

    async def everywhere() -> int:
        async with pool.tenant_tx(stack.tenants["acme"], user_id, "viewer") as tx:
            return await revoke_other_sessions(tx, user_id, keep=None, reason="sessions.end")

    for round_ in range(30):
        tokens = [await _new_family(service, user_id, stack.tenants["acme"], key) for _ in range(2)]
        rotations = [
            service.refresh(refresh_token=t, client_id=CLI_CLIENT_ID, jkt=key.thumbprint)
            for t in tokens
        ]
        await asyncio.gather(everywhere(), *rotations, return_exceptions=True)
        for token in tokens:
            assert _unrevoked_in_family(stack, token) == 0, f"round {round_}"


# -- MFA changes need a recent sign-in --------------------------------------------------------


async def _signed_in_minutes_ago(
    stack: Stack, http: httpx.AsyncClient, tokens: TokenSet, minutes: float
) -> TokenSet:
    """A token as a refresh gives it ``minutes`` after the sign-in (the family's
    auth_time moved back; a refresh keeps auth_time)."""
    _sql(
        stack,
        "UPDATE bastion.refresh_tokens SET auth_time = now() - make_interval(secs => %s) "
        "WHERE token_hash = sha256(convert_to(%s, 'UTF8'))",
        minutes * 60,
        tokens.refresh_token,
    )
    return await refresh(http, stack.url, tokens)


def _factor(stack: Stack, user_id: UUID) -> tuple[Any, ...] | None:
    rows = _sql(
        stack,
        "SELECT confirmed_at IS NOT NULL, secret_sealed, "
        "(SELECT count(*) FROM bastion.recovery_codes r WHERE r.user_id = t.user_id) "
        "FROM bastion.mfa_totp t WHERE user_id = %s",
        user_id,
    )
    return rows[0] if rows else None


@pytest.mark.parametrize("change", ["enrol", "confirm", "remove"])
async def test_mfa_change_with_an_old_sign_in_is_refused_and_writes_nothing(
    stack: Stack, http: httpx.AsyncClient, db: Database, change: str
) -> None:
    user_id, email = await _person(db, stack, "contributor")
    mfa = stack.identity.service.mfa
    secret = pyotp.random_base32()  # a code of no factor, for "enrol"
    if change in ("confirm", "remove"):  # a pending factor (confirmed below for "remove")
        async with db.tenant_tx(stack.tenants["acme"], None, "system") as tx:
            secret, _uri = await mfa.enroll(tx, user_id, email)
    # Signed in while no factor was confirmed: no TOTP asked.
    signed_in = await _login(stack, http, email)
    other = await _login(stack, http, email)
    if change == "remove":
        async with db.tenant_tx(stack.tenants["acme"], None, "system") as tx:
            await mfa.confirm(tx, user_id, pyotp.TOTP(secret).now())
    stale = await _signed_in_minutes_ago(stack, http, signed_in, 5.5)
    factor_before = _factor(stack, user_id)
    tokens_before = _token_rows(stack)

    method, path, body = {
        "enrol": ("POST", "/me/mfa/totp", None),
        "confirm": ("POST", "/me/mfa/totp/confirm", {"code": pyotp.TOTP(secret).now()}),
        "remove": ("DELETE", "/me/mfa/totp", None),
    }[change]
    answer = await _call(stack, http, stale, method, path, body)

    assert answer.status_code == 403
    assert answer.headers["content-type"] == PROBLEM
    problem = answer.json()
    assert problem["type"].endswith("/reauthentication-required")
    assert problem["max_age"] == 300
    assert "insufficient_user_authentication" in answer.headers["www-authenticate"]
    assert "max_age=300" in answer.headers["www-authenticate"]
    assert _factor(stack, user_id) == factor_before  # nothing written
    assert _token_rows(stack) == tokens_before
    assert _live_tokens(stack, other.refresh_token) == 1  # no session was ended
    attempted = {"enrol": "mfa.enroll", "confirm": "mfa.confirm", "remove": "mfa.remove"}[change]
    events = _audit(stack, stack.tenants["acme"], "reauthentication.required", f"user:{user_id}")
    assert events == [{"attempted": attempted}]


async def test_mfa_changes_with_a_fresh_sign_in_work_and_end_other_sessions(
    stack: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    user_id, email = await _person(db, stack, "contributor")
    first = await _login(stack, http, email)
    second = await _login(stack, http, email)
    recent = await _signed_in_minutes_ago(stack, http, first, 4)  # within five minutes

    enrolled = await _call(stack, http, recent, "POST", "/me/mfa/totp")
    assert enrolled.status_code == 200, enrolled.text
    secret = enrolled.json()["secret"]
    confirmed = await _call(
        stack, http, recent, "POST", "/me/mfa/totp/confirm", {"code": pyotp.TOTP(secret).now()}
    )
    assert confirmed.status_code == 200, confirmed.text
    await _refused(stack, http, second)  # enrolling a factor ended the other session
    assert _audit(stack, stack.tenants["acme"], "mfa.enroll", f"user:{user_id}") == [
        {"sessions_ended": 1}
    ]

    third = await _login(stack, http, email, totp=pyotp.TOTP(secret).at(int(time.time()) + 30))
    removed = await _call(stack, http, third, "DELETE", "/me/mfa/totp")
    assert removed.status_code == 204, removed.text
    assert _factor(stack, user_id) is None
    with pytest.raises(LoginFailed, match="invalid_grant"):
        await refresh(http, stack.url, recent)  # first's family: ended by the removal
    assert (await refresh(http, stack.url, third)).access_token


# -- a tenant keeps an owner --------------------------------------------------------------------


def _owners(stack: Stack, tenant: UUID) -> int:
    rows = _sql(
        stack,
        "SELECT count(*) FROM bastion.memberships WHERE tenant_id = %s AND role = 'owner'",
        tenant,
    )
    return int(rows[0][0])


async def _tenant_with_owners(db: Database, n: int) -> tuple[UUID, list[UUID]]:
    service = TenantService(db)
    tenant = (await service.create_tenant(f"own-{uuid4().hex[:8]}", "owners")).id
    owners = [
        await service.add_member(tenant, f"o{i}-{uuid4().hex[:6]}@owners.test", "owner")
        for i in range(n)
    ]
    return tenant, owners


def _owner_token(stack: Stack, tenant: UUID, user_id: UUID) -> tuple[str, DpopKey]:
    key = DpopKey.generate()
    token, _claims = stack.identity.service.tokens.issue_access(
        user_id=user_id,
        tenant_id=tenant,
        roles=("owner",),
        amr=("pwd", "otp", "mfa"),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    return token, key


async def test_two_owners_revoking_each_other_at_once_leave_one(stack: Stack, db: Database) -> None:
    outcomes: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=15) as http:
        for round_ in range(20):
            tenant, (a, b) = await _tenant_with_owners(db, 2)
            requests = []
            for actor, target in ((a, b), (b, a)):
                token, key = _owner_token(stack, tenant, actor)
                url = f"{stack.url}/tenants/{tenant}/members/{target}/roles/owner"
                headers = {
                    "Authorization": f"DPoP {token}",
                    "DPoP": key.proof("DELETE", url, access_token=token),
                }
                requests.append(http.delete(url, headers=headers))
            answers = await asyncio.gather(*requests)
            assert _owners(stack, tenant) == 1, f"round {round_}"
            statuses = sorted(answer.status_code for answer in answers)
            assert statuses[0] == 204 and statuses[1] != 204
            loser = max(answers, key=lambda answer: answer.status_code)
            assert loser.status_code in (403, 409), loser.text
            assert loser.headers["content-type"] == PROBLEM
            problem = loser.json()
            if loser.status_code == 409:  # both passed the guard: the database chose
                assert problem["type"].endswith("/role-change-refused")
                assert problem["reason"] == "last-owner"
            else:  # the winner committed before the loser's guard read its roles
                assert problem["type"].endswith("/forbidden")
            kind = problem["type"].rsplit("/", 1)[-1]
            outcomes[kind] = outcomes.get(kind, 0) + 1
            revokes = _sql(
                stack,
                "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s "
                "AND action = 'role.revoke'",
                tenant,
            )
            assert revokes == [(1,)]  # the loser wrote nothing
    assert sum(outcomes.values()) == 20


async def test_concurrent_owner_removals_in_the_service_leave_one(
    stack: Stack, database: DbHandles
) -> None:
    async with Database(database.app, database.context_key, min_size=6, max_size=6) as pool:
        approvals = ApprovalService(pool, TenantMembers())
        for round_ in range(20):
            tenant, owners = await _tenant_with_owners(pool, 3)
            # Each owner removes the next one: all three at once.
            removals = [
                approvals.revoke(tenant, actor, owners[(i + 1) % 3], "owner")
                for i, actor in enumerate(owners)
            ]
            results = await asyncio.gather(*removals, return_exceptions=True)
            assert _owners(stack, tenant) == 1, f"round {round_}"
            assert results.count(True) == 2
            refused = [r for r in results if r is not True]
            assert len(refused) == 1
            assert isinstance(refused[0], ApprovalError) and refused[0].reason == "last-owner"


async def test_the_last_owner_cannot_be_removed_by_any_statement(
    stack: Stack, db: Database, database: DbHandles
) -> None:
    tenant, (owner,) = await _tenant_with_owners(db, 1)
    # Over HTTP: revoking oneself, the only owner.
    token, key = _owner_token(stack, tenant, owner)
    url = f"{stack.url}/tenants/{tenant}/members/{owner}/roles/owner"
    async with httpx.AsyncClient(timeout=15) as http:
        answer = await http.delete(
            url,
            headers={
                "Authorization": f"DPoP {token}",
                "DPoP": key.proof("DELETE", url, access_token=token),
            },
        )
    assert answer.status_code == 409 and answer.headers["content-type"] == PROBLEM
    assert answer.json()["reason"] == "last-owner"
    # As bastion_app in the owner's context (an SQL injection): delete, downgrade.
    for statement in (
        "DELETE FROM bastion.memberships WHERE role = 'owner'",
        "UPDATE bastion.memberships SET role = 'viewer' WHERE role = 'owner'",
    ):
        with pytest.raises(psycopg.errors.CheckViolation, match="keeps at least one owner"):
            async with db.tenant_tx(tenant, owner, "owner") as tx:
                await tx.execute(statement)
    # Deleting the user (cascading to the membership), even as the superuser.
    with pytest.raises(psycopg.errors.CheckViolation, match="keeps at least one owner"):
        _sql(stack, "DELETE FROM bastion.users WHERE id = %s", owner)
    assert _owners(stack, tenant) == 1
    assert _sql(stack, "SELECT count(*) FROM bastion.users WHERE id = %s", owner) == [(1,)]
    # With a second owner, either may go.
    second = await TenantService(db).add_member(tenant, f"n-{uuid4().hex[:6]}@o.test", "owner")
    assert await ApprovalService(db, TenantMembers()).revoke(tenant, second, owner, "owner")
    assert _owners(stack, tenant) == 1


# -- the migration ---------------------------------------------------------------------------


def _migrate(owner: str, action: str, revision: str) -> None:
    """Run alembic ``action`` to ``revision`` as the schema owner."""
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(owner), poolclass=NullPool
    )
    config = Config()
    config.set_main_option("script_location", str(provision._MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def test_0017_downgrades_and_upgrades_again_keeping_every_family(
    stack: Stack, database: DbHandles
) -> None:
    """Last in this module: it rebuilds the families from the tokens the tests
    above left (live, used, revoked)."""
    families = "SELECT id, revoked_at IS NOT NULL FROM bastion.refresh_families ORDER BY id"
    before = _sql(stack, families)
    assert len(before) > 20 and {revoked for _id, revoked in before} == {True, False}
    _migrate(database.owner, "downgrade", "0016")
    assert _sql(stack, "SELECT to_regclass('bastion.refresh_families')") == [(None,)]
    _migrate(database.owner, "upgrade", "head")
    # One row per family again, revoked exactly when each of its tokens is.
    assert _sql(stack, families) == before
    orphans = _sql(
        stack,
        "SELECT count(*) FROM bastion.refresh_tokens t WHERE NOT EXISTS "
        "(SELECT 1 FROM bastion.refresh_families f WHERE f.id = t.family_id)",
    )
    assert orphans == [(0,)]
