"""The built-in OAuth 2.0 / OpenID Connect provider: authorization code flow
with mandatory PKCE S256, DPoP-bound tokens and rotating refresh tokens.

Implements RFC 6749 (authorization code grant and refresh; no implicit or
password grant), RFC 7636 (PKCE, S256 only), RFC 9449 (DPoP binding), RFC 7009
(revocation) and the parts of OpenID Connect Core 1.0 a code-flow client needs.

Opaque codes and refresh tokens carry their tenant in clear before a random
part (``<tenant hex>.<secret>``): the service looks them up inside that
tenant's RLS context, by their SHA-256 only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import anyio

from bastion import audit
from bastion.db.pool import Conn, Database
from bastion.encoding import b64url_decode, b64url_encode, hex_decode
from bastion.identity import users
from bastion.identity.errors import Throttled
from bastion.identity.mfa import MfaService, mfa_required
from bastion.identity.passwords import PasswordService
from bastion.identity.throttle import LoginThrottle, client_network
from bastion.identity.tokens import TokenIssuer

CODE_LIFETIME = timedelta(seconds=60)
# The context of deployment-wide work (clients, throttle counters): no tenant's rows.
PLATFORM = UUID(int=0)
# The public client `bastion login` uses (RFC 8252 loopback redirect).
CLI_CLIENT_ID = "bastion-cli"
CLI_REDIRECT_URI = "http://127.0.0.1/callback"
_PKCE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # RFC 7636 section 4.1
# The roles a user holds in ``tx``'s tenant, sorted: memberships are the tenants
# domain's (``bastion.tenants.service.roles_of``), which sits above this one.
MemberRoles = Callable[[Conn, UUID], Awaitable[tuple[str, ...]]]
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
MAX_SCOPE = 512
SUPPORTED_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})


class OAuthError(Exception):
    """An RFC 6749 error: ``error`` is the registered code (section 4.1.2.1 / 5.2)."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


class ClientError(OAuthError):
    """The client or redirect URI is invalid: the user agent must NOT be redirected
    to it (RFC 6749 section 4.1.2.1); the provider shows the error itself."""


@dataclass(frozen=True)
class AuthorizationRequest:
    """A validated ``/authorize`` request (RFC 6749 4.1.1 + RFC 7636 4.3)."""

    client_id: str
    redirect_uri: str
    state: str | None
    scope: str
    nonce: str | None
    code_challenge: str
    tenant: str


@dataclass(frozen=True)
class LoginResult:
    """Who passed the password step, and whether a TOTP code is needed next."""

    user_id: UUID
    tenant_id: UUID
    roles: tuple[str, ...]
    needs_totp: bool


@dataclass(frozen=True)
class TokenResponse:
    """RFC 6749 5.1 successful response (with ``token_type`` DPoP, RFC 9449 5)."""

    access_token: str
    refresh_token: str
    expires_in: int
    scope: str
    id_token: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": self.access_token,
            "token_type": "DPoP",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "scope": self.scope,
        }
        if self.id_token:
            body["id_token"] = self.id_token
        return body


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _new_opaque(tenant_id: UUID) -> str:
    return f"{tenant_id.hex}.{secrets.token_urlsafe(32)}"


def _tenant_of(token: str) -> UUID | None:
    head, sep, rest = token.partition(".")
    if not sep or len(head) != 32 or len(rest) < 40 or len(token) > 200:
        return None
    try:
        # Lower-case hex only, as _new_opaque writes it: one spelling per token.
        return UUID(bytes=hex_decode(head, size=16))
    except ValueError:
        return None


def _canonical_s256(challenge: str) -> bool:
    """Whether ``challenge`` is a SHA-256 in strict base64url (43 characters, pad
    bits clear): the only spelling :func:`s256` can ever match (RFC 7636 4.2)."""
    try:
        b64url_decode(challenge, size=32)
    except ValueError:
        return False
    return True


def s256(verifier: str) -> str:
    """Return the PKCE S256 challenge of ``verifier`` (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return b64url_encode(digest)


class IdentityService:
    """The provider's logic; routes stay thin. Dependencies are passed in."""

    def __init__(
        self,
        db: Database,
        *,
        tokens: TokenIssuer,
        passwords: PasswordService,
        mfa: MfaService,
        throttle: LoginThrottle,
        member_roles: MemberRoles,
        refresh_lifetime: timedelta = timedelta(days=30),
    ) -> None:
        self.db = db
        self._roles = member_roles
        self.tokens = tokens
        self.passwords = passwords
        self.mfa = mfa
        self.throttle = throttle
        self.refresh_lifetime = refresh_lifetime

    # -- clients -------------------------------------------------------------

    async def register_client(
        self, client_id: str, name: str, redirect_uris: Sequence[str]
    ) -> None:
        """Register (or update) a public client with exact redirect URIs.

        Clients belong to the deployment, not to a tenant: the write runs as
        the system role in the platform context (no tenant's rows are visible).
        """
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            await tx.execute(
                "INSERT INTO bastion.oauth_clients (client_id, name, redirect_uris) "
                "VALUES (%s, %s, %s) ON CONFLICT (client_id) DO UPDATE "
                "SET name = EXCLUDED.name, redirect_uris = EXCLUDED.redirect_uris",
                (client_id, name, list(redirect_uris)),
            )

    # -- /authorize ------------------------------------------------------------

    async def validate_authorization(self, params: dict[str, str]) -> AuthorizationRequest:
        """Validate an authorization request.

        Raises :class:`ClientError` (show, don't redirect) for an unknown client
        or a redirect URI that is not registered exactly, and
        :class:`OAuthError` (redirect with ``error``) for everything else.
        """
        client_id = params.get("client_id", "")
        redirect_uri = params.get("redirect_uri", "")
        if not client_id or len(client_id) > 64 or len(redirect_uri) > 2000:
            raise ClientError("invalid_request", "client_id and redirect_uri are required")
        async with self.db.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT redirect_uris FROM bastion.oauth_clients WHERE client_id = %s",
                    (client_id,),
                )
            ).fetchone()
        if row is None:
            raise ClientError("invalid_client", "unknown client_id")
        # Exact string match (RFC 9700 section 4.1.3): no prefixes, no wildcards.
        if redirect_uri not in row["redirect_uris"]:
            raise ClientError("invalid_request", "redirect_uri is not registered for this client")
        if params.get("response_type") != "code":
            raise OAuthError("unsupported_response_type", "only response_type=code is supported")
        challenge = params.get("code_challenge")
        method = params.get("code_challenge_method")
        if not challenge:
            raise OAuthError("invalid_request", "PKCE code_challenge is required")
        if method != "S256":
            raise OAuthError("invalid_request", "code_challenge_method must be S256")
        if not _canonical_s256(challenge):
            raise OAuthError("invalid_request", "code_challenge is not a base64url SHA-256")
        scope = params.get("scope", "openid")
        if len(scope) > MAX_SCOPE or not set(scope.split()) <= SUPPORTED_SCOPES:
            raise OAuthError("invalid_scope", "unsupported scope")
        tenant = params.get("tenant", "")
        if tenant and not _SLUG.fullmatch(tenant):
            raise OAuthError("invalid_request", "malformed tenant")
        state, nonce = params.get("state"), params.get("nonce")
        if (state and len(state) > 500) or (nonce and len(nonce) > 500):
            raise OAuthError("invalid_request", "state or nonce too long")
        return AuthorizationRequest(client_id, redirect_uri, state, scope, nonce, challenge, tenant)

    async def login(self, tenant_slug: str, email: str, password: str, ip: str) -> LoginResult:
        """Check a password for ``email`` in ``tenant_slug``.

        Returns the :class:`LoginResult`. Waits first as long as the throttle
        says (at most its ``max_delay``). Raises :class:`Throttled` when the
        account is locked out for this client address ``ip`` (its own failures
        there), and :class:`OAuthError` (``access_denied``) for any bad
        combination, never saying which part was wrong.
        """
        denied = OAuthError("access_denied", "invalid tenant, e-mail or password", status=401)
        if not _SLUG.fullmatch(tenant_slug) or len(email) > 320 or len(password) > 1024:
            raise denied
        async with self.db.pool.connection() as conn:
            row = await (
                await conn.execute("SELECT bastion.tenant_id_by_slug(%s) AS id", (tenant_slug,))
            ).fetchone()
        tenant_id: UUID | None = row["id"] if row else None
        # Unknown tenants throttle (and cost) the same as known ones.
        context = tenant_id or PLATFORM
        async with self.db.tenant_tx(context, None, "system") as tx:
            attempt = await self.throttle.login(tx, tenant_slug, email, ip)
        # Others' failures slow this check down (bounded), never refuse it.
        await anyio.sleep(attempt.delay)
        user_id: UUID | None = None
        roles: tuple[str, ...] = ()
        async with self.db.tenant_tx(context, None, "system") as tx:
            if tenant_id is not None:
                user_id, roles = await self._member(tx, email)
            # Read for unknown users too (finding nothing): the same work either way.
            stored = await self.passwords.stored_hash(tx, user_id or PLATFORM)
        # argon2 (~0.3 s of a core) outside any transaction: anonymous sign-ins
        # never hold a connection of the pool every tenant's requests share.
        ok = await self.passwords.matches(stored, password)
        upgraded = await self.passwords.upgraded_hash(stored, password) if ok and stored else None
        async with self.db.tenant_tx(context, None, "system") as tx:
            if ok and user_id is not None and roles and tenant_id is not None:
                assert stored is not None
                await self.passwords.upgrade(tx, user_id, stored, upgraded)
                await self.throttle.succeeded(tx, attempt)  # only failures stay counted
                needs_totp = await self.mfa.has_factor(tx, user_id)
                return LoginResult(user_id, tenant_id, roles, needs_totp)
            if attempt.locked and tenant_id is not None:
                # Once per lockout (members or not: no oracle), in the tenant's trail.
                await audit.record(
                    tx,
                    actor="identity",
                    action="login.locked",
                    target=f"user:{user_id}" if user_id is not None else "",
                    details={"address": client_network(ip)},
                )
        raise denied

    async def second_factor(self, login: LoginResult, code: str, ip: str) -> bool:
        """Check a TOTP or recovery code for ``login``; True if it passed.

        Guesses are throttled like passwords (a 6-digit code is short). Raises
        :class:`Throttled` when the user's second factor is locked out.
        """
        # Keyed on the ticket's user id: no typed name reaches this counter.
        async with self.db.tenant_tx(login.tenant_id, None, "system") as tx:
            attempt = await self.throttle.second_factor(tx, login.user_id, ip)
        await anyio.sleep(attempt.delay)
        async with self.db.tenant_tx(login.tenant_id, None, "system") as tx:
            passed = await self.mfa.verify(tx, login.user_id, code) or (
                await self.mfa.use_recovery_code(tx, login.user_id, code)
            )
            if passed:
                await self.throttle.succeeded(tx, attempt)
            elif attempt.locked:
                await audit.record(
                    tx,
                    actor="identity",
                    action="mfa.locked",
                    target=f"user:{login.user_id}",
                    details={"address": client_network(ip)},
                )
        return passed

    async def issue_code(
        self, request: AuthorizationRequest, login: LoginResult, amr: Sequence[str]
    ) -> str:
        """Create a single-use authorization code for ``login``; return it."""
        code = _new_opaque(login.tenant_id)
        now = datetime.now(UTC)
        async with self.db.tenant_tx(login.tenant_id, None, "system") as tx:
            await tx.execute(
                "INSERT INTO bastion.auth_codes (code_hash, tenant_id, user_id, client_id, "
                "redirect_uri, code_challenge, scope, nonce, amr, auth_time, expires_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    _hash(code),
                    login.tenant_id,
                    login.user_id,
                    request.client_id,
                    request.redirect_uri,
                    request.code_challenge,
                    request.scope,
                    request.nonce,
                    list(amr),
                    now,
                    now + CODE_LIFETIME,
                ),
            )
        return code

    # -- /token ----------------------------------------------------------------

    async def exchange_code(
        self, *, code: str, client_id: str, redirect_uri: str, code_verifier: str, jkt: str
    ) -> TokenResponse:
        """Redeem an authorization code (RFC 6749 4.1.3, RFC 7636 4.6).

        Raises :class:`OAuthError` ``invalid_grant`` for an unknown, expired,
        reused or foreign code, a wrong redirect URI or a wrong verifier.
        """
        invalid = OAuthError("invalid_grant", "the authorization code is invalid")
        if not _PKCE.fullmatch(code_verifier or ""):
            raise OAuthError("invalid_request", "code_verifier must be 43-128 unreserved chars")
        tenant_id = _tenant_of(code)
        if tenant_id is None:
            raise invalid
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            # Marked used in the same statement that reads it: a code races once.
            row = await (
                await tx.execute(
                    "UPDATE bastion.auth_codes SET used_at = now() "
                    "WHERE code_hash = %s AND used_at IS NULL AND expires_at > now() "
                    "RETURNING user_id, client_id, redirect_uri, code_challenge, scope, nonce, "
                    "amr, auth_time",
                    (_hash(code),),
                )
            ).fetchone()
            if row is None:
                raise invalid
            verifier_ok = hmac.compare_digest(s256(code_verifier), row["code_challenge"])
            if (
                row["client_id"] != client_id
                or row["redirect_uri"] != redirect_uri
                or not verifier_ok
            ):
                raise invalid
            return await self._issue(
                tx,
                tenant_id,
                row,
                client_id=client_id,
                jkt=jkt,
                family_id=None,
                nonce=row["nonce"],
            )

    async def refresh(self, *, refresh_token: str, client_id: str, jkt: str) -> TokenResponse:
        """Rotate a refresh token (RFC 6749 6; RFC 9700 4.14.2 reuse detection).

        A token used a second time revokes its whole family and is audited.
        Raises :class:`OAuthError` ``invalid_grant``.
        """
        invalid = OAuthError("invalid_grant", "the refresh token is invalid")
        tenant_id = _tenant_of(refresh_token)
        if tenant_id is None:
            raise invalid
        reused = False
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            # The family's row first, locked: a revocation updates it before
            # the tokens, so rotation and revocation take turns (migration 0017).
            family = await (
                await tx.execute(
                    "SELECT revoked_at FROM bastion.refresh_families WHERE id = ("
                    "SELECT family_id FROM bastion.refresh_tokens WHERE token_hash = %s) "
                    "FOR UPDATE",
                    (_hash(refresh_token),),
                )
            ).fetchone()
            if family is None or family["revoked_at"] is not None:
                raise invalid
            row = await (
                await tx.execute(
                    "SELECT id, family_id, user_id, client_id, jkt, scope, amr, auth_time, "
                    "used_at, revoked_at, expires_at FROM bastion.refresh_tokens "
                    "WHERE token_hash = %s FOR UPDATE",
                    (_hash(refresh_token),),
                )
            ).fetchone()
            if row is None or row["revoked_at"] is not None:
                raise invalid
            if row["used_at"] is not None:
                await self._revoke_family(tx, row["family_id"], reason="refresh_token.reuse")
                reused = True
            elif (
                row["client_id"] != client_id
                or row["expires_at"] <= datetime.now(UTC)
                or (row["jkt"] is not None and not hmac.compare_digest(row["jkt"], jkt))
            ):
                raise invalid
            else:
                await tx.execute(
                    "UPDATE bastion.refresh_tokens SET used_at = now() WHERE id = %s",
                    (row["id"],),
                )
                return await self._issue(
                    tx,
                    tenant_id,
                    row,
                    client_id=client_id,
                    jkt=jkt,
                    family_id=row["family_id"],
                    nonce=None,
                )
        assert reused  # the family revocation above has committed
        raise invalid

    async def revoke(self, token: str, client_id: str) -> None:
        """Revoke a refresh token and its family (RFC 7009 2.1). Unknown tokens
        are ignored, as the RFC requires (the answer is 200 either way)."""
        tenant_id = _tenant_of(token)
        if tenant_id is None:
            return
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            row = await (
                await tx.execute(
                    "SELECT family_id, client_id FROM bastion.refresh_tokens WHERE token_hash = %s",
                    (_hash(token),),
                )
            ).fetchone()
            if row is not None and row["client_id"] == client_id:
                await self._revoke_family(tx, row["family_id"], reason="refresh_token.revoke")

    async def profile(
        self, tenant_id: UUID, user_id: UUID, db_role: str
    ) -> tuple[str | None, str | None]:
        """Return the user's e-mail and display name (OIDC Core 5.3 UserInfo), or Nones."""
        async with self.db.tenant_tx(tenant_id, user_id, db_role) as tx:
            return await users.profile(tx, user_id)

    # -- helpers -----------------------------------------------------------------

    async def _member(self, tx: Conn, email: str) -> tuple[UUID | None, tuple[str, ...]]:
        user_id = await users.user_id_by_email(tx, email)
        if user_id is None:
            return None, ()
        return user_id, await self._roles(tx, user_id)

    async def _issue(
        self,
        tx: Conn,
        tenant_id: UUID,
        grant: dict[str, Any],
        *,
        client_id: str,
        jkt: str,
        family_id: UUID | None,
        nonce: str | None,
    ) -> TokenResponse:
        """Issue tokens for ``grant`` (a code's or refresh token's row: user_id,
        scope, amr, auth_time) with the user's roles as they are now.

        Raises :class:`OAuthError` ``invalid_grant`` when the user no longer
        belongs to the tenant.
        """
        user_id, scope, amr, auth_time = (
            grant["user_id"],
            grant["scope"],
            grant["amr"],
            grant["auth_time"],
        )
        roles = await self._roles(tx, user_id)
        if not roles:
            raise OAuthError("invalid_grant", "the user no longer belongs to this tenant")
        if family_id is None:  # a new sign-in: a new family
            family = await (
                await tx.execute(
                    "INSERT INTO bastion.refresh_families (tenant_id, user_id, client_id) "
                    "VALUES (%s, %s, %s) RETURNING id",
                    (tenant_id, user_id, client_id),
                )
            ).fetchone()
            assert family is not None
            family_id = family["id"]
        refresh = _new_opaque(tenant_id)
        await tx.execute(
            "INSERT INTO bastion.refresh_tokens (family_id, token_hash, tenant_id, user_id, "
            "client_id, jkt, scope, amr, auth_time, expires_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                family_id,
                _hash(refresh),
                tenant_id,
                user_id,
                client_id,
                jkt,
                scope,
                list(amr),
                auth_time,
                datetime.now(UTC) + self.refresh_lifetime,
            ),
        )
        access, claims = self.tokens.issue_access(
            user_id=user_id,
            tenant_id=tenant_id,
            roles=roles,
            amr=tuple(amr),
            jkt=jkt,
            scope=scope,
            auth_time=int(auth_time.timestamp()),
            sid=str(family_id),
        )
        id_token = None
        if "openid" in scope.split():
            id_token = self.tokens.issue_id_token(
                user_id=user_id,
                tenant_id=tenant_id,
                client_id=client_id,
                nonce=nonce,
                auth_time=int(auth_time.timestamp()),
                amr=tuple(amr),
            )
        return TokenResponse(access, refresh, claims.exp - claims.iat, scope, id_token)

    @staticmethod
    async def _revoke_family(tx: Conn, family_id: UUID, *, reason: str) -> None:
        # The family's row first: this waits for a rotation in progress, and
        # the next statement (a fresh snapshot under READ COMMITTED) then sees
        # the token that rotation issued. A rotation that comes later waits
        # for this one and finds the family revoked.
        family = await (
            await tx.execute(
                "UPDATE bastion.refresh_families SET revoked_at = now(), revoked_reason = %s "
                "WHERE id = %s AND revoked_at IS NULL RETURNING user_id",
                (reason, family_id),
            )
        ).fetchone()
        await tx.execute(
            "UPDATE bastion.refresh_tokens SET revoked_at = now() "
            "WHERE family_id = %s AND revoked_at IS NULL",
            (family_id,),
        )
        # The user, for the detectors (a reuse revokes all of that user's sessions).
        details = {"user": str(family["user_id"])} if family is not None else {}
        await audit.record(
            tx, actor="identity", action=reason, target=f"family:{family_id}", details=details
        )


def amr_for(login: LoginResult, *, totp_passed: bool) -> list[str]:
    """Authentication methods (RFC 8176) of a completed login."""
    return ["pwd", "otp", "mfa"] if totp_passed else ["pwd"]


__all__ = [
    "AuthorizationRequest",
    "ClientError",
    "IdentityService",
    "LoginResult",
    "OAuthError",
    "Throttled",
    "TokenResponse",
    "amr_for",
    "mfa_required",
    "s256",
]
