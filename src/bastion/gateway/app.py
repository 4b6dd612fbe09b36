"""The gateway process: the OpenAI-compatible model proxy and its health endpoints."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from bastion.api.app import Lifespan, Readiness, create_app
from bastion.gateway.providers import LocalProvider, OpenAICompatible, Provider
from bastion.gateway.routing import ModelRouter, Price, Target
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import resolve_ref
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


def _provider(route: ModelRoute, keystore: Keystore, embedder: str) -> Provider:
    if route.provider == "local":
        return LocalProvider(embedder)
    if not route.base_url or not route.api_key_ref:
        raise ValueError(f"model {route.name!r} needs base_url and api_key_ref")
    return OpenAICompatible(
        route.base_url,
        resolve_ref(keystore, route.api_key_ref).decode(),
        upstream_model=route.upstream_model,
        timeout=route.timeout_seconds,
    )


def build_routers(
    routes: list[ModelRoute], keystore: Keystore, *, embedder: str
) -> dict[str, ModelRouter]:
    """Each configured model's router over its targets; upstream keys from the key ring."""
    targets: dict[str, list[Target]] = {}
    for i, route in enumerate(routes):
        targets.setdefault(route.name, []).append(
            Target(
                f"{route.name}#{i}",
                _provider(route, keystore, embedder),
                weight=route.weight,
                canary=route.canary,
                fallback=route.fallback,
                price=Price(route.micro_usd_per_mtok_prompt, route.micro_usd_per_mtok_completion),
            )
        )
    return {name: ModelRouter(group) for name, group in targets.items()}
