"""The FastAPI application factory shared by Bastion's processes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager

import structlog
from fastapi import APIRouter, FastAPI

from bastion import __version__
from bastion.api.middleware import RequestIdMiddleware, RequestSizeLimitMiddleware
from bastion.api.problems import NotReady, install_problem_handlers

Readiness = Callable[[], Awaitable[None]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

_log = structlog.get_logger("bastion.api")
READINESS_TIMEOUT = 2.0


def create_app(
    *,
    title: str = "Bastion API",
    readiness: Readiness | None = None,
    lifespan: Lifespan | None = None,
    routers: Sequence[APIRouter] = (),
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """Return an app with health/readiness, problem+json errors and request ids.

    ``readiness`` is awaited by ``GET /readyz``; if it raises or takes longer
    than 2 s the answer is 503 (fail closed).
    """
    app = FastAPI(
        title=title, version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan
    )
    install_problem_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> dict[str, str]:
        if readiness is not None:
            try:
                await asyncio.wait_for(readiness(), READINESS_TIMEOUT)
            except Exception as exc:
                # The reason goes to the log only: it may name hosts or DSNs.
                _log.warning("not_ready", error=type(exc).__name__, reason=str(exc))
                raise NotReady("a dependency is unavailable") from None
        return {"status": "ready"}

    for router in routers:
        app.include_router(router)
    # Outermost first: the request id exists before the size check answers.
    app.add_middleware(RequestSizeLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
