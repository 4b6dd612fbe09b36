"""The api process's app (identity, access, tenant routes) served for a test
module: real uvicorn on 127.0.0.1, its own event loop and pool, seeded in its
lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bastion.api.app import create_app
from bastion.billing import account_routes
from bastion.billing import routes as billing_routes
from bastion.db.pool import Database
from bastion.gateway import sampling_routes
from bastion.gateway.sampling import PromptSampling
from bastion.identity.wiring import Identity, build_identity
from bastion.knowledge import routes as knowledge_routes
from bastion.knowledge.answers import AskService
from bastion.knowledge.keys import TenantKeys
from bastion.knowledge.service import KnowledgeService
from bastion.safety import routes as safety_routes
from bastion.safety.signing import EnvelopeSigner
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from tests.conftest import DbHandles
from tests.http_server import serving

Seed = Callable[[Database, Identity], Awaitable[None]]


@contextlib.contextmanager
def api_server(
    database: DbHandles,
    keystore: LocalKeystore,
    seed: Seed,
    *,
    gateway_url: str = "http://127.0.0.1:9",  # nothing listens: questions get a 503
) -> Iterator[tuple[str, FastAPI, Identity]]:
    """Yield (base URL, app, identity) of a running api on ``database``."""
    built: list[tuple[FastAPI, Identity]] = []

    def build(url: str) -> FastAPI:
        db = Database(database.app, database.context_key, max_size=8)
        identity = build_identity(Settings(issuer=url), db, keystore)

        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            await db.open()
            try:
                await identity.start()
                await seed(db, identity)
                yield
            finally:
                await db.close()

        knowledge = KnowledgeService(db, TenantKeys(keystore), default_embedder="hashing")
        app = create_app(
            readiness=db.ping,
            lifespan=lifespan,
            extra_routers=(
                *identity.routers,
                knowledge_routes.build_router(
                    knowledge,
                    identity.guard,
                    AskService(knowledge, EnvelopeSigner(keystore), gateway_url),
                ),
                safety_routes.build_router(knowledge.vault, db, identity.guard),
                *billing_routes.build_routers(Settings(issuer=url), db, keystore, identity.guard),
                *account_routes.build_from_settings(
                    Settings(issuer=url), db, keystore, identity.guard
                ),
                sampling_routes.build_router(PromptSampling(db), identity.guard),
            ),
        )
        built.append((app, identity))
        return app

    with serving(build) as url:
        app, identity = built[0]
        yield url, app, identity
