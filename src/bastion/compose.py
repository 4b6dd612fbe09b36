"""The composition root: the api, the gateway and the worker built from settings.

The one place that wires Bastion's processes. Production (``bastion serve``,
and ``bastion up`` through it, hence the demo and the benchmarks) and the
tests' stacks (``tests/api_stack.py``, ``tests/gateway_stack.py``) build their
apps here; what a caller may replace is the small :class:`Overrides` — the
database pool, the key ring, the gateway's model routers and a start-up hook —
never the wiring itself. So what the tests walk (the route matrix) is what
runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI

from bastion.access.guard import Guard
from bastion.billing.checkout import CheckoutService
from bastion.db.pool import Database
from bastion.gateway.routing import ModelRouter
from bastion.gateway.service import GatewayService
from bastion.identity.passwords import PasswordService
from bastion.identity.wiring import Identity
from bastion.knowledge.service import KnowledgeService
from bastion.runtime import app_database, knowledge_service, queue_conninfo
from bastion.secrets.backends import open_key_ring
from bastion.secrets.protocols import KMS, Keystore
from bastion.settings import Settings

PROCESSES = ("api", "gateway", "worker")

OnStart = Callable[[Database], Awaitable[None]]


@dataclass(frozen=True)
class Overrides:
    """What replaces the settings' own choice (tests, the demo, benchmarks).

    ``database``: the app pool (default: the provisioned database of the
    settings); the built app opens and closes it in its lifespan.
    ``keystore``, ``kms``: the key ring's named secrets and the tenants' KEKs
    (default: the backend the settings configure, :func:`open_key_ring`).
    ``models``: the gateway's model routers (default: ``settings.gateway_models``;
    tests put an upstream double behind them).
    ``passwords``: the api's password hashing (tests: a cheaper argon2).
    ``on_start``: awaited once the pool is open, before the first request
    (tests seed here).
    ``routers``: routes added to the app after the built ones; they are held to
    the same rule (a route that declares no action refuses to build).
    """

    database: Database | None = None
    keystore: Keystore | None = None
    kms: KMS | None = None
    models: dict[str, ModelRouter] | None = None
    passwords: PasswordService | None = None
    on_start: OnStart | None = None
    routers: Sequence[APIRouter] = ()


NO_OVERRIDES = Overrides()


@dataclass(frozen=True)
class Api:
    """The api process: its app and the parts tests and the demo reach into."""

    app: FastAPI
    db: Database
    keystore: Keystore
    identity: Identity
    knowledge: KnowledgeService


@dataclass(frozen=True)
class Gateway:
    """The gateway process: its app and its service."""

    app: FastAPI
    db: Database
    keystore: Keystore
    service: GatewayService
    guard: Guard


@dataclass(frozen=True)
class Worker:
    """The worker process: its health app (the queue's worker runs in its lifespan)."""

    app: FastAPI
    db: Database


def _resources(settings: Settings, overrides: Overrides) -> tuple[Database, Keystore, KMS]:
    db = overrides.database if overrides.database is not None else app_database(settings)
    ring = open_key_ring(settings, keystore=overrides.keystore, kms=overrides.kms)
    return db, ring.keystore, ring.kms


def build_app(process: str, settings: Settings, overrides: Overrides = NO_OVERRIDES) -> FastAPI:
    """Return the ASGI app of ``process`` ("api", "gateway" or "worker")."""
    if process == "api":
        return build_api(settings, overrides).app
    if process == "gateway":
        return build_gateway(settings, overrides).app
    if process == "worker":
        return build_worker(settings, overrides).app
    raise ValueError(f"no such process: {process!r}")


def build_api(settings: Settings, overrides: Overrides = NO_OVERRIDES) -> Api:
    """The api: identity, tenants, knowledge, safety, billing and sampling routes."""
    from bastion.api.app import create_app
    from bastion.billing import account_routes
    from bastion.billing import routes as billing_routes
    from bastion.billing.metering import MeteringService
    from bastion.billing.receipts import ReceiptKeys, ReceiptService
    from bastion.billing.wiring import build_billing
    from bastion.gateway import sampling_routes
    from bastion.gateway.sampling import PromptSampling
    from bastion.identity.wiring import build_identity
    from bastion.knowledge import routes as knowledge_routes
    from bastion.knowledge.answers import AskService
    from bastion.safety import routes as safety_routes
    from bastion.safety.signing import EnvelopeSigner

    db, keystore, kms = _resources(settings, overrides)
    knowledge = knowledge_service(settings, db, kms)
    identity = build_identity(settings, db, keystore, passwords=overrides.passwords)
    billing = build_billing(settings, db, keystore)
    receipt_keys = ReceiptKeys(keystore)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with _pool_lifespan(db)(_app), _forgetting_shreds(db, knowledge):
            await identity.start()
            if overrides.on_start is not None:
                await overrides.on_start(db)
            yield

    app = create_app(
        title="Bastion API",
        readiness=db.ping,
        lifespan=lifespan,
        extra_routers=(
            # First: provider webhooks are the hot path (fewer routes to match).
            billing_routes.build_webhook_router(
                billing.intake, billing.stripe_webhook, billing.adyen_webhook
            ),
            billing_routes.build_router(billing.service, billing.catalogue, identity.guard),
            *identity.routers,
            knowledge_routes.build_router(
                knowledge,
                identity.guard,
                AskService(
                    knowledge,
                    EnvelopeSigner(keystore),
                    settings.gateway_url,
                    allowed_hosts=settings.answer_link_hosts,
                ),
            ),
            safety_routes.build_router(knowledge.vault, db, identity.guard),
            account_routes.build_keys_router(receipt_keys),
            account_routes.build_router(
                identity.guard,
                metering=MeteringService(db),
                receipts=ReceiptService(db, receipt_keys, issuer=settings.resolved_issuer),
                checkout=_checkout(settings, db, keystore),
            ),
            sampling_routes.build_router(PromptSampling(db), identity.guard),
            *overrides.routers,
        ),
        max_body_bytes=settings.max_upload_bytes,
        trusted_proxies=settings.trusted_proxies,
    )
    return Api(app, db, keystore, identity, knowledge)


def _checkout(settings: Settings, db: Database, keystore: Keystore) -> CheckoutService | None:
    """Stripe Checkout, when a Stripe key and both return URLs are configured."""
    from bastion.billing.wiring import stripe_client

    client = stripe_client(settings, keystore)
    if (
        client is None
        or not settings.billing_checkout_success_url
        or not settings.billing_checkout_cancel_url
    ):
        return None
    return CheckoutService(
        db,
        client,
        success_url=settings.billing_checkout_success_url,
        cancel_url=settings.billing_checkout_cancel_url,
    )


def build_gateway(settings: Settings, overrides: Overrides = NO_OVERRIDES) -> Gateway:
    """The gateway: the OpenAI-compatible proxy behind the guard, the ledger and the plan."""
    from bastion.access.roles import LiveRoles
    from bastion.billing.budgets import BudgetService
    from bastion.billing.wiring import build_billing
    from bastion.gateway import routes as gateway_routes
    from bastion.gateway.app import build_routers, create_gateway_app
    from bastion.gateway.cache import AnswerCache
    from bastion.gateway.entitlements import PlanGate
    from bastion.gateway.ledger import CallLedger
    from bastion.gateway.sampling import PromptSampling
    from bastion.gateway.shreds import ShredListener
    from bastion.identity.wiring import build_guard
    from bastion.safety.signing import EnvelopeSigner, ToolCallSigner
    from bastion.safety.vault import PiiVault
    from bastion.secrets.tenant_keys import TenantKeys

    db, keystore, kms = _resources(settings, overrides)
    routers = (
        overrides.models
        if overrides.models is not None
        else build_routers(settings.gateway_models, keystore, embedder=settings.embedder)
    )
    live_roles = (
        LiveRoles(db, ttl_seconds=settings.gateway_roles_ttl_seconds)
        if settings.gateway_roles_ttl_seconds > 0
        else None
    )
    guard = build_guard(settings, db, keystore, public_url=settings.gateway_url, roles=live_roles)
    ledger = CallLedger(
        db,
        BudgetService(db),
        lease_calls=settings.gateway_budget_lease_calls,
        lease_seconds=settings.gateway_budget_lease_seconds,
    )
    answers = AnswerCache(
        max_entries=settings.gateway_cache_entries,
        max_bytes=settings.gateway_cache_bytes,
        expected_tenants=settings.gateway_cache_expected_tenants,
        ttl_seconds=settings.gateway_cache_ttl_seconds,
        shared_within_tenant=settings.gateway_cache_scope == "tenant",
    )
    vault = PiiVault(TenantKeys(kms))
    # A shredded tenant's answers and keys are dropped when the shred commits.
    shreds = ShredListener(db, answers, vault, vault.keys)
    service = GatewayService(
        ledger,
        routers,
        answers,
        authorizer=guard.authorizer,
        tool_signer=ToolCallSigner(keystore),
        vault=vault,
        # The plan's models and rate, from the tenant's subscription.
        plan_gate=PlanGate(build_billing(settings, db, keystore).service.entitlements),
        # Prompts logged only where the owner set a rate and the user consented.
        sampling=PromptSampling(db),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with _pool_lifespan(db)(_app):
            ledger.start()
            shreds.start()
            if live_roles is not None:
                live_roles.start()
            try:
                if overrides.on_start is not None:
                    await overrides.on_start(db)
                yield
            finally:
                await shreds.aclose()
                if live_roles is not None:
                    await live_roles.aclose()
                await ledger.aclose()
                for router in routers.values():
                    await router.aclose()

    app = create_gateway_app(
        readiness=db.ping,
        lifespan=lifespan,
        routers=(
            gateway_routes.build_router(service, guard, EnvelopeSigner(keystore)),
            *overrides.routers,
        ),
    )
    return Gateway(app, db, keystore, service, guard)


def build_worker(settings: Settings, overrides: Overrides = NO_OVERRIDES) -> Worker:
    """The worker: the job queue's worker, and its health endpoints."""
    from bastion.worker.health import create_worker_health_app

    db, keystore, kms = _resources(settings, overrides)
    knowledge = knowledge_service(settings, db, kms)
    app = create_worker_health_app(
        db.ping, lifespan=_worker_lifespan(settings, db, keystore, knowledge, overrides.on_start)
    )
    return Worker(app, db)


def _pool_lifespan(db: Database) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await db.open()
        try:
            yield
        finally:
            await db.close()

    return lifespan


@asynccontextmanager
async def _forgetting_shreds(db: Database, knowledge: KnowledgeService) -> AsyncIterator[None]:
    """Drop a tenant's unwrapped keys in this process when its shred commits elsewhere."""
    from bastion.knowledge.shreds import ShredListener

    listener = ShredListener(db, knowledge.keys, knowledge.vault)
    listener.start()
    try:
        yield
    finally:
        await listener.aclose()


def _worker_lifespan(
    settings: Settings,
    db: Database,
    keystore: Keystore,
    knowledge: KnowledgeService,
    on_start: OnStart | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The worker's pool, and the queue's worker running its jobs."""
    from bastion.access.authorize import Authorizer
    from bastion.billing import metering_tasks
    from bastion.billing import tasks as billing_tasks
    from bastion.billing.receipts import ReceiptKeys, ReceiptService
    from bastion.knowledge import tasks as knowledge_tasks
    from bastion.safety import tasks as safety_tasks
    from bastion.worker.jobs import JobRegistry
    from bastion.worker.queue import queue_app, running_worker

    queue = queue_app(queue_conninfo(settings))
    authorizer = Authorizer(settings.policy_dir) if settings.policy_dir else Authorizer()
    knowledge_tasks.register(queue, JobRegistry(authorizer), db, knowledge)
    receipts = ReceiptService(db, ReceiptKeys(keystore), issuer=settings.resolved_issuer)
    billing_tasks.register_from_settings(
        queue,
        JobRegistry(authorizer),
        settings,
        db,
        keystore,
        invoice_paid_hook=receipts.on_invoice_paid,
    )
    metering_tasks.register_from_settings(queue, settings, db, keystore)
    safety_tasks.register_from_settings(queue, JobRegistry(authorizer), settings, db, keystore)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        slots = {
            "billing": settings.worker_billing_concurrency,
            "ingest": settings.worker_ingest_concurrency,
            "tools": settings.worker_tools_concurrency,
        }
        async with (
            _pool_lifespan(db)(_app),
            _forgetting_shreds(db, knowledge),
            running_worker(queue, concurrency=slots),
        ):
            if on_start is not None:
                await on_start(db)
            yield

    return lifespan
