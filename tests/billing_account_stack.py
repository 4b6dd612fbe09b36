"""The api with the billing-account routes (checkout, usage, receipts, receipt keys),
served for a test module on real uvicorn, and DPoP-bound tokens to call it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
from fastapi import FastAPI

from bastion.api.app import create_app
from bastion.billing import account_routes
from bastion.billing.checkout import CheckoutService
from bastion.billing.metering import MeteringService
from bastion.billing.receipts import ReceiptKeys, ReceiptService
from bastion.compose import Identity, build_identity
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from tests.conftest import DbHandles
from tests.http_server import serving

Seed = Callable[[Database, Identity], Awaitable[None]]
CheckoutFactory = Callable[[Database], CheckoutService]


@dataclass
class BillingStack:
    url: str
    identity: Identity
    receipts: ReceiptService
    metering: MeteringService
    tenants: dict[str, UUID] = field(default_factory=dict)
    users: dict[tuple[str, str], UUID] = field(default_factory=dict)

    def headers(
        self, tenant: str, role: str, method: str, url: str, *, mfa: bool = True
    ) -> dict[str, str]:
        key = DpopKey.generate()
        token, _ = self.identity.service.tokens.issue_access(
            user_id=self.users[(tenant, role)],
            tenant_id=self.tenants[tenant],
            roles=(role,),
            amr=("pwd", "mfa") if mfa else ("pwd",),
            jkt=key.thumbprint,
            auth_time=int(time.time()),
        )
        return {
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof(method, url, access_token=token),
        }

    def call(
        self,
        method: str,
        path: str,
        *,
        tenant: str = "a",
        role: str = "billing-admin",
        as_tenant: str | None = None,
        mfa: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Call ``path`` as ``role`` of ``as_tenant`` (default ``tenant``)."""
        url = f"{self.url}{path}"
        headers = {
            **self.headers(as_tenant or tenant, role, method, url, mfa=mfa),
            **kwargs.pop("headers", {}),
        }
        return httpx.request(method, url, headers=headers, timeout=15, **kwargs)


@contextlib.contextmanager
def billing_server(
    database: DbHandles,
    keystore: LocalKeystore,
    receipt_keys: ReceiptKeys,
    seed: Callable[[Database, BillingStack], Awaitable[None]],
    *,
    checkout: CheckoutFactory | None = None,
) -> Iterator[BillingStack]:
    built: list[BillingStack] = []

    def build(url: str) -> FastAPI:
        db = Database(database.app, database.context_key, max_size=8)
        identity = build_identity(Settings(issuer=url), db, keystore)
        receipts = ReceiptService(db, receipt_keys, issuer=url)
        metering = MeteringService(db)
        stack = BillingStack(url, identity, receipts, metering)
        built.append(stack)

        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            await db.open()
            try:
                await identity.start()
                await seed(db, stack)
                yield
            finally:
                await db.close()

        return create_app(
            readiness=db.ping,
            lifespan=lifespan,
            extra_routers=(
                *identity.routers,
                account_routes.build_keys_router(receipt_keys),
                account_routes.build_router(
                    identity.guard,
                    metering=metering,
                    receipts=receipts,
                    checkout=checkout(db) if checkout else None,
                ),
            ),
        )

    with serving(build):
        yield built[0]


ROLES = ("owner", "billing-admin", "auditor", "contributor", "viewer")


async def seed_tenants(
    db: Database, stack: BillingStack, names: tuple[str, ...] = ("a", "b")
) -> None:
    """Tenants ``a`` and ``b``, each with a user in every role."""
    from uuid import uuid4

    from bastion.tenants.service import TenantService

    service = TenantService(db)
    for name in names:
        tenant = (await service.create_tenant(f"bill-{name}-{uuid4().hex[:8]}", name)).id
        stack.tenants[name] = tenant
        for role in ROLES:
            stack.users[(name, role)] = await service.add_member(
                tenant, f"{role}-{name}-{uuid4().hex[:6]}@billing.test", role
            )
