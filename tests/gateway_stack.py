"""A gateway app for tests, assembled around a test's own GatewayService the way
``processes.py`` runs the gateway process: the pool opened, the ledger (and,
given, the live roles) running, everything closed at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bastion.access.guard import Guard
from bastion.access.roles import LiveRoles
from bastion.db.pool import Database
from bastion.gateway import routes as gateway_routes
from bastion.gateway.app import create_gateway_app
from bastion.gateway.service import GatewayService
from bastion.safety.signing import EnvelopeSigner


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
