"""Assembling the identity services of the api process from settings."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

import anyio.to_thread
from fastapi import APIRouter

from bastion.access.authorize import Authorizer
from bastion.access.guard import Guard, RolesReader
from bastion.db.pool import Database
from bastion.identity import oidc
from bastion.identity import routes as account_routes
from bastion.identity.auth import Authenticator
from bastion.identity.dpop import DpopVerifier, MemoryReplayCache
from bastion.identity.issuers import CombinedVerifier, ExternalIssuers, IssuerConfig
from bastion.identity.keys import SigningKeys
from bastion.identity.mfa import MfaService
from bastion.identity.passwords import PasswordService
from bastion.identity.replay import SharedReplayStore
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, IdentityService
from bastion.identity.throttle import LoginThrottle
from bastion.identity.tokens import AccessTokenVerifier, TokenIssuer, TokenVerifier
from bastion.logs import get_logger
from bastion.secrets.protocols import Keystore
from bastion.settings import Settings
from bastion.tenants import routes as tenant_routes

_log = get_logger("bastion.identity")
# The key ring's name of the DPoP nonce key (RFC 9449 section 8).
DPOP_NONCE_KEY = "identity/dpop-nonce-key"


@dataclass(frozen=True)
class Identity:
    """The api's identity side: the provider's service and every guarded route."""

    service: IdentityService
    routers: tuple[APIRouter, ...]
    external: ExternalIssuers
    guard: Guard  # for other domains' routes

    async def start(self) -> None:
        """Idempotent start-up work: the CLI's public client exists, and external
        issuers' keys are fetched now rather than on a first request."""
        await self.service.register_client(CLI_CLIENT_ID, "Bastion CLI", [CLI_REDIRECT_URI])
        # In a thread (this waits for each issuer); one issuer down neither
        # stops the api nor keeps the others' keys from being fetched.
        for issuer in sorted(self.external.issuers):
            try:
                await anyio.to_thread.run_sync(self.external.refresh, issuer)
            except Exception as exc:
                _log.warning("external_issuer_unavailable", issuer=issuer, error=type(exc).__name__)


def _authorizer(settings: Settings) -> Authorizer:
    return Authorizer(settings.policy_dir) if settings.policy_dir is not None else Authorizer()


def _verifiers(
    settings: Settings, db: Database, keystore: Keystore, public_url: str | None = None
) -> tuple[SigningKeys, DpopVerifier, Authenticator, ExternalIssuers, SharedReplayStore | None]:
    """The signing keys, what verifies a request's access token and DPoP proof,
    and the shared replay store (None: this process's memory only)."""
    issuer = settings.resolved_issuer
    keys = SigningKeys(keystore, token_lifetime=timedelta(minutes=settings.access_token_minutes))
    # One replay cache per process (api and gateway each keep their own); with
    # replay_store "postgres" what passes it is then checked across processes
    # (the verifier hands each accepted proof to the caller for that).
    shared = SharedReplayStore(db) if settings.replay_store == "postgres" else None
    dpop = DpopVerifier(
        MemoryReplayCache(),
        # One key for every process (api, gateway): a nonce any of them issued holds at all.
        nonce_secret=keystore.ensure(DPOP_NONCE_KEY, lambda: secrets.token_bytes(32)),
    )
    local = TokenVerifier(keys, issuer=issuer, audience=issuer)
    external = ExternalIssuers(
        [IssuerConfig(**config.model_dump()) for config in settings.external_issuers]
    )
    verifier: AccessTokenVerifier = (
        CombinedVerifier(local, external) if settings.external_issuers else local
    )
    authenticator = Authenticator(
        verifier,
        dpop,
        issuer,
        public_url=public_url,
        replay_store=shared,
        nonce_required=settings.dpop_nonce_at_resources,
    )
    return keys, dpop, authenticator, external, shared


def build_guard(
    settings: Settings,
    db: Database,
    keystore: Keystore,
    *,
    public_url: str,
    authorizer: Authorizer | None = None,
    roles: RolesReader | None = None,
) -> Guard:
    """The request guard (token + DPoP, then Cedar) for a process other than the api,
    served at ``public_url``; ``roles`` reads members' roles (default: the database)."""
    _keys, _dpop, authenticator, external, _shared = _verifiers(settings, db, keystore, public_url)
    # Requests never wait for an issuer's keys: start fetching them now, so the
    # first external tokens find them cached (no-op without external issuers).
    external.prefetch()
    return Guard(authenticator, authorizer or _authorizer(settings), db, roles=roles)


def build_identity(
    settings: Settings,
    db: Database,
    keystore: Keystore,
    authorizer: Authorizer | None = None,
    passwords: PasswordService | None = None,
) -> Identity:
    """Return the provider's service and the routes of the api (OIDC, account,
    tenants), all guarded by the request authenticator and the Cedar policies.
    ``passwords`` replaces the default password service (tests: cheaper argon2)."""
    issuer = settings.resolved_issuer
    lifetime = timedelta(minutes=settings.access_token_minutes)
    keys, dpop, authenticator, external, shared = _verifiers(settings, db, keystore)
    keys.current()  # the first signing key exists before the first request
    tokens = TokenIssuer(keys, issuer=issuer, audience=issuer, lifetime=lifetime)
    if authorizer is None:
        authorizer = _authorizer(settings)
    guard = Guard(authenticator, authorizer, db)
    passwords = passwords or PasswordService()
    mfa = MfaService(keystore)
    throttle = LoginThrottle(
        keystore.ensure("identity/throttle-key", lambda: secrets.token_bytes(32)),
        max_delay=timedelta(seconds=settings.login_max_delay_seconds),
    )
    service = IdentityService(
        db,
        tokens=tokens,
        passwords=passwords,
        mfa=mfa,
        throttle=throttle,
        refresh_lifetime=timedelta(days=settings.refresh_token_days),
    )
    tickets = oidc.LoginTickets(
        keystore.ensure("identity/login-ticket-key", lambda: secrets.token_bytes(32))
    )
    routers = (
        oidc.build_router(
            service,
            keys=keys,
            dpop=dpop,
            guard=guard,
            tickets=tickets,
            issuer=issuer,
            replay_store=shared,
            nonce_at_token=settings.dpop_nonce_at_token,
        ),
        account_routes.build_router(db, guard, mfa, passwords, throttle),
        tenant_routes.build_router(db, guard),
    )
    return Identity(service, routers, external, guard)
