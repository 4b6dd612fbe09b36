"""The gateway for tests.

:func:`gateway_server` serves the gateway the composition root builds
(:func:`bastion.compose.build_gateway`, what ``bastion serve gateway`` runs) on
the test's database and key ring. :func:`gateway_app` is the older helper for
tests that assemble their own, narrower GatewayService (no plan gate, no answer
cache…) around the same lifespan: the pool opened, the ledger (and, given, the
live roles) running, everything closed at shutdown."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bastion.access.guard import Guard
from bastion.access.roles import LiveRoles
from bastion.compose import Gateway, Overrides, build_gateway
from bastion.db.pool import Database
from bastion.gateway import routes as gateway_routes
from bastion.gateway.app import create_gateway_app
from bastion.gateway.routing import ModelRouter
from bastion.gateway.service import GatewayService
from bastion.safety.signing import EnvelopeSigner
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from tests.conftest import DbHandles
from tests.http_server import serving


@contextlib.contextmanager
def gateway_server(
    database: DbHandles,
    keystore: LocalKeystore,
    settings: Callable[[str], Settings],
    *,
    models: dict[str, ModelRouter] | None = None,
    seed: Callable[[Database], Awaitable[None]] | None = None,
) -> Iterator[tuple[str, Gateway]]:
    """Yield (base URL, the composed gateway) of a running gateway on ``database``;
    ``settings(url)`` gives its settings once its URL is known, ``models``
    replaces the configured model routers, ``seed`` runs before the first request."""
    built: list[Gateway] = []

    def build(url: str) -> FastAPI:
        overrides = Overrides(
            database=Database(database.app, database.context_key, max_size=8),
            keystore=keystore,
            models=models,
            on_start=seed,
        )
        built.append(build_gateway(settings(url), overrides))
        return built[0].app

    with serving(build) as url:
        yield url, built[0]


def gateway_app(
    db: Database,
    service: GatewayService,
    guard: Guard,
    signer: EnvelopeSigner,
    *,
    live_roles: LiveRoles | None = None,
    seed: Callable[[Database], Awaitable[None]] | None = None,
) -> FastAPI:
    """The app; ``seed`` runs once the pool is open, before the first request."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await db.open()
        service.ledger.start()
        if live_roles is not None:
            live_roles.start()
        try:
            if seed is not None:
                await seed(db)
            yield
        finally:
            if live_roles is not None:
                await live_roles.aclose()
            await service.ledger.aclose()
            for model_router in service.models.values():
                await model_router.aclose()
            await db.close()

    router = gateway_routes.build_router(service, guard, signer)
    return create_gateway_app(readiness=db.ping, lifespan=lifespan, routers=(router,))
