"""The FastAPI side of authorization: authenticate, then ask Cedar.

``Depends(guard("member:list", "Member"))`` authenticates the caller (token +
DPoP), resolves the tenant from the token — a path naming another tenant is
404 — and asks the :class:`Authorizer` whether the caller may do the action on
a resource of that type in their tenant. Denied is 403; denied only for want
of MFA is 403 with an RFC 9470 step-up hint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from uuid import UUID

from fastapi import Request

from bastion.access.authorize import Authorizer, Resource, Subject
from bastion.access.restrictions import READ_ACTIONS, LiveRestrictions
from bastion.api.problems import Problem, problem_type
from bastion.db.pool import Database
from bastion.identity.auth import (
    Authenticator,
    Principal,
    StepUpRequired,
    TenantMismatch,
    Unauthorized,
)

GuardDependency = Callable[[Request], Awaitable[Principal]]
RolesReader = Callable[[UUID, UUID], Awaitable[frozenset[str]]]


class Forbidden(Problem):
    type = problem_type("forbidden")
    title = "Forbidden"
    status = 403


class TenantIdRequired(Problem):
    """A path names its tenant by something other than an id (a slug, say).

    Refused, not looked up: a slug would name a tenant by a guessable word,
    and one spelling per tenant keeps every route's check the same."""

    type = problem_type("tenant-id-required")
    title = "A tenant id is required"
    status = 422


class TenantLocked(Problem):
    """The tenant is in lockdown (an incident): it is read-only until an operator lifts it."""

    type = problem_type("tenant-locked")
    title = "The tenant is locked down"
    status = 423


class SessionRevoked(Unauthorized):
    """The access token was issued before an operator ended the sessions it belongs to."""

    type = problem_type("session-revoked")
    title = "The session was revoked"


def _step_up() -> StepUpRequired:
    problem = StepUpRequired(
        "this action needs a sign-in with a second factor; sign in again with TOTP",
        acr_values="mfa",
    )
    problem.headers = {
        "WWW-Authenticate": 'DPoP error="insufficient_user_authentication", '
        'error_description="multi-factor authentication required", acr_values="mfa"'
    }
    return problem


class Guard:
    """Makes per-route dependencies that authenticate and authorize."""

    def __init__(
        self,
        authenticator: Authenticator,
        authorizer: Authorizer,
        db: Database,
        *,
        roles: RolesReader | None = None,
        restrictions: LiveRestrictions | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.db = db
        self._roles = roles or db.member_roles
        # Lockdowns and session cut-offs (incident runbook), kept live per process.
        self.restrictions = restrictions or LiveRestrictions(db)

    async def member_roles(self, tenant_id: UUID, user_id: UUID) -> frozenset[str]:
        """The roles ``user_id`` holds in ``tenant_id`` now (read, or kept live: LiveRoles)."""
        return await self._roles(tenant_id, user_id)

    def __call__(self, action: str, resource_type: str) -> GuardDependency:
        """Return the dependency that lets a caller do ``action`` on ``resource_type``."""
        return _Guarded(self, action, resource_type)


class _Guarded:
    """One route's guard; ``bastion_action`` is what declares the route's action."""

    def __init__(self, guard: Guard, action: str, resource_type: str) -> None:
        self.guard = guard
        self.bastion_action = action
        self.resource_type = resource_type

    async def __call__(self, request: Request) -> Principal:
        guard, action = self.guard, self.bastion_action
        principal = await guard.authenticator(request)
        tenant_id = principal.tenant_id
        named = request.path_params.get("tenant_id")
        if named is not None and not _is_uuid(str(named)):
            raise TenantIdRequired("name the tenant by its id (a UUID); slugs are not accepted")
        if named is not None and str(named) != str(tenant_id):
            raise TenantMismatch()
        restrictions = await guard.restrictions.snapshot()
        cutoff = restrictions.cutoff_for(tenant_id, principal.user_id)
        if cutoff is not None and principal.claims.iat < cutoff:
            problem = SessionRevoked("the session this token belongs to was ended")
            problem.headers = {"WWW-Authenticate": 'DPoP error="invalid_token"'}
            raise problem
        if tenant_id in restrictions.locked and action not in READ_ACTIONS:
            raise TenantLocked("the tenant is read-only while it is locked down")
        roles = frozenset(principal.roles)
        if principal.claims.iss == guard.authenticator.issuer:
            # Our own tokens' roles are checked against the memberships as they
            # are now: a revoked role stops on the very next request, not when
            # the token expires. (External issuers' roles are their IdP's word.)
            roles &= await guard.member_roles(tenant_id, principal.user_id)
            if not roles:
                raise Forbidden("you no longer hold a role in this tenant")
            principal = replace(principal, roles=tuple(sorted(roles)))
        subject = Subject(principal.user_id, tenant_id, roles, principal.has_mfa)
        resource = Resource(
            self.resource_type,
            str(request.path_params.get("resource_id", tenant_id)),
            tenant_id,
            owner=principal.user_id if self.resource_type == "Account" else None,
        )
        guard.authorizer.reload_if_changed()
        if guard.authorizer.authorize(subject, action, resource):
            return principal
        stronger = Subject(subject.user_id, tenant_id, subject.roles, True)
        if not subject.mfa and guard.authorizer.authorize(stronger, action, resource):
            raise _step_up()
        raise Forbidden(f"your roles do not allow {action}")


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True
