"""The FastAPI application factory shared by Bastion's processes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager

from fastapi import APIRouter, FastAPI

from bastion import __version__
from bastion.api.declare import public, require_declared
from bastion.api.input_rules import InputRulesMiddleware
from bastion.api.middleware import (
    DEFAULT_MAX_BODY_BYTES,
    BodySizeLimitMiddleware,
    ClientAddressMiddleware,
    IPNetwork,
    RequestIdMiddleware,
)
from bastion.api.openapi import install_openapi
from bastion.api.problems import NotReady, install_problem_handlers
from bastion.api.tracing import TracingMiddleware
from bastion.logs import get_logger
from bastion.telemetry.tracing import Tracing

Readiness = Callable[[], Awaitable[None]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

# Seconds /readyz waits for the readiness check before answering 503.
READINESS_TIMEOUT = 2.0

_log = get_logger("bastion.api")

_STATUS = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
_HEALTHZ = {
    "summary": "Liveness: the process runs",
    "responses": {
        "200": {"description": "Alive", "content": {"application/json": {"schema": _STATUS}}}
    },
}
_READYZ = {
    "summary": "Readiness: the process's dependencies answer (fail closed)",
    "responses": {
        "200": {"description": "Ready", "content": {"application/json": {"schema": _STATUS}}},
        "503": {
            "description": "A dependency is unavailable",
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        },
    },
}


def create_app(
    *,
    readiness: Readiness | None = None,
    title: str = "Bastion API",
    extra_routers: Sequence[APIRouter] = (),
    lifespan: Lifespan | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    trusted_proxies: Sequence[IPNetwork] = (),
    tracing: Tracing | None = None,
) -> FastAPI:
    """Return an app with health/readiness, problem+json errors and request ids.

    ``GET /healthz`` answers ``{"status": "ok"}`` while the process runs.
    ``GET /readyz`` awaits ``readiness`` (if given) and answers 503 problem+json
    (type ``.../not-ready``) when it raises or takes longer than
    ``READINESS_TIMEOUT`` seconds: fail closed. ``extra_routers`` are included
    as they are; ``lifespan`` is handed to FastAPI; request bodies over
    ``max_body_bytes`` are refused with 413. The client address is the
    socket peer, or behind one of ``trusted_proxies`` the address they
    forwarded (:class:`ClientAddressMiddleware`). With ``tracing``, each
    request is a span (:class:`TracingMiddleware`). No docs UI is served;
    ``/openapi.json`` is.
    """
    app = FastAPI(
        title=title,
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    install_problem_handlers(app)

    @app.get("/healthz", **public(_HEALTHZ))
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", **public(_READYZ))
    async def readyz() -> dict[str, str]:
        if readiness is not None:
            try:
                await asyncio.wait_for(readiness(), READINESS_TIMEOUT)
            except Exception as exc:
                # The reason goes to the (redacted) log only: it may name hosts
                # or carry a DSN.
                _log.warning("not_ready", error=type(exc).__name__, reason=str(exc))
                raise NotReady("a dependency is unavailable") from None
        return {"status": "ready"}

    for router in extra_routers:
        app.include_router(router)
    # Deny by default: an app with a route that declares no action does not start.
    require_declared(app)
    install_openapi(app)
    # add_middleware puts each new one outside the previous: the request id
    # exists before the size check answers, and is echoed on its 413; the
    # input rules read bodies already capped by the size check.
    app.add_middleware(InputRulesMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    if tracing is not None:
        # Outside the request id's: its request line carries the trace id.
        app.add_middleware(TracingMiddleware, tracing=tracing)
    # Outermost: everything inside sees the real client's address.
    app.add_middleware(ClientAddressMiddleware, trusted_proxies=trusted_proxies)
    return app
