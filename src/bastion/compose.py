"""The composition root: the api, the gateway and the worker built from settings.

The one place that wires Bastion's processes. Production (``bastion serve``,
and ``bastion up`` through it, hence the demo and the benchmarks) and the
tests' stacks (``tests/api_stack.py``, ``tests/gateway_stack.py``,
``tests/billing_account_stack.py``) build their apps here; what a caller may
replace is the small :class:`Overrides` — the database pool, the key ring,
the gateway's model routers, the receipt keys, the checkout, a start-up hook —
never the wiring itself. So what the tests walk (the route matrix) is what
runs.

The domains' own builders (:func:`bastion.db.service.app_database`,
:func:`bastion.knowledge.service.build_knowledge`,
:func:`bastion.billing.wiring.build_billing`) import no routes and no
framework, so the command lines use them without an app; everything that
touches HTTP (the guard, the routers, the apps) is assembled only here.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI

from bastion.access.authorize import Authorizer
from bastion.access.guard import Guard, RolesReader
from bastion.billing.checkout import CheckoutService
from bastion.billing.metering import MeteringService
from bastion.billing.receipts import ReceiptKeys, ReceiptService
from bastion.db.pool import Database
from bastion.gateway.cache import AnswerCache
from bastion.gateway.routing import ModelRouter
from bastion.gateway.service import GatewayService
from bastion.identity.auth import Authenticator
from bastion.identity.dpop import DpopVerifier, MemoryReplayCache
from bastion.identity.issuers import CombinedVerifier, ExternalIssuers, IssuerConfig
from bastion.identity.keys import SigningKeys
from bastion.identity.passwords import PasswordService
from bastion.identity.replay import ReplayAudit, SharedReplayStore
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, IdentityService
from bastion.identity.tokens import AccessTokenVerifier, TokenVerifier
from bastion.identity.workload import (
    PeerVerifier,
    SvidFiles,
    SvidSource,
    WorkloadCA,
    WorkloadTls,
    renewing,
    spiffe_id,
)
from bastion.knowledge.service import KnowledgeService, build_knowledge
from bastion.logs import get_logger
from bastion.secrets.backends import open_key_ring
from bastion.secrets.protocols import KMS, Keystore
from bastion.settings import Settings
from bastion.telemetry.metrics import Metrics
from bastion.telemetry.tracing import Tracing, build_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from bastion.api.mtls import WorkloadGate
    from bastion.rotation import RotationPlan

PROCESSES = ("api", "gateway", "worker")
# Who may call each route of the processes' internal (mTLS) listeners, by
# workload; a route not named here is refused there (deny by default). Only
# the api posts envelopes; health is for the configured scrapers
# (settings.workload_scrapers) and the metrics scraper; /metrics for the
# metrics scraper alone (settings.resolved_metrics_scraper_id). The worker
# serves no other internal route: it claims its jobs (tool runs included)
# from the database queue. The api serves none to the other processes.
SCRAPED: dict[str, tuple[str, ...]] = {"/metrics": (), "/healthz": (), "/readyz": ()}
GATEWAY_INTERNAL_CALLERS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("api",),
    "/v1/embeddings": ("api",),
    "/v1/models": ("api",),
    **SCRAPED,
}
API_INTERNAL_CALLERS: dict[str, tuple[str, ...]] = dict(SCRAPED)
WORKER_INTERNAL_CALLERS: dict[str, tuple[str, ...]] = dict(SCRAPED)
INTERNAL_CALLERS = {
    "api": API_INTERNAL_CALLERS,
    "gateway": GATEWAY_INTERNAL_CALLERS,
    "worker": WORKER_INTERNAL_CALLERS,
}
# The key ring's name of the DPoP nonce key (RFC 9449 section 8).
DPOP_NONCE_KEY = "identity/dpop-nonce-key"

_log = get_logger("bastion.identity")

OnStart = Callable[[Database], Awaitable[None]]
CheckoutFactory = Callable[[Database], CheckoutService]


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
    ``answer_cache``: the gateway's answer cache (default: sized by the
    settings; tests: one on a test clock, with a small per-tenant share).
    ``without_plan_gate``: the gateway admits every configured model at any
    rate, whatever the tenant's plan (tests of the proxy's other stages, which
    set up no subscriptions; the plan gate has tests of its own). Never in a
    process: ``bastion serve`` passes no overrides.
    ``receipt_keys``: the Ed25519 keys the api publishes and signs receipts
    with, and the worker signs paid invoices' receipts with (default: on the
    key ring, published five minutes before use; tests: a ring of their own,
    the receipts' tests one that signs with a new key at once).
    ``checkout``: builds the hosted Checkout on the app pool (default: Stripe's,
    when the settings give a Stripe key and both return URLs, else none; tests:
    the official client against a double of Stripe's API).
    ``workload_ca``: the workload CA (default: the SVID files of
    ``settings.workload_svid_dir`` when set, else the key ring's CA, when
    ``settings.internal_mtls``; tests: one on a test clock). Given or
    configured, the gateway gets its mTLS internal listener and the api calls
    it with its SVID.
    ``span_processor``: where every process built with these overrides sends
    its spans (default: OTLP when ``settings.otlp_traces_endpoint`` is set,
    else nowhere; tests: an ``InMemorySpanExporter`` behind a simple processor).
    """

    database: Database | None = None
    keystore: Keystore | None = None
    kms: KMS | None = None
    models: dict[str, ModelRouter] | None = None
    passwords: PasswordService | None = None
    on_start: OnStart | None = None
    routers: Sequence[APIRouter] = ()
    answer_cache: AnswerCache | None = None
    without_plan_gate: bool = False
    receipt_keys: ReceiptKeys | None = None
    checkout: CheckoutFactory | None = None
    workload_ca: SvidSource | None = None
    span_processor: SpanProcessor | None = None


NO_OVERRIDES = Overrides()


@dataclass(frozen=True)
class Api:
    """The api process: its app and the parts tests and the demo reach into."""

    app: FastAPI
    db: Database
    keystore: Keystore
    identity: Identity
    knowledge: KnowledgeService
    receipts: ReceiptService
    metering: MeteringService
    # The mTLS internal listener's app and TLS (None: no internal listener).
    internal: Any = None
    tls: WorkloadTls | None = None
    metrics: Metrics | None = None  # None: settings.metrics_enabled off


@dataclass(frozen=True)
class Gateway:
    """The gateway process: its app and its service."""

    app: FastAPI
    db: Database
    keystore: Keystore
    service: GatewayService
    guard: Guard
    # The mTLS internal listener's app and TLS (None: no internal listener).
    internal: Any = None
    tls: WorkloadTls | None = None
    metrics: Metrics | None = None


@dataclass(frozen=True)
class Worker:
    """The worker process: its health app (the queue's worker runs in its lifespan)."""

    app: FastAPI
    db: Database
    internal: Any = None
    tls: WorkloadTls | None = None
    metrics: Metrics | None = None


def _resources(settings: Settings, overrides: Overrides) -> tuple[Database, Keystore, KMS]:
    from bastion.db.service import app_database

    db = overrides.database if overrides.database is not None else app_database(settings)
    ring = open_key_ring(settings, keystore=overrides.keystore, kms=overrides.kms)
    return db, ring.keystore, ring.kms


def build_app(process: str, settings: Settings, overrides: Overrides = NO_OVERRIDES) -> FastAPI:
    """Return the ASGI app of ``process`` ("api", "gateway" or "worker")."""
    from bastion.safety import pii_names
    from bastion.safety.injection import classifier

    # Fail closed at start-up: screening without its weights would be a silent
    # allow, redaction without the tagger's would pass names in clear. Read here,
    # not by the first request (about a second of CPU each).
    classifier.model()
    pii_names.load()
    return build_process(process, settings, overrides).app


def build_process(
    process: str, settings: Settings, overrides: Overrides = NO_OVERRIDES
) -> Api | Gateway | Worker:
    """Return ``process`` ("api", "gateway" or "worker") as built, with its
    internal listener (``.internal``, ``.tls``) when internal calls go over mTLS."""
    if process == "api":
        return build_api(settings, overrides)
    if process == "gateway":
        return build_gateway(settings, overrides)
    if process == "worker":
        return build_worker(settings, overrides)
    raise ValueError(f"no such process: {process!r}")


def build_api(settings: Settings, overrides: Overrides = NO_OVERRIDES) -> Api:
    """The api: identity, tenants, knowledge, safety, billing and sampling routes."""
    from bastion.api.app import create_app
    from bastion.audit import routes as audit_routes
    from bastion.audit.checkpoints import AuditKeys
    from bastion.billing import account_routes
    from bastion.billing import routes as billing_routes
    from bastion.billing.wiring import build_billing
    from bastion.gateway import sampling_routes
    from bastion.gateway.sampling import PromptSampling
    from bastion.knowledge import routes as knowledge_routes
    from bastion.knowledge.answers import AskService
    from bastion.safety import routes as safety_routes
    from bastion.safety.signing import EnvelopeSigner
    from bastion.safety.tenant_policies import SafetyPolicies

    db, keystore, kms = _resources(settings, overrides)
    # One instance for the routes that change the tenants' safety configuration
    # and the readers in this process, so a change here holds here at once.
    safety = SafetyPolicies(db)
    knowledge = build_knowledge(settings, db, kms, safety=safety)
    identity = build_identity(settings, db, keystore, passwords=overrides.passwords)
    ca = _workload_ca(settings, keystore, overrides)
    api_tls = WorkloadTls(ca, "api") if ca is not None else None
    billing = build_billing(settings, db, keystore)
    receipt_keys = _receipt_keys(keystore, overrides)
    receipts = ReceiptService(db, receipt_keys, issuer=settings.resolved_issuer)
    metering = MeteringService(db)
    checkout = (
        overrides.checkout(db)
        if overrides.checkout is not None
        else _checkout(settings, db, keystore)
    )

    tracing = _tracing(settings, "api", overrides)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with (
            _exporting(tracing),
            _pool_lifespan(db)(_app),
            _forgetting_shreds(db, knowledge),
            renewing(api_tls),
        ):
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
                    settings.gateway_url if api_tls is None else settings.gateway_internal_url,
                    allowed_hosts=settings.answer_link_hosts,
                    # With its SVID, to the gateway's SPIFFE ID only; one
                    # client, so connections are reused.
                    http=_gateway_client(api_tls, "gateway"),
                    gateway_id=None if api_tls is None else _peer_id(api_tls, "gateway"),
                    safety=safety,
                ),
            ),
            safety_routes.build_router(knowledge.vault, db, identity.guard, safety=safety),
            account_routes.build_keys_router(receipt_keys),
            audit_routes.build_router(db, identity.guard),
            audit_routes.build_keys_router(AuditKeys(keystore)),
            account_routes.build_router(
                identity.guard, metering=metering, receipts=receipts, checkout=checkout
            ),
            sampling_routes.build_router(PromptSampling(db), identity.guard),
            _detector_routes(db, identity.guard),
            *overrides.routers,
        ),
        max_body_bytes=settings.max_upload_bytes,
        trusted_proxies=settings.trusted_proxies,
        tracing=tracing,
    )
    metrics = _counting_requests(app, settings, "api")
    internal = None
    if ca is not None:
        internal = _internal_gate(app, "api", settings, ca, db, metrics)
    return Api(
        app, db, keystore, identity, knowledge, receipts, metering, internal, api_tls, metrics
    )


def _peer_id(tls: WorkloadTls, workload: str) -> str:
    return spiffe_id(tls.ca.trust_domain, workload)


def _gateway_client(tls: WorkloadTls | None, peer: str) -> Any:
    """The api's httpx client to the workload ``peer``: with ``tls``, presenting
    its SVID and talking only to ``peer`` (any other Bastion workload fails the
    handshake); without (development on loopback), plain HTTP.

    Each request leaves in one write (httpcore writes the head and the body
    apart: over TLS, two records for both sides to seal and open; see
    :class:`bastion.identity.workload_transport.OneWriteBackend`), on the
    loop's own transport and its TLS
    (:class:`~bastion.identity.workload_transport.LoopBackend`); the same with
    TLS on or off, so that the two differ by TLS alone."""
    import httpcore
    import httpx

    from bastion.identity.workload_transport import LoopBackend, OneWriteBackend

    context = None if tls is None else tls.client_context(expect=[_peer_id(tls, peer)])
    transport = (
        httpx.AsyncHTTPTransport() if context is None else httpx.AsyncHTTPTransport(verify=context)
    )
    # httpx takes no network backend: its pool is rebuilt as httpx builds it
    # by default (100 connections, 20 kept alive for 5 s), with the backend.
    if not isinstance(transport._pool, httpcore.AsyncConnectionPool):  # httpx is pinned
        raise RuntimeError("httpx's transport no longer holds an httpcore pool")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=OneWriteBackend(LoopBackend()),
    )
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(60.0, connect=5.0))


def _receipt_keys(keystore: Keystore, overrides: Overrides) -> ReceiptKeys:
    """The receipt keys: one ring for the api (which publishes them) and the worker."""
    return overrides.receipt_keys if overrides.receipt_keys is not None else ReceiptKeys(keystore)


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
    from bastion.gateway.entitlements import PlanGate
    from bastion.gateway.incident import IncidentSwitches
    from bastion.gateway.ledger import CallLedger
    from bastion.gateway.sampling import PromptSampling
    from bastion.gateway.shreds import ShredListener
    from bastion.safety.signing import EnvelopeSigner, ToolCallSigner
    from bastion.safety.tenant_policies import SafetyPolicies
    from bastion.safety.vault import PiiVault
    from bastion.secrets.tenant_keys import TenantKeys

    db, keystore, kms = _resources(settings, overrides)
    ca = _workload_ca(settings, keystore, overrides)
    tls = WorkloadTls(ca, "gateway") if ca is not None else None
    metrics = Metrics("gateway") if settings.metrics_enabled else None
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
    answers = (
        overrides.answer_cache
        if overrides.answer_cache is not None  # an empty cache is falsy (len 0)
        else AnswerCache(
            max_entries=settings.gateway_cache_entries,
            max_bytes=settings.gateway_cache_bytes,
            expected_tenants=settings.gateway_cache_expected_tenants,
            ttl_seconds=settings.gateway_cache_ttl_seconds,
            shared_within_tenant=settings.gateway_cache_scope == "tenant",
        )
    )
    # Each tenant's screen policy and PII allow-list, from its tables (fail closed).
    safety = SafetyPolicies(db)
    vault = PiiVault(TenantKeys(kms), allow_lists=safety.pii_allow_lists)
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
        plan_gate=None
        if overrides.without_plan_gate
        else PlanGate(build_billing(settings, db, keystore).service.entitlements),
        # Prompts logged only where the owner set a rate and the user consented.
        sampling=PromptSampling(db),
        safety_policies=safety,
        # The runbook's switches (serve-cached, freeze-spend, disable-tools).
        incident=IncidentSwitches(db, ttl_seconds=settings.gateway_incident_ttl_seconds),
        spent=None if metrics is None else metrics.spent,
    )

    tracing = _tracing(settings, "gateway", overrides)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with _exporting(tracing), _pool_lifespan(db)(_app), renewing(tls):
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
            gateway_routes.build_router(
                service,
                guard,
                EnvelopeSigner(keystore),
                # Over mTLS, an envelope is taken only from the api's workload.
                envelope_from=None if ca is None else spiffe_id(ca.trust_domain, "api"),
            ),
            *overrides.routers,
        ),
        tracing=tracing,
    )
    _counting_requests(app, settings, "gateway", metrics)
    internal = None
    if ca is not None:
        internal = _internal_gate(app, "gateway", settings, ca, db, metrics)
    return Gateway(app, db, keystore, service, guard, internal, tls, metrics)


def _workload_ca(settings: Settings, keystore: Keystore, overrides: Overrides) -> SvidSource | None:
    """Where the SVIDs come from when internal calls go over mTLS: files kept
    current by cert-manager or SPIRE (``workload_svid_dir``; no CA key here),
    else Bastion's CA in the key ring (it must exist: `bastion ca init`)."""
    if overrides.workload_ca is not None:
        return overrides.workload_ca
    if not settings.internal_mtls:
        return None
    if settings.workload_svid_dir is not None:
        return SvidFiles(
            settings.workload_svid_dir,
            settings.workload_trust_domain,
            poll_seconds=settings.workload_svid_poll_seconds,
        )
    return WorkloadCA(keystore, settings.workload_trust_domain)


def _counting_requests(
    app: FastAPI, settings: Settings, process: str, metrics: Metrics | None = None
) -> Metrics | None:
    """The process's metrics (``metrics``, or new ones), counting every request
    of ``app``, outermost; None when ``settings.metrics_enabled`` is off."""
    from bastion.api.metrics import RequestMetrics

    if not settings.metrics_enabled:
        return None
    metrics = metrics if metrics is not None else Metrics(process)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return metrics


def _internal_gate(
    app: FastAPI,
    listener: str,
    settings: Settings,
    ca: SvidSource,
    db: Database,
    metrics: Metrics | None,
) -> WorkloadGate:
    """``app`` — with ``/metrics`` in front when metrics are on — behind the
    SPIFFE-ID gate of its internal listener (callers: :data:`INTERNAL_CALLERS`)."""
    from bastion.api.metrics import METRICS_PATH, InternalListener
    from bastion.api.mtls import Refusal, WorkloadGate
    from bastion.identity import workload_refusals

    served: Any = app
    routes = list(app.routes)
    if metrics is not None:
        served = InternalListener(app, routes, metrics)
        routes = served.routes
    scraper = frozenset({settings.resolved_metrics_scraper_id})
    health = frozenset(settings.workload_scrapers) | scraper
    extra = {"/healthz": health, "/readyz": health, METRICS_PATH: scraper}
    declared = {
        path: frozenset(spiffe_id(ca.trust_domain, w) for w in workloads)
        | extra.get(path, frozenset())
        for path, workloads in INTERNAL_CALLERS[listener].items()
    }

    async def record(refusal: Refusal) -> None:
        await workload_refusals.record(
            db,
            listener=refusal.listener,
            route=refusal.route,
            reason=refusal.reason,
            presented_id=refusal.presented_id,
            peer=refusal.peer,
        )

    return WorkloadGate(
        served,
        listener=listener,
        routes=routes,
        callers=declared,
        verifier=PeerVerifier(ca),
        record=record,
    )


def build_worker(settings: Settings, overrides: Overrides = NO_OVERRIDES) -> Worker:
    """The worker: the job queue's worker, and its health endpoints."""
    from bastion.worker.health import create_worker_health_app

    db, keystore, kms = _resources(settings, overrides)
    knowledge = build_knowledge(settings, db, kms)
    ca = _workload_ca(settings, keystore, overrides)
    tls = WorkloadTls(ca, "worker") if ca is not None else None
    metrics = Metrics("worker") if settings.metrics_enabled else None
    app = create_worker_health_app(
        db.ping,
        lifespan=_worker_lifespan(settings, db, keystore, knowledge, overrides, tls, metrics),
    )
    _counting_requests(app, settings, "worker", metrics)
    internal = None
    if ca is not None:
        internal = _internal_gate(app, "worker", settings, ca, db, metrics)
    return Worker(app, db, internal, tls, metrics)


def _tracing(settings: Settings, process: str, overrides: Overrides) -> Tracing:
    """The process's tracing: the overrides' span processor, else OTLP when configured."""
    return build_tracing(
        process,
        otlp_endpoint=settings.otlp_traces_endpoint,
        sample_ratio=settings.trace_sample_ratio,
        processor=overrides.span_processor,
    )


@asynccontextmanager
async def _exporting(tracing: Tracing) -> AsyncIterator[None]:
    """Spans are flushed to the exporter when the process stops."""
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(tracing.shutdown)


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
    overrides: Overrides,
    tls: WorkloadTls | None = None,
    metrics: Metrics | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The worker's pool, the queue's worker running its jobs, its SVID renewed;
    ``metrics`` read the queue's depth and the keys' ages on each scrape."""
    from bastion.billing import metering_tasks
    from bastion.billing import tasks as billing_tasks
    from bastion.db.service import queue_conninfo, queue_password
    from bastion.knowledge import tasks as knowledge_tasks
    from bastion.safety import tasks as safety_tasks
    from bastion.worker.jobs import JobRegistry
    from bastion.worker.queue import queue_app, queue_depth, running_worker

    queue = queue_app(queue_conninfo(settings), password=queue_password(settings))
    authorizer = _authorizer(settings)
    knowledge_tasks.register(queue, JobRegistry(authorizer), db, knowledge)
    receipts = ReceiptService(
        db, _receipt_keys(keystore, overrides), issuer=settings.resolved_issuer
    )
    billing_tasks.register_from_settings(
        queue,
        JobRegistry(authorizer),
        settings,
        db,
        keystore,
        invoice_paid_hook=receipts.on_invoice_paid,
    )
    metering_tasks.register_from_settings(queue, settings, db, keystore)
    # The tools' audit digests are keyed by the tenants' data keys: the same
    # TenantKeys as the knowledge base's, which the shred listener clears.
    safety_tasks.register_from_settings(
        queue, JobRegistry(authorizer), settings, db, keystore, knowledge.keys
    )
    plan = _register_rotation(queue, settings, db, keystore, knowledge.keys.kms)
    if metrics is not None:

        async def read_queue(m: Metrics) -> None:
            m.set_queue_depth(await queue_depth(queue))

        async def read_key_ages(m: Metrics) -> None:
            m.set_rotation_ages(await anyio.to_thread.run_sync(plan.ages))

        metrics.add_probe("queue", read_queue, feeds=metrics.queue_jobs)
        metrics.add_probe("rotation", read_key_ages, feeds=metrics.rotation_age)

    tracing = _tracing(settings, "worker", overrides)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        slots = {
            "billing": settings.worker_billing_concurrency,
            "ingest": settings.worker_ingest_concurrency,
            "tools": settings.worker_tools_concurrency,
        }
        async with (
            _exporting(tracing),
            _pool_lifespan(db)(_app),
            _forgetting_shreds(db, knowledge),
            running_worker(queue, concurrency=slots, tracing=tracing),
            _checkpointing(settings, db, keystore),
            _detecting(settings, db, keystore, knowledge.keys.kms, metrics),
            renewing(tls),
        ):
            if overrides.on_start is not None:
                await overrides.on_start(db)
            yield

    return lifespan


@asynccontextmanager
async def _checkpointing(
    settings: Settings, db: Database, keystore: Keystore
) -> AsyncIterator[None]:
    """The audit chain's signed checkpoints, every N events or T seconds, in the worker.

    A loop in the worker's lifespan rather than a periodic job: the queue's
    periodic tasks fire at most once a minute, and ``audit_checkpoint_seconds``
    may be shorter. A failed run is logged and retried at the next poll.
    """
    from bastion.audit.checkpoints import AuditKeys, Checkpointer

    checkpointer = Checkpointer.from_settings(settings, db, AuditKeys(keystore))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(checkpointer.run_forever)
        if settings.audit_checkpoint_webhook_url is not None:
            from bastion.audit.webhook import WebhookSink

            webhook = WebhookSink(settings.audit_checkpoint_webhook_url, checkpointer.sink)
            tasks.start_soon(webhook.run_forever)
        try:
            yield
        finally:
            tasks.cancel_scope.cancel()


def _detector_routes(db: Database, guard: Guard) -> APIRouter:
    """An owner's undo of a detector's response (the runner itself is the worker's)."""
    from bastion.detectors import routes as detector_routes
    from bastion.detectors.response import Responder
    from bastion.detectors.runner import DetectorService
    from bastion.incident.controls import IncidentControls

    service = DetectorService(db, Responder(IncidentControls(db), None))
    return detector_routes.build_router(service, guard)


@asynccontextmanager
async def _detecting(
    settings: Settings, db: Database, keystore: Keystore, kms: KMS, metrics: Metrics | None
) -> AsyncIterator[None]:
    """The live detectors (issue 19 items 4-5) in the worker, answering through the
    incident controls; alerts to the log and, when configured, a webhook."""
    if not settings.detectors_enabled:
        yield
        return
    from bastion.detectors.wiring import build_runner
    from bastion.incident.controls import IncidentControls
    from bastion.incident.service import IncidentService

    runner = build_runner(
        settings,
        db,
        IncidentControls(db),
        IncidentService(db, settings, keystore, kms),
        on_fired=None if metrics is None else metrics.detector_fired,
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(runner.run_forever)
        if runner.alerts is not None:
            tasks.start_soon(runner.alerts.run_forever)
        try:
            yield
        finally:
            tasks.cancel_scope.cancel()


def _register_rotation(
    queue: Any, settings: Settings, db: Database, keystore: Keystore, kms: KMS
) -> RotationPlan:
    """The periodic rotation of every key (bastion.rotation), in the worker."""
    from bastion.db.service import resolve_target
    from bastion.rotation import RotationPlan
    from bastion.rotation import tasks as rotation_tasks

    plan = RotationPlan(
        settings,
        keystore,
        kms,
        db,
        admin_conninfo=lambda: resolve_target(settings, start=False).admin_conninfo,
    )
    rotation_tasks.register(queue, plan, cron=settings.key_rotation_check_cron)
    return plan


# The identity side: the request guard (every process that serves routes) and,
# in the api, the provider's service and its routes (OIDC, account, tenants).


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
        on_replay=ReplayAudit(db),
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
    from bastion.identity import oidc
    from bastion.identity import routes as identity_routes
    from bastion.identity.mfa import MfaService
    from bastion.identity.throttle import LoginThrottle
    from bastion.identity.tokens import TokenIssuer
    from bastion.tenants import routes as tenant_routes
    from bastion.tenants.service import roles_of

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
        member_roles=roles_of,
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
        identity_routes.build_router(db, guard, mfa, passwords, throttle),
        tenant_routes.build_router(db, guard),
    )
    return Identity(service, routers, external, guard)


def openapi_documents(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """The OpenAPI documents of the api and the gateway, as they serve them.

    Built here like every app, on a pool that is never opened and a throwaway
    key ring (a temporary directory, removed after): no database or key is
    needed to describe the routes. Keyed by process name.
    """
    import tempfile
    from pathlib import Path

    from bastion.secrets import LocalKeystore

    settings = settings or Settings(embedder="hashing")
    with tempfile.TemporaryDirectory(prefix="bastion-openapi-") as tmp:
        keystore = LocalKeystore(Path(tmp) / "keystore.bin", Path(tmp) / "master.key")
        # Never opened: building an app does not connect.
        db = Database("postgresql:///bastion-openapi", b"\0" * 32)
        ca = None
        if settings.internal_mtls:  # as served: a throwaway workload CA
            ca = WorkloadCA(keystore, settings.workload_trust_domain)
            ca.init()
        overrides = Overrides(database=db, keystore=keystore, models={}, workload_ca=ca)
        return {
            "api": build_api(settings, overrides).app.openapi(),
            "gateway": build_gateway(settings, overrides).app.openapi(),
        }
