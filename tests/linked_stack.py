"""The api and the gateway linked as ``bastion up`` runs them (the api's
questions go to this gateway, the gateway trusts this api's tokens), both
built by the composition root and served by real uvicorn on the test
module's database, with two seeded tenants: every role is a member of the
"own" one (a contributor with a password, for the sign-in), which has a budget
for questions, and each tenant has a ``support`` namespace holding one indexed
document."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from argon2 import PasswordHasher, Type
from opentelemetry.sdk.trace import SpanProcessor

from bastion.access.authorize import ROLES
from bastion.billing.budgets import BudgetService
from bastion.compose import Api, Gateway, Identity
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.passwords import PasswordService
from bastion.identity.service import PLATFORM
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.api_stack import api_stack
from tests.conftest import DbHandles, short_tempdir
from tests.gateway_stack import gateway_server
from tests.http_server import bound_socket
from tests.stripe_double import API_KEY as STRIPE_API_KEY
from tests.stripe_double import stripe_double

PASSWORD = "correct horse battery staple 42"
NAMESPACE = "support"
SIDES = ("own", "other")
DOCUMENT = (
    "Ticket 1042: the customer asked for a refund of invoice INV-1042. "
    "The refund was approved by the billing team and paid back within five days."
)
SIGNS_IN = "contributor"  # the role whose member has a password
CHEAP_HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.ID)
TOKEN_LIFETIME = 300  # seconds a minted token is used for (they live 15 minutes)


@dataclass
class Seeded:
    tenants: dict[str, UUID] = field(default_factory=dict)  # side -> tenant
    slugs: dict[str, str] = field(default_factory=dict)  # side -> slug
    users: dict[str, UUID] = field(default_factory=dict)  # role -> member of "own"
    namespaces: dict[str, UUID] = field(default_factory=dict)  # side -> namespace id
    documents: dict[str, UUID] = field(default_factory=dict)  # side -> indexed document


@dataclass
class Linked(Seeded):
    api_url: str = ""
    gateway_url: str = ""
    api: Api | None = None
    gateway: Gateway | None = None
    keystore: LocalKeystore | None = None
    _minted: dict[tuple[str, bool], tuple[DpopKey, str, float]] = field(default_factory=dict)

    @staticmethod
    def email(role: str) -> str:
        return f"{role}@linked.test"

    def credentials(self, role: str, *, mfa: bool = True) -> tuple[DpopKey, str]:
        """A DPoP key and an access token bound to it for ``role`` in the own
        tenant (minted by the api's own issuer, as a sign-in would), renewed
        well before it expires."""
        minted = self._minted.get((role, mfa))
        if minted is None or time.monotonic() - minted[2] > TOKEN_LIFETIME:
            key = DpopKey.generate()
            assert self.api is not None
            token, _claims = self.api.identity.service.tokens.issue_access(
                user_id=self.users[role],
                tenant_id=self.tenants["own"],
                roles=(role,),
                amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
                jkt=key.thumbprint,
                auth_time=int(time.time()),
            )
            minted = self._minted[(role, mfa)] = (key, token, time.monotonic())
        return minted[0], minted[1]


@contextlib.contextmanager
def linked_stack(
    database: DbHandles,
    *,
    gateway_models: list[ModelRoute] | None = None,
    span_processor: SpanProcessor | None = None,
    ring: Mapping[str, bytes] | None = None,
) -> Iterator[Linked]:
    """Yield the seeded, linked api and gateway, on a key ring of their own
    (the billing secrets below must not reach other modules' tests);
    ``gateway_models``: the gateway's models (default: the settings'),
    ``span_processor``: where both send their spans, ``ring``: more secrets on
    their key ring (a provider's key)."""
    base = short_tempdir("bastion-linked-")
    keystore = LocalKeystore(base / "keystore.bin", base / "master.key")
    # Every route live, as a deployment that sells through Stripe and Adyen
    # has it: webhook secrets, and Checkout against a double of Stripe's API.
    keystore.set("billing/stripe-webhook-secret", f"whsec_{secrets.token_hex(16)}".encode())
    keystore.set("billing/adyen-hmac-key", secrets.token_hex(32).encode())
    keystore.set("billing/stripe-api-key", STRIPE_API_KEY.encode())
    for name, value in (ring or {}).items():
        keystore.set(name, value)
    seeded = Seeded()

    async def seed(db: Database, _identity: Identity) -> None:
        await _seed(db, keystore, seeded)

    gateway_socket = bound_socket()
    gateway_url = f"http://127.0.0.1:{gateway_socket.getsockname()[1]}"
    try:
        with (
            stripe_double() as stripe,
            api_stack(
                database,
                keystore,
                seed,
                gateway_url=gateway_url,
                more_settings={
                    "billing_stripe_api_key_ref": "local://billing/stripe-api-key",
                    "billing_stripe_api_base": stripe.url,
                    "billing_checkout_success_url": "https://app.example/paid",
                    "billing_checkout_cancel_url": "https://app.example/cancelled",
                },
                span_processor=span_processor,
            ) as (api_url, api),
        ):

            def gateway_settings(url: str) -> Settings:
                settings = Settings(issuer=api_url, gateway_public_url=url, embedder="hashing")
                if gateway_models is not None:
                    settings = settings.model_copy(update={"gateway_models": gateway_models})
                return settings

            with gateway_server(
                database,
                keystore,
                gateway_settings,
                sock=gateway_socket,
                span_processor=span_processor,
            ) as (
                url,
                gateway,
            ):
                assert url == gateway_url
                linked = Linked(**vars(seeded), api_url=api_url, gateway_url=url)
                linked.api, linked.gateway, linked.keystore = api, gateway, keystore
                yield linked
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _seed(db: Database, keystore: LocalKeystore, seeded: Seeded) -> None:
    tenants = TenantService(db)
    knowledge = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    for side in SIDES:
        slug = f"l-{uuid4().hex[:8]}"
        tenant = (await tenants.create_tenant(slug, side)).id
        seeded.tenants[side], seeded.slugs[side] = tenant, slug
        operator = Actor(tenant, None, "system")
        namespace = await knowledge.create_namespace(operator, NAMESPACE)
        upload = await knowledge.upload(
            operator,
            NAMESPACE,
            title="Refund ticket",
            body=DOCUMENT.encode(),
            content_type="text/plain",
            enqueue=False,
        )
        assert (await knowledge.ingest(tenant, upload.document.id)).status == "indexed"
        seeded.namespaces[side] = namespace.id
        seeded.documents[side] = upload.document.id
    own = seeded.tenants["own"]
    for role in ROLES:
        seeded.users[role] = await tenants.add_member(own, Linked.email(role), role)
    # A budget for the own tenant's questions (the day's, generous).
    start = datetime.now(UTC) - timedelta(minutes=1)
    await BudgetService(db).set_budget(
        own,
        period_start=start,
        period_end=start + timedelta(days=1),
        call_limit=10**6,
        token_limit=10**9,
    )
    # The member who signs in with a password (cheaply hashed: a test's seed).
    async with db.tenant_tx(own, None, "system") as tx:
        await PasswordService(hasher=CHEAP_HASH).set_password(tx, seeded.users[SIGNS_IN], PASSWORD)
    # Plans are data: the platform says which Stripe price sells each paid plan.
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        for code in ("pro", "enterprise"):
            await tx.execute(
                "UPDATE bastion.plans SET stripe_price_id = %s WHERE code = %s",
                (f"price_linked_{code}", code),
            )
