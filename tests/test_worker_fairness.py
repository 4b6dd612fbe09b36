"""One tenant's PDF bombs delay neither another tenant's billing nor its ingestion
(issue 23, A2), on a real ``bastion serve worker`` and ``bastion serve api``.

Tenants A and C each upload small PDFs of path operators (~10 s of CPU each
to extract, unbounded), enough to fill the worker's two ingest slots. While
the worker is busy with them, tenant B's Stripe subscription update arrives
at the api and B uploads a document. B's event is applied at once, while
both ingest slots are still busy (billing has its own worker loop); B's
document is indexed within :data:`BOUND` seconds (a tenant runs one ingest
job at a time, and each extraction runs in a child process killed at its
CPU limit). The bombs end ``failed`` / ``too-complex`` soon after their CPU
limit, never more than one per tenant at a time, and no extraction process
is left behind.
"""

from __future__ import annotations

import asyncio
import time
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.db.pool import Database
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir
from tests.pdf_bombs import operator_bomb
from tests.process_tree import forked_by_forkserver
from tests.served import serving_process
from tests.stripe_double import (
    TEST_PRICES,
    event_object,
    price_plans,
    signed,
    subscription_object,
    to_json,
)

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # timing bounds: see Makefile `test`

ATTACKERS = ("a", "c")
BOMBS = 2  # per attacker
CPU_SECONDS = 2
# B's webhook applied within BILLING_BOUND, and B's document indexed within
# BOUND, seconds of arriving, on a noisy 2-core box (well under a second when
# quiet; the document may wait for one bomb to be killed). Unbounded, the
# bombs ahead of them cost ~40 s.
BILLING_BOUND = 5.0
BOUND = 10.0
# A starved box may not give a bomb its 2 s of CPU in time: then the
# wall-clock limit kills it. B's document waits for at most one bomb.
WALL_SECONDS = 6


def _documents(database: DbHandles, ids: list[UUID]) -> dict[UUID, tuple[str, str | None]]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT id, status, failure_reason FROM bastion.documents WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def _plan(database: DbHandles, tenant: UUID) -> str | None:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT plan_code FROM bastion.subscriptions WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    return row[0] if row else None


def _ingesting(database: DbHandles, tenant: UUID) -> int:
    with psycopg.connect(database.queue) as conn:
        row = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE status = 'doing' "
            "AND task_name = 'knowledge.ingest' AND args->>'tenant_id' = %s",
            (str(tenant),),
        ).fetchone()
    return int(row[0]) if row else 0


async def test_pdf_bombs_of_one_tenant_delay_neither_billing_nor_ingestion_of_another(
    database: DbHandles, keystore: LocalKeystore, db: Database
) -> None:
    await price_plans(db)
    tenants = TenantService(db)
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    writers: dict[str, Actor] = {}
    ids: dict[str, UUID] = {}
    for name in (*ATTACKERS, "b"):
        tenant = (await tenants.create_tenant(f"fair-{name}-{uuid4().hex[:8]}", name)).id
        owner = await tenants.add_member(tenant, f"owner@{name}.fair.test", "owner")
        writer = await tenants.add_member(tenant, f"writer@{name}.fair.test", "contributor")
        await kb.create_namespace(Actor(tenant, owner, "owner"), "docs")
        writers[name], ids[name] = Actor(tenant, writer, "contributor"), tenant
    billing = BillingService(db, EventCipher(keystore))
    customer = f"cus_fair_{uuid4().hex[:10]}"
    await billing.link_stripe_customer(ids["b"], customer)
    secret_name = f"billing/test-fair-{uuid4().hex[:8]}"
    secret = f"whsec_fair_{uuid4().hex}"
    keystore.set(secret_name, secret.encode())
    extra = {
        "BASTION_STRIPE_WEBHOOK_SECRET_REF": f"local://{secret_name}",
        "BASTION_EXTRACT_CPU_SECONDS": str(CPU_SECONDS),
        "BASTION_EXTRACT_WALL_SECONDS": str(WALL_SECONDS),
    }
    home = short_tempdir("bastion-fair-")
    bomb = operator_bomb(5, 90_000)  # 15 KB; under the operator bounds
    assert len(bomb) < 30_000

    with (
        serving_process("worker", database, keystore, home, extra) as (worker_proc, _),
        serving_process("api", database, keystore, home, extra) as (_api, api_url),
    ):
        uploaded = time.monotonic()
        bombs = [
            (
                await kb.upload(
                    writers[attacker],
                    "docs",
                    title=f"bomb {n}.pdf",
                    body=bomb,
                    content_type="application/pdf",
                )
            ).document.id
            # A's bombs first: without a per-tenant cap they would take both slots.
            for attacker in ATTACKERS
            for n in range(BOMBS)
        ]

        def busy() -> dict[str, int]:
            """Each attacker's running ingest jobs."""
            return {attacker: _ingesting(database, ids[attacker]) for attacker in ATTACKERS}

        # The worker is busy with a bomb of each attacker: every ingest slot
        # (as many as it gives them; at least one).
        deadline = time.monotonic() + 15
        while sum(busy().values()) < len(ATTACKERS) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sum(busy().values()) >= 1, "the worker never started on the bombs"
        most = 0
        seen_extraction = False

        # Now B: a subscription update from Stripe, and a document.
        arrived = time.monotonic()
        sub = subscription_object(f"sub_{customer}", customer, TEST_PRICES["pro"])
        body = to_json(event_object("customer.subscription.updated", sub, created=int(time.time())))
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                f"{api_url}/webhooks/stripe",
                content=body,
                headers={"Stripe-Signature": signed(body, secret)},
            )
        assert response.status_code == 200
        doc_b = (
            await kb.upload(
                writers["b"],
                "docs",
                title="ticket.txt",
                body=b"The export of invoices to CSV stops halfway.",
                content_type="text/plain",
            )
        ).document.id
        applied = indexed = None
        ended_before_b = 0
        busy_when_applied: dict[str, int] = {}
        while applied is None or indexed is None:
            now = time.monotonic()
            running = busy()
            most = max(most, *running.values())
            if applied is None and _plan(database, ids["b"]) == "pro":
                applied, busy_when_applied = now - arrived, running
            if indexed is None and _documents(database, [doc_b])[doc_b][0] == "indexed":
                indexed = now - arrived
                ended_before_b = sum(
                    status == "failed" for status, _ in _documents(database, bombs).values()
                )
            seen_extraction = seen_extraction or bool(forked_by_forkserver(worker_proc.pid))
            assert now - arrived < BOUND, (
                f"B waited behind A: webhook applied after {applied}, document after {indexed}"
            )
            await asyncio.sleep(0.05)
        assert applied < BILLING_BOUND
        # Round robin: B's first job went before the attackers' second ones, so
        # it waited for at most one bomb per slot (first come, first served: 3).
        assert ended_before_b <= len(ATTACKERS)
        # Billing did not wait for an ingest slot: both were taken by the attackers.
        assert busy_when_applied == dict.fromkeys(ATTACKERS, 1)

        # The bombs: each killed at its CPU limit, a tenant's one after the
        # other (one ingest job of a tenant at a time), failed with a stable reason.
        deadline = uploaded + BOMBS * (WALL_SECONDS + 1) + 5
        while any(status == "pending" for status, _ in _documents(database, bombs).values()):
            most = max(most, *busy().values())
            seen_extraction = seen_extraction or bool(forked_by_forkserver(worker_proc.pid))
            assert time.monotonic() < deadline, (
                f"A's bombs still running: {_documents(database, bombs)}"
            )
            await asyncio.sleep(0.05)
        finished = time.monotonic() - uploaded
        assert set(_documents(database, bombs).values()) == {("failed", "too-complex")}
        assert most == 1  # never two ingest jobs of one tenant at once
        # The extraction ran in a child process of the worker, and none is left.
        assert seen_extraction
        assert forked_by_forkserver(worker_proc.pid) == []
        assert worker_proc.poll() is None  # the worker itself is alive

    attackers = [ids[attacker] for attacker in ATTACKERS]
    with psycopg.connect(database.superuser) as conn:
        failed = conn.execute(
            "SELECT target, details->>'reason' FROM bastion.audit_events "
            "WHERE tenant_id = ANY(%s) AND action = 'document.failed'",
            (attackers,),
        ).fetchall()
    with psycopg.connect(database.queue) as conn:
        left = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE status IN "
            "('todo', 'doing') AND args->>'tenant_id' = ANY(%s)",
            ([str(t) for t in attackers],),
        ).fetchone()
    assert sorted(failed) == sorted((str(d), "too-complex") for d in bombs)
    assert left == (0,)  # failed for good, not retried
    print(
        f"\nB: webhook applied {applied:.2f} s, document indexed {indexed:.2f} s after arriving; "
        f"the {len(bombs)} bombs failed {finished:.1f} s after upload"
    )
