"""What follows a rotation without a restart (issue 17, the rest of item 4):
the gateway's upstream API key, the LISTEN listeners' and the job queue's
connections after a database password rotation, and tenant KEKs held by
OpenBao transit (a real ``bao server -dev``) and AWS KMS (moto's server, an
API-compatible stand-in); and the rotation periods' validation."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from psycopg import sql
from pydantic import ValidationError

from bastion.billing.budgets import BudgetService
from bastion.db.notify import Listener
from bastion.db.pool import Database
from bastion.db.provision import APP_ROLE, QUEUE_ROLE, role_password
from bastion.db.service import follow_role_password
from bastion.gateway.app import PROVIDER_KEY_REFRESH_SECONDS
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.rotation import RotationPlan
from bastion.safety.vault import PiiVault, tokens_in
from bastion.secrets import KMS, Keystore, LocalKeystore, open_key_ring
from bastion.secrets.kms import LocalKMS
from bastion.secrets.openbao import OpenBaoKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import KEY_ROTATION_DAYS, ModelRoute, Settings
from bastion.tenants.service import TenantService
from bastion.worker.queue import queue_app
from tests.awskms_stack import Moto, start_moto
from tests.conftest import DbHandles, short_tempdir
from tests.gateway_stack import gateway_server
from tests.http_server import running_server
from tests.provider_double import API_KEY, DoubleState, provider_double
from tests.test_secrets_openbao import Bao, _start_bao

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # timing bounds: see Makefile `test`
ISSUER = "https://api.bastion.test"


def _audit(database: DbHandles, action: str, target: str) -> list[Any]:
    with psycopg.connect(database.superuser) as conn:
        return conn.execute(
            "SELECT details FROM bastion.audit_events WHERE action = %s AND target = %s",
            (action, target),
        ).fetchall()


# -- provider API keys ------------------------------------------------------------------


async def test_a_rotated_provider_key_reaches_the_running_gateway_with_no_failed_call(
    database: DbHandles, keystore: LocalKeystore
) -> None:
    """The upstream double accepts the old key, then both (the provider's overlap),
    then only the new one; calls run all along. New calls carry the new key
    within the refresh bound, and not one call fails."""
    secret = f"providers/rotating-{uuid4().hex[:8]}"
    old, new = "sk-old-" + uuid4().hex, "sk-new-" + uuid4().hex
    keystore.set(secret, old.encode())
    upstream = DoubleState(accepted_keys={old})
    seeded: dict[str, UUID] = {}

    async def seed(db: Database) -> None:
        tenants = TenantService(db)
        seeded["tenant"] = (await tenants.create_tenant(f"p-{uuid4().hex[:8]}", "p")).id
        seeded["user"] = await tenants.add_member(seeded["tenant"], "c@p.test", "contributor")

    with running_server(provider_double(upstream)) as upstream_url:
        settings = Settings(
            issuer=ISSUER,
            embedder="hashing",
            gateway_models=[
                ModelRoute(
                    name="rotating",
                    provider="openai_compatible",
                    base_url=f"{upstream_url}/v1",
                    api_key_ref=f"local://{secret}",
                    timeout_seconds=5,
                )
            ],
        )
        with gateway_server(
            database,
            keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            without_plan_gate=True,
        ) as (url, _gateway):
            async with Database(database.app, database.context_key, max_size=2) as db:
                client = await _gateway_client(url, keystore, db, seeded)
                statuses: list[int] = []
                stop = asyncio.Event()

                async def calls() -> None:
                    body = {"model": "rotating", "messages": [{"role": "user", "content": "hi"}]}
                    while not stop.is_set():
                        answer = await client.post(f"{url}/v1/chat/completions", json=body)
                        statuses.append(answer.status_code)

                loops = [asyncio.create_task(calls()) for _ in range(2)]
                await asyncio.sleep(0.5)
                upstream.accepted_keys = {old, new}  # the provider's overlap begins
                rotated_at = time.monotonic()
                plan = RotationPlan(settings, keystore, LocalKMS(keystore), db)
                (result,) = await plan.rotate("provider", name=secret, value=new.encode())
                assert result.rotated is not None
                bound = PROVIDER_KEY_REFRESH_SECONDS + 1.0  # + one call's time in flight
                await asyncio.sleep(bound + 0.5)
                upstream.accepted_keys = {new}  # the overlap ends: the old key is refused
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*loops)
                await client.aclose()

    assert statuses and all(status == 200 for status in statuses), sorted(set(statuses))
    after = [(at - rotated_at, key) for at, key in upstream.keys_seen if at >= rotated_at]
    first_new = min(at for at, key in after if key == new)
    assert first_new <= bound
    assert all(key == new for at, key in after if at > bound)  # new calls use the new key
    assert {key for _at, key in upstream.keys_seen} <= {old, new}
    assert API_KEY not in {key for _at, key in upstream.keys_seen}
    assert len(_audit(database, "key.rotate", f"provider:{secret}")) == 1


async def _gateway_client(
    url: str, keystore: LocalKeystore, db: Database, seeded: dict[str, UUID]
) -> httpx.AsyncClient:
    """A contributor's DPoP client, with a budget for the calls."""
    now = time.time()  # the gateway seeded its tenant before it served
    start = datetime.fromtimestamp(now - 60, UTC)
    await BudgetService(db).set_budget(
        seeded["tenant"],
        period_start=start,
        period_end=start + timedelta(hours=1),
        call_limit=100_000,
        token_limit=10**9,
    )
    key = DpopKey.generate()
    token, _ = TokenIssuer(
        SigningKeys(keystore), issuer=ISSUER, audience=ISSUER, lifetime=timedelta(minutes=15)
    ).issue_access(
        user_id=seeded["user"],
        tenant_id=seeded["tenant"],
        roles=("contributor",),
        amr=("pwd",),
        jkt=key.thumbprint,
        auth_time=int(now),
    )

    async def sign(request: httpx.Request) -> None:
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = key.proof(request.method, str(request.url), access_token=token)

    return httpx.AsyncClient(event_hooks={"request": [sign]}, timeout=30)


# -- connections that follow a rotated database password ---------------------------------


@pytest.fixture
def own_passwords(keystore: LocalKeystore, database: DbHandles) -> Iterator[LocalKeystore]:
    """A key ring of this test's own holding the roles' current passwords; the roles
    are cluster-wide, so their passwords are put back afterwards."""
    base = short_tempdir("bastion-rotf-")
    own = LocalKeystore(base / "keystore.bin", base / "master.key")
    original = {role: role_password(keystore, role) for role in (APP_ROLE, QUEUE_ROLE)}
    for role, password in original.items():
        own.set(f"db/{role.replace('_', '-')}-password", password.encode())
    try:
        yield own
    finally:
        with psycopg.connect(database.superuser, autocommit=True) as conn:
            for role, password in original.items():
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password)
                    )
                )
        shutil.rmtree(base, ignore_errors=True)


def _terminate(database: DbHandles, *, pid: int | None = None, role: str | None = None) -> int:
    """End the server process ``pid``, or every connection of ``role`` to this database."""
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid = %s OR (usename = %s AND datname = current_database())",
            (pid, role),
        ).fetchall()
    return len(rows)


async def _until(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_listener_reconnects_with_a_rotated_db_password_and_still_hears(
    own_passwords: LocalKeystore, database: DbHandles
) -> None:
    keys = own_passwords
    channel = f"rotation_{uuid4().hex[:8]}"
    heard: list[str] = []
    readies: list[float] = []
    db = Database(database.app, database.context_key, min_size=1, max_size=2)
    follow_role_password(db, keys, APP_ROLE)
    async with db:
        listener = Listener(
            db,
            channel,
            on_notify=heard.append,
            on_ready=lambda: readies.append(time.monotonic()),
            on_lost=lambda: None,
            retry_seconds=0.2,
        )
        listener.start()
        try:
            await _until(lambda: readies, 10, "the listener listening")

            def announce(payload: str) -> None:
                with psycopg.connect(database.superuser, autocommit=True) as conn:
                    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

            announce("before")
            await _until(lambda: "before" in heard, 10, "the first announcement")
            plan = RotationPlan(
                Settings(embedder="hashing"),
                keys,
                LocalKMS(keys),
                db,
                admin_conninfo=lambda: database.superuser,
            )
            await plan.rotate("db-password")
            with pytest.raises(psycopg.OperationalError):  # the old password is void
                psycopg.connect(database.app, connect_timeout=5).close()
            assert listener.backend_pid is not None
            assert _terminate(database, pid=listener.backend_pid) == 1
            await _until(lambda: len(readies) >= 2, 10, "the listener back, on the new password")
            announce("after")
            await _until(lambda: "after" in heard, 10, "an announcement after the rotation")
        finally:
            await listener.aclose()


async def test_the_job_queue_defers_and_runs_after_a_db_password_rotation(
    own_passwords: LocalKeystore, database: DbHandles
) -> None:
    keys = own_passwords
    queue = queue_app(database.queue, password=lambda: role_password(keys, QUEUE_ROLE))
    ran: list[str] = []

    @queue.task(name="rotation_probe", queue="rotation-probe")
    async def probe(marker: str) -> None:
        ran.append(marker)

    async with queue.open_async(), Database(database.app, database.context_key) as db:
        await probe.defer_async(marker="before")
        plan = RotationPlan(
            Settings(embedder="hashing"),
            keys,
            LocalKMS(keys),
            db,
            admin_conninfo=lambda: database.superuser,
        )
        await plan.rotate("db-password")
        # Every connection of the queue's role ends: the pool must sign in again.
        assert _terminate(database, role=QUEUE_ROLE) >= 1
        await probe.defer_async(marker="after")
        await queue.run_worker_async(
            queues=["rotation-probe"], wait=False, install_signal_handlers=False
        )
    assert sorted(ran) == ["after", "before"]
    with psycopg.connect(database.superuser) as conn:
        done = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs "
            "WHERE task_name = 'rotation_probe' AND status = 'succeeded'"
        ).fetchone()
    assert done is not None and done[0] == 2


# -- KEKs in OpenBao transit and AWS KMS -------------------------------------------------


async def _kek_round(
    db: Database, database: DbHandles, settings: Settings, keystore: Keystore, kms: KMS
) -> tuple[UUID, list[Any], list[Any]]:
    """A tenant with a document and a PII token; its KEK rotated. Returns the
    tenant and its wrapped data keys before and after; checks that no
    ciphertext of data changed, the audit event, and that a second run is a no-op."""
    tenant = (await TenantService(db).create_tenant(f"k-{uuid4().hex[:8]}", "kek")).id
    actor = Actor(tenant, None, "system")
    kb = KnowledgeService(db, TenantKeys(kms), default_embedder="hashing")
    await kb.ensure_namespace(actor, "ns")
    up = await kb.upload(
        actor, "ns", title="t", body=b"the refund was paid", content_type="text/plain",
        enqueue=False,
    )  # fmt: skip
    await kb.ingest(tenant, up.document.id)
    redaction = await PiiVault(TenantKeys(kms)).tokenize(db, tenant, "write to ada@example.com")

    def rows() -> tuple[list[Any], list[Any]]:
        with psycopg.connect(database.superuser) as conn:
            wrapped = conn.execute(
                "SELECT wrapped FROM bastion.data_keys WHERE tenant_id = %s "
                "UNION ALL SELECT wrapped FROM bastion.pii_token_keys WHERE tenant_id = %s",
                (tenant, tenant),
            ).fetchall()
            data = conn.execute(
                "SELECT body_ciphertext FROM bastion.documents WHERE tenant_id = %s ORDER BY id",
                (tenant,),
            ).fetchall()
        return wrapped, data

    keys_before, data_before = rows()
    plan = RotationPlan(settings, keystore, kms, db)
    results = [r for r in await plan.rotate("kek") if r.name.endswith(str(tenant))]
    assert len(results) == 1 and results[0].rotated == 2
    assert results[0].rewrapped == len(keys_before) == 2  # the data key and the token key
    keys_after, data_after = rows()
    assert all(a != b for a, b in zip(keys_after, keys_before, strict=True))
    assert data_after == data_before  # not one ciphertext byte re-encrypted
    # A process that never saw the old blobs (no cache) reads everything.
    fresh_kms = open_key_ring(settings).kms
    fresh = KnowledgeService(db, TenantKeys(fresh_kms), default_embedder="hashing")
    found = await fresh.search(actor, "ns", query="refund", k=1)
    assert found and "refund" in found[0].text
    (token,) = tokens_in(redaction.text)
    owner = await TenantService(db).add_member(tenant, f"o-{uuid4().hex[:6]}@k.test", "owner")
    revealed = await PiiVault(TenantKeys(fresh_kms)).detokenize(
        db, tenant, [token], user_id=owner, role="owner", reason="after the rotation"
    )
    assert [r.value for r in revealed] == ["ada@example.com"]
    events = _audit(database, "key.rotate", f"kek:{tenant}")
    assert len(events) == 1 and events[0][0] == {"version": 2, "rewrapped": 2}
    # Status shows the new version in use and the old one still verifying.
    states = {(row.version, row.state) for row in plan.status() if row.name.endswith(str(tenant))}
    assert states == {(1, "verifying"), (2, "active")}
    # Not due again: a second run changes nothing and writes nothing.
    assert [r for r in await plan.rotate("kek", force=False) if str(tenant) in r.name] == []
    assert len(_audit(database, "key.rotate", f"kek:{tenant}")) == 1
    return tenant, keys_before, keys_after


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = _start_bao(tmp_path_factory.mktemp("bao-rot"))
    yield server
    server.stop()


async def test_kek_rotation_in_openbao_rotates_transit_and_rewraps_inside_it(
    bao: Bao, db: Database, database: DbHandles, tmp_path: Path
) -> None:
    settings = bao.settings(tmp_path / "home", embedder="hashing")
    ring = open_key_ring(settings)
    tenant, before, after = await _kek_round(db, database, settings, ring.keystore, ring.kms)
    key = bao.root.secrets.transit.read_key(OpenBaoKMS.key_name(tenant))["data"]
    assert key["latest_version"] == 2 and key["min_decryption_version"] == 1
    assert all(bytes(b[0]).startswith(b"vault:v1:") for b in before)
    assert all(bytes(a[0]).startswith(b"vault:v2:") for a in after)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = start_moto(tmp_path_factory.mktemp("moto-rot"))
    yield server
    server.stop()


async def test_kek_rotation_in_aws_kms_rotates_the_key_and_reencrypts_inside_kms(
    moto: Moto, db: Database, database: DbHandles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in moto.environ().items():
        monkeypatch.setenv(name, value)
    settings = moto.settings(tmp_path / "home", embedder="hashing")
    ring = open_key_ring(settings)
    tenant, _before, _after = await _kek_round(db, database, settings, ring.keystore, ring.kms)
    alias = f"alias/{settings.awskms_alias_prefix}{tenant}"
    key_id = moto.root.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"]
    # The same key (its id and alias kept: Decrypt names it), one on-demand rotation.
    assert len(moto.root.list_key_rotations(KeyId=key_id)["Rotations"]) == 1


# -- settings -----------------------------------------------------------------------------


def test_rotation_periods_below_a_day_or_of_unknown_kinds_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for bad, said in (
        ({"jwt": 0}, "at least 1 day (jwt)"),
        ({"kek": -30, "receipt": 365}, "at least 1 day (kek)"),
        ({"jwts": 7}, "unknown key kind(s) jwts"),
    ):
        with pytest.raises(ValidationError, match=r"key_rotation_days") as refused:
            Settings(embedder="hashing", key_rotation_days=bad)
        assert said in str(refused.value)
    monkeypatch.setenv("BASTION_KEY_ROTATION_DAYS", '{"db-password": 0}')
    with pytest.raises(ValidationError, match=r"at least 1 day \(db-password\)"):
        Settings(embedder="hashing")
    # A kind not given keeps its default (not a blanket 90 days).
    monkeypatch.setenv("BASTION_KEY_ROTATION_DAYS", '{"jwt": 7}')
    assert Settings(embedder="hashing").key_rotation_days == {**KEY_ROTATION_DAYS, "jwt": 7}
