"""The gateway's ASGI application (health and readiness only, for now)."""

from __future__ import annotations

from fastapi import FastAPI

from bastion.api.app import Lifespan, Readiness, create_app


def create_gateway_app(
    *, readiness: Readiness | None = None, lifespan: Lifespan | None = None
) -> FastAPI:
    """Return the gateway app: ``/healthz``, ``/readyz`` and problem+json errors."""
    return create_app(title="Bastion gateway", readiness=readiness, lifespan=lifespan)
