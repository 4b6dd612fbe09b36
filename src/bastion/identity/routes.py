"""Account self-service: TOTP enrolment and removal, password change.

Each route acts on the caller only (the token's user, in the token's tenant)
and runs with the user's own database context, which RLS limits to their rows.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bastion import audit
from bastion.access.guard import Guard
from bastion.api.problems import Problem, problem_type
from bastion.db.pool import Database
from bastion.identity.auth import Principal
from bastion.identity.errors import (
    LastFactorRequired,
    MfaError,
    PasswordReused,
    Throttled,
    WeakPassword,
)
from bastion.identity.mfa import MfaService, mfa_required
from bastion.identity.passwords import PasswordService
from bastion.identity.throttle import LoginThrottle

_NO_STORE = {"Cache-Control": "no-store"}


class PasswordRefused(Problem):
    type = problem_type("password-refused")
    title = "Password refused"
    status = 422


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

    @router.post("/mfa/totp")
    async def enroll(principal: Principal = Depends(may_manage_mfa)) -> JSONResponse:
        """Start TOTP enrolment; answers the secret once (for the authenticator app)."""
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            try:
                secret, uri = await mfa.enroll(tx, principal.user_id, str(principal.user_id))
            except MfaError:
                raise TotpConflict("remove the current factor first") from None
        return JSONResponse({"secret": secret, "otpauth_uri": uri}, headers=_NO_STORE)

    @router.post("/mfa/totp/confirm")
    async def confirm(body: Code, principal: Principal = Depends(may_manage_mfa)) -> JSONResponse:
        """Confirm enrolment with a first code; answers the recovery codes once."""
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            try:
                codes = await mfa.confirm(tx, principal.user_id, body.code)
            except MfaError:
                raise WrongCredentials("that code is not valid") from None
            await audit.record(
                tx,
                actor=f"user:{principal.user_id}",
                action="mfa.enroll",
                target=f"user:{principal.user_id}",
            )
        return JSONResponse({"recovery_codes": codes}, headers=_NO_STORE)

    @router.delete("/mfa/totp", status_code=204)
    async def remove(principal: Principal = Depends(may_manage_mfa)) -> None:
        """Remove the TOTP factor; refused for holders of admin-grade roles."""
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            try:
                await mfa.remove(
                    tx, principal.user_id, holds_admin_role=mfa_required(principal.roles)
                )
            except LastFactorRequired:
                raise LastFactor("owners, billing-admins and auditors must keep MFA") from None
            await audit.record(
                tx,
                actor=f"user:{principal.user_id}",
                action="mfa.remove",
                target=f"user:{principal.user_id}",
            )

    @router.post("/password", status_code=204)
    async def change_password(
        body: PasswordChange, principal: Principal = Depends(may_change_password)
    ) -> None:
        """Change the caller's password (the current one is required).

        Guesses of the current password are throttled like logins: a stolen
        token must not become a password oracle.
        """
        account = f"pwchange:{principal.user_id}"
        async with db.tenant_tx(principal.tenant_id, None, "system") as tx:
            try:
                await throttle.attempt(tx, account, "-")
            except Throttled as exc:
                raise TooManyAttempts(headers={"Retry-After": str(exc.retry_after)}) from None
        async with db.tenant_tx(principal.tenant_id, principal.user_id, principal.db_role) as tx:
            if not await passwords.verify(tx, principal.user_id, body.current_password):
                raise WrongCredentials("the current password is wrong")
            try:
                await passwords.set_password(tx, principal.user_id, body.new_password)
            except (WeakPassword, PasswordReused) as exc:
                raise PasswordRefused(str(exc)) from None
            await audit.record(
                tx,
                actor=f"user:{principal.user_id}",
                action="password.change",
                target=f"user:{principal.user_id}",
            )

    return router
