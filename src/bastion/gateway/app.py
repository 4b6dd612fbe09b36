"""The gateway process: the OpenAI-compatible model proxy and its health endpoints."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI

from bastion.api.app import Lifespan, Readiness, create_app
from bastion.gateway.providers import LocalProvider, OpenAICompatible, Provider
from bastion.gateway.routing import ModelRouter, Price, Target
from bastion.logs import get_logger
from bastion.secrets.errors import SecretsError
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import resolve_ref
from bastion.settings import ModelRoute
from bastion.telemetry.tracing import Tracing

_log = get_logger("bastion.gateway")

# A rotated upstream key (``bastion keys rotate provider``) is used by new calls
# within this long; the provider keeps the old one valid during the overlap.
PROVIDER_KEY_REFRESH_SECONDS = 5.0


def create_gateway_app(
    *,
    readiness: Readiness | None = None,
    lifespan: Lifespan | None = None,
    routers: tuple[APIRouter, ...] = (),
    tracing: Tracing | None = None,
) -> FastAPI:
    """Return the gateway app: ``/v1/*``, ``/healthz``, ``/readyz``, problem+json
    errors; with ``tracing``, a span per request."""
    return create_app(
        title="Bastion gateway",
        readiness=readiness,
        lifespan=lifespan,
        extra_routers=routers,
        tracing=tracing,
    )


def _provider(route: ModelRoute, keystore: Keystore, embedder: str) -> Provider:
    if route.provider == "local":
        return LocalProvider(embedder)
    if not route.base_url or not route.api_key_ref:
        raise ValueError(f"model {route.name!r} needs base_url and api_key_ref")
    return OpenAICompatible(
        route.base_url,
        CurrentKey(keystore, route.api_key_ref),
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
                provider_name=(urlsplit(route.base_url).hostname if route.base_url else None)
                or route.provider,
            )
        )
    return {name: ModelRouter(group) for name, group in targets.items()}


class CurrentKey:
    """The upstream API key a reference names, re-read at most every ``refresh`` seconds.

    Read at call time, not at build time, so a rotation reaches a running
    gateway with no restart. A reference that cannot be read fails at build
    time; if the secret store becomes unreadable later, the last key read is
    kept (it was valid, and the provider's overlap keeps it valid for a while)
    and reading is tried again after ``refresh``.
    """

    def __init__(
        self,
        keystore: Keystore,
        ref: str,
        *,
        refresh: float = PROVIDER_KEY_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keystore = keystore
        self._ref = ref
        self._refresh = refresh
        self._clock = clock
        self._value = resolve_ref(keystore, ref).decode()
        self._read_at = clock()
        self._lock = threading.Lock()

    def __call__(self) -> str:
        if self._clock() - self._read_at < self._refresh:
            return self._value
        with self._lock:  # one reader at a time; the others keep the cached key
            now = self._clock()
            if now - self._read_at >= self._refresh:
                try:
                    self._value = resolve_ref(self._keystore, self._ref).decode()
                except SecretsError as error:
                    _log.warning(
                        "provider_key_unreadable", ref=self._ref, error=type(error).__name__
                    )
                self._read_at = now
            return self._value
