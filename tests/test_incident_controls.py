"""The incident runbook's switches under real traffic (issue 20): freeze-spend,
serve-cached, disable-tools — each idempotent, audited, reversible.

Over real HTTP against the gateway the composition root builds, a real
upstream (the provider double, which counts the calls it gets), the real
PostgreSQL and the real sandbox. Every refusal checks the problem type and
that nothing was written (the budget rows, the reservations, the ledger's
queue; the tool-run ledger).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from typer.testing import CliRunner

from bastion.billing.budgets import BudgetService, SpendFrozen
from bastion.cli import app
from bastion.compose import Gateway
from bastion.db.pool import Database
from bastion.gateway.incident import IncidentSwitches
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.incident.controls import (
    PLATFORM,
    IncidentControls,
    RouteKind,
    reverted_on_exit,
)
from bastion.safety.sandbox import Limits, Outcome, Result, RunSpec, Sandbox, SandboxConfig
from bastion.safety.signing import ToolCall, ToolCallSigner
from bastion.safety.tools import SignedToolCall, ToolExecutor, ToolRefused
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir
from tests.gateway_stack import gateway_server
from tests.provider_double import ANSWER, API_KEY, DoubleState, provider_double

pytestmark = pytest.mark.anyio
ISSUER = "https://api.bastion.test"
SWITCH_TTL = 0.2  # how long the gateway keeps the switches (1 s in production)
OPERATOR = "operator:test"


@dataclass
class Stack:
    url: str
    double: DoubleState
    gateway: Gateway
    tokens: TokenIssuer
    users: dict[str, tuple[UUID, UUID]]  # tenant name -> (tenant, user)


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    from tests.http_server import running_server

    keystore.set("providers/double", API_KEY.encode())
    double = DoubleState()
    seeded: dict[str, Any] = {}
    with running_server(provider_double(double)) as upstream:
        settings = Settings(
            issuer=ISSUER,
            embedder="hashing",
            gateway_budget_lease_calls=8,
            # Longer than the switches' time: a lease opened before a freeze
            # would still cover calls, were the gateway not to check.
            gateway_budget_lease_seconds=30,
            gateway_incident_ttl_seconds=SWITCH_TTL,
            gateway_models=[
                ModelRoute(
                    name="upstream",
                    provider="openai_compatible",
                    base_url=f"{upstream}/v1",
                    api_key_ref="local://providers/double",
                    timeout_seconds=1.5,
                )
            ],
        )

        async def seed(db: Database) -> None:
            tenants, budgets = TenantService(db), BudgetService(db)
            start = datetime.now(UTC) - timedelta(minutes=1)
            users: dict[str, tuple[UUID, UUID]] = {}
            for name in ("spender", "bystander", "fresh", "tooler"):
                tenant = (await tenants.create_tenant(f"i-{uuid4().hex[:8]}", name)).id
                await budgets.set_budget(
                    tenant,
                    period_start=start,
                    period_end=start + timedelta(hours=1),
                    call_limit=10_000,
                    token_limit=10**9,
                )
                user = await tenants.add_member(tenant, f"u@{name}.test", "contributor")
                users[name] = (tenant, user)
            seeded["users"] = users

        with gateway_server(
            database,
            keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            pool_size=4,
            without_plan_gate=True,
        ) as (url, composed):
            tokens = TokenIssuer(
                SigningKeys(keystore),
                issuer=ISSUER,
                audience=ISSUER,
                lifetime=timedelta(minutes=15),
            )
            yield Stack(url, double, composed, tokens, seeded["users"])


class Client:
    def __init__(self, stack: Stack, who: str) -> None:
        tenant, user = stack.users[who]
        self.url = f"{stack.url}/v1/chat/completions"
        key = DpopKey.generate()
        token, _ = stack.tokens.issue_access(
            user_id=user,
            tenant_id=tenant,
            roles=("contributor",),
            amr=("pwd",),
            jkt=key.thumbprint,
            auth_time=int(time.time()),
        )

        async def sign(request: httpx.Request) -> None:
            request.headers["Authorization"] = f"DPoP {token}"
            request.headers["DPoP"] = key.proof(
                request.method, str(request.url), access_token=token
            )

        self.http = httpx.AsyncClient(event_hooks={"request": [sign]}, timeout=30)

    async def ask(self, prompt: str, **fields: Any) -> httpx.Response:
        body = {"model": "upstream", "temperature": 0.7, "max_tokens": 50, **fields}
        body.setdefault("messages", [{"role": "user", "content": prompt}])
        return await self.http.post(self.url, json=body)


async def _until(ask: Any, done: Any, *, within: float = 3.0) -> tuple[httpx.Response, float]:
    """Ask until ``done(answer)``; the answer and how long the gateway took to learn."""
    started = time.monotonic()
    while True:
        answer = await ask()
        if done(answer):
            return answer, time.monotonic() - started
        assert time.monotonic() - started < within, answer.text
        await asyncio.sleep(0.02)


def _problem(answer: httpx.Response, status: int, slug: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"] == f"https://bastion.dev/problems/{slug}"


async def _spend(db: Database, tenant: UUID) -> tuple[Any, ...]:
    """Everything a call could write for the tenant: its budget, its reservations."""
    async with db.tenant_tx(tenant, None, "system") as tx:
        budget = await (
            await tx.execute(
                "SELECT calls_used, tokens_used, calls_reserved, tokens_reserved "
                "FROM bastion.budgets WHERE tenant_id = %s",
                (tenant,),
            )
        ).fetchall()
        held = await (
            await tx.execute(
                "SELECT id, status, calls_used FROM bastion.budget_reservations "
                "WHERE tenant_id = %s ORDER BY id",
                (tenant,),
            )
        ).fetchall()
        invoked = await (
            await tx.execute(
                "SELECT count(*) AS n FROM bastion.audit_events WHERE action = 'model.invoke'"
            )
        ).fetchone()
    return budget, held, invoked


def _queued(stack: Stack, tenant: UUID) -> tuple[Any, ...]:
    """What the gateway's ledger holds for the tenant: its open leases' calls, and
    what its next flush writes."""
    book = stack.gateway.service.ledger._books.get(tenant)
    if book is None:
        return (), 0, 0
    leases = tuple((lease.calls_free, lease.in_flight, lease.calls_used) for lease in book.open)
    return leases, len(book.events), len(book.closed)


async def _drained(stack: Stack, tenant: UUID) -> None:
    """Until the ledger's flusher wrote what the tenant's earlier calls queued
    (a flush takes the events from the book, then commits: wait for both)."""
    ledger, started = stack.gateway.service.ledger, time.monotonic()
    while ((book := ledger._books.get(tenant)) and book.events) or ledger._flushing.locked():
        assert time.monotonic() - started < 3.0
        await asyncio.sleep(0.05)


def _charged(spend: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a call would add: a reservation, calls or tokens held or used, an
    invocation. (A lease opened before the freeze may close meanwhile: that
    turns held into used and gives tokens back, and adds nothing.)"""
    budget, held, invoked = spend
    (row,) = budget
    return (
        {r["id"] for r in held},
        row["calls_used"] + row["calls_reserved"],
        row["tokens_used"] + row["tokens_reserved"],
        invoked["n"],
    )


async def _events(db: Database, tenant: UUID, action: str) -> list[dict[str, Any]]:
    async with db.tenant_tx(tenant, None, "auditor") as tx:
        cur = await tx.execute(
            "SELECT actor, action, target, details FROM bastion.audit_events "
            "WHERE action = %s ORDER BY seq",
            (action,),
        )
        return list(await cur.fetchall())


# -- freeze-spend ----------------------------------------------------------------------


async def test_a_frozen_tenant_s_paid_call_is_refused_and_writes_nothing(
    stack: Stack, db: Database, record_property: Any
) -> None:
    """Also the calls a lease opened before the freeze still covered; another
    tenant is unaffected; the freeze is audited and lifted."""
    controls = IncidentControls(db)
    tenant, _ = stack.users["spender"]
    spender, bystander = Client(stack, "spender"), Client(stack, "bystander")
    assert (await spender.ask("before")).status_code == 200  # a lease of 8 calls is open
    assert await controls.freeze_spend(tenant, actor=OPERATOR, reason="card fraud")
    try:
        refused, learned = await _until(
            lambda: spender.ask(f"during {uuid4()}"), lambda a: a.status_code != 200
        )
        _problem(refused, 402, "spend-frozen")
        assert learned < SWITCH_TTL + 1.0
        record_property("seconds_to_first_refusal", round(learned, 3))
        calls = stack.double.calls
        await _drained(stack, tenant)
        before, queued = _charged(await _spend(db, tenant)), _queued(stack, tenant)
        _problem(await spender.ask(f"again {uuid4()}"), 402, "spend-frozen")
        ids, held_or_used, tokens, invoked = _charged(await _spend(db, tenant))
        assert ids == before[0] and held_or_used <= before[1] and tokens <= before[2]
        assert invoked == before[3] and _queued(stack, tenant)[1] == queued[1]  # no event
        assert stack.double.calls == calls  # no provider call since the gateway learned
        assert (await bystander.ask(f"other {uuid4()}")).status_code == 200
    finally:
        assert await controls.unfreeze_spend(tenant, actor=OPERATOR, reason="resolved")
    (frozen,) = await _events(db, tenant, "incident.spend_frozen")
    assert frozen["actor"] == OPERATOR and frozen["details"]["reason"] == "card fraud"
    await _until(lambda: spender.ask(f"after {uuid4()}"), lambda a: a.status_code == 200)


async def test_a_freeze_is_enforced_by_the_reservation_itself_for_a_tenant_or_everyone(
    stack: Stack, db: Database
) -> None:
    """No gateway in the way: the budget's own statement reserves nothing, and a
    gateway that never saw the tenant refuses at its first call."""
    controls, budgets = IncidentControls(db), BudgetService(db)
    fresh, _ = stack.users["fresh"]
    other, _ = stack.users["bystander"]
    assert await controls.freeze_spend(fresh, actor=OPERATOR, reason="drill")
    try:
        before = await _spend(db, fresh)
        with pytest.raises(SpendFrozen):
            await budgets.lease(fresh, calls=8, tokens_per_call=100, min_tokens=100)
        with pytest.raises(SpendFrozen):
            await budgets.reserve(fresh, 100)
        _problem(await Client(stack, "fresh").ask("first call"), 402, "spend-frozen")
        assert await _spend(db, fresh) == before and _queued(stack, fresh) == ((), 0, 0)
        # The global freeze: every tenant, and lifting it leaves the tenant's own.
        assert await controls.freeze_spend(None, actor=OPERATOR, reason="provider bill")
        try:
            other_before = await _spend(db, other)
            with pytest.raises(SpendFrozen):
                await budgets.reserve(other, 100)
            assert await _spend(db, other) == other_before
        finally:
            assert await controls.unfreeze_spend(None, actor=OPERATOR, reason="resolved")
        released = await budgets.reserve(other, 100)
        assert await budgets.release(released)
        with pytest.raises(SpendFrozen):
            await budgets.reserve(fresh, 100)
    finally:
        await controls.unfreeze_spend(fresh, actor=OPERATOR, reason="resolved")
    (event,) = await _events(db, PLATFORM, "incident.spend_frozen")
    assert event["target"] == "platform" and event["details"]["scope"] == "global"


# -- serve-cached ----------------------------------------------------------------------


async def test_serve_cached_answers_from_the_cache_marked_and_never_calls_the_provider(
    stack: Stack, db: Database, record_property: Any
) -> None:
    controls = IncidentControls(db)
    client = Client(stack, "bystander")
    asked = f"What is the refund policy? {uuid4()}"
    live = await client.ask(asked)
    assert live.status_code == 200 and "bastion-cache" not in live.headers
    # By model, then by provider (the upstream's host).
    routes: list[tuple[RouteKind, str]] = [("model", "upstream"), ("provider", "127.0.0.1")]
    for kind, name in routes:
        assert await controls.serve_cached(kind, name, actor=OPERATOR, reason="outage")
        try:
            cached, learned = await _until(
                lambda: client.ask(asked), lambda a: "bastion-cache" in a.headers
            )
            assert learned < SWITCH_TTL + 1.0
            record_property(f"seconds_to_first_cached_answer_by_{kind}", round(learned, 3))
            calls = stack.double.calls
            cached = await client.ask(asked)
            assert cached.headers["bastion-cache"] == "stale-fallback"
            assert cached.json()["choices"][0]["message"]["content"] == ANSWER
            miss = await client.ask(f"never asked {uuid4()}")
            _problem(miss, 503, "provider-unavailable")
            assert "bastion-cache" not in miss.headers
            assert stack.double.calls == calls  # no upstream call, hit or miss
        finally:
            assert await controls.serve_live(kind, name, actor=OPERATOR, reason="recovered")
        again, _ = await _until(
            lambda: client.ask(asked), lambda a: "bastion-cache" not in a.headers
        )
        assert again.status_code == 200
    events = await _events(db, PLATFORM, "incident.serve_cached")
    assert [e["target"] for e in events][-2:] == ["model:upstream", "provider:127.0.0.1"]


# -- disable-tools ---------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {
        "name": "calculate",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "maxLength": 200}},
            "required": ["expression"],
        },
    },
}


async def test_disabled_tools_refuse_a_request_declaring_tools_and_write_nothing(
    stack: Stack, db: Database
) -> None:
    controls = IncidentControls(db)
    tenant, _ = stack.users["tooler"]
    client = Client(stack, "tooler")
    assert await controls.disable_tools(tenant, actor=OPERATOR, reason="tool abuse")
    try:
        calls, before = stack.double.calls, await _spend(db, tenant)
        refused = await client.ask("compute", tools=[TOOL])
        _problem(refused, 403, "tools-disabled")
        assert stack.double.calls == calls
        assert await _spend(db, tenant) == before and _queued(stack, tenant) == ((), 0, 0)
        # A request without tools is served as ever.
        assert (await client.ask(f"plain {uuid4()}")).status_code == 200
    finally:
        assert await controls.enable_tools(tenant, actor=OPERATOR, reason="resolved")
    (event,) = await _events(db, tenant, "incident.tools_disabled")
    assert event["actor"] == OPERATOR


class CountingSandbox(Sandbox):
    runs = 0

    def run(self, spec: RunSpec) -> Result:
        type(self).runs += 1
        return super().run(spec)


@pytest.fixture
async def executor(db: Database, keystore: LocalKeystore) -> AsyncIterator[ToolExecutor]:
    limits = Limits(cpu_seconds=2, wall_seconds=8.0, pids=16, output_bytes=64 * 1024)
    probed = Sandbox.probe(SandboxConfig(limits=limits))
    sandbox = CountingSandbox(probed.backend, probed.config)
    yield ToolExecutor(db, ToolCallSigner(keystore), sandbox, keys=TenantKeys(LocalKMS(keystore)))


async def test_a_queued_tool_run_is_not_started_while_tools_are_disabled(
    db: Database, keystore: LocalKeystore, executor: ToolExecutor
) -> None:
    """Globally disabled: the run the worker picks up is refused (audited), runs
    nothing and records nothing; enabled again, tool calls run."""
    tenants, controls = TenantService(db), IncidentControls(db)
    tenant = (await tenants.create_tenant(f"t-{uuid4().hex[:8]}", "T")).id
    user = await tenants.add_member(tenant, f"u-{uuid4().hex[:6]}@t.test", "contributor")

    def signed() -> SignedToolCall:
        call = ToolCall(f"call_{uuid4().hex[:12]}", "calculate", json.dumps({"expression": "6*7"}))
        signature = ToolCallSigner(keystore).sign(
            call, tenant_id=tenant, user_id=user, declaration=TOOL
        )
        return SignedToolCall(tenant, call, signature, TOOL)

    queued = signed()
    assert await controls.disable_tools(None, actor=OPERATOR, reason="sandbox CVE")
    try:
        runs = CountingSandbox.runs
        with pytest.raises(ToolRefused, match="tools-disabled"):
            await executor.run(queued, user_id=user)
        assert CountingSandbox.runs == runs
        async with db.tenant_tx(tenant, None, "system") as tx:
            cur = await tx.execute("SELECT count(*) AS n FROM bastion.tool_call_runs")
            assert (await cur.fetchone() or {})["n"] == 0
        (refused,) = await _events(db, tenant, "tool.refused")
        assert refused["details"]["reason"] == "tools-disabled"
    finally:
        assert await controls.enable_tools(None, actor=OPERATOR, reason="patched")
    # Refused for good (a tool call is never retried); a call proposed now runs.
    result = await executor.run(signed(), user_id=user)
    assert result.outcome is Outcome.OK and result.output.strip() == "42"


# -- every command: twice is safe, each change audited once -----------------------------


async def test_every_switch_twice_is_safe_and_audited_once(db: Database) -> None:
    controls = IncidentControls(db)
    tenant = (await TenantService(db).create_tenant(f"t-{uuid4().hex[:8]}", "T")).id
    pairs = [
        (controls.freeze_spend, controls.unfreeze_spend, "incident.spend_frozen"),
        (controls.disable_tools, controls.enable_tools, "incident.tools_disabled"),
    ]
    for on, off, action in pairs:
        flips = [
            await on(tenant, actor=OPERATOR, reason="r"),
            await on(tenant, actor=OPERATOR, reason="r"),
            await off(tenant, actor=OPERATOR, reason="r"),
            await off(tenant, actor=OPERATOR, reason="r"),
        ]
        assert flips == [True, False, True, False]
        assert len(await _events(db, tenant, action)) == 1
    name = f"m-{uuid4().hex[:6]}"
    flips = [
        await controls.serve_cached("model", name, actor=OPERATOR, reason="r"),
        await controls.serve_cached("model", name, actor=OPERATOR, reason="r"),
        await controls.serve_live("model", name, actor=OPERATOR, reason="r"),
        await controls.serve_live("model", name, actor=OPERATOR, reason="r"),
    ]
    assert flips == [True, False, True, False]
    served = await _events(db, PLATFORM, "incident.serve_cached")
    assert [e["target"] for e in served].count(f"model:{name}") == 1


async def test_reverted_on_exit_undoes_a_freeze_when_the_drill_is_interrupted(
    db: Database,
) -> None:
    controls, budgets = IncidentControls(db), BudgetService(db)
    tenant = (await TenantService(db).create_tenant(f"t-{uuid4().hex[:8]}", "T")).id
    now = datetime.now(UTC) - timedelta(minutes=1)
    await budgets.set_budget(
        tenant, period_start=now, period_end=now + timedelta(hours=1), call_limit=5, token_limit=500
    )

    async def drill() -> None:
        async with reverted_on_exit() as reverts:
            await controls.freeze_spend(tenant, actor="drill:test", reason="drill")
            reverts.push(
                "spend unfrozen",
                lambda: controls.unfreeze_spend(tenant, actor="drill:test", reason="drill ended"),
            )
            drilled.append(reverts)
            await asyncio.Event().wait()  # until interrupted

    drilled: list[Any] = []
    task = asyncio.ensure_future(drill())
    while not drilled:
        await asyncio.sleep(0)
    with pytest.raises(SpendFrozen):
        await budgets.reserve(tenant, 10)
    task.cancel()  # Ctrl-C
    with pytest.raises(asyncio.CancelledError):
        await task
    assert drilled[0].restored == ["spend unfrozen"]
    assert await budgets.release(await budgets.reserve(tenant, 10))


def test_the_commands_say_already_when_run_twice(
    database: DbHandles, keystore: LocalKeystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line, in process (as ``bastion`` runs it, on this database)."""
    env = {
        "LOGNAME": "alice",
        "BASTION_HOME": str(short_tempdir("bastion-cli-")),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runner, slug = CliRunner(), f"cli-{uuid4().hex[:8]}"
    assert runner.invoke(app, ["tenant", "create", slug]).exit_code == 0
    first = runner.invoke(app, ["incident", "freeze-spend", "--tenant", slug])
    second = runner.invoke(app, ["incident", "freeze-spend", "--tenant", slug])
    lifted = runner.invoke(app, ["incident", "unfreeze-spend", "--tenant", slug])
    assert first.exit_code == second.exit_code == lifted.exit_code == 0, first.output
    assert "spending frozen" in first.output and "already frozen" in second.output
    assert "spending unfrozen" in lifted.output
    nobody = runner.invoke(app, ["incident", "disable-tools", "--tenant", f"x-{uuid4().hex}"])
    assert nobody.exit_code == 1 and "no tenant named" in nobody.output
    neither = runner.invoke(app, ["incident", "serve-cached"])
    assert neither.exit_code == 1 and "--model NAME or --provider NAME" in neither.output


async def test_the_gateway_keeps_the_last_switches_it_read_while_the_database_is_away(
    database: DbHandles, db: Database
) -> None:
    """A failed read neither lifts a freeze nor fails the call: the last state stays."""
    tenant = (await TenantService(db).create_tenant(f"t-{uuid4().hex[:8]}", "T")).id
    controls = IncidentControls(db)
    assert await controls.freeze_spend(tenant, actor=OPERATOR, reason="r")
    assert await controls.serve_cached("model", "m-away", actor=OPERATOR, reason="r")
    try:
        own = Database(database.app, database.context_key, max_size=1)
        await own.open()
        switches = IncidentSwitches(own, ttl_seconds=0)  # read at every call
        assert (await switches.of_tenant(tenant)).spend_frozen
        assert "model:m-away" in await switches.served_cached()
        await own.close()  # the database away: every read fails
        assert (await switches.of_tenant(tenant)).spend_frozen
        assert "model:m-away" in await switches.served_cached()
    finally:
        await controls.unfreeze_spend(tenant, actor=OPERATOR, reason="r")
        await controls.serve_live("model", "m-away", actor=OPERATOR, reason="r")
