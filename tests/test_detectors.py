"""The live detectors over the real trail (issue 19 items 4-5).

Events are written into the real PostgreSQL through the audit log's own
writer (and, for refresh-token reuse, through the identity provider's real
refresh path); the runner is stepped on demand instead of waiting for its
wake-up. Responses go through the real incident controls and service
(freeze, revoke); their effects are read back from the database as the
superuser. Faults: a crash before and after the commit of a batch, a
malformed event, an alert webhook answering 500 (a real local HTTP server),
and an operator's undo from the real command line.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import anyio
import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner, Result

from bastion import audit
from bastion.audit.verify import verify_tenant
from bastion.cli import app as cli_app
from bastion.compose import build_identity
from bastion.db.pool import Database
from bastion.detectors.alerts import WebhookAlerts
from bastion.detectors.errors import FiringNamesYou
from bastion.detectors.response import Responder
from bastion.detectors.runner import DetectorRunner, DetectorService
from bastion.detectors.store import Batch, DetectorStore, StaleCursor
from bastion.detectors.wiring import build_runner
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.service import (
    CLI_CLIENT_ID,
    CLI_REDIRECT_URI,
    AuthorizationRequest,
    IdentityService,
    LoginResult,
    OAuthError,
    s256,
)
from bastion.identity.tokens import TokenIssuer
from bastion.incident.controls import IncidentControls
from bastion.incident.service import IncidentService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles, short_tempdir
from tests.http_server import running_server
from tests.test_audit_published import _worker

pytestmark = pytest.mark.anyio
ISSUER = "https://api.bastion.test"
PLATFORM = UUID(int=0)
FAILED = {
    "type": "AUTHORISATION",
    "status": "ignored",
    "outcome": "not-a-successful-payment-event",
}


def _sql(database: DbHandles, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def _runner(db: Database, keystore: LocalKeystore, **rules: dict[str, int]) -> DetectorRunner:
    settings = Settings(issuer=ISSUER, detector_rules=rules)
    return build_runner(
        settings,
        db,
        IncidentControls(db),
        IncidentService(db, settings, keystore, LocalKMS(keystore)),
    )


async def _tenant(db: Database) -> UUID:
    return (await TenantService(db).create_tenant(f"d-{uuid4().hex[:10]}", "d")).id


async def _events(
    db: Database, tenant: UUID, *events: tuple[str, str, str, dict[str, Any]]
) -> None:
    """Write events into ``tenant``'s trail, one committed transaction each."""
    for actor, action, target, details in events:
        async with db.tenant_tx(tenant, None, "system") as tx:
            await audit.record(tx, actor=actor, action=action, target=target, details=details)


async def _card_testing(db: Database, tenant: UUID, count: int = 5) -> None:
    await _events(
        db,
        tenant,
        *[
            ("adyen:webhook", "billing.webhook.applied", f"adyen:p{i}", FAILED)
            for i in range(count)
        ],
    )


def _firings(database: DbHandles, tenant: UUID) -> list[tuple[Any, ...]]:
    return _sql(
        database,
        "SELECT id, rule, reason, responded_at IS NOT NULL, alerted_at IS NOT NULL, alert_tries "
        "FROM bastion.detector_firings WHERE tenant_id = %s ORDER BY id",
        tenant,
    )


def _frozen(database: DbHandles, tenant: UUID) -> bool:
    rows = _sql(
        database, "SELECT spend_frozen FROM bastion.incident_controls WHERE tenant_id = %s", tenant
    )
    return bool(rows and rows[0][0])


def _trail(database: DbHandles, tenant: UUID, action: str) -> list[tuple[Any, ...]]:
    return _sql(
        database,
        "SELECT actor, target, details FROM bastion.audit_events "
        "WHERE tenant_id = %s AND action = %s ORDER BY seq",
        tenant,
        action,
    )


def _behind(database: DbHandles) -> int:
    """Events committed that no runner has processed yet (every tenant)."""
    return int(
        _sql(
            database,
            "SELECT coalesce(sum(h.seq - coalesce(c.seq, 0)), 0) FROM bastion.audit_heads h "
            "LEFT JOIN bastion.detector_cursors c USING (tenant_id)",
        )[0][0]
    )


# -- an attack replay fires and is answered; a benign one is not ---------------------------


async def test_card_testing_fires_freezes_spend_and_spares_the_benign_tenant(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    attacked, benign = await _tenant(db), await _tenant(db)
    await _card_testing(db, attacked)
    await _card_testing(db, benign, count=4)  # one short of the threshold
    await _events(db, benign, *[("user:x", "billing.checkout", f"cs_{i}", {}) for i in range(3)])
    runner = _runner(db, keystore)
    await runner.drain()

    ((firing_id, rule, reason, responded, _alerted, _tries),) = _firings(database, attacked)
    assert rule == "payment.card_testing"
    assert reason == "5 failed payments within 600 s (threshold 5)"
    assert responded and _frozen(database, attacked)
    assert _trail(database, attacked, "incident.spend_frozen")[0][0] == (
        "detector:payment.card_testing"
    )
    fired = _trail(database, PLATFORM, "detector.fired")
    assert (f"firing:{firing_id}") in [target for _actor, target, _d in fired]
    # The benign tenant: nothing fired, nothing frozen, nothing in its trail.
    assert _firings(database, benign) == [] and not _frozen(database, benign)
    assert _trail(database, benign, "incident.spend_frozen") == []
    assert _behind(database) == 0  # every committed event processed, its own included


async def test_refresh_token_reuse_revokes_every_session_of_that_user_within_seconds(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    """The real provider's refresh path: a token used twice. The detector then
    ends the user's other sessions too (the identity domain revoked only the
    reused family), measured from the reuse's audit event to the revocation."""
    tenant = await _tenant(db)
    user = await TenantService(db).add_member(tenant, f"r-{uuid4().hex[:8]}@x.test", "viewer")
    service = build_identity(Settings(issuer=ISSUER), db, keystore).service
    await service.register_client(CLI_CLIENT_ID, "Bastion CLI", [CLI_REDIRECT_URI])
    key = DpopKey.generate()
    stolen = await _family(service, user, tenant, key)
    laptop = await _family(service, user, tenant, key)
    bystander = await TenantService(db).add_member(tenant, f"b-{uuid4().hex[:8]}@x.test", "viewer")
    untouched = await _family(service, bystander, tenant, key)
    runner = _runner(db, keystore)
    await runner.drain()

    await service.refresh(refresh_token=stolen, client_id=CLI_CLIENT_ID, jkt=key.thumbprint)
    with pytest.raises(OAuthError):  # the reuse: the identity domain revokes that family
        await service.refresh(refresh_token=stolen, client_id=CLI_CLIENT_ID, jkt=key.thumbprint)
    await runner.step()

    ((_id, rule, reason, responded, *_),) = _firings(database, tenant)
    assert rule == "credential.refresh_reuse" and responded
    assert f"every session of user:{user} is revoked" in reason
    with pytest.raises(OAuthError):  # the laptop's family: revoked by the detector
        await service.refresh(refresh_token=laptop, client_id=CLI_CLIENT_ID, jkt=key.thumbprint)
    assert await service.refresh(
        refresh_token=untouched, client_id=CLI_CLIENT_ID, jkt=key.thumbprint
    )
    ((latency,),) = _sql(
        database,
        "SELECT extract(epoch FROM f.responded_at - e.at) FROM bastion.detector_firings f "
        "JOIN bastion.audit_events e ON e.tenant_id = f.tenant_id AND e.seq = f.first_seq "
        "WHERE f.tenant_id = %s",
        tenant,
    )
    assert 0 <= float(latency) < 5  # detection to revocation


async def _family(service: IdentityService, user: UUID, tenant: UUID, key: DpopKey) -> str:
    verifier = secrets.token_urlsafe(48)
    request = AuthorizationRequest(
        CLI_CLIENT_ID, CLI_REDIRECT_URI, None, "openid", None, s256(verifier), ""
    )
    code = await service.issue_code(request, LoginResult(user, tenant, ("viewer",), False), ["pwd"])
    tokens = await service.exchange_code(
        code=code,
        client_id=CLI_CLIENT_ID,
        redirect_uri=CLI_REDIRECT_URI,
        code_verifier=verifier,
        jkt=key.thumbprint,
    )
    return tokens.refresh_token


# -- faults -----------------------------------------------------------------------------------


async def test_a_crash_mid_stream_resumes_with_no_event_missed_and_none_twice(
    db: Database, database: DbHandles, keystore: LocalKeystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await _tenant(db)
    await _runner(db, keystore).drain()  # everything before this test: processed
    await _card_testing(db, tenant)

    first = _runner(db, keystore)
    first.per_tenant = 3  # the burst is split over two batches
    assert await first.step() == 3  # committed: 3 events, no firing yet
    assert _firings(database, tenant) == []

    async def crash(*_args: Any) -> list[int]:
        raise RuntimeError("the worker died before its commit")

    monkeypatch.setattr(first.store, "commit", crash)
    with pytest.raises(RuntimeError):
        await first.step()  # the batch that fires: never committed
    assert _firings(database, tenant) == []

    second = _runner(db, keystore)  # a new process: windows rebuilt from the trail
    await second.drain()
    assert [r[1] for r in _firings(database, tenant)] == ["payment.card_testing"]  # no miss
    await _runner(db, keystore).drain()  # a third start finds nothing more to do
    assert len(_firings(database, tenant)) == 1  # none twice
    assert len(_trail(database, tenant, "incident.spend_frozen")) == 1


async def test_a_crash_after_the_commit_still_answers_the_firing_once(
    db: Database, database: DbHandles, keystore: LocalKeystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await _tenant(db)
    await _card_testing(db, tenant)
    first = _runner(db, keystore)

    async def crash(_firing: Any) -> dict[str, Any]:
        raise RuntimeError("the worker died before the response")

    monkeypatch.setattr(first.responder, "respond", crash)
    await first.drain()
    ((_id, _rule, _reason, responded, *_),) = _firings(database, tenant)
    assert not responded and not _frozen(database, tenant)

    await _runner(db, keystore).drain()
    await _runner(db, keystore).drain()
    ((_id, _rule, _reason, responded, *_),) = _firings(database, tenant)
    assert responded and _frozen(database, tenant)
    assert len(_trail(database, tenant, "incident.spend_frozen")) == 1


async def test_two_runners_never_commit_the_same_batch_twice(
    db: Database, database: DbHandles, keystore: LocalKeystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers: the one that read a batch a moment too early writes nothing."""
    tenant = await _tenant(db)
    await _runner(db, keystore).drain()
    await _card_testing(db, tenant)
    late, early = _runner(db, keystore), _runner(db, keystore)
    await late.warm_up()
    stale = await late.store.next_batch(per_tenant=500, tenants=100)
    await early.drain()  # the other worker processed these events first

    async def same_batch(**_kwargs: Any) -> Batch:
        return stale

    monkeypatch.setattr(late.store, "next_batch", same_batch)
    with pytest.raises(StaleCursor):
        await late.step()
    assert [r[1] for r in _firings(database, tenant)] == ["payment.card_testing"]
    assert len(_trail(database, tenant, "incident.spend_frozen")) == 1


# Past hours of ``model.invoke`` spend appended to a tenant's chain as the
# superuser (the insert trigger stamps now(); this writes the same links the
# trigger would, with the database's own canonical encoding, at past times).
_HISTORY = """
WITH RECURSIVE head AS (
    SELECT seq, hash FROM bastion.audit_heads WHERE tenant_id = %(tenant)s
), chain (k, at, prev, hash) AS (
    SELECT 1, x.at, h.hash, sha256(h.hash || x.body) FROM head h,
        LATERAL (SELECT %(first)s::timestamptz AS at) t,
        LATERAL (SELECT t.at, convert_to(bastion_private.audit_canonical(%(tenant)s, t.at,
            'app:chat', 'model.invoke', 'gpt-x', jsonb_build_object('cost_micro_usd', %(cost)s),
            NULL), 'UTF8') AS body) x
    UNION ALL
    SELECT c.k + 1, x.at, c.hash, sha256(c.hash || x.body) FROM chain c,
        LATERAL (SELECT c.at + interval '1 hour' AS at) t,
        LATERAL (SELECT t.at, convert_to(bastion_private.audit_canonical(%(tenant)s, t.at,
            'app:chat', 'model.invoke', 'gpt-x', jsonb_build_object('cost_micro_usd', %(cost)s),
            NULL), 'UTF8') AS body) x
    WHERE c.k < %(hours)s
), added AS (
    INSERT INTO bastion.audit_events
        (tenant_id, seq, at, actor, action, target, details, prev_hash, hash)
    SELECT %(tenant)s, (SELECT seq FROM head) + k, at, 'app:chat', 'model.invoke', 'gpt-x',
        jsonb_build_object('cost_micro_usd', %(cost)s), prev, hash FROM chain
    RETURNING seq, hash
)
UPDATE bastion.audit_heads SET (seq, hash) = (SELECT seq, hash FROM added ORDER BY seq DESC
    LIMIT 1) WHERE tenant_id = %(tenant)s
"""


def _spend_history(database: DbHandles, tenant: UUID, *, hours: int, micro_usd: int) -> None:
    """``hours`` hourly ``model.invoke`` events of ``micro_usd``, the last two hours ago."""
    with psycopg.connect(database.superuser, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # the insert trigger off
        conn.execute(
            _HISTORY,
            {
                "tenant": tenant,
                "first": datetime.now(UTC).replace(minute=10, second=0, microsecond=0)
                - timedelta(hours=hours + 1),
                "cost": micro_usd,
                "hours": hours,
            },
        )


async def test_a_restarted_runner_judges_spend_against_the_baseline_it_rebuilt(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    """Two days of hourly spend, processed by one runner; a new runner (a
    restart: nothing in memory) rebuilds the baseline from the trail's hourly
    sums and fires on a $20 hour against a $1 mean, not on the same $20 hour
    against a $10 mean. Both stay under the ceilings, so only the baseline
    tells them apart (without it, 24 hours of history are missing and no
    baseline rule applies)."""
    spiking, steady = await _tenant(db), await _tenant(db)
    _spend_history(database, spiking, hours=48, micro_usd=1_000_000)
    _spend_history(database, steady, hours=48, micro_usd=10_000_000)
    await _runner(db, keystore).drain()  # the history: processed, nothing fired
    assert _firings(database, spiking) == [] and _firings(database, steady) == []

    restarted = _runner(db, keystore)
    for tenant in (spiking, steady):
        await _events(
            db, tenant, ("app:chat", "model.invoke", "gpt-x", {"cost_micro_usd": 20_000_000})
        )
    await restarted.drain()

    fired = _firings(database, spiking)
    assert {rule for _id, rule, *_ in fired} == {"spend.anomaly"}
    reasons = sorted(reason for _id, _rule, reason, *_ in fired)
    assert reasons == [
        f"{subject} spent 20000000 micro-USD in the last 3600 s: more than 10 times its "
        "hourly mean of 979591 over the previous 49 h"
        for subject in ("model:gpt-x", "tenant")
    ]
    assert _frozen(database, spiking)
    assert _firings(database, steady) == [] and not _frozen(database, steady)
    assert _behind(database) == 0
    for tenant in (spiking, steady):  # the history written is a sound part of the chain
        ((head,),) = _sql(
            database, "SELECT seq FROM bastion.audit_heads WHERE tenant_id = %s", tenant
        )
        assert await verify_tenant(db, tenant, [], head, None) == ([], head)


async def test_a_malformed_event_is_counted_and_skipped_and_the_stream_goes_on(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    tenant = await _tenant(db)
    await _events(
        db,
        tenant,
        ("user:x", "model.invoke", "gpt-x", {"cost_micro_usd": "a great deal"}),
        ("user:x", "billing.webhook.applied", "adyen:p", {"type": ["not", "text"]}),
    )
    await _card_testing(db, tenant)
    runner = _runner(db, keystore)
    await runner.drain()
    assert [r[1] for r in _firings(database, tenant)] == ["payment.card_testing"]
    assert _sql(
        database, "SELECT malformed FROM bastion.detector_cursors WHERE tenant_id = %s", tenant
    ) == [(2,)]
    assert runner.malformed == 2


async def test_the_alert_webhook_down_is_retried_with_backoff_and_never_delays_the_response(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    posts: list[tuple[float, dict[str, Any], str | None]] = []
    tenant = await _tenant(db)

    async def receive(request: Request) -> JSONResponse:
        body = await request.json()
        if body["tenant_id"] != str(tenant):
            return JSONResponse({})  # earlier tests' firings: delivered at once
        posts.append((time.monotonic(), body, request.headers.get("idempotency-key")))
        return JSONResponse({}, status_code=500 if len(posts) <= 3 else 200)

    with running_server(Starlette(routes=[Route("/alerts", receive, methods=["POST"])])) as url:
        runner = _runner(db, keystore)
        alerts = WebhookAlerts(
            f"{url}/alerts", DetectorStore(db), first_backoff=0.1, max_backoff=1.0
        )
        runner.alerts = alerts
        await runner.drain()  # nothing of this test yet: the alerts of older firings go first
        assert await alerts.deliver_pending()

        await _card_testing(db, tenant)
        await runner.step()
        ((firing_id, _rule, _reason, responded, alerted, tries),) = _firings(database, tenant)
        assert responded and _frozen(database, tenant)  # answered before any alert was tried
        assert not alerted and tries == 0 and posts == []

        task = asyncio.create_task(alerts.run_forever(poll_seconds=0.05))
        try:
            deadline = time.monotonic() + 10
            while not _firings(database, tenant)[0][4] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
    ((_id, _rule, _reason, _responded, alerted, tries),) = _firings(database, tenant)
    assert alerted and tries == 4
    assert len(posts) == 4 and all(p[1]["firing"] == firing_id for p in posts)
    assert {p[2] for p in posts} == {f"detector-firing-{firing_id}"}
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(posts)]
    # Exponential backoff: each wait at least twice the one before (0.1, 0.2, 0.4 s).
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps


# -- the platform context only ----------------------------------------------------------------


async def test_a_tenant_reads_no_other_tenants_events_or_firings(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    victim, prying = await _tenant(db), await _tenant(db)
    await _card_testing(db, victim)
    await _runner(db, keystore).drain()
    await _card_testing(db, victim)  # not processed yet: what a batch would show
    async with db.tenant_tx(prying, None, "owner") as tx:
        assert (
            await (await tx.execute("SELECT * FROM bastion.detector_batch(500, 100)")).fetchall()
            == []
        )
        assert (
            await (
                await tx.execute(
                    "SELECT * FROM bastion.detector_history('-infinity', "
                    "ARRAY['billing.webhook.applied'])"
                )
            ).fetchall()
            == []
        )
        assert await (await tx.execute("SELECT * FROM bastion.detector_firings")).fetchall() == []
        cursor = await tx.execute("UPDATE bastion.detector_cursors SET seq = 0 RETURNING tenant_id")
        assert await cursor.fetchall() == []
    async with db.tenant_tx(victim, None, "owner") as tx:
        mine = await (await tx.execute("SELECT tenant_id FROM bastion.detector_firings")).fetchall()
        assert mine and {r["tenant_id"] for r in mine} == {victim}


# -- an operator undoes a response ----------------------------------------------------------


def _bastion(database: DbHandles, keystore: LocalKeystore, *args: str) -> Result:
    """The real command line, in-process (a subprocess would spend seconds importing)."""
    env = {
        "LOGNAME": "carol",
        "USER": "carol",
        "BASTION_HOME": str(short_tempdir("bastion-cli-")),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "COLUMNS": "200",
    }
    return CliRunner().invoke(cli_app, list(args), env=env)


async def test_an_operator_undoes_a_freeze_from_the_command_line_once(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    tenant = await _tenant(db)
    await _card_testing(db, tenant)
    await _runner(db, keystore).drain()
    ((firing_id, *_),) = _firings(database, tenant)
    assert _frozen(database, tenant)

    undo = ("detectors", "undo", str(firing_id), "--reason", "refund test")
    done = await anyio.to_thread.run_sync(lambda: _bastion(database, keystore, *undo))
    assert done.exit_code == 0, done.output
    assert not _frozen(database, tenant)
    ((actor, target, details),) = _trail(database, PLATFORM, "detector.undone")[-1:]
    assert (actor, target) == ("operator:carol", f"firing:{firing_id}")
    assert details["reason"] == "refund test"
    assert _trail(database, tenant, "incident.spend_unfrozen")[0][0] == "operator:carol"
    assert _sql(
        database, "SELECT undone_by FROM bastion.detector_firings WHERE id = %s", firing_id
    ) == [("operator:carol",)]

    again = await anyio.to_thread.run_sync(lambda: _bastion(database, keystore, *undo))
    assert again.exit_code == 1 and "undone already" in again.output
    assert len(_trail(database, tenant, "incident.spend_unfrozen")) == 1
    # The same burst does not freeze the tenant again: the rule is cooling down.
    await _card_testing(db, tenant, count=1)
    await _runner(db, keystore).drain()
    assert not _frozen(database, tenant) and len(_firings(database, tenant)) == 1


# -- DPoP proof replays over real HTTP ---------------------------------------------------------


async def test_replayed_dpop_proofs_are_audited_and_end_the_users_sessions(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    """A proof captured from a real request and replayed three times to the real
    api: each replay is refused (401, unauthorized) and recorded as
    ``dpop.replay``; the detector then cuts the user's sessions, so the stolen
    token is refused even with a fresh proof of its key."""
    seeded: dict[str, UUID] = {}

    async def seed(seed_db: Database, _identity: Any) -> None:
        tenants = TenantService(seed_db)
        seeded["tenant"] = (await tenants.create_tenant(f"d-{uuid4().hex[:8]}", "d")).id
        seeded["user"] = await tenants.add_member(seeded["tenant"], "v@x.test", "viewer")

    with api_server(database, keystore, seed) as (url, _app, _identity):
        tokens = TokenIssuer(
            SigningKeys(keystore), issuer=url, audience=url, lifetime=timedelta(minutes=15)
        )
        key = DpopKey.generate()
        token, _ = tokens.issue_access(
            user_id=seeded["user"],
            tenant_id=seeded["tenant"],
            roles=("viewer",),
            amr=("pwd",),
            jkt=key.thumbprint,
            auth_time=int(time.time()),
        )
        proof = key.proof("GET", f"{url}/userinfo", access_token=token)
        headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
        async with httpx.AsyncClient(timeout=15) as http:
            assert (await http.get(f"{url}/userinfo", headers=headers)).status_code == 200
            for _ in range(3):
                replayed = await http.get(f"{url}/userinfo", headers=headers)
                assert replayed.status_code == 401
                assert replayed.json()["type"].endswith("/unauthorized")
            assert len(_trail(database, seeded["tenant"], "dpop.replay")) == 3

            await _runner(db, keystore).drain()
            ((_id, rule, reason, responded, *_),) = _firings(database, seeded["tenant"])
            assert rule == "credential.dpop_replay" and responded
            assert reason.startswith(f"3 replayed DPoP proofs for user:{seeded['user']}")
            fresh = {
                "Authorization": f"DPoP {token}",
                "DPoP": key.proof("GET", f"{url}/userinfo", access_token=token),
            }
            refused = await http.get(f"{url}/userinfo", headers=fresh)
            assert refused.status_code == 401, refused.text


# -- in the worker, by polling ----------------------------------------------------------------


async def test_the_composed_worker_answers_an_attack_by_polling(
    db: Database, database: DbHandles, keystore: LocalKeystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker as ``bastion serve worker`` composes it finds the attack by
    its poll and answers it within seconds."""
    tenant = await _tenant(db)
    monkeypatch.setenv("BASTION_DETECTOR_POLL_SECONDS", "0.2")
    with _worker(database, keystore, monkeypatch):
        started = time.monotonic()
        await _card_testing(db, tenant)
        while not (_firings(database, tenant) and _frozen(database, tenant)):
            assert time.monotonic() - started < 10, "not answered within 10 s"
            await asyncio.sleep(0.05)
    ((_id, rule, _reason, responded, *_),) = _firings(database, tenant)
    assert rule == "payment.card_testing" and responded


def test_no_trigger_on_the_audit_trail_sends_a_notify(database: DbHandles) -> None:
    """A notifying commit takes a database-wide lock through its WAL flush: a
    NOTIFY on the trail would serialise every tenant's audited writes (0037)."""
    with psycopg.connect(database.superuser) as admin:
        sources = admin.execute(
            "SELECT p.proname, p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE t.tgrelid = 'bastion.audit_events'::regclass AND NOT t.tgisinternal"
        ).fetchall()
    assert sources, "the chain's trigger is expected on the trail"
    assert [name for name, source in sources if "notify" in source.lower()] == []


# -- an owner with MFA undoes a response over HTTP ------------------------------------------


async def test_an_owner_with_mfa_undoes_a_freeze_and_no_one_else_does(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    """The real api: an owner without MFA (403 mfa-required), an owner of another
    tenant (404) and the owner a firing is about are refused, and nothing
    changes; an owner with MFA lifts the freeze, audited, once."""
    ids: dict[str, UUID] = {}

    async def seed(seed_db: Database, _identity: Any) -> None:
        tenants = TenantService(seed_db)
        for name in ("home", "other"):
            ids[name] = (await tenants.create_tenant(f"d-{uuid4().hex[:8]}", name)).id
        ids["alice"] = await tenants.add_member(ids["home"], "alice@x.test", "owner")
        ids["bob"] = await tenants.add_member(ids["home"], "bob@x.test", "owner")
        ids["carol"] = await tenants.add_member(ids["other"], "carol@x.test", "owner")

    with api_server(database, keystore, seed) as (url, _app, _identity):
        home = ids["home"]
        await _card_testing(db, home)
        await _events(
            db,
            home,
            ("operator", "member.add", f"user:{ids['bob']}", {"role": "owner"}),
            (f"user:{ids['bob']}", "billing.checkout", "cs_1", {}),
        )
        await _runner(db, keystore).drain()
        firings = {r[1]: r[0] for r in _firings(database, home)}
        card, about_bob = firings["payment.card_testing"], firings["role.new_owner_billing"]
        issuer = TokenIssuer(
            SigningKeys(keystore), issuer=url, audience=url, lifetime=timedelta(minutes=15)
        )

        async def undo(who: str, tenant: str, firing: int, amr: tuple[str, ...]) -> httpx.Response:
            key = DpopKey.generate()
            token, _ = issuer.issue_access(
                user_id=ids[who],
                tenant_id=ids[tenant],
                roles=("owner",),
                amr=amr,
                jkt=key.thumbprint,
                auth_time=int(time.time()),
            )
            target = f"{url}/tenants/{ids[tenant]}/detector-firings/{firing}/undo"
            async with httpx.AsyncClient(timeout=15) as http:
                return await http.post(
                    target,
                    json={"reason": "a refund batch"},
                    headers={
                        "Authorization": f"DPoP {token}",
                        "DPoP": key.proof("POST", target, access_token=token),
                    },
                )

        mfa = ("pwd", "otp", "mfa")
        refused = await undo("alice", "home", card, ("pwd",))
        assert (refused.status_code, refused.json()["type"].rsplit("/", 1)[-1]) == (
            403,
            "mfa-required",
        )
        elsewhere = await undo("carol", "other", card, mfa)
        assert (elsewhere.status_code, elsewhere.json()["type"].rsplit("/", 1)[-1]) == (
            404,
            "detector-firing-not-found",
        )
        assert str(home) not in elsewhere.text
        service = _service(db)
        with pytest.raises(FiringNamesYou):
            await service.undo_as_owner(home, ids["bob"], about_bob, reason="mine")
        assert _frozen(database, home) and _trail(database, home, "incident.spend_unfrozen") == []
        assert _sql(
            database,
            "SELECT count(*) FROM bastion.detector_firings WHERE undone_at IS NOT NULL "
            "AND tenant_id = %s",
            home,
        ) == [(0,)]

        done = await undo("alice", "home", card, mfa)
        assert done.status_code == 200, done.text
        assert done.json() == {"firing": card, "undone": {"unfreeze_spend": True}}
        assert not _frozen(database, home)
        assert _trail(database, home, "incident.spend_unfrozen")[0][0] == f"user:{ids['alice']}"
        assert (await undo("alice", "home", card, mfa)).status_code == 404  # once


def _service(db: Database) -> DetectorService:
    return DetectorService(db, Responder(IncidentControls(db), None))
