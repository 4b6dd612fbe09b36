"""The gateway for tests.

:func:`gateway_server` serves the gateway the composition root builds
(:func:`bastion.compose.build_gateway`, what ``bastion serve gateway`` runs) on
the test's database and key ring; what a test may change is what
:class:`bastion.compose.Overrides` offers (model routers, the answer cache, the
plan gate left out), never the wiring."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator

from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from bastion.compose import Gateway, Overrides, build_gateway
from bastion.db.pool import Database
from bastion.gateway.cache import AnswerCache
from bastion.gateway.routing import ModelRouter
from bastion.secrets import KMS, LocalKeystore
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
    sock: socket.socket | None = None,
    pool_size: int = 8,
    answer_cache: AnswerCache | None = None,
    without_plan_gate: bool = False,
    kms: KMS | None = None,
    span_processor: SpanProcessor | None = None,
) -> Iterator[tuple[str, Gateway]]:
    """Yield (base URL, the composed gateway) of a running gateway on ``database``;
    ``settings(url)`` gives its settings once its URL is known, ``models``
    replaces the configured model routers, ``seed`` runs before the first request,
    ``sock`` is the bound socket to serve on (default: a free port);
    ``answer_cache``, ``without_plan_gate``, ``kms`` (the tenants' KEKs; default:
    the settings' backend) and ``span_processor`` are :class:`Overrides`' fields."""
    built: list[Gateway] = []

    def build(url: str) -> FastAPI:
        overrides = Overrides(
            database=Database(database.app, database.context_key, max_size=pool_size),
            keystore=keystore,
            kms=kms,
            models=models,
            on_start=seed,
            answer_cache=answer_cache,
            without_plan_gate=without_plan_gate,
            span_processor=span_processor,
        )
        # Plain HTTP between the processes (development on loopback): these
        # tests post envelopes to the public app; the mTLS listener has its own
        # (tests/test_workload_identity.py).
        plain = settings(url).model_copy(update={"internal_mtls": False, "dev_mode": True})
        built.append(build_gateway(plain, overrides))
        return built[0].app

    with serving(build, sock) as url:
        yield url, built[0]
