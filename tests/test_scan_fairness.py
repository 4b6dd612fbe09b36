"""One tenant's megabytes of personal data do not stall the gateway for another
(issue 23, A3): PII scans of prompts (the vault's tokenization) and of model
answers, plain and streamed, run in the screening processes under the
tenant's share, never on the event loop nor in its default thread pool.

Real parts: the gateway served by uvicorn on 127.0.0.1 with the vault on the
embedded PostgreSQL, an upstream model over HTTP that answers the flooding
tenant with 200 KB of personal data, and a heartbeat task on the gateway's own
event loop that measures how late its 5 ms timer fires.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from bastion.billing.budgets import BudgetService
from bastion.db.pool import Database
from bastion.safety.signing import HEADER, EnvelopeSigner
from bastion.secrets import LocalKeystore
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.gateway_stack import gateway_server
from tests.http_server import running_server

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # timing bounds: see Makefile `test`

API_KEY = "sk-scan-fairness-upstream"
FLOOD = "FLOOD-MARKER"
_rng = random.Random(23)
_VALUES = ["ann.lee@example.com", "+1 415 555 0100", "4111 1111 1111 1111", "10.1.2.3", "a"]
# 200 KB dense with personal data: a third of a second of scanning, or more.
DENSE = " ".join(_rng.choice(_VALUES) for _ in range(30_000))[:200_000]
SHORT_ANSWER = "The refund was issued on the fifth of March."
HEARTBEAT_SECONDS = 0.005


def upstream() -> FastAPI:
    """A model that answers a prompt carrying FLOOD with DENSE (streamed in 8 KB
    pieces with no sentence end, or whole), and anything else with one sentence."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        flood = FLOOD in json.dumps(body["messages"])
        answer = DENSE if flood else SHORT_ANSWER
        usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
        if not body.get("stream"):
            message = {"role": "assistant", "content": answer}
            return {
                "id": "chatcmpl-up",
                "object": "chat.completion",
                "created": 0,
                "model": "up",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }

        async def events() -> AsyncIterator[bytes]:
            for start in range(0, len(answer), 8192):
                piece = answer[start : start + 8192].replace(".", ",")  # no sentence end
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@dataclass
class Gateway:
    url: str
    tenants: dict[str, UUID]
    users: dict[str, UUID]
    lags: list[tuple[float, float]]  # (when, how late the heartbeat fired), on its loop


async def _heartbeat(lags: list[tuple[float, float]]) -> None:
    while True:
        started = time.perf_counter()
        await asyncio.sleep(HEARTBEAT_SECONDS)
        now = time.perf_counter()
        lags.append((now, now - started - HEARTBEAT_SECONDS))


@pytest.fixture(scope="module")
def gateway(database: DbHandles, keystore: LocalKeystore) -> Iterator[Gateway]:
    keystore.set("providers/scan-fairness", API_KEY.encode())
    seeded: dict[str, dict[str, UUID]] = {"tenants": {}, "users": {}}
    lags: list[tuple[float, float]] = []
    tasks: list[asyncio.Task[None]] = []
    with running_server(upstream()) as upstream_url:
        settings = Settings(
            issuer="https://gateway.bastion.test",
            embedder="hashing",
            gateway_models=[
                ModelRoute(
                    name="up",
                    provider="openai_compatible",
                    base_url=f"{upstream_url}/v1",
                    api_key_ref="local://providers/scan-fairness",
                    timeout_seconds=30,
                )
            ],
        )

        async def seed(db: Database) -> None:
            tenants = TenantService(db)
            start = datetime.now(UTC) - timedelta(minutes=1)
            for name in ("flooder", "victim"):
                tenant = (await tenants.create_tenant(f"{name}-{uuid4().hex[:8]}", name)).id
                seeded["tenants"][name] = tenant
                seeded["users"][name] = await tenants.add_member(
                    tenant, f"{name}@scan.test", "viewer"
                )
                await BudgetService(db).set_budget(
                    tenant,
                    period_start=start,
                    period_end=start + timedelta(hours=2),
                    call_limit=100_000,
                    token_limit=10**12,
                )
            tasks.append(asyncio.get_running_loop().create_task(_heartbeat(lags)))

        # Composed as ``bastion serve gateway`` builds it, without the plan gate
        # (these tenants have budgets, no plan).
        with gateway_server(
            database,
            keystore,
            lambda url: settings.model_copy(update={"gateway_public_url": url}),
            seed=seed,
            pool_size=12,
            without_plan_gate=True,
        ) as (url, _gateway):
            yield Gateway(url, seeded["tenants"], seeded["users"], lags)


def _request(
    gw: Gateway, signer: EnvelopeSigner, who: str, turns: list[str], *, stream: bool = False
) -> tuple[bytes, dict[str, str]]:
    messages = [{"role": "user", "content": text} for text in turns]
    body = json.dumps({"model": "up", "messages": messages, "stream": stream}).encode()
    envelope = signer.sign(
        tenant_id=gw.tenants[who], user_id=gw.users[who], body=body, action="question:ask"
    )
    return body, {"Content-Type": "application/json", HEADER: envelope}


async def test_a_tenant_s_flood_of_personal_data_does_not_stall_another_tenant(
    gateway: Gateway, keystore: LocalKeystore
) -> None:
    """Tenant A keeps four requests in flight for 4 s: prompts of 4 turns of
    200 KB dense with personal data (800 KB to tokenize into its vault), each
    answered with 200 KB more of it, half of them streamed. Meanwhile tenant B
    asks short questions one after another.

    Bounds: every B request answers 200 within 0.5 s, and a 5 ms heartbeat on
    the gateway's event loop is late by under 40 ms at p99 (measured: p50
    0.2 ms, p99 ~19 ms; single outliers up to ~200 ms remain, see the report:
    the upstream double and this test's client share the process's GIL). Before the fix
    the tokenization ran in the default thread pool holding the GIL and the
    answers were scanned on the loop: the loop stalled for 100s of ms and B
    waited about as long.
    """
    signer = EnvelopeSigner(keystore)
    flood_statuses: list[int] = []
    victim_times: list[float] = []
    victim_statuses: list[int] = []
    flooding = True

    async def flood(http: httpx.AsyncClient, lane: int) -> None:
        n = 0
        while flooding:
            n += 1
            turns = [f"{FLOOD} {lane}.{n}.{i} {DENSE[:-30]}" for i in range(4)]
            body, headers = _request(gateway, signer, "flooder", turns, stream=bool(lane % 2))
            answer = await http.post(
                f"{gateway.url}/v1/chat/completions", content=body, headers=headers
            )
            flood_statuses.append(answer.status_code)
            if answer.status_code == 429:
                await anyio.sleep(0.05)

    async def victim(http: httpx.AsyncClient) -> None:
        await anyio.sleep(0.5)  # the flood is under way
        while flooding:
            body, headers = _request(
                gateway, signer, "victim", [f"Where is my refund? ({uuid4().hex[:8]})"]
            )
            started = time.perf_counter()
            answer = await http.post(
                f"{gateway.url}/v1/chat/completions", content=body, headers=headers
            )
            victim_times.append(time.perf_counter() - started)
            victim_statuses.append(answer.status_code)
            assert answer.json()["choices"][0]["message"]["content"] == SHORT_ANSWER
            await anyio.sleep(0.05)

    async with httpx.AsyncClient(timeout=60) as http:
        # Warm: the screening processes started, the vault's keys made.
        for who in ("flooder", "victim"):
            body, headers = _request(gateway, signer, who, [f"hello {DENSE[:5000]}"])
            warm = await http.post(
                f"{gateway.url}/v1/chat/completions", content=body, headers=headers
            )
            assert warm.status_code == 200
        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for lane in range(4):
                group.start_soon(flood, http, lane)
            group.start_soon(victim, http)
            await anyio.sleep(4.0)
            flooding = False
        ended = time.perf_counter()

    # The flood was real: its requests were answered (or refused as busy, 429).
    assert flood_statuses and set(flood_statuses) <= {200, 429}, set(flood_statuses)
    assert flood_statuses.count(200) >= 4
    assert len(victim_statuses) >= 5 and set(victim_statuses) == {200}
    assert max(victim_times) < 0.5, f"B waited up to {max(victim_times):.3f} s"
    # The loop's heartbeat during the flood (its clock is this process's).
    during = [lag for when, lag in gateway.lags if started <= when <= ended]
    assert len(during) > 100
    during.sort()
    print(
        f"heartbeat lag p50 {during[len(during) // 2] * 1000:.1f} ms, p99 "
        f"{during[int(len(during) * 0.99)] * 1000:.1f} ms, max {during[-1] * 1000:.1f} ms; "
        f"B max {max(victim_times) * 1000:.0f} ms, flood {len(flood_statuses)}"
    )
    p99 = during[int(len(during) * 0.99)]
    assert p99 < 0.040, f"the gateway's loop was late by {p99 * 1000:.0f} ms at p99"
