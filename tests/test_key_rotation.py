"""Rotation of every key (issue 17 items 4-5): the overlap rule, status and its
alert, KEK re-wrapping, database passwords, and the zero-failure load test:
steady traffic through the real api (DPoP), the gateway (the api's signed
envelopes, and the official openai client) and Stripe webhook deliveries while
every rotation runs one after another."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import openai
import psycopg
import pytest
from psycopg import sql

from bastion.db.pool import Database
from bastion.db.provision import APP_ROLE, QUEUE_ROLE, role_password
from bastion.db.service import follow_role_password
from bastion.rotation import RotationPlan
from bastion.safety.signing import EnvelopeSigner
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from tests.conftest import Captured, DbHandles, short_tempdir
from tests.linked_stack import NAMESPACE, Linked, linked_stack
from tests.stripe_double import event_object, to_json

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # timing bounds: see Makefile `test`

ROTATED_IN_LOAD = ("jwt", "envelope", "tool", "webhook", "receipt", "kek", "db-password")


@pytest.fixture
def own_keystore() -> Iterator[LocalKeystore]:
    base = short_tempdir("bastion-rot-")
    try:
        yield LocalKeystore(base / "keystore.bin", base / "master.key")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _plan(keystore: LocalKeystore, db: Database | None, **kw: Any) -> RotationPlan:
    return RotationPlan(Settings(embedder="hashing"), keystore, LocalKMS(keystore), db, **kw)


def _audit(database: DbHandles, action: str, target_prefix: str) -> list[tuple[str, Any]]:
    with psycopg.connect(database.superuser) as conn:
        return conn.execute(
            "SELECT target, details FROM bastion.audit_events WHERE action = %s "
            "AND target LIKE %s ORDER BY seq",
            (action, target_prefix + "%"),
        ).fetchall()


# -- the overlap rule ----------------------------------------------------------------


async def test_a_new_envelope_key_is_never_used_before_verifiers_can_know_it(
    own_keystore: LocalKeystore, db: Database, database: DbHandles
) -> None:
    """The gateway reads the key ring's versions at most every few seconds; the api
    used a new key at once, so an envelope signed right after a rotation met a
    gateway that did not know its kid yet: "unknown-key", a failed request."""
    api, gateway = EnvelopeSigner(own_keystore), EnvelopeSigner(own_keystore)
    tenant, user, body = uuid4(), uuid4(), b'{"model":"m"}'
    gateway.verify(api.sign(tenant_id=tenant, user_id=user, body=body), body)  # keys loaded
    results = await _plan(own_keystore, db).rotate("envelope")
    assert results[0].rotated == 2
    fresh_api = EnvelopeSigner(own_keystore)  # another api process, started after
    for signer in (api, fresh_api):
        signer.tokens._signing_read_at = float("-inf")  # looks at the ring again now
        envelope = signer.sign(tenant_id=tenant, user_id=user, body=body)
        assert gateway.verify(envelope, body).tenant_id == tenant
    assert _audit(database, "key.rotate", "envelope:") != []


async def test_a_rotation_is_idempotent_and_retires_only_after_the_overlap(
    own_keystore: LocalKeystore, db: Database
) -> None:
    plan = _plan(own_keystore, db)
    now = time.time()
    first = await plan.rotate("tool", now=now)  # the first key
    second = await plan.rotate("tool", now=now + 2)
    repeat = await plan.rotate("tool", now=now + 3)  # the new one is still pending
    assert first[0].rotated == 1 and second[0].rotated == 2 and repeat[0].rotated is None
    states = {r.version: r.state for r in plan.status(now + 3) if r.kind == "tool"}
    assert states == {1: "active", 2: "pending"}
    # Signing with version 2 since now+2+11 s; tool calls live 300 s (+10 s).
    assert (await plan.rotate("tool", force=False, now=now + 200))[0].retired == []
    states = {r.version: r.state for r in plan.status(now + 200) if r.kind == "tool"}
    assert states == {1: "verifying", 2: "active"}
    done = await plan.rotate("tool", force=False, now=now + 400)
    assert done[0].retired == [1] and done[0].rotated is None


async def test_status_lists_every_kind_and_an_overdue_key_raises_the_alert(
    own_keystore: LocalKeystore, db: Database, logs: Captured
) -> None:
    plan = _plan(own_keystore, db)
    own_keystore.set("billing/stripe-webhook-secret", b"whsec_test_status")
    for kind in ("jwt", "envelope", "receipt"):
        await plan.rotate(kind)
    kinds = {r.kind for r in plan.status()}
    assert {"jwt", "envelope", "receipt", "webhook"} <= kinds
    assert not [r for r in plan.status() if r.overdue]
    later = time.time() + 400 * 86_400.0
    overdue = [r for r in plan.status(later) if r.overdue]
    assert {r.kind for r in overdue} == {"jwt", "envelope", "receipt", "webhook"}
    alert = logs.wait_for(lambda e: e.get("event") == "key_rotation_overdue")
    assert alert["level"] == "warning" and alert["kind"] in {"jwt", "envelope", "receipt"}
    assert "whsec_test_status" not in logs.text
    rows = [r.as_json() for r in plan.status(later)]
    assert all(set(r) >= {"kind", "version", "age_days", "state", "next_rotation"} for r in rows)
    assert "whsec_test_status" not in json.dumps(rows)


async def test_a_webhook_secret_from_the_provider_is_required_and_overlaps(
    own_keystore: LocalKeystore, db: Database
) -> None:
    plan = _plan(own_keystore, db)
    own_keystore.set("billing/stripe-webhook-secret", b"whsec_old")
    name = "billing/stripe-webhook-secret"
    with pytest.raises(Exception, match="give the new value"):
        await plan.rotate("webhook", name=name)
    now = time.time()
    (result,) = await plan.rotate("webhook", name=name, value=b"whsec_new", now=now)
    assert result.rotated == 2
    assert (await plan.rotate("webhook", name=name, value=b"whsec_new", now=now))[0].rotated is None
    states = {r.version: r.state for r in plan.status(now) if r.name == name}
    assert states == {1: "verifying", 2: "active"}  # both accepted during the overlap
    after = await plan.rotate("webhook", force=False, now=now + 25 * 3600)
    assert [r.retired for r in after if r.name == name] == [[1]]


# -- KEKs: data keys re-wrapped, data untouched -------------------------------------------


async def test_kek_rotation_rewraps_data_keys_and_never_reencrypts_data(
    keystore: LocalKeystore, db: Database, database: DbHandles
) -> None:
    from bastion.knowledge.service import Actor, KnowledgeService
    from bastion.tenants.service import TenantService

    tenant = (await TenantService(db).create_tenant(f"k-{uuid4().hex[:8]}", "kek")).id
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    await kb.ensure_namespace(Actor(tenant, None, "system"), "ns")
    up = await kb.upload(
        Actor(tenant, None, "system"),
        "ns",
        title="t",
        body=b"the refund was paid",
        content_type="text/plain",
        enqueue=False,
    )
    await kb.ingest(tenant, up.document.id)

    def rows() -> tuple[list[Any], list[Any]]:
        with psycopg.connect(database.superuser) as conn:
            keys = conn.execute(
                "SELECT wrapped FROM bastion.data_keys WHERE tenant_id = %s", (tenant,)
            ).fetchall()
            data = conn.execute(
                "SELECT body_ciphertext FROM bastion.documents WHERE tenant_id = %s ORDER BY id",
                (tenant,),
            ).fetchall()
        return keys, data

    keys_before, data_before = rows()
    plan = _plan(keystore, db)
    results = [r for r in await plan.rotate("kek") if r.name.endswith(str(tenant))]
    assert results and results[0].rewrapped >= 1 and results[0].retired == [1]
    keys_after, data_after = rows()
    assert keys_after != keys_before  # re-wrapped under the new KEK version
    assert data_after == data_before  # not one ciphertext byte re-encrypted
    fresh = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    found = await fresh.search(Actor(tenant, None, "system"), "ns", query="refund", k=1)
    assert found and "refund" in found[0].text
    events = _audit(database, "key.rotate", f"kek:{tenant}")
    assert len(events) == 1 and events[0][1]["rewrapped"] >= 1
    # Not due again: a second run changes nothing and writes nothing.
    assert [r for r in await plan.rotate("kek", force=False) if str(tenant) in r.name] == []
    assert len(_audit(database, "key.rotate", f"kek:{tenant}")) == 1


# -- database passwords -----------------------------------------------------------------


def _set_role_passwords(admin: str, passwords: dict[str, str]) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        for role, password in passwords.items():
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )


@pytest.fixture
def private_role_passwords(
    keystore: LocalKeystore, own_keystore: LocalKeystore, database: DbHandles
) -> Iterator[LocalKeystore]:
    """``own_keystore`` holding the roles' current passwords; the roles are
    cluster-wide, so their passwords are put back afterwards for other modules."""
    original = {role: role_password(keystore, role) for role in (APP_ROLE, QUEUE_ROLE)}
    for role, password in original.items():
        own_keystore.set(f"db/{role.replace('_', '-')}-password", password.encode())
    try:
        yield own_keystore
    finally:
        _set_role_passwords(database.superuser, original)


async def test_db_password_rotation_reaches_pools_without_a_restart(
    private_role_passwords: LocalKeystore, database: DbHandles
) -> None:
    keys = private_role_passwords
    following = Database(database.app, database.context_key, min_size=1, max_size=2)
    follow_role_password(following, keys, APP_ROLE)
    async with following:
        plan = _plan(keys, following, admin_conninfo=lambda: database.superuser)
        results = await plan.rotate("db-password")
        assert {r.name for r in results if r.rotated} == {
            "db/bastion-app-password",
            "db/bastion-queue-password",
        }
        await following.ping()  # an open connection stays
        # A new pool with the same (old) conninfo, following the key ring: connects.
        fresh = Database(database.app, database.context_key, min_size=1, max_size=1)
        follow_role_password(fresh, keys, APP_ROLE)
        async with fresh:
            await fresh.ping()
    # The old password opens nothing any more.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database.app, connect_timeout=5).close()
    assert len(_audit(database, "key.rotate", "db-password:")) >= 2


# -- the load test (item 5) -----------------------------------------------------------


def _stripe_header(payload: str, secrets_: list[bytes]) -> str:
    """Stripe's header while it rolls a secret: one v1 signature per active secret."""
    t = int(time.time())
    sigs = [hmac.new(s, f"{t}.{payload}".encode(), hashlib.sha256).hexdigest() for s in secrets_]
    return ",".join([f"t={t}", *(f"v1={s}" for s in sigs)])


@pytest.fixture(scope="module")
def linked(database: DbHandles) -> Iterator[Linked]:
    # A steady load, not a rate-limit test: this module's plans admit it.
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute("UPDATE bastion.plans SET requests_per_minute = 1000000")
    with linked_stack(database) as stack:
        yield stack


async def run_rotation_load(
    linked: Linked,
    database: DbHandles,
    *,
    steady_seconds: float,
    tail_seconds: float,
    gap_seconds: float = 1.0,
    warmup_seconds: float = 1.5,
    concurrency: int = 2,
) -> dict[str, Any]:
    """Drive the three paths, rotate every kind one after another, and return the
    answers' statuses and latencies, split into steady state and rotation."""
    assert linked.api is not None and linked.gateway is not None and linked.keystore is not None
    keystore = linked.keystore
    # The pools pick up a rotated database password (as app_database wires them).
    for role_db in (linked.api.db, linked.gateway.db):
        follow_role_password(role_db, keystore, APP_ROLE)
    webhook_secrets = [keystore.get("billing/stripe-webhook-secret")]
    samples: list[tuple[str, float, float, int]] = []  # path, start, seconds, status
    stop = asyncio.Event()
    own = linked.tenants["own"]

    def dpop_client(base: str) -> httpx.AsyncClient:
        async def sign(request: httpx.Request) -> None:
            key, token = linked.credentials("contributor")
            request.headers["Authorization"] = f"DPoP {token}"
            request.headers["DPoP"] = key.proof(
                request.method, str(request.url), access_token=token
            )

        return httpx.AsyncClient(base_url=base, event_hooks={"request": [sign]}, timeout=30)

    async def timed(path: str, call: Any) -> None:
        start = time.monotonic()
        try:
            status = await call()
        except openai.APIStatusError as exc:
            status = exc.status_code
        except (httpx.HTTPError, openai.APIConnectionError):
            status = 599
        samples.append((path, start, time.monotonic() - start, status))

    async def api_loop() -> None:
        async with dpop_client(linked.api_url) as http:
            url = f"/tenants/{own}/knowledge/namespaces/{NAMESPACE}/questions"

            async def ask() -> int:
                r = await http.post(url, json={"question": "Was the refund paid?"})
                return r.status_code

            while not stop.is_set():
                await timed("api", ask)

    async def gateway_loop() -> None:
        client = openai.AsyncOpenAI(
            base_url=f"{linked.gateway_url}/v1",
            api_key="dpop-bound",
            http_client=dpop_client(linked.gateway_url),
            max_retries=0,
        )

        async def chat() -> int:
            await client.chat.completions.create(
                model="bastion-local", messages=[{"role": "user", "content": "hello"}]
            )
            return 200

        while not stop.is_set():
            await timed("gateway", chat)

    async def webhook_loop() -> None:
        async with httpx.AsyncClient(base_url=linked.api_url, timeout=30) as http:

            async def deliver() -> int:
                event = event_object(
                    "customer.tax_id.created",
                    {"id": f"txi_{uuid4().hex[:10]}", "customer": "cus_rotation"},
                    created=int(time.time()),
                )
                body = to_json(event)
                r = await http.post(
                    "/webhooks/stripe",
                    content=body,
                    headers={"Stripe-Signature": _stripe_header(body, list(webhook_secrets))},
                )
                return r.status_code

            while not stop.is_set():
                await timed("webhook", deliver)

    # The plan's own pool, on this event loop: the api's pool belongs to the
    # loop of the thread that serves it.
    async with Database(database.app, database.context_key, max_size=2) as plan_db:
        plan = RotationPlan(
            Settings(issuer=linked.api_url, embedder="hashing"),
            keystore,
            LocalKMS(keystore),
            plan_db,
            admin_conninfo=lambda: database.superuser,
        )
        loops = [
            asyncio.create_task(loop())
            for loop in (api_loop, gateway_loop, webhook_loop)
            for _ in range(concurrency)
        ]
        # Warm-up (first unwraps, connections, the model's first call) is not steady state.
        await asyncio.sleep(warmup_seconds)
        steady_start = time.monotonic()
        await asyncio.sleep(steady_seconds)
        rotation_start = time.monotonic()
        done: list[str] = []
        for kind in ROTATED_IN_LOAD:
            if kind == "webhook":
                new = f"whsec_{secrets.token_hex(16)}".encode()
                webhook_secrets.append(new)  # the provider signs with both while it rolls
                results = await plan.rotate(kind, name="billing/stripe-webhook-secret", value=new)
            else:
                results = await plan.rotate(kind)
            assert any(r.rotated is not None for r in results), kind
            done.append(kind)
            await asyncio.sleep(gap_seconds)
        # Past the HMAC keys' publication delay: the api's envelopes are now signed
        # with the new key, which the gateway must know.
        await asyncio.sleep(tail_seconds)
    stop.set()
    await asyncio.gather(*loops)
    steady = [s for s in samples if steady_start <= s[1] < rotation_start]
    during = [s for s in samples if s[1] >= rotation_start]
    warmup = [s for s in samples if s[1] < steady_start]
    return {"warmup": warmup, "steady": steady, "during": during, "rotated": done}


def p50(samples: list[tuple[str, float, float, int]]) -> float:
    ordered = sorted(s[2] for s in samples)
    return ordered[len(ordered) // 2] if ordered else 0.0


def p99(samples: list[tuple[str, float, float, int]]) -> float:
    ordered = sorted(s[2] for s in samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


async def test_every_rotation_under_load_fails_no_request(
    linked: Linked, database: DbHandles, keystore: LocalKeystore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert linked.keystore is not None
    original = {role: role_password(keystore, role) for role in (APP_ROLE, QUEUE_ROLE)}
    for role, password in original.items():  # the roles' passwords, in the stack's ring
        linked.keystore.set(f"db/{role.replace('_', '-')}-password", password.encode())
    try:
        result = await run_rotation_load(
            linked,
            database,
            steady_seconds=float(os.environ.get("BASTION_ROTATION_STEADY_SECONDS", "4")),
            tail_seconds=12,
            warmup_seconds=3,
        )
    finally:
        _set_role_passwords(database.superuser, original)
    assert result["rotated"] == list(ROTATED_IN_LOAD)
    everything = result["warmup"] + result["steady"] + result["during"]
    failed = [(p, status) for p, _t, _d, status in everything if not 200 <= status < 300]
    assert failed == [], failed[:10]
    for path in ("api", "gateway", "webhook"):
        assert sum(1 for s in result["during"] if s[0] == path) >= 5, path
    # Every rotation left its audit event.
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE action = 'key.rotate'"
        ).fetchone()
    assert row is not None and row[0] >= len(ROTATED_IN_LOAD)
    report = os.environ.get("BASTION_ROTATION_REPORT")  # bench/rotation.py reads it
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    phase: {
                        "requests": len(result[phase]),
                        "p50_ms": p50(result[phase]) * 1000,
                        "p99_ms": p99(result[phase]) * 1000,
                        "failed": sum(1 for s in result[phase] if not 200 <= s[3] < 300),
                    }
                    for phase in ("steady", "during")
                }
            )
        )
    with capsys.disabled():
        print(
            f"\nrotation load: {len(result['steady'])} steady p99 "
            f"{p99(result['steady']) * 1000:.0f} ms, {len(result['during'])} during "
            f"rotation p99 {p99(result['during']) * 1000:.0f} ms"
        )


def test_keys_status_cli_prints_json(tmp_path: Path) -> None:
    """``bastion keys status --json`` on a fresh home: every row has its fields."""
    import subprocess
    import sys

    keystore = LocalKeystore(tmp_path / "keys" / "keystore.bin", tmp_path / "cfg" / "master.key")
    EnvelopeSigner(keystore).sign(tenant_id=uuid4(), user_id=uuid4(), body=b"x")
    env = {
        **os.environ,
        "BASTION_HOME": str(tmp_path),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "BASTION_EMBEDDER": "hashing",
    }
    done = subprocess.run(
        [sys.executable, "-m", "bastion", "keys", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["kind"], r["version"], r["state"]) for r in rows] == [("envelope", 1, "active")]
