"""Metering (CHECKLIST P1): usage comes only from the gateway's settled records,
is read per tenant and period by billing-admins and auditors (``usage:read``)
and by no one else, and reaches Stripe's meters once per record — through the
official ``stripe`` client against a real HTTP double of Stripe — however
often, concurrently or after a failure the report runs."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.billing.budgets import BudgetService
from bastion.billing.metering import (
    MeterEvent,
    MeteringService,
    MeterReporter,
    StripeMeterSink,
    stripe_customer,
)
from bastion.billing.receipts import ReceiptKeys
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.billing_account_stack import BillingStack, billing_server, seed_tenants
from tests.conftest import DbHandles, short_tempdir
from tests.stripe_double import StripeDouble, stripe_double

pytestmark = pytest.mark.anyio
A_TOKENS = (11, 22, 33)


async def add_calls(db: Database, tenant: UUID, tokens: tuple[int, ...]) -> list[UUID]:
    """Settled calls in the tenant's current period (created if needed); their record ids."""
    budgets = BudgetService(db)
    if await budgets.state(tenant) is None:
        start = datetime.now(UTC) - timedelta(minutes=5)
        await budgets.set_budget(
            tenant,
            period_start=start,
            period_end=start + timedelta(days=30),
            call_limit=1000,
            token_limit=1_000_000,
        )
    ids = []
    for used in tokens:
        reservation = await budgets.reserve(tenant, 100)
        await budgets.settle(reservation, used)
        ids.append(reservation.id)
    await budgets.release(await budgets.reserve(tenant, 100))  # a failed call: no usage
    return ids


async def subscribe(db: Database, tenant: UUID, customer: str) -> None:
    async with db.tenant_tx(tenant, None, "system") as tx:
        await tx.execute(
            "INSERT INTO bastion.subscriptions (plan_code, provider, stripe_customer_id) "
            "VALUES ('pro', 'stripe', %s)",
            (customer,),
        )


async def metered_tenant(db: Database, tokens: tuple[int, ...]) -> tuple[UUID, str, list[UUID]]:
    tenant = (await TenantService(db).create_tenant(f"meter-{uuid4().hex[:8]}", "m")).id
    customer = f"cus_{uuid4().hex[:14]}"
    await subscribe(db, tenant, customer)
    return tenant, customer, await add_calls(db, tenant, tokens)


@dataclass
class Env:
    stack: BillingStack
    stripe: StripeDouble


@pytest.fixture(scope="module")
def env(database: DbHandles, keystore: LocalKeystore) -> Iterator[Env]:
    base = short_tempdir("bastion-mkeys-")
    keys = ReceiptKeys(LocalKeystore(base / "k.bin", base / "m.key"))

    async def seed(db: Database, stack: BillingStack) -> None:
        await seed_tenants(db, stack)
        await add_calls(db, stack.tenants["a"], A_TOKENS)

    try:
        with stripe_double() as double, billing_server(database, keystore, keys, seed) as stack:
            yield Env(stack, double)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _usage_path(env: Env, tenant: str = "a") -> str:
    return f"/tenants/{env.stack.tenants[tenant]}/billing/usage"


# -- the usage endpoint -----------------------------------------------------------------


@pytest.mark.parametrize("role", ["billing-admin", "auditor", "owner"])
def test_billing_people_read_the_usage_of_their_tenant(env: Env, role: str) -> None:
    answer = env.stack.call("GET", _usage_path(env), role=role)
    assert answer.status_code == 200, answer.text
    (period,) = answer.json()["periods"]
    assert (period["calls"], period["tokens"]) == (len(A_TOKENS), sum(A_TOKENS))
    assert period["closed"] is False


async def test_a_gateway_lease_counts_the_calls_it_settled(db: Database) -> None:
    # The gateway settles a block of calls as one record (see gateway/ledger.py).
    tenant, _customer, _ids = await metered_tenant(db, ())
    budgets = BudgetService(db)
    lease = await budgets.lease(tenant, calls=8, tokens_per_call=100, min_tokens=100)
    await budgets.settle(lease, 500, calls_used=5)
    (period,) = await MeteringService(db).usage(tenant, None, "system")
    assert (period.calls, period.tokens) == (5, 500)


@pytest.mark.parametrize("role", ["viewer", "contributor"])
def test_a_viewer_or_contributor_is_refused(env: Env, role: str) -> None:
    answer = env.stack.call("GET", _usage_path(env), role=role)
    assert answer.status_code == 403
    assert answer.json()["type"].endswith("/forbidden") and "tokens" not in answer.text


def test_usage_of_another_tenant_is_refused(env: Env) -> None:
    # b's billing-admin names a's tenant in the path: not found, and nothing of a's.
    answer = env.stack.call("GET", _usage_path(env, "a"), as_tenant="b")
    assert answer.status_code == 404 and "tokens" not in answer.text
    # b's own usage holds none of a's calls, whatever the query string says.
    answer = env.stack.call(
        "GET",
        _usage_path(env, "b"),
        tenant="b",
        params={"tenant_id": str(env.stack.tenants["a"])},
    )
    assert answer.status_code == 200 and answer.json()["periods"] == []


def test_client_sent_usage_is_not_accepted(env: Env, database: DbHandles) -> None:
    """P1: there is no route that takes usage from a client."""
    for method in ("POST", "PUT", "PATCH"):
        answer = env.stack.call(method, _usage_path(env), json={"calls": 0, "tokens": 0})
        assert answer.status_code == 405
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*), sum(tokens_used) FROM bastion.budget_reservations "
            "WHERE tenant_id = %s AND status = 'settled'",
            (env.stack.tenants["a"],),
        ).fetchone()
    assert row == (len(A_TOKENS), sum(A_TOKENS))


# -- reporting to Stripe's meters ----------------------------------------------------------


def _reporter(db: Database, env: Env, **kwargs: int) -> MeterReporter:
    sink = StripeMeterSink(env.stripe.client())
    return MeterReporter(db, sink, lambda t: stripe_customer(db, t), **kwargs)


def _events_for(env: Env, ids: list[UUID]) -> list[dict[str, object]]:
    wanted = {str(i) for i in ids}
    return [e for e in env.stripe.meter_events if e["identifier"] in wanted]


async def test_reporting_twice_sends_each_record_once(env: Env, db: Database) -> None:
    tenant, customer, ids = await metered_tenant(db, (5, 6, 7))
    reporter = _reporter(db, env, batch_size=2)  # several batches
    assert await reporter.report(tenant) == 3
    assert await reporter.report(tenant) == 0
    events = _events_for(env, ids)
    assert sorted(str(e["identifier"]) for e in events) == sorted(str(i) for i in ids)
    assert all(
        e["payload"] == {"stripe_customer_id": customer, "value": e["payload"]["value"]}  # type: ignore[index]
        for e in events
    )
    assert sorted(int(e["payload"]["value"]) for e in events) == [5, 6, 7]  # type: ignore[index]
    posts = [
        r
        for r in env.stripe.calls("POST", "/v1/billing/meter_events")
        if r.params.get("identifier") in {str(i) for i in ids}
    ]
    assert len(posts) == 3
    assert {r.headers["idempotency-key"] for r in posts} == {f"bastion-meter-{i}" for i in ids}
    # The usage endpoint counts them as reported.
    usage = await env.stack.metering.usage(tenant, None, "system")
    assert usage[0].calls_reported == 3


async def test_concurrent_reporters_send_each_record_once(env: Env, db: Database) -> None:
    tenant, _customer, ids = await metered_tenant(db, tuple(range(1, 13)))
    sent = await asyncio.gather(
        *(_reporter(db, env, batch_size=3).report(tenant) for _ in range(3))
    )
    assert sum(sent) == 12
    assert await _reporter(db, env).report(tenant) == 0
    posts = [
        r
        for r in env.stripe.calls("POST", "/v1/billing/meter_events")
        if r.params.get("identifier") in {str(i) for i in ids}
    ]
    assert len(posts) == 12 and len(_events_for(env, ids)) == 12


class LostAnswer:
    """Stripe records the event, then the answer is lost (a crash, a cut connection)."""

    def __init__(self, inner: StripeMeterSink) -> None:
        self.inner = inner

    async def send(self, event: MeterEvent) -> None:
        await self.inner.send(event)
        raise ConnectionError("answer lost")


async def test_a_report_whose_answer_was_lost_is_counted_once_at_stripe(
    env: Env, db: Database
) -> None:
    tenant, _customer, ids = await metered_tenant(db, (9,))
    lossy = MeterReporter(
        db, LostAnswer(StripeMeterSink(env.stripe.client())), lambda t: stripe_customer(db, t)
    )
    assert await lossy.report(tenant) == 0  # not marked reported: Bastion never saw the answer
    assert await _reporter(db, env).report(tenant) == 1  # sent again, same identifier and key
    posts = [
        r
        for r in env.stripe.calls("POST", "/v1/billing/meter_events")
        if r.params.get("identifier") == str(ids[0])
    ]
    assert len(posts) == 2 and len(_events_for(env, ids)) == 1


async def test_an_outage_sends_nothing_and_the_next_run_catches_up(
    env: Env, db: Database, database: DbHandles
) -> None:
    tenant, _customer, ids = await metered_tenant(db, (1, 2))
    env.stripe.fail_with = 500
    try:
        assert await _reporter(db, env).report(tenant) == 0
    finally:
        env.stripe.fail_with = None
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.meter_reports WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert row == (0,)
    assert await _reporter(db, env).report(tenant) == 2
    assert len(_events_for(env, ids)) == 2


async def test_a_tenant_without_a_stripe_customer_reports_nothing(env: Env, db: Database) -> None:
    before = len(env.stripe.meter_events)
    assert await _reporter(db, env).report(env.stack.tenants["b"]) == 0
    assert len(env.stripe.meter_events) == before


# -- the periodic job ----------------------------------------------------------------------


async def end_current_period(db: Database, tenant: UUID) -> None:
    """Start the next period now: the current one ends here."""
    now = datetime.now(UTC)
    await BudgetService(db).set_budget(
        tenant, period_start=now, period_end=now + timedelta(days=30), call_limit=10, token_limit=10
    )


async def test_the_periodic_job_closes_ended_periods_and_reports_once(
    env: Env, db: Database
) -> None:
    from bastion.billing.metering_tasks import UsagePeriodJob
    from bastion.billing.receipts import ReceiptService, jwks_lookup, verify_receipt

    tenant, _customer, ids = await metered_tenant(db, (3, 4))
    await end_current_period(db, tenant)
    base = short_tempdir("bastion-jkeys-")
    try:
        keys = ReceiptKeys(LocalKeystore(base / "k.bin", base / "m.key"))
        job = UsagePeriodJob(
            db, ReceiptService(db, keys, issuer="https://bastion.test"), _reporter(db, env)
        )
        first = await job.run()
        assert first.receipts >= 1 and first.reported >= 2 and first.failed_tenants == 0
        second = await job.run()
        assert (second.receipts, second.reported) == (0, 0)
        async with db.tenant_tx(tenant, None, "system") as tx:
            cur = await tx.execute("SELECT jws FROM bastion.receipts WHERE kind = 'usage_period'")
            (row,) = await cur.fetchall()
        payload = verify_receipt(row["jws"], jwks_lookup(keys.jwks())).payload
        assert payload["usage"] == {"calls": 2, "tokens": 7}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert len(_events_for(env, ids)) == 2


async def test_a_tenant_context_cannot_list_the_tenants_due(env: Env, db: Database) -> None:
    tenant, _customer, _ids = await metered_tenant(db, (1,))
    await end_current_period(db, tenant)
    for role in ("system", "owner", "billing-admin"):
        async with db.tenant_tx(tenant, None, role) as tx:
            cur = await tx.execute("SELECT t FROM bastion.usage_periods_due() AS t")
            assert await cur.fetchall() == []
    async with db.tenant_tx(UUID(int=0), None, "system") as tx:
        cur = await tx.execute("SELECT t FROM bastion.usage_periods_due() AS t")
        assert tenant in {row["t"] for row in await cur.fetchall()}
