"""Authenticating API requests: a DPoP-bound access token and a fresh proof.

Every request must carry ``Authorization: DPoP <token>`` and one ``DPoP``
proof header (RFC 9449 section 7.1). The token is verified (signature, alg
allow-list, iss, aud, exp/nbf/iat), then the proof (htm, htu, iat window,
jti replay, ath) and its key must be the one the token is bound to
(``cnf.jkt``). With a shared replay store (identity/replay.py) a proof is
single-use across processes too. Bearer use is refused. The tenant of the
request is the token's ``tenant_id`` claim, never a value from the path or the
body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from fastapi import Request

from bastion.api.problems import Problem, problem_type
from bastion.identity.dpop import REPLAYED, AcceptedProof, DpopVerifier
from bastion.identity.errors import InvalidDpopProof, InvalidToken
from bastion.identity.replay import SharedReplayStore
from bastion.identity.tokens import AccessClaims, AccessTokenVerifier

DPOP_ALGS = "ES256 EdDSA"
_MAX_AUTHORIZATION = 8192


class Unauthorized(Problem):
    type = problem_type("unauthorized")
    title = "Authentication required"
    status = 401


class ProofReplayed(Unauthorized):
    """A DPoP proof used a second time (RFC 9449 section 11.1): the same 401."""


class NoRole(Problem):
    type = problem_type("forbidden")
    title = "Forbidden"
    status = 403


class StepUpRequired(Problem):
    """RFC 9470: the token's authentication is not strong enough (no MFA)."""

    type = problem_type("mfa-required")
    title = "Multi-factor authentication required"
    status = 403


class TenantMismatch(Problem):
    """A path names another tenant than the token's: answered as not found, so
    another tenant's identifiers cannot even be confirmed."""

    type = problem_type("not-found")
    title = "Not found"
    status = 404


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token: the request's only source of tenant."""

    user_id: UUID
    tenant_id: UUID
    roles: tuple[str, ...]
    amr: tuple[str, ...]
    claims: AccessClaims

    @property
    def has_mfa(self) -> bool:
        return "mfa" in self.amr

    @property
    def db_role(self) -> str:
        """The role the database context runs as: the strongest one held."""
        for role in ("owner", "billing-admin", "auditor", "contributor", "viewer"):
            if role in self.roles:
                return role
        return "viewer"


def _unauthorized(
    detail: str, error: str = "invalid_token", kind: type[Unauthorized] | None = None
) -> Unauthorized:
    problem = (kind or Unauthorized)(detail)
    problem.headers = {"WWW-Authenticate": f'DPoP error="{error}", algs="{DPOP_ALGS}"'}
    return problem


class Authenticator:
    """FastAPI dependency: ``principal = Depends(authenticator)``."""

    def __init__(
        self,
        tokens: AccessTokenVerifier,
        dpop: DpopVerifier,
        issuer: str,
        *,
        public_url: str | None = None,
        replay_store: SharedReplayStore | None = None,
        nonce_required: bool = False,
        on_replay: Callable[[UUID, UUID], Awaitable[None]] | None = None,
    ) -> None:
        self.tokens = tokens
        self.dpop = dpop
        self.issuer = issuer.rstrip("/")
        # This process's own public base URL (the gateway's differs from the
        # issuer's): what DPoP proofs' htu must name.
        self.public_url = (public_url or issuer).rstrip("/")
        # Several processes: single use also across them. None: this
        # process's memory only.
        self.replay_store = replay_store
        # RFC 9449 section 9: proofs must echo a server nonce (DPoP-Nonce);
        # a client learns it from the first 401 "use_dpop_nonce".
        self.nonce_required = nonce_required
        # A replayed proof of a genuine token: recorded in the token's tenant's
        # trail (the detectors read it), then refused as before.
        self.on_replay = on_replay

    async def __call__(self, request: Request) -> Principal:
        authorization = request.headers.get("authorization", "")
        if len(authorization) > _MAX_AUTHORIZATION:
            raise _unauthorized("authorization header too large", "invalid_request")
        scheme, _, token = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme not in ("dpop", "bearer") or not token:
            raise _unauthorized("a DPoP-bound access token is required", "invalid_request")
        try:
            claims = self.tokens.verify(token)
        except InvalidToken as exc:
            raise _unauthorized(f"invalid token: {exc.reason}") from None
        if scheme == "bearer":
            # RFC 9449 7.2: a sender-constrained token is never a bearer token.
            # Our own tokens always are; an external issuer's unbound token may
            # be presented as bearer ("DPoP honoured when present").
            if claims.jkt or claims.iss == self.issuer:
                raise _unauthorized("DPoP-bound tokens cannot be used as bearer tokens")
        else:
            try:
                accepted = self._check_proof(request, token, claims)
                if self.replay_store is not None:
                    await self._check_shared(self.replay_store, accepted)
            except ProofReplayed:
                if self.on_replay is not None:
                    await self.on_replay(claims.tenant_id, claims.sub)
                raise
        if not claims.roles:
            raise NoRole("the token carries no role in this tenant")
        return Principal(claims.sub, claims.tenant_id, claims.roles, claims.amr, claims)

    async def _check_shared(self, store: SharedReplayStore, accepted: AcceptedProof) -> None:
        """Refuse a proof another process accepted already (RFC 9449 section 11.1)."""
        if not await store.first_use("dpop", accepted.replay_key, accepted.expires_at):
            raise _unauthorized(
                "invalid DPoP proof: proof replayed", "invalid_dpop_proof", ProofReplayed
            )

    def _check_proof(self, request: Request, token: str, claims: AccessClaims) -> AcceptedProof:
        proofs = request.headers.getlist("dpop")
        if len(proofs) != 1:
            raise _unauthorized("exactly one DPoP proof is required", "invalid_dpop_proof")
        if not claims.jkt:
            raise _unauthorized("the token is not bound to a key")
        try:
            # htu from the configured public URL, not the Host header a client controls.
            return self.dpop.accept(
                proofs[0],
                method=request.method,
                url=self.public_url + request.url.path,
                access_token=token,
                expected_jkt=claims.jkt,
                nonce_required=self.nonce_required,
            )
        except InvalidDpopProof as exc:
            kind = ProofReplayed if exc.reason == REPLAYED else Unauthorized
            problem = _unauthorized(f"invalid DPoP proof: {exc.reason}", exc.error, kind)
            if exc.nonce:
                problem.headers["DPoP-Nonce"] = exc.nonce
            raise problem from None
