"""The gateway process: the OpenAI-compatible model proxy and its health endpoints."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from bastion.api.app import Lifespan, Readiness, create_app
from bastion.gateway.providers import LocalProvider, OpenAICompatible, Provider
from bastion.secrets.store import LocalKeystore, resolve_ref
from bastion.settings import ModelRoute


def create_gateway_app(
    *,
    readiness: Readiness | None = None,
    lifespan: Lifespan | None = None,
    routers: tuple[APIRouter, ...] = (),
) -> FastAPI:
    """Return the gateway app: ``/v1/*``, ``/healthz``, ``/readyz``, problem+json errors."""
    return create_app(
        title="Bastion gateway", readiness=readiness, lifespan=lifespan, extra_routers=routers
    )


def build_providers(
    routes: list[ModelRoute], keystore: LocalKeystore, *, embedder: str
) -> dict[str, Provider]:
    """The provider of each configured model; upstream keys come from the key ring."""
    providers: dict[str, Provider] = {}
    for route in routes:
        if route.provider == "local":
            providers[route.name] = LocalProvider(embedder)
            continue
        if not route.base_url or not route.api_key_ref:
            raise ValueError(f"model {route.name!r} needs base_url and api_key_ref")
        key = resolve_ref(keystore, route.api_key_ref).decode()
        providers[route.name] = OpenAICompatible(
            route.base_url,
            key,
            upstream_model=route.upstream_model,
            timeout=route.timeout_seconds,
        )
    return providers
