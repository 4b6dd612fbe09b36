"""The audit chain's checkpoints, published and taken without an operator.

Over real HTTP on the composed api: a tenant's owners and auditors read its
signed heads and verify them against the public key set; a viewer, a caller
without MFA and another tenant's owner read nothing. And the real worker
process (``bastion serve worker``) signs and exports checkpoints on its own,
every N events or T seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import anyio
import httpx
import psycopg
import pytest
from joserfc import jws
from joserfc.jwk import KeySet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bastion import audit
from bastion.audit.checkpoints import (
    KEYS_PATH,
    AuditKeys,
    Checkpointer,
    DirectorySink,
    read_history,
    tenant_checkpoints,
)
from bastion.audit.webhook import WebhookSink
from bastion.compose import Overrides, build_worker
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.api_stack import api_stack
from tests.conftest import DbHandles, short_tempdir
from tests.http_server import serving

pytestmark = pytest.mark.anyio


@dataclass
class Stack:
    url: str
    issue: Any
    tenants: dict[str, UUID]
    users: dict[str, UUID]


# who: (their tenant, their role)
CALLERS = {
    "owner": ("own", "owner"),
    "auditor": ("own", "auditor"),
    "viewer": ("own", "viewer"),
    "stranger": ("other", "owner"),
}


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    tenants: dict[str, UUID] = {}
    users: dict[str, UUID] = {}

    async def seed(db: Database, _identity: Any) -> None:
        service = TenantService(db)
        for side in ("own", "other"):
            tenants[side] = (await service.create_tenant(f"ck-{uuid4().hex[:8]}", side)).id
        for who, (side, role) in CALLERS.items():
            users[who] = await service.add_member(tenants[side], f"{who}@ck.test", role)
        sink = DirectorySink(short_tempdir("bastion-audit-sink-"))
        checkpointer = Checkpointer(db, AuditKeys(keystore), sink)
        assert await checkpointer.run_once(force=True) is not None
        async with db.tenant_tx(tenants["own"], None, "system") as tx:
            await audit.record(tx, actor="user:1", action="doc.write", target="doc:1")
        assert await checkpointer.run_once(force=True) is not None

    # No internal listener: these routes do not reach the gateway.
    with api_stack(database, keystore, seed, more_settings={"internal_mtls": False}) as (url, api):
        yield Stack(url, api.identity.service.tokens, tenants, users)


def _get(
    http: httpx.Client, stack: Stack, who: str, path: str, *, mfa: bool = True
) -> httpx.Response:
    side, role = CALLERS[who]
    key = DpopKey.generate()
    token, _ = stack.issue.issue_access(
        user_id=stack.users[who],
        tenant_id=stack.tenants[side],
        roles=(role,),
        amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    url = f"{stack.url}{path}"
    return http.get(
        url,
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", url, access_token=token),
        },
    )


def _signed_heads(database: DbHandles, tenant: UUID) -> list[tuple[int, int, str]]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT number, seq, encode(hash, 'hex') FROM bastion.audit_tenant_checkpoints "
            "WHERE tenant_id = %s ORDER BY number",
            (tenant,),
        ).fetchall()
    return [(int(n), int(s), str(h)) for n, s, h in rows]


def _path(stack: Stack, side: str) -> str:
    return f"/tenants/{stack.tenants[side]}/audit/checkpoints"


def test_owners_and_auditors_read_signed_heads_that_verify_with_the_published_keys(
    stack: Stack, database: DbHandles
) -> None:
    with httpx.Client(timeout=30) as http:
        published = http.get(f"{stack.url}{KEYS_PATH}")
        assert published.status_code == 200
        assert published.headers["content-type"] == "application/jwk-set+json"
        key_set = published.json()
        assert key_set["keys"] and all(
            k["kty"] == "OKP" and k["crv"] == "Ed25519" and "d" not in k for k in key_set["keys"]
        )
        keys = KeySet.import_key_set(key_set)
        for who in ("owner", "auditor"):
            listed = _get(http, stack, who, _path(stack, "own"))
            assert listed.status_code == 200, listed.text
            body = listed.json()
            assert body["keys"] == KEYS_PATH
            heads = []
            for entry in body["checkpoints"]:
                payload = json.loads(
                    jws.deserialize_compact(entry["jws"], keys, algorithms=["Ed25519"]).payload
                )
                assert payload == {
                    "tenant_id": str(stack.tenants["own"]),
                    "number": entry["number"],
                    "seq": entry["seq"],
                    "hash": entry["hash"],
                }
                heads.append((entry["number"], entry["seq"], entry["hash"]))
            assert heads == _signed_heads(database, stack.tenants["own"]) and len(heads) == 2
        # Paging: after the first checkpoint, only the second.
        first = heads[0][0]
        later = _get(http, stack, "owner", f"{_path(stack, 'own')}?after={first}&limit=1")
        assert [c["number"] for c in later.json()["checkpoints"]] == [heads[1][0]]


def test_a_viewer_and_a_caller_without_mfa_are_refused(stack: Stack) -> None:
    with httpx.Client(timeout=30) as http:
        viewer = _get(http, stack, "viewer", _path(stack, "own"))
        assert viewer.status_code == 403
        assert viewer.headers["content-type"] == "application/problem+json"
        assert viewer.json()["type"].endswith("/forbidden")
        weak = _get(http, stack, "auditor", _path(stack, "own"), mfa=False)
        assert weak.status_code == 403 and weak.json()["type"].endswith("/mfa-required")
        # The owner's path works, so the refusals above are the role and the factor.
        assert _get(http, stack, "owner", _path(stack, "own")).status_code == 200
    for refused in (viewer, weak):
        assert "jws" not in refused.text and "checkpoints" not in refused.json()


def test_another_tenants_checkpoints_are_not_readable(stack: Stack, database: DbHandles) -> None:
    own_heads = _signed_heads(database, stack.tenants["own"])
    with httpx.Client(timeout=30) as http:
        theirs = _get(http, stack, "stranger", _path(stack, "own"))
        assert theirs.status_code == 404 and theirs.json()["type"].endswith("/not-found")
        # On their own path they get their own tenant's heads, none of ours.
        mine = _get(http, stack, "stranger", _path(stack, "other"))
        assert mine.status_code == 200
        entries = mine.json()["checkpoints"]
        assert [(c["number"], c["seq"], c["hash"]) for c in entries] == _signed_heads(
            database, stack.tenants["other"]
        )
        assert str(stack.tenants["own"]) not in mine.text
        assert not {h for _n, _s, h in own_heads} & {c["hash"] for c in entries}


async def test_row_level_security_shows_the_heads_only_to_owners_and_auditors(
    stack: Stack, db: Database
) -> None:
    own, other = stack.tenants["own"], stack.tenants["other"]
    everything = 1 << 30
    seen = await tenant_checkpoints(db, own, stack.users["owner"], "owner", after=0, limit=500)
    assert len(seen) == 2
    # Below the route: a viewer's context, and another tenant's owner, read no row.
    assert not await tenant_checkpoints(
        db, own, stack.users["viewer"], "viewer", after=0, limit=everything
    )
    for checkpoint in await tenant_checkpoints(
        db, other, stack.users["stranger"], "owner", after=0, limit=500
    ):
        assert checkpoint.hash not in {c.hash for c in seen}


def test_bad_paging_is_a_problem_not_an_error(stack: Stack) -> None:
    with httpx.Client(timeout=30) as http:
        for query in ("after=-1", "limit=0", "limit=100000", "after=x"):
            response = _get(http, stack, "owner", f"{_path(stack, 'own')}?{query}")
            assert response.status_code == 422, query
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"].endswith("/validation-error"), response.text
            assert "jws" not in response.text


# -- the worker takes them ------------------------------------------------------------


def _files(sink: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(sink.glob("checkpoint-*.json"))]


def _signed_seq(sink: Path, keystore: LocalKeystore, tenant: UUID) -> int:
    history = read_history(DirectorySink(sink), AuditKeys(keystore).public_key)
    assert history.problems == []
    return max((a.seq for a in history.anchors.get(str(tenant), [])), default=0)


def _wait_for(condition: Any, seconds: float) -> float:
    """Seconds until ``condition()`` holds; fails after ``seconds``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "no checkpoint was exported in time"
        time.sleep(0.1)
    return time.monotonic() - started


async def _events(db: Database, tenant: UUID, count: int) -> int:
    """Write ``count`` events; return the tenant's head ``seq`` after them."""
    async with db.tenant_tx(tenant, None, "system") as tx:
        for i in range(count):
            await audit.record(tx, actor="user:1", action="doc.write", target=f"doc:{i}")
    return await _head(db, tenant)


async def _head(db: Database, tenant: UUID) -> int:
    async with db.tenant_tx(tenant, None, "system") as tx:
        row = await (
            await tx.execute("SELECT max(seq) AS seq FROM bastion.audit_events")
        ).fetchone()
    assert row is not None
    return int(row["seq"])


_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37  # prctl(2)


@contextlib.contextmanager
def _subreaper_restored() -> Iterator[None]:
    """Give this process back the child-subreaper flag it had before: the worker's
    sandbox sets it (orphans of its runs are re-parented to it) and nothing in
    the test session reaps the other orphans it would adopt after that (every
    ``bastion`` child's own children: they would stay zombies to the end)."""
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    assert libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) == 0
    try:
        yield
    finally:
        assert libc.prctl(_PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0) == 0


@contextlib.contextmanager
def _worker(
    database: DbHandles, keystore: LocalKeystore, monkeypatch: pytest.MonkeyPatch, **audit: str
) -> Iterator[None]:
    """The worker as ``bastion serve worker`` composes it (its queue, its lifespan),
    served by uvicorn on 127.0.0.1, with the given ``BASTION_AUDIT_CHECKPOINT_*``."""
    env = {
        "BASTION_HOME": str(short_tempdir("bastion-worker-")),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "BASTION_EMBEDDER": "hashing",
        "BASTION_INTERNAL_MTLS": "0",
        "BASTION_DEV_MODE": "1",
        **{f"BASTION_AUDIT_CHECKPOINT_{k.upper()}": v for k, v in audit.items()},
    }
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = Settings()
    overrides = Overrides(database=Database(database.app, database.context_key, max_size=4))
    with (
        _subreaper_restored(),
        serving(lambda _url: build_worker(settings, overrides).app) as url,
    ):
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        yield


async def test_the_worker_signs_checkpoints_every_n_events_and_every_t_seconds(
    db: Database, database: DbHandles, keystore: LocalKeystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = (await TenantService(db).create_tenant(f"wk-{uuid4().hex[:8]}", "worker")).id
    # Every 5 events (no clock): five events wait for the worker to start.
    start = await _events(db, tenant, 5)
    by_count = short_tempdir("bastion-audit-n-")
    with _worker(database, keystore, monkeypatch, events="5", seconds="86400", dir=str(by_count)):
        _wait_for(lambda: _signed_seq(by_count, keystore, tenant) == start, 30)
        few = await _events(db, tenant, 2)
        time.sleep(1.5)  # it polls at least once: two events are not due
        assert _signed_seq(by_count, keystore, tenant) < few
        enough = await _events(db, tenant, 3)
        _wait_for(lambda: _signed_seq(by_count, keystore, tenant) == enough, 30)

    # Every second (no count): events written after a checkpoint are signed
    # within T, without any operator.
    by_time = short_tempdir("bastion-audit-t-")
    with _worker(database, keystore, monkeypatch, events="1000000", seconds="1", dir=str(by_time)):
        _wait_for(lambda: _signed_seq(by_time, keystore, tenant) >= enough, 30)
        last = await _events(db, tenant, 1)
        waited = _wait_for(lambda: _signed_seq(by_time, keystore, tenant) == last, 30)
    assert waited < 15  # T is 1 s; generous for a loaded box
    assert len(_files(by_time)) >= 2


# -- the webhook sink -------------------------------------------------------------------


async def test_the_webhook_gets_every_run_in_order_and_a_down_receiver_never_holds_up_a_checkpoint(
    db: Database, keystore: LocalKeystore
) -> None:
    received: list[tuple[str, bytes]] = []
    receiver_state = {"up": False, "refused": 0}

    async def receive(request: Request) -> PlainTextResponse:
        if not receiver_state["up"]:
            receiver_state["refused"] += 1
            return PlainTextResponse("down", status_code=503)
        received.append((request.headers["idempotency-key"], await request.body()))
        return PlainTextResponse("ok")

    receiver = Starlette(routes=[Route("/hook", receive, methods=["POST"])])
    tenant = (await TenantService(db).create_tenant(f"wh-{uuid4().hex[:8]}", "webhook")).id
    sink = DirectorySink(short_tempdir("bastion-audit-wh-"))
    checkpointer = Checkpointer(db, AuditKeys(keystore), sink)
    with serving(lambda _url: receiver) as url:
        webhook = WebhookSink(f"{url}/hook", sink, first_backoff=0.05, max_backoff=0.2)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(webhook.run_forever, 0.05)
            numbers = []
            for _ in range(2):
                await _events(db, tenant, 1)
                started = time.monotonic()
                number = await checkpointer.run_once(force=True)
                assert number is not None and time.monotonic() - started < 5
                numbers.append(number)
            # Both checkpoints were taken while the receiver refused every POST.
            with anyio.fail_after(30):
                while receiver_state["refused"] < 2:  # and it was retried
                    await anyio.sleep(0.05)
            assert received == [] and webhook.delivered() == 0
            receiver_state["up"] = True
            with anyio.fail_after(30):
                while webhook.delivered() < numbers[-1]:
                    await anyio.sleep(0.05)
            tasks.cancel_scope.cancel()
    files = dict(sink.files())
    assert [int(key) for key, _body in received] == sorted(files)  # every run, in order
    assert [body for _key, body in received] == [files[n].read_bytes() for n in sorted(files)]
    # What arrived proves itself: signed, chained, naming this tenant's head.
    copy = DirectorySink(short_tempdir("bastion-audit-copy-"))
    for key, body in received:
        content = json.loads(body)
        copy.write(int(key), content["checkpoint"], content["tenants"])
    history = read_history(copy, AuditKeys(keystore).public_key)
    assert history.problems == [] and history.last_number == numbers[-1]
    assert history.anchors[str(tenant)][-1].seq == await _head(db, tenant)
