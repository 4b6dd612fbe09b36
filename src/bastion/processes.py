"""Running Bastion's processes: one in the foreground (``bastion serve``) or the
whole stack on one machine (``bastion up``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from rich.console import Console
from rich.table import Table

from bastion.db.pool import Database
from bastion.db.service import embedded_server
from bastion.knowledge.service import KnowledgeService
from bastion.logs import configure_logging
from bastion.runtime import app_database, knowledge_service, open_keystore, queue_conninfo
from bastion.serve import serve
from bastion.settings import Settings

PROCESSES = ("api", "gateway", "worker")


def _port(settings: Settings, process: str) -> int:
    return {
        "api": settings.api_port,
        "gateway": settings.gateway_port,
        "worker": settings.worker_port,
    }[process]


def settings_env(settings: Settings) -> dict[str, str]:
    """Return environment variables that give a child process these settings."""
    env = {
        "BASTION_HOME": str(settings.home),
        "BASTION_DATABASE_NAME": settings.database_name,
        "BASTION_API_HOST": settings.api_host,
        "BASTION_API_PORT": str(settings.api_port),
        "BASTION_GATEWAY_PORT": str(settings.gateway_port),
        "BASTION_WORKER_PORT": str(settings.worker_port),
        "BASTION_LOG_LEVEL": settings.log_level,
        "BASTION_EMBEDDER": settings.embedder,
        "BASTION_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
        "BASTION_GATEWAY_MODELS": json.dumps(
            [route.model_dump(exclude_defaults=True) for route in settings.gateway_models]
        ),
        "BASTION_GATEWAY_CACHE_TTL_SECONDS": str(settings.gateway_cache_ttl_seconds),
        # Every process of a stack shares one replay store or none does.
        "BASTION_REPLAY_STORE": settings.replay_store,
        "BASTION_TRUSTED_PROXIES": json.dumps([str(net) for net in settings.trusted_proxies]),
        "BASTION_LOGIN_MAX_DELAY_SECONDS": str(settings.login_max_delay_seconds),
    }
    for name, value in (
        ("BASTION_KEYS_DIR", settings.keys_dir),
        ("BASTION_MASTER_KEY_FILE", settings.master_key_file),
        ("BASTION_KEYSTORE_FILE", settings.keystore_file),
        ("BASTION_PG_PORT", settings.pg_port),
        ("BASTION_ISSUER", settings.issuer),
    ):
        if value is not None:
            env[name] = str(value)
    return env


def build_app(process: str, settings: Settings) -> FastAPI:
    """Return the ASGI app of ``process``, with the database pool in its lifespan."""
    from bastion.api.app import create_app
    from bastion.billing import account_routes
    from bastion.billing import routes as billing_routes
    from bastion.gateway import sampling_routes
    from bastion.gateway.app import create_gateway_app
    from bastion.gateway.sampling import PromptSampling
    from bastion.identity.wiring import build_identity
    from bastion.knowledge import routes as knowledge_routes
    from bastion.knowledge.answers import AskService
    from bastion.safety import routes as safety_routes
    from bastion.safety.signing import EnvelopeSigner, ToolCallSigner
    from bastion.worker.health import create_worker_health_app

    db = app_database(settings)
    keystore = open_keystore(settings)
    if process == "gateway":
        from bastion.access.roles import LiveRoles
        from bastion.billing.budgets import BudgetService
        from bastion.billing.wiring import build_billing
        from bastion.gateway import routes as gateway_routes
        from bastion.gateway.app import build_routers
        from bastion.gateway.cache import AnswerCache
        from bastion.gateway.entitlements import PlanGate
        from bastion.gateway.ledger import CallLedger
        from bastion.gateway.service import GatewayService
        from bastion.gateway.shreds import ShredListener
        from bastion.identity.wiring import build_guard
        from bastion.knowledge.keys import TenantKeys
        from bastion.safety.vault import PiiVault

        routers = build_routers(settings.gateway_models, keystore, embedder=settings.embedder)
        live_roles = (
            LiveRoles(db, ttl_seconds=settings.gateway_roles_ttl_seconds)
            if settings.gateway_roles_ttl_seconds > 0
            else None
        )
        guard = build_guard(
            settings, db, keystore, public_url=settings.gateway_url, roles=live_roles
        )
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
        # A shredded tenant's answers are dropped when the shred commits.
        shreds = ShredListener(db, answers)
        gateway = GatewayService(
            ledger,
            routers,
            answers,
            authorizer=guard.authorizer,
            tool_signer=ToolCallSigner(keystore),
            vault=PiiVault(TenantKeys(keystore)),
            # The plan's models and rate, from the tenant's subscription.
            plan_gate=PlanGate(build_billing(settings, db, keystore).service.entitlements),
            # Prompts logged only where the owner set a rate and the user consented.
            sampling=PromptSampling(db),
        )

        @asynccontextmanager
        async def gateway_lifespan(_app: FastAPI) -> AsyncIterator[None]:
            async with _pool_lifespan(db)(_app):
                ledger.start()
                shreds.start()
                if live_roles is not None:
                    live_roles.start()
                try:
                    yield
                finally:
                    await shreds.aclose()
                    if live_roles is not None:
                        await live_roles.aclose()
                    await ledger.aclose()
                    for router in routers.values():
                        await router.aclose()

        return create_gateway_app(
            readiness=db.ping,
            lifespan=gateway_lifespan,
            routers=(gateway_routes.build_router(gateway, guard, EnvelopeSigner(keystore)),),
        )
    knowledge = knowledge_service(settings, db, keystore)
    if process == "worker":
        return create_worker_health_app(db.ping, lifespan=_worker_lifespan(settings, db, knowledge))
    identity = build_identity(settings, db, keystore)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with _pool_lifespan(db)(_app):
            await identity.start()
            yield

    return create_app(
        title="Bastion API",
        readiness=db.ping,
        lifespan=lifespan,
        extra_routers=(
            # First: provider webhooks are the hot path (fewer routes to match).
            *billing_routes.build_routers(settings, db, keystore, identity.guard),
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
            *account_routes.build_from_settings(settings, db, keystore, identity.guard),
            sampling_routes.build_router(PromptSampling(db), identity.guard),
        ),
        max_body_bytes=settings.max_upload_bytes,
        trusted_proxies=settings.trusted_proxies,
    )


def _pool_lifespan(db: Database) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await db.open()
        try:
            yield
        finally:
            await db.close()

    return lifespan


def _worker_lifespan(
    settings: Settings, db: Database, knowledge: KnowledgeService
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
    receipts = ReceiptService(
        db, ReceiptKeys(open_keystore(settings)), issuer=settings.resolved_issuer
    )
    billing_tasks.register_from_settings(
        queue,
        JobRegistry(authorizer),
        settings,
        db,
        open_keystore(settings),
        invoice_paid_hook=receipts.on_invoice_paid,
    )
    metering_tasks.register_from_settings(queue, settings, db, open_keystore(settings))
    safety_tasks.register_from_settings(
        queue, JobRegistry(authorizer), settings, db, open_keystore(settings)
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        slots = {
            "billing": settings.worker_billing_concurrency,
            "ingest": settings.worker_ingest_concurrency,
            "tools": settings.worker_tools_concurrency,
        }
        async with _pool_lifespan(db)(_app), running_worker(queue, concurrency=slots):
            yield

    return lifespan


def run_process(process: str, settings: Settings, *, port: int | None = None) -> None:
    """Serve ``process`` in the foreground until interrupted."""
    configure_logging(settings.log_level, json=settings.log_json)
    serve(
        build_app(process, settings),
        settings.api_host,
        port or _port(settings, process),
        settings.log_level,
    )


@contextlib.contextmanager
def stack(
    settings: Settings, *, wait: float = 30.0, log_dir: Path | None = None
) -> Iterator[dict[str, str]]:
    """Start the database (if embedded) and the three processes; stop them on exit.

    Yields the base URL of each process once all answer ``/readyz``. Their logs
    go to ``log_dir/<process>.log`` when given, else to this terminal. The
    embedded server is stopped at the end only if this call started it.
    """
    server = None if settings.database_url else embedded_server(settings)
    was_running = server is not None and server.status() is not None
    app_database(settings, migrate=True)  # starts the embedded server, migrates
    children: dict[str, subprocess.Popen[bytes]] = {}
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        for process in PROCESSES:
            log = None if log_dir is None else open(log_dir / f"{process}.log", "ab")  # noqa: SIM115
            children[process] = subprocess.Popen(
                [sys.executable, "-m", "bastion", "serve", process],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # One BLAS thread: the embedder shares the cores with PostgreSQL
                # and the api, and spinning BLAS threads collapse under that.
                env={"OPENBLAS_NUM_THREADS": "1", **os.environ, **settings_env(settings)},
            )
            if log is not None:
                log.close()  # the child holds its own descriptor
        urls = {p: f"http://{settings.api_host}:{_port(settings, p)}" for p in PROCESSES}
        _wait_ready(urls, children, wait)
        yield urls
    finally:
        for child in children.values():
            child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None and not was_running:
            server.stop()


def _wait_ready(
    urls: dict[str, str], children: dict[str, subprocess.Popen[bytes]], wait: float
) -> None:
    deadline = time.monotonic() + wait
    pending = dict(urls)
    with httpx.Client(timeout=1.0) as client:
        while pending:
            for process, url in list(pending.items()):
                if children[process].poll() is not None:
                    raise RuntimeError(f"the {process} process exited while starting")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/readyz").status_code == 200:
                        del pending[process]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {wait:.0f} s: {', '.join(pending)}")
            time.sleep(0.05)


def run_stack(settings: Settings, console: Console) -> None:
    """``bastion up``: start everything, print where it listens, wait for Ctrl-C."""
    with stack(settings) as urls:
        table = Table(title="Bastion is up")
        table.add_column("process")
        table.add_column("url")
        for process, url in urls.items():
            table.add_row(process, url)
        console.print(table)
        console.print("Ctrl-C stops everything.")
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
