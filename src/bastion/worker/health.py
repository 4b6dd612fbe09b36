"""The worker's health endpoints, served on the worker's own port."""

from __future__ import annotations

from fastapi import FastAPI

from bastion.api.app import Lifespan, Readiness, create_app


def create_worker_health_app(
    readiness: Readiness | None = None, *, lifespan: Lifespan | None = None
) -> FastAPI:
    """Return the worker's health app: ``/healthz`` and ``/readyz`` (503 when
    ``readiness`` raises or is slow)."""
    return create_app(title="Bastion worker", readiness=readiness, lifespan=lifespan)
