"""Account self-service: TOTP enrolment and removal, password change, and
"sign out everywhere".

Each route acts on the caller only (the token's user, in the token's tenant)
and runs with the user's own database context, which RLS limits to their rows.
A password or MFA change ends the caller's other sessions in the same
transaction; changing MFA needs a sign-in within the last five minutes
(:mod:`bastion.identity.sessions`).
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bastion import audit
from bastion.access.guard import Guard
from bastion.api.problems import Problem, problem_type
from bastion.db.pool import Conn, Database
from bastion.identity.auth import Principal
from bastion.identity.errors import (
    LastFactorRequired,
    MfaError,
    PasswordChanged,
    PasswordReused,
    Throttled,
    WeakPassword,
)
from bastion.identity.mfa import MfaService, mfa_required
from bastion.identity.passwords import PasswordService
from bastion.identity.sessions import (
    RECENT_SIGN_IN_SECONDS,
    revoke_other_sessions,
    session_of,
    signed_in_recently,
)
from bastion.identity.throttle import LoginThrottle, client_network

_NO_STORE = {"Cache-Control": "no-store"}


class PasswordRefused(Problem):
    type = problem_type("password-refused")
    title = "Password refused"
    status = 422


class PasswordConflict(Problem):
    type = problem_type("password-changed-meanwhile")
    title = "The password was changed meanwhile"
    status = 409


class WrongCredentials(Problem):
    type = problem_type("wrong-credentials")
    title = "Current password or code is wrong"
    status = 403


class LastFactor(Problem):
    type = problem_type("last-factor-required")
    title = "The last second factor cannot be removed"
    status = 409


class TooManyAttempts(Problem):
    type = problem_type("too-many-attempts")
    title = "Too many attempts"
    status = 429


class TotpConflict(Problem):
    type = problem_type("totp-already-enrolled")
    title = "A TOTP factor is already enrolled"
    status = 409


class ReauthenticationRequired(Problem):
    """RFC 9470: the sign-in behind the token is too old for this action."""

    type = problem_type("reauthentication-required")
    title = "A recent sign-in is required"
    status = 403


def _reauthentication_required() -> ReauthenticationRequired:
    problem = ReauthenticationRequired(
        f"sign in again (within {RECENT_SIGN_IN_SECONDS // 60} minutes) to change "
        "your second factor; a refreshed token keeps the time of its sign-in",
        max_age=RECENT_SIGN_IN_SECONDS,
    )
    # RFC 9470 section 3: the client runs the authorization request again
    # (every sign-in at /authorize asks for the credentials).
    problem.headers = {
        "WWW-Authenticate": 'DPoP error="insufficient_user_authentication", '
        'error_description="a recent sign-in is required", '
        f"max_age={RECENT_SIGN_IN_SECONDS}"
    }
    return problem


class Code(BaseModel):
    code: str = Field(min_length=6, max_length=32)


class PasswordChange(BaseModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024)


def build_router(
    db: Database,
    guard: Guard,
    mfa: MfaService,
    passwords: PasswordService,
    throttle: LoginThrottle,
) -> APIRouter:
    router = APIRouter(prefix="/me")
    may_manage_mfa = guard("account:mfa", "Account")
    may_change_password = guard("account:password", "Account")
    may_end_sessions = guard("account:sessions", "Account")

    async def require_recent_sign_in(principal: Principal, attempted: str) -> None:
        """Refuse (403, audited, nothing else written) unless the caller signed
        in within the last five minutes."""
        if signed_in_recently(principal.claims):
            return
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            await audit.record(
                tx,
                actor=f"user:{principal.user_id}",
                action="reauthentication.required",
                target=f"user:{principal.user_id}",
                details={"attempted": attempted},
            )
        raise _reauthentication_required()

    @router.post("/mfa/totp")
    async def enroll(principal: Principal = Depends(may_manage_mfa)) -> JSONResponse:
        """Start TOTP enrolment; answers the secret once (for the authenticator app)."""
        await require_recent_sign_in(principal, "mfa.enroll")
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            try:
                secret, uri = await mfa.enroll(tx, principal.user_id, str(principal.user_id))
            except MfaError:
                raise TotpConflict("remove the current factor first") from None
        return JSONResponse({"secret": secret, "otpauth_uri": uri}, headers=_NO_STORE)

    async def end_other_sessions(tx: Conn, principal: Principal, action: str) -> int:
        """End every other session of the caller (in every tenant) and record
        ``action`` with how many ended, in ``tx``."""
        ended = await revoke_other_sessions(
            tx, principal.user_id, keep=session_of(principal.claims), reason=action
        )
        await audit.record(
            tx,
            actor=f"user:{principal.user_id}",
            action=action,
            target=f"user:{principal.user_id}",
            details={"sessions_ended": ended},
        )
        return ended

    @router.post("/mfa/totp/confirm")
    async def confirm(body: Code, principal: Principal = Depends(may_manage_mfa)) -> JSONResponse:
        """Confirm enrolment with a first code; answers the recovery codes once.
        The caller's other sessions end."""
        await require_recent_sign_in(principal, "mfa.confirm")
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            try:
                codes = await mfa.confirm(tx, principal.user_id, body.code)
            except MfaError:
                raise WrongCredentials("that code is not valid") from None
            await end_other_sessions(tx, principal, "mfa.enroll")
        return JSONResponse({"recovery_codes": codes}, headers=_NO_STORE)

    @router.delete("/mfa/totp", status_code=204)
    async def remove(principal: Principal = Depends(may_manage_mfa)) -> None:
        """Remove the TOTP factor; refused for holders of admin-grade roles.
        The caller's other sessions end."""
        await require_recent_sign_in(principal, "mfa.remove")
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            try:
                await mfa.remove(
                    tx, principal.user_id, holds_admin_role=mfa_required(principal.roles)
                )
            except LastFactorRequired:
                raise LastFactor("owners, billing-admins and auditors must keep MFA") from None
            await end_other_sessions(tx, principal, "mfa.remove")

    @router.post("/password", status_code=204)
    async def change_password(
        body: PasswordChange, request: Request, principal: Principal = Depends(may_change_password)
    ) -> None:
        """Change the caller's password (the current one is required).

        Guesses of the current password are throttled like logins, on the
        token's user (never on anything typed) and the client address: a
        stolen token must not become a password oracle, and no one's failures
        hold up another user's change.
        """
        address = request.client.host if request.client else "unknown"
        async with db.tenant_tx(principal.tenant_id, None, "system") as tx:
            try:
                attempt = await throttle.password_change(tx, principal.user_id, address)
            except Throttled as exc:
                raise TooManyAttempts(headers={"Retry-After": str(exc.retry_after)}) from None
        await anyio.sleep(attempt.delay)
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            current, previous = await passwords.known_hashes(tx, principal.user_id)
        # Every argon2 run (about 0.3 s of a core each, up to a dozen here) happens
        # outside any transaction: the pool's connections serve every tenant.
        current_ok = await passwords.matches(current, body.current_password)
        async with db.tenant_tx(principal.tenant_id, None, "system") as tx:
            if current_ok:
                await throttle.succeeded(tx, attempt)  # only failures stay counted
            elif attempt.locked:
                await audit.record(
                    tx,
                    actor="identity",
                    action="password_change.locked",
                    target=f"user:{principal.user_id}",
                    details={"address": client_network(address)},
                )
        if not current_ok:
            raise WrongCredentials("the current password is wrong")
        try:
            new = await passwords.prepare(principal.user_id, body.new_password, current, previous)
        except (WeakPassword, PasswordReused) as exc:
            raise PasswordRefused(str(exc)) from None
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            try:
                await passwords.store(tx, new)
            except PasswordChanged:
                raise PasswordConflict("the password was changed meanwhile; try again") from None
            # Whoever held another session (a stolen refresh token, a lost
            # device) is out with the old password, in every tenant.
            await end_other_sessions(tx, principal, "password.change")

    @router.delete("/sessions")
    async def sign_out_everywhere(
        principal: Principal = Depends(may_end_sessions),
    ) -> JSONResponse:
        """Sign out everywhere else: end every other session of the caller, in
        every tenant (this one stays; /revoke ends it). Answers how many ended."""
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            ended = await end_other_sessions(tx, principal, "sessions.end")
        return JSONResponse({"sessions_ended": ended}, headers=_NO_STORE)

    return router
