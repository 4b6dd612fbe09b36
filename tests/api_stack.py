"""The api process's app served for a test module: built by the composition
root (:func:`bastion.compose.build_api`) exactly as ``bastion serve api`` builds
it, on the test's database and key ring, served by real uvicorn on 127.0.0.1
with its own event loop and pool, seeded in its lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from bastion.compose import Api, Identity, Overrides, build_api
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from tests.conftest import DbHandles
from tests.http_server import serving

Seed = Callable[[Database, Identity], Awaitable[None]]


def api_settings(url: str, gateway_url: str) -> Settings:
    """The settings a test api runs with: its own URL as the issuer, the
    keyless embedder, and ``gateway_url`` as the gateway questions go to —
    over plain HTTP, which development mode allows on loopback (the mTLS path
    is tested on its own: tests/test_workload_identity.py)."""
    return Settings(
        issuer=url,
        gateway_public_url=gateway_url,
        embedder="hashing",
        internal_mtls=False,
        dev_mode=True,
    )


@contextlib.contextmanager
def api_stack(
    database: DbHandles,
    keystore: LocalKeystore,
    seed: Seed,
    *,
    gateway_url: str = "http://127.0.0.1:9",  # nothing listens: questions get a 503
    routers: tuple[APIRouter, ...] = (),
    answer_link_hosts: tuple[str, ...] = (),
    more_settings: Mapping[str, Any] | None = None,
    span_processor: SpanProcessor | None = None,
) -> Iterator[tuple[str, Api]]:
    """Yield (base URL, the composed api) of a running api on ``database``;
    ``answer_link_hosts``: the hosts an answer may link to (settings);
    ``more_settings``: any other settings (e.g. billing's); ``span_processor``:
    where its spans go (:class:`Overrides`)."""
    built: list[Api] = []

    async def on_start(db: Database) -> None:
        await seed(db, built[0].identity)

    def build(url: str) -> FastAPI:
        overrides = Overrides(
            database=Database(database.app, database.context_key, max_size=8),
            keystore=keystore,
            on_start=on_start,
            routers=routers,
            span_processor=span_processor,
        )
        settings = api_settings(url, gateway_url)
        if answer_link_hosts:
            settings = settings.model_copy(update={"answer_link_hosts": list(answer_link_hosts)})
        if more_settings:
            settings = settings.model_copy(update=dict(more_settings))
        built.append(build_api(settings, overrides))
        return built[0].app

    with serving(build) as url:
        yield url, built[0]


@contextlib.contextmanager
def api_server(
    database: DbHandles,
    keystore: LocalKeystore,
    seed: Seed,
    *,
    gateway_url: str = "http://127.0.0.1:9",
) -> Iterator[tuple[str, FastAPI, Identity]]:
    """Yield (base URL, app, identity) of a running api on ``database``."""
    with api_stack(database, keystore, seed, gateway_url=gateway_url) as (url, api):
        yield url, api.app, api.identity
