"""The api as the composition root builds it (:func:`bastion.compose.build_api`),
served for a billing test module on real uvicorn with the module's own receipt
keys and, where given, a checkout against a double of Stripe; and DPoP-bound
tokens to call its billing-account routes (checkout, usage, receipts, receipt
keys)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
from fastapi import FastAPI

from bastion.billing.metering import MeteringService
from bastion.billing.receipts import ReceiptKeys, ReceiptService
from bastion.compose import CheckoutFactory, Identity, Overrides, build_api
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.secrets import LocalKeystore
from tests.api_stack import api_settings
from tests.conftest import DbHandles
from tests.http_server import serving


@dataclass
class BillingStack:
    """The served api: its URL, the services its routes use, and the seeded
    tenants and their members (one per role)."""

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


Seed = Callable[[Database, BillingStack], Awaitable[None]]


@contextlib.contextmanager
def billing_server(
    database: DbHandles,
    keystore: LocalKeystore,
    receipt_keys: ReceiptKeys,
    seed: Seed,
    *,
    checkout: CheckoutFactory | None = None,
) -> Iterator[BillingStack]:
    """Yield the running api on ``database``, seeded by ``seed`` once its pool
    is open; it signs and publishes receipts with ``receipt_keys`` and sells
    through ``checkout`` (default: none configured)."""
    built: list[BillingStack] = []

    async def on_start(db: Database) -> None:
        await seed(db, built[0])

    def build(url: str) -> FastAPI:
        overrides = Overrides(
            database=Database(database.app, database.context_key, max_size=8),
            keystore=keystore,
            on_start=on_start,
            receipt_keys=receipt_keys,
            checkout=checkout,
        )
        api = build_api(api_settings(url, "http://127.0.0.1:9"), overrides)
        built.append(BillingStack(url, api.identity, api.receipts, api.metering))
        return api.app

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
