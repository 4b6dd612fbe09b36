"""Single use across processes (RFC 9449 section 11.1; CHECKLIST M1): with
``replay_store = "postgres"``, a DPoP proof or an api-signed envelope accepted
by one gateway process is refused by another on the same database.

Two gateway apps (each with its own memory, as two processes have) serve on
127.0.0.1 behind one public URL, against the real PostgreSQL; the model
provider is a real HTTP server (the double)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from bastion.access.guard import Guard
from bastion.billing.budgets import BudgetService, BudgetState
from bastion.compose import Overrides, build_gateway, build_identity
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.replay import SharedReplayStore
from bastion.identity.tokens import TokenIssuer
from bastion.safety.signing import HEADER, EnvelopeSigner
from bastion.secrets import LocalKeystore
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.http_server import running_server, serving
from tests.provider_double import API_KEY, DoubleState, provider_double

pytestmark = pytest.mark.anyio
ISSUER = "https://api.bastion.test"
# What clients address; every gateway process behind it verifies proofs for it.
PUBLIC_URL = "https://gateway.bastion.test"
CHAT = "/v1/chat/completions"


@dataclass
class Pair:
    """Two gateway processes on one database: their loopback URLs and guards."""

    a: str
    b: str
    guards: list[Guard]


@dataclass
class Stack:
    keystore: LocalKeystore
    double: DoubleState
    tokens: TokenIssuer
    tenant: UUID
    user: UUID
    pairs: dict[str, Pair] = field(default_factory=dict)


def _gateway(
    settings: Settings,
    database: DbHandles,
    keystore: LocalKeystore,
    guards: list[Guard],
    seed: Callable[[Database], Awaitable[None]] | None = None,
) -> FastAPI:
    """One gateway process, as the composition root builds it (without the plan
    gate: the tenant has a budget, no plan)."""
    gateway = build_gateway(
        settings,
        Overrides(
            database=Database(database.app, database.context_key, max_size=4),
            keystore=keystore,
            on_start=seed,
            without_plan_gate=True,
        ),
    )
    guards.append(gateway.guard)
    return gateway.app


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    keystore.set("providers/double", API_KEY.encode())
    double = DoubleState()
    seeded: dict[str, UUID] = {}

    async def seed(db: Database) -> None:
        tenants = TenantService(db)
        tenant = (await tenants.create_tenant(f"r-{uuid4().hex[:8]}", "replay")).id
        seeded["tenant"] = tenant
        seeded["user"] = await tenants.add_member(tenant, "caller@replay.test", "contributor")
        start = datetime.now(UTC) - timedelta(minutes=1)
        await BudgetService(db).set_budget(
            tenant,
            period_start=start,
            period_end=start + timedelta(hours=1),
            call_limit=1000,
            token_limit=10**9,
        )

    with running_server(provider_double(double)) as upstream:
        models = [
            ModelRoute(
                name="upstream",
                provider="openai_compatible",
                base_url=f"{upstream}/v1",
                api_key_ref="local://providers/double",
            )
        ]
        guards: dict[str, list[Guard]] = {"postgres": [], "memory": []}

        def process(
            mode: Literal["postgres", "memory"], seeds: bool = False
        ) -> AbstractContextManager[str]:
            settings = Settings(
                issuer=ISSUER,
                gateway_public_url=PUBLIC_URL,  # every process: one public URL
                gateway_models=models,
                replay_store=mode,
                embedder="hashing",
                # One call per lease: a reservation shows at once in the budget.
                gateway_budget_lease_calls=1,
                gateway_budget_lease_seconds=0.2,
                internal_mtls=False,  # envelopes to the public app: development on loopback
                dev_mode=True,
            )
            return serving(
                lambda _url: _gateway(
                    settings, database, keystore, guards[mode], seed if seeds else None
                )
            )

        with (
            process("postgres", seeds=True) as a_pg,
            process("postgres") as b_pg,
            process("memory") as a_mem,
            process("memory") as b_mem,
        ):
            pairs = {
                "postgres": Pair(a_pg, b_pg, guards["postgres"]),
                "memory": Pair(a_mem, b_mem, guards["memory"]),
            }
            keys = SigningKeys(keystore)
            tokens = TokenIssuer(
                keys, issuer=ISSUER, audience=ISSUER, lifetime=timedelta(minutes=15)
            )
            yield Stack(keystore, double, tokens, seeded["tenant"], seeded["user"], pairs)


@pytest.fixture
async def budgets(database: DbHandles) -> AsyncIterator[BudgetService]:
    async with Database(database.app, database.context_key, max_size=2) as db:
        yield BudgetService(db)


async def _settled(budgets: BudgetService, tenant: UUID) -> BudgetState:
    """The budget once every lease is closed (0.2 s after it opened here)."""
    deadline = time.monotonic() + 5
    while True:
        state = await budgets.state(tenant)
        assert state is not None
        if state.calls_reserved == 0 or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)


def _used_once_rows(database: DbHandles) -> int:
    with psycopg.connect(database.superuser, autocommit=True) as admin:
        row = admin.execute("SELECT count(*) FROM bastion_private.used_once").fetchone()
    assert row is not None
    return int(row[0])


def _body() -> bytes:
    # A fresh prompt each time: the answer cache never answers in the provider's place.
    content = f"replay {uuid4()}"
    return json.dumps(
        {"model": "upstream", "messages": [{"role": "user", "content": content}]}
    ).encode()


def _dpop_request(stack: Stack) -> tuple[dict[str, str], bytes]:
    """The headers and body of one request with a token and one DPoP proof."""
    key = DpopKey.generate()
    token, _ = stack.tokens.issue_access(
        user_id=stack.user,
        tenant_id=stack.tenant,
        roles=("contributor",),
        amr=("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    proof = key.proof("POST", PUBLIC_URL + CHAT, access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    return {**headers, "Content-Type": "application/json"}, _body()


def _envelope_request(stack: Stack) -> tuple[dict[str, str], bytes]:
    """The headers and body of one request the api signed for the user."""
    body = _body()
    envelope = EnvelopeSigner(stack.keystore).sign(
        tenant_id=stack.tenant, user_id=stack.user, body=body
    )
    return {HEADER: envelope, "Content-Type": "application/json"}, body


async def _post(url: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(url + CHAT, content=body, headers=headers)


# -- the store ---------------------------------------------------------------------------


async def test_a_key_is_used_once_and_namespaces_are_apart(db: Database) -> None:
    store = SharedReplayStore(db)
    key, expires = uuid4().hex, time.time() + 60
    assert await store.first_use("dpop", key, expires) is True
    assert await store.first_use("dpop", key, expires) is False
    assert await store.first_use("dpop", key, expires) is False
    assert await store.first_use("envelope", key, expires) is True


async def test_an_expired_key_may_be_used_again(db: Database) -> None:
    store = SharedReplayStore(db)
    key = uuid4().hex
    # Expired (past the store's margin) as soon as it is recorded.
    assert await store.first_use("dpop", key, time.time() - 60) is True
    assert await store.first_use("dpop", key, time.time() + 60) is True
    assert await store.first_use("dpop", key, time.time() + 60) is False


async def test_twenty_concurrent_first_uses_of_one_key_give_exactly_one_true(
    database: DbHandles,
) -> None:
    # A connection each, opened before the race, so the calls really overlap.
    async with Database(database.app, database.context_key, min_size=20, max_size=20) as db:
        store = SharedReplayStore(db)
        for _round in range(3):
            key, expires = uuid4().hex, time.time() + 60
            results = await asyncio.gather(
                *(store.first_use("dpop", key, expires) for _ in range(20))
            )
            assert results.count(True) == 1, results


async def test_expired_rows_are_swept(database: DbHandles, db: Database) -> None:
    store = SharedReplayStore(db)
    past = time.time() - 60
    for _ in range(50):
        await store.first_use("sweep", uuid4().hex, past)
    before = _used_once_rows(database)
    # Every hundredth call (at random: none in 1200 has odds of 6e-6) sweeps
    # up to 500 expired rows.
    for _ in range(1200):
        await store.first_use("sweep", uuid4().hex, past)
    assert _used_once_rows(database) < before + 1200


# -- the table is the function's alone ---------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM bastion_private.used_once",
        "INSERT INTO bastion_private.used_once VALUES (sha256('x'), now() + interval '1 day')",
        "DELETE FROM bastion_private.used_once",
        "TRUNCATE bastion_private.used_once",
    ],
)
def test_the_app_role_cannot_touch_the_table(database: DbHandles, statement: str) -> None:
    before = _used_once_rows(database)
    with (
        psycopg.connect(database.app, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement)
    assert _used_once_rows(database) == before


def test_the_app_role_calls_the_function_and_other_roles_cannot(database: DbHandles) -> None:
    with psycopg.connect(database.app, autocommit=True) as conn:
        row = conn.execute(
            "SELECT bastion.use_once(sha256(%s::bytea), now() + interval '1 minute')",
            (uuid4().bytes,),
        ).fetchone()
        assert row == (True,)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT bastion.use_once('short'::bytea, now())")
    before = _used_once_rows(database)
    with (
        psycopg.connect(database.queue, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(
            "SELECT bastion.use_once(sha256(%s::bytea), now() + interval '1 minute')",
            (uuid4().bytes,),
        )
    assert _used_once_rows(database) == before


def test_a_far_expiry_is_capped_at_an_hour(database: DbHandles) -> None:
    key = uuid4().bytes
    with psycopg.connect(database.app, autocommit=True) as conn:
        conn.execute(
            "SELECT bastion.use_once(sha256(%s::bytea), now() + interval '10 years')", (key,)
        )
    with psycopg.connect(database.superuser, autocommit=True) as admin:
        row = admin.execute(
            "SELECT expires_at - now() <= interval '1 hour' FROM bastion_private.used_once"
            " WHERE key = sha256(%s::bytea)",
            (key,),
        ).fetchone()
    assert row == (True,)


# -- attacks: a replay to a second process -----------------------------------------------


async def test_a_dpop_proof_accepted_by_one_process_is_refused_by_another(
    stack: Stack, budgets: BudgetService
) -> None:
    pair = stack.pairs["postgres"]
    headers, body = _dpop_request(stack)
    first = await _post(pair.a, headers, body)
    assert first.status_code == 200, first.text
    calls, used = stack.double.calls, (await _settled(budgets, stack.tenant)).calls_used

    replayed = await _post(pair.b, headers, body)
    assert replayed.status_code == 401
    assert replayed.headers["content-type"].startswith("application/problem+json")
    assert "replayed" in replayed.json()["detail"]
    assert 'error="invalid_dpop_proof"' in replayed.headers["www-authenticate"]
    assert stack.double.calls == calls  # no provider call
    state = await _settled(budgets, stack.tenant)
    assert (state.calls_used, state.calls_reserved) == (used, 0)  # nothing reserved


async def test_a_fresh_proof_is_accepted_by_the_second_process(stack: Stack) -> None:
    # The refusal above is the replay's, not the second process's.
    headers, body = _dpop_request(stack)
    answer = await _post(stack.pairs["postgres"].b, headers, body)
    assert answer.status_code == 200, answer.text


async def test_one_proof_raced_to_both_processes_is_answered_once(
    stack: Stack, budgets: BudgetService
) -> None:
    pair = stack.pairs["postgres"]
    headers, body = _dpop_request(stack)
    used = (await _settled(budgets, stack.tenant)).calls_used
    calls = stack.double.calls
    answers = await asyncio.gather(*(_post(url, headers, body) for url in [pair.a, pair.b] * 5))
    assert sorted(a.status_code for a in answers) == [200] + [401] * 9
    assert stack.double.calls == calls + 1
    assert (await _settled(budgets, stack.tenant)).calls_used == used + 1


async def test_an_envelope_accepted_by_one_process_is_refused_by_another(
    stack: Stack, budgets: BudgetService
) -> None:
    pair = stack.pairs["postgres"]
    headers, body = _envelope_request(stack)
    first = await _post(pair.a, headers, body)
    assert first.status_code == 200, first.text
    calls, used = stack.double.calls, (await _settled(budgets, stack.tenant)).calls_used

    replayed = await _post(pair.b, headers, body)
    assert replayed.status_code == 401
    problem = replayed.json()
    assert problem["type"].endswith("/envelope-refused") and problem["reason"] == "replayed"
    assert stack.double.calls == calls
    state = await _settled(budgets, stack.tenant)
    assert (state.calls_used, state.calls_reserved) == (used, 0)


# -- the default: this process's memory only, no query -----------------------------------


async def test_the_memory_default_makes_no_query_and_stops_only_local_replays(
    stack: Stack, database: DbHandles
) -> None:
    pair = stack.pairs["memory"]
    assert all(guard.authenticator.replay_store is None for guard in pair.guards)
    assert all(
        guard.authenticator.replay_store is not None for guard in stack.pairs["postgres"].guards
    )
    rows = _used_once_rows(database)
    headers, body = _dpop_request(stack)
    assert (await _post(pair.a, headers, body)).status_code == 200
    assert (await _post(pair.a, headers, body)).status_code == 401  # same process: refused
    envelope_headers, envelope_body = _envelope_request(stack)
    assert (await _post(pair.a, envelope_headers, envelope_body)).status_code == 200
    assert (await _post(pair.a, envelope_headers, envelope_body)).status_code == 401
    assert _used_once_rows(database) == rows  # nothing recorded: no query was made
    # The limit "postgres" closes: another process's memory never saw them.
    assert (await _post(pair.b, headers, body)).status_code == 200
    assert (await _post(pair.b, envelope_headers, envelope_body)).status_code == 200


async def test_the_api_process_shares_the_store_when_set(
    db: Database, keystore: LocalKeystore
) -> None:
    shared = build_identity(Settings(issuer=ISSUER, replay_store="postgres"), db, keystore)
    alone = build_identity(Settings(issuer=ISSUER), db, keystore)
    assert isinstance(shared.guard.authenticator.replay_store, SharedReplayStore)
    assert alone.guard.authenticator.replay_store is None
