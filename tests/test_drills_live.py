"""``bastion drill revoke-keys`` and ``provider-outage`` (issue 20, item 3) with
tiny durations, on a real api and gateway (uvicorn on 127.0.0.1), the real
PostgreSQL, a real key ring of the test's own and the provider double. Each
asserts the drill's verdict and its figures against the issue's targets."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.backup.live_drills import (
    Member,
    provider_outage_drill,
    revoke_keys_drill,
    webhook_storm_drill,
)
from bastion.billing.budgets import BudgetService
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.gateway.routing import TargetBreaker
from bastion.incident.service import IncidentService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.api_stack import api_stack
from tests.conftest import DbHandles, short_tempdir
from tests.gateway_stack import gateway_server
from tests.http_server import running_server
from tests.provider_double import API_KEY, DoubleState, provider_double
from tests.served import serving_process

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # latency targets: see Makefile `test`


@pytest.fixture
def own_keystore() -> Iterator[LocalKeystore]:
    """A key ring of this test's own: revoking keys must not touch the session's."""
    base = short_tempdir("bastion-drl-")
    try:
        yield LocalKeystore(base / "keystore.bin", base / "master.key")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _seeder(seeded: dict[str, UUID]):  # type: ignore[no-untyped-def]
    async def seed(db: Database, _identity: Identity | None = None) -> None:
        if seeded:
            return
        tenants = TenantService(db)
        seeded["tenant"] = (await tenants.create_tenant(f"d-{uuid4().hex[:8]}", "d")).id
        seeded["user"] = await tenants.add_member(seeded["tenant"], "c@d.test", "contributor")
        start = datetime.now(UTC) - timedelta(minutes=1)
        await BudgetService(db).set_budget(
            seeded["tenant"],
            period_start=start,
            period_end=start + timedelta(hours=1),
            call_limit=100_000,
            token_limit=10**9,
        )

    return seed


async def test_drill_revoke_keys_every_process_refuses_old_tokens_within_2s_new_ones_work(
    database: DbHandles, own_keystore: LocalKeystore
) -> None:
    seeded: dict[str, UUID] = {}
    seed = _seeder(seeded)
    with api_stack(database, own_keystore, seed) as (api, _api):
        issuer = api.rstrip("/")
        settings = Settings(issuer=issuer, embedder="hashing")
        with gateway_server(
            database,
            own_keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            without_plan_gate=True,
        ) as (gateway, _gw):
            async with Database(database.app, database.context_key, max_size=2) as db:
                incident = IncidentService(db, settings, own_keystore, LocalKMS(own_keystore))
                result = await revoke_keys_drill(
                    api_url=api,
                    gateway_url=gateway,
                    issuer=issuer,
                    member=Member(seeded["tenant"], seeded["user"]),
                    keystore=own_keystore,
                    incident=incident,
                    before=0.5,
                    after=2.2,
                )
    figures = result.figures
    assert result.passed, str(result.figures)
    assert 0 < result.marks["revoke-keys"] < float(result.timeline[-1]["t"]) + 0.25
    assert figures["kinds_revoked"] == 3
    assert 0 <= figures["every_process_refuses_seconds"] <= 2.0
    assert figures["api_refuses_seconds"] >= 0 and figures["gateway_refuses_seconds"] >= 0
    assert figures["old_token_accepted_after_refusal"] == 0
    assert 0 <= figures["every_process_accepts_new_seconds"] <= 2.0
    assert figures["new_token_refused_after_acceptance"] == 0
    assert figures["new_token_requests_ok"] > 0 and figures["failed_requests"] == 0
    # The error rate over time: old tokens answered before, refused after; no error.
    assert sum(b["refused"] for b in result.timeline) > 0
    assert sum(b["failed"] for b in result.timeline) == 0
    with psycopg.connect(database.superuser) as conn:
        audited = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE action = 'key.revoke' "
            "AND details->>'reason' = 'drill revoke-keys' AND actor = 'operator:drill'"
        ).fetchone()
    assert audited is not None and audited[0] >= 3


async def test_drill_provider_outage_answers_from_the_cache_marked_within_1s_then_recovers(
    database: DbHandles, keystore: LocalKeystore
) -> None:
    keystore.set("providers/drill-double", API_KEY.encode())
    double = DoubleState()
    seeded: dict[str, UUID] = {}
    seed = _seeder(seeded)

    async def provider_down(down: bool) -> None:
        double.mode = "fail" if down else "ok"

    with running_server(provider_double(double)) as upstream:
        settings = Settings(
            issuer="https://api.bastion.test",
            embedder="hashing",
            gateway_models=[
                ModelRoute(
                    name="upstream",
                    provider="openai_compatible",
                    base_url=f"{upstream}/v1",
                    api_key_ref="local://providers/drill-double",
                    timeout_seconds=1.5,
                )
            ],
        )
        with gateway_server(
            database,
            keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            without_plan_gate=True,
        ) as (gateway, composed):
            # The breaker's open time bounds the recovery (30 s in production): short here.
            for target in composed.service.models["upstream"].targets:
                target.breaker = TargetBreaker(open_seconds=0.3)
            result = await provider_outage_drill(
                gateway_url=gateway,
                model="upstream",
                issuer="https://api.bastion.test",
                member=Member(seeded["tenant"], seeded["user"]),
                keystore=keystore,
                provider_down=provider_down,
                before=0.3,
                outage=1.2,
                after=0.2,
                recover_within=3.0,
            )
            # Ctrl-C (a cancellation) during the outage: the provider is brought back.
            interrupted = asyncio.create_task(
                provider_outage_drill(
                    gateway_url=gateway,
                    model="upstream",
                    issuer="https://api.bastion.test",
                    member=Member(seeded["tenant"], seeded["user"]),
                    keystore=keystore,
                    provider_down=provider_down,
                    questions=1,
                    before=0.05,
                    outage=30.0,
                )
            )
            while double.mode != "fail":
                await asyncio.sleep(0.01)
            interrupted.cancel()
            stopped = await interrupted
    figures = result.figures
    assert result.passed, str(result.figures)
    assert 0 < result.marks["provider down"] < result.marks["provider up"]
    assert 0 <= figures["first_cached_answer_seconds"] <= 1.0
    assert figures["cached_answers"] > 0 and figures["unmarked_answers_during_outage"] == 0
    assert figures["failed_during_outage"] == 0
    assert figures["recovered"] == 1 and 0 <= figures["recovery_seconds"] <= 3.0
    assert double.mode == "ok"  # the drill left the provider up
    assert "provider double up" in result.note
    assert stopped.interrupted and not stopped.passed
    assert "restored: provider double up" in stopped.note


async def test_drill_webhook_storm_paused_then_resumed_loses_and_doubles_nothing(
    database: DbHandles, keystore: LocalKeystore, db: Database
) -> None:
    name = f"billing/drill-storm-{uuid4().hex[:8]}"
    secret = f"whsec_drill_{uuid4().hex}"
    keystore.set(name, secret.encode())
    home = short_tempdir("bastion-drs-")
    billing = BillingService(db, EventCipher(keystore))

    async def nothing(_db: Database, _identity: Identity) -> None:
        return None

    try:
        # The worker (a process: it applies the events) starts while the api does;
        # events wait, held or queued, until it is up.
        with (
            serving_process("worker", database, keystore, home, wait_ready=False),
            api_stack(
                database,
                keystore,
                nothing,
                more_settings={"stripe_webhook_secret_ref": f"local://{name}"},
            ) as (url, _api),
        ):
            result = await webhook_storm_drill(
                api_url=url, secret=secret, db=db, billing=billing, tenants=3, invoices=4
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    figures = result.figures
    assert result.passed, str(figures)
    assert result.marks["webhooks paused"] == 0 < result.marks["webhooks resumed"]
    assert figures["events"] == 15 and figures["deliveries"] >= 30
    assert figures["answered_duplicate"] == figures["deliveries"] - figures["events"]
    assert figures["applied_while_paused"] == 0 and figures["held_at_resume"] > 0
    assert figures["invoices_paid"] == 12
    assert figures["events_lost"] == 0 and figures["applied_more_than_once"] == 0
    assert not await billing.paused()  # the drill resumed webhooks
    assert "webhooks resumed" in result.note
