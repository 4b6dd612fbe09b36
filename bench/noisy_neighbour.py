"""Benchmark: tenant B's latency while tenant A attacks (issue 23, the noisy neighbour).

Run: .venv/bin/python bench/noisy_neighbour.py [--steady 12] [--attack 15]

The real stack, as in production: an embedded PostgreSQL and ``bastion serve
api``, ``gateway`` and ``worker`` as their own processes; the gateway's
upstream is a local mock (this script, ``--serve-doubles``: a fixed answer, and
400 for ``max_tokens`` above 4096 as a real upstream refuses a malformed
request), beside a slow external OIDC issuer (4 s per discovery or JWKS
answer) that ``BASTION_EXTERNAL_ISSUERS`` names. Every address is 127.0.0.1.

Tenant B, measured from this process, one sequential client per probe:
  api GET       GET /tenants/{B}/members, DPoP token and a fresh proof
  chat          POST /v1/chat/completions, temperature 1 (to the upstream)
  cached chat   the same at temperature 0 on 16 prompts B asked before (hits)
  upload        B's text upload, until the worker has indexed it
  webhook       B's signed Stripe subscription update, until the worker applied it
first in steady state, then while A (a separate process, on the same two cores)
runs each class of attack for a bounded time:
  bad-requests  chat calls the upstream refuses with 400 (A1)
  cache-flood   2048 distinct deterministic prompts: 16x A's cache quota (A4)
  issuer-storm  anonymous tokens naming the slow issuer with unknown kids (A3)
  parser-bombs  3 PDF bombs, then 1 MiB HTML uploads in a loop (A2/A3)
Prints, per attack and probe: B's p50 and p99 in steady state and under attack,
their ratios, and B's errors (there should be none), and what A got back. Upload
and webhook have ~20 samples a phase: their p99 is about their maximum, and the
slowest of each is broken down (api answer, then the database's own timestamps).
The machine is a shared 2-core VM: the attacker's own client and the bombs'
CPU compete with everything else, so ratios well above 1 are expected; errors
and unbounded waits are what must not happen.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import itertools
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import stripe
import uvicorn

from bastion.billing.budgets import BudgetService
from bastion.billing.plans import Plan, PlanCatalogue
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.billing.wiring import build_billing
from bastion.db.launcher import EmbeddedPostgres
from bastion.db.service import resolve_target
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.knowledge.service import Actor
from bastion.runtime import app_database, knowledge_service, open_keystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from wrk_dpop import free_port

# The attacker's PDF bombs are the tests' own (tests/ is a package at the repo root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.pdf_bombs import operator_bomb

PLANS = [
    Plan(
        code=code,
        name=f"Benchmark {code}",
        rank=rank,
        monthly_token_budget=10**12,
        monthly_call_budget=10**9,
        requests_per_minute=10**8,
        models_allowed=("*",),
        overage_policy="block",
        stripe_price_id=f"price_{code}",
    )
    for code, rank in (("bench", 100), ("bench2", 101))
]
MODEL_MAX_TOKENS = 4096  # the mock upstream's limit, as a model's
SLOW_ISSUER_SECONDS = 4.0
# The cache: 512 entries, 4 expected tenants: a quota of 128 entries a tenant.
# One LRU shared by all would lose B's 16 entries to A's flood (2048 prompts).
CACHE_ENTRIES, CACHE_TENANTS = 512, 4
B_PROMPTS = 16
# A bomb costs ~10 s of CPU unbounded; the worker kills it at 3 s (8 s wall).
EXTRACT_CPU_SECONDS, EXTRACT_WALL_SECONDS = 3, 8
B_PAUSE = 0.02  # between two of a probe's requests: a user, not a load test
HTTP_TIMEOUT = 30.0
PROBES = ("api GET", "chat", "cached chat", "upload", "webhook")

# -- the doubles: a mock upstream and a slow OIDC issuer, in one process --------------

ANSWER = json.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The refund was issued."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
).encode()
REFUSAL = json.dumps(
    {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}
).encode()

Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def upstream_app(scope: dict[str, Any], receive: Any, send: Send) -> None:
    """OpenAI-compatible chat completions: 400 for max_tokens over the model's limit."""
    if scope["type"] != "http":
        return
    raw = await _body(receive)
    try:
        max_tokens = json.loads(raw or b"{}").get("max_tokens")
    except ValueError:
        max_tokens = None
    if isinstance(max_tokens, int) and max_tokens > MODEL_MAX_TOKENS:
        await _answer(send, 400, REFUSAL)
    else:
        await _answer(send, 200, ANSWER)


def issuer_app(issuer: str) -> Any:
    """A slow OIDC issuer: discovery and an empty JWK Set, each after SLOW_ISSUER_SECONDS."""
    fetched: Counter[str] = Counter()

    async def app(scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _body(receive)
        path = scope["path"]
        if path == "/stats":
            await _answer(send, 200, json.dumps(fetched).encode())
            return
        fetched[path] += 1
        await asyncio.sleep(SLOW_ISSUER_SECONDS)
        if path == "/.well-known/openid-configuration":
            await _answer(
                send, 200, json.dumps({"issuer": issuer, "jwks_uri": f"{issuer}/jwks"}).encode()
            )
        else:
            await _answer(send, 200, b'{"keys": []}')

    return app


async def serve_doubles(upstream_port: int, issuer_port: int) -> None:
    options: dict[str, Any] = {"host": "127.0.0.1", "log_level": "warning", "access_log": False}
    servers = [
        uvicorn.Server(uvicorn.Config(upstream_app, port=upstream_port, **options)),
        uvicorn.Server(
            uvicorn.Config(
                issuer_app(f"http://127.0.0.1:{issuer_port}"), port=issuer_port, **options
            )
        ),
    ]
    await asyncio.gather(*(server.serve() for server in servers))


# -- tenant A: the attacker, its own process ----------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_token(issuer: str, n: int) -> str:
    """A JWT naming ``issuer`` and a kid it never published; the signature is noise."""
    header = {"alg": "ES256", "typ": "JWT", "kid": f"made-up-{n}-{secrets.token_hex(4)}"}
    claims = {"iss": issuer, "aud": "bench", "sub": f"mallory-{n}", "exp": int(time.time()) + 300}
    parts = (json.dumps(header).encode(), json.dumps(claims).encode(), secrets.token_bytes(64))
    return ".".join(_b64(part) for part in parts)


Request = tuple[str, str, dict[str, str], bytes]


def attack_requests(kind: str, spec: dict[str, Any]) -> Callable[[int], Request]:
    """The ``n``-th request of attack ``kind`` (method, url, headers, body)."""
    key = DpopKey.from_json(spec["dpop_key"])
    token = spec["token"]
    chat, upload = spec["chat_url"], spec["upload_url"]

    def authed(method: str, url: str) -> dict[str, str]:
        proof = key.proof(method, url, access_token=token)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    def chat_body(content: str, **extra: Any) -> bytes:
        messages = [{"role": "user", "content": content}]
        return json.dumps({"model": "bench", "messages": messages, **extra}).encode()

    bomb = operator_bomb(5, 90_000)
    # 1 MiB of tags with no text: the parse is the cost, then it is refused ("empty").
    html = b"<div><b></b><i></i></div>" * ((1 << 20) // 25 - 8)
    json_type = {"Content-Type": "application/json"}

    def make(n: int) -> Request:
        if kind == "bad-requests":
            body = chat_body(f"Summarise ticket {n}", max_tokens=32_768)
            return "POST", chat, {**authed("POST", chat), **json_type}, body
        if kind == "cache-flood":
            body = chat_body(f"flood {n} {secrets.token_hex(8)}", temperature=0)
            return "POST", chat, {**authed("POST", chat), **json_type}, body
        if kind == "issuer-storm":
            forged = {"Authorization": f"Bearer {forged_token(spec['issuer'], n)}"}
            if n % 2:
                return "GET", spec["members_url"], forged, b""
            return "POST", chat, {**forged, **json_type}, chat_body("hello")
        if kind == "parser-bombs":
            bombing = n < spec["bombs"]
            url = f"{upload}?title={'bomb' if bombing else 'page'}-{n}"
            media = "application/pdf" if bombing else "text/html"
            return (
                "POST",
                url,
                {**authed("POST", upload), "Content-Type": media},
                (bomb if bombing else html),
            )
        raise ValueError(kind)

    return make


async def attack(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run attack ``kind`` for ``spec['seconds']`` or ``spec['max_requests']``; return
    how many answers of each status A got, and for how long it attacked."""
    make = attack_requests(kind, spec)
    started = time.monotonic()
    deadline = started + spec["seconds"]
    numbers = itertools.count()
    got: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=spec["concurrency"])
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as http:

        async def lane() -> None:
            while time.monotonic() < deadline:
                n = next(numbers)
                if n >= spec["max_requests"]:
                    return
                method, url, headers, body = make(n)
                try:
                    response = await http.request(method, url, headers=headers, content=body)
                    got[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    got[type(exc).__name__] += 1

        await asyncio.gather(*(lane() for _ in range(spec["concurrency"])))
    return {"statuses": dict(got), "seconds": round(time.monotonic() - started, 1)}


# -- tenant B: the probes -----------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    timings: list[float] = dataclasses.field(default_factory=list)  # ms
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    hits: int = 0
    # The slowest sample's breakdown (ms): answered by the api, then in the database.
    worst: tuple[float, str] = (0.0, "")

    def add(self, total_ms: float, breakdown: str = "") -> None:
        self.timings.append(total_ms)
        if total_ms > self.worst[0]:
            self.worst = (total_ms, breakdown)


@dataclasses.dataclass
class Bench:
    api: str
    gateway: str
    token: str
    key: DpopKey
    tenant: UUID
    customer: str
    secret: str
    next_created: int
    plan_flip: itertools.cycle[str] = dataclasses.field(
        default_factory=lambda: itertools.cycle(["price_bench2", "price_bench"])
    )

    def auth(self, method: str, url: str) -> dict[str, str]:
        proof = self.key.proof(method, url, access_token=self.token)
        return {"Authorization": f"DPoP {self.token}", "DPoP": proof}

    def chat_body(self, content: str, temperature: float) -> bytes:
        messages = [{"role": "user", "content": content}]
        body = {"model": "bench", "messages": messages, "temperature": temperature}
        return json.dumps(body).encode()


async def _timed(
    probe: Probe, send: Awaitable[httpx.Response], ok: int = 200
) -> httpx.Response | None:
    """Await ``send`` (a request not yet started); record its time, or its error."""
    started = time.perf_counter()
    try:
        response = await send
    except httpx.HTTPError as exc:
        probe.errors[type(exc).__name__] += 1
        return None
    if response.status_code != ok:
        probe.errors[str(response.status_code)] += 1
        return None
    probe.timings.append((time.perf_counter() - started) * 1000)
    return response


async def _requests(bench: Bench, name: str, probe: Probe, deadline: float, max_count: int) -> None:
    """A sequential client: B's api GET, chat or cached chat until ``deadline``."""
    members = f"{bench.api}/tenants/{bench.tenant}/members"
    chat = f"{bench.gateway}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        for n in range(max_count):
            if time.monotonic() >= deadline:
                return
            if name == "api GET":
                headers = bench.auth("GET", members)
                await _timed(probe, http.get(members, headers=headers))
            else:
                cached = name == "cached chat"
                body = bench.chat_body(
                    f"B's question {n % B_PROMPTS}" if cached else "When was the refund issued?",
                    0 if cached else 1,
                )
                headers = {**bench.auth("POST", chat), "Content-Type": "application/json"}
                response = await _timed(probe, http.post(chat, headers=headers, content=body))
                if response is not None and response.headers.get("bastion-cache") == "hit":
                    probe.hits += 1
            await asyncio.sleep(B_PAUSE)


async def _until(
    db: psycopg.AsyncConnection[Any], query: str, arg: Any, done: set[str], limit: float
) -> str | None:
    """Poll ``query`` (one status) every 20 ms until it is in ``done``; None on timeout."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        row = await (await db.execute(query, (arg,))).fetchone()
        if row is not None and row[0] in done:
            return str(row[0])
        await asyncio.sleep(0.02)
    return None


async def _server_ms(
    db: psycopg.AsyncConnection[Any], interval: str, where: str, arg: Any
) -> float:
    """``interval`` (two timestamps of one row) in milliseconds, as the database saw it."""
    query = f"SELECT extract(epoch FROM {interval}) * 1000 FROM {where}"
    row = await (await db.execute(query, (arg,))).fetchone()
    return float(row[0]) if row and row[0] is not None else float("nan")


async def _pipeline(
    bench: Bench,
    db: psycopg.AsyncConnection[Any],
    uploads: Probe,
    webhooks: Probe,
    deadline: float,
    max_count: int,
) -> None:
    """B's upload until indexed and B's Stripe webhook until applied, side by side."""
    upload_url = f"{bench.api}/tenants/{bench.tenant}/knowledge/namespaces/docs/documents"
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:

        async def upload(n: int) -> None:
            started = time.perf_counter()
            headers = {**bench.auth("POST", upload_url), "Content-Type": "text/plain"}
            try:
                response = await http.post(
                    upload_url,
                    params={"title": f"ticket {n}"},
                    headers=headers,
                    content=f"Ticket {n}: the export of invoices to CSV stops halfway.".encode(),
                )
            except httpx.HTTPError as exc:
                uploads.errors[type(exc).__name__] += 1
                return
            answered = (time.perf_counter() - started) * 1000
            if response.status_code != 202:
                uploads.errors[str(response.status_code)] += 1
                return
            document = UUID(response.json()["id"])
            status = await _until(
                db,
                "SELECT status FROM bastion.documents WHERE id = %s",
                document,
                {"indexed", "failed"},
                HTTP_TIMEOUT,
            )
            if status != "indexed":
                uploads.errors[status or "not indexed in 30 s"] += 1
                return
            total = (time.perf_counter() - started) * 1000
            stored = await _server_ms(
                db, "indexed_at - created_at", "bastion.documents WHERE id = %s", document
            )
            uploads.add(total, f"api answered {answered:.0f}, stored -> indexed {stored:.0f}")

        async def webhook() -> None:
            # Each a newer version of B's subscription, flipping between two plans.
            bench.next_created += 1
            price = next(bench.plan_flip)
            sub = {
                "id": f"sub_{bench.customer}",
                "object": "subscription",
                "customer": bench.customer,
                "status": "active",
                "cancel_at_period_end": False,
                "items": {"object": "list", "data": [{"price": {"id": price, "object": "price"}}]},
                "livemode": False,
            }
            event_id = f"evt_{uuid4().hex}"
            event = {
                "id": event_id,
                "object": "event",
                "created": bench.next_created,
                "type": "customer.subscription.updated",
                "livemode": False,
                "data": {"object": sub},
            }
            body = json.dumps(event, separators=(",", ":"))
            signature = stripe.WebhookSignature.generate_signature_header(body, bench.secret)
            started = time.perf_counter()
            try:
                response = await http.post(
                    f"{bench.api}/webhooks/stripe",
                    content=body,
                    headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                webhooks.errors[type(exc).__name__] += 1
                return
            answered = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                webhooks.errors[str(response.status_code)] += 1
                return
            status = await _until(
                db,
                "SELECT status FROM bastion.webhook_events WHERE provider = 'stripe' "
                "AND event_id = %s",
                event_id,
                {"applied", "stale", "ignored", "failed"},
                HTTP_TIMEOUT,
            )
            if status != "applied":
                webhooks.errors[status or "not applied in 30 s"] += 1
                return
            total = (time.perf_counter() - started) * 1000
            stored = await _server_ms(
                db,
                "applied_at - received_at",
                "bastion.webhook_events WHERE provider = 'stripe' AND event_id = %s",
                event_id,
            )
            webhooks.add(total, f"api answered {answered:.0f}, stored -> applied {stored:.0f}")

        for n in range(max_count):
            if time.monotonic() >= deadline:
                return
            await asyncio.gather(upload(n), webhook())
            await asyncio.sleep(0.3)


async def measure_b(
    bench: Bench, db: psycopg.AsyncConnection[Any], seconds: float
) -> dict[str, Probe]:
    probes = {name: Probe() for name in PROBES}
    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(_requests(bench, name, probes[name], deadline, 2000) for name in PROBES[:3]),
        _pipeline(bench, db, probes["upload"], probes["webhook"], deadline, 20),
    )
    return probes


# -- the run ------------------------------------------------------------------------------

ATTACKS: dict[str, dict[str, Any]] = {
    "bad-requests": {"concurrency": 8, "max_requests": 20_000},
    "cache-flood": {"concurrency": 8, "max_requests": 4 * CACHE_ENTRIES},
    "issuer-storm": {"concurrency": 8, "max_requests": 20_000},
    "parser-bombs": {"concurrency": 2, "max_requests": 200, "bombs": 3},
}


def _quantiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=100, method="inclusive")[98]


def _errors(probe: Probe) -> str:
    return ", ".join(f"{k}x{v}" for k, v in probe.errors.items()) or "0"


def report(steady: dict[str, Probe], attacked: dict[str, dict[str, Probe]]) -> None:
    """The table; then the slowest upload and webhook of each phase, where the time went."""
    print(
        f"\n{'attack':13} {'B probe':12} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'steady p50':>10} {'steady p99':>10} {'p50 x':>6} {'p99 x':>6}  B errors"
    )
    for name, probe in steady.items():
        p50, p99 = _quantiles(probe.timings)
        hits = f" (hits {probe.hits}/{len(probe.timings)})" if name == "cached chat" else ""
        print(
            f"{'(steady)':13} {name:12} {len(probe.timings):>5} {p50:>8.1f} {p99:>8.1f} "
            f"{'':>10} {'':>10} {'':>6} {'':>6}  {_errors(probe)}{hits}"
        )
    for attack_name, probes in attacked.items():
        for name, probe in probes.items():
            p50, p99 = _quantiles(probe.timings)
            s50, s99 = _quantiles(steady[name].timings)
            hits = f" (hits {probe.hits}/{len(probe.timings)})" if name == "cached chat" else ""
            print(
                f"{attack_name:13} {name:12} {len(probe.timings):>5} {p50:>8.1f} {p99:>8.1f} "
                f"{s50:>10.1f} {s99:>10.1f} {p50 / s50:>6.2f} {p99 / s99:>6.2f}  "
                f"{_errors(probe)}{hits}"
            )
    print("\nslowest of B's uploads and webhooks per phase (ms):")
    for phase, probes in {"(steady)": steady, **attacked}.items():
        for name in ("upload", "webhook"):
            total, breakdown = probes[name].worst
            print(f"  {phase:13} {name:8} {total:7.0f}  {breakdown}")


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the {what} exited while starting")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the {what} did not come up at {url}")


async def _pending_of(db: psycopg.AsyncConnection[Any], tenant: UUID) -> int:
    row = await (
        await db.execute(
            "SELECT count(*) FROM bastion.documents WHERE tenant_id = %s AND status = 'pending'",
            (tenant,),
        )
    ).fetchone()
    return int(row[0]) if row else 0


async def run(steady_seconds: float, attack_seconds: float) -> None:
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    ports = {name: free_port() for name in ("api", "gateway", "worker", "upstream", "issuer")}
    issuer = f"http://127.0.0.1:{ports['issuer']}"
    models = [
        {
            "name": "bench",
            "provider": "openai_compatible",
            "base_url": f"http://127.0.0.1:{ports['upstream']}/v1",
            "api_key_ref": "local://providers/mock",
        }
    ]
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "BASTION_API_PORT": str(ports["api"]),
        "BASTION_GATEWAY_PORT": str(ports["gateway"]),
        "BASTION_WORKER_PORT": str(ports["worker"]),
        "BASTION_LOG_LEVEL": "warning",
        "BASTION_EMBEDDER": "hashing",
        "BASTION_GATEWAY_MODELS": json.dumps(models),
        "BASTION_GATEWAY_CACHE_ENTRIES": str(CACHE_ENTRIES),
        "BASTION_GATEWAY_CACHE_EXPECTED_TENANTS": str(CACHE_TENANTS),
        "BASTION_EXTERNAL_ISSUERS": json.dumps([{"issuer": issuer, "audience": "bench"}]),
        "BASTION_EXTRACT_CPU_SECONDS": str(EXTRACT_CPU_SECONDS),
        "BASTION_EXTRACT_WALL_SECONDS": str(EXTRACT_WALL_SECONDS),
    }
    env.pop("DATABASE_URL", None)
    settings = Settings(
        home=home,
        api_port=ports["api"],
        gateway_port=ports["gateway"],
        embedder="hashing",
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    # BENCH_VERBOSE=1 shows the processes' logs.
    stderr = None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": stderr}
    keys_dir = settings.resolved_keystore_file.parent
    try:
        started = time.monotonic()
        keystore = open_keystore(settings)
        keystore.set("providers/mock", b"sk-mock")
        secret = f"whsec_{uuid4().hex}"
        keystore.set(settings.stripe_webhook_secret_ref.removeprefix("local://"), secret.encode())
        tenants: dict[str, UUID] = {}
        users: dict[str, UUID] = {}
        customer = f"cus_bench_{uuid4().hex[:10]}"
        async with app_database(settings, migrate=True, max_size=2) as db:
            service = TenantService(db)
            catalogue = PlanCatalogue(db)
            for plan in PLANS:
                await catalogue.put(plan, actor="bench")
            approvals = build_billing(settings, db, keystore).approvals
            kb = knowledge_service(settings, db, keystore)
            for name in ("a", "b"):
                tenant = (await service.create_tenant(f"noisy-{name}", f"Tenant {name}")).id
                owner = await service.add_member(tenant, f"owner@{name}.bench.example", "owner")
                users[name] = await service.add_member(
                    tenant, f"writer@{name}.bench.example", "contributor"
                )
                await kb.create_namespace(Actor(tenant, owner, "owner"), "docs")
                # A plan that admits the model at any rate (two operators, outside Stripe).
                request = await approvals.request_tenant_plan(
                    tenant, "bench", operator="operator:bench", reason="benchmark"
                )
                await approvals.approve(request.id, operator="operator:bench-approver")
                start = datetime.now(UTC) - timedelta(minutes=1)
                await BudgetService(db).set_budget(
                    tenant,
                    period_start=start,
                    period_end=start + timedelta(days=1),
                    call_limit=10**9,
                    token_limit=10**12,
                )
                tenants[name] = tenant
            await BillingService(db, EventCipher(keystore)).link_stripe_customer(
                tenants["b"], customer
            )
        admin = resolve_target(settings, start=False).admin_conninfo_on_db()
        issuer_of_tokens = settings.resolved_issuer
        token_issuer = TokenIssuer(
            SigningKeys(keystore),
            issuer=issuer_of_tokens,
            audience=issuer_of_tokens,
            lifetime=timedelta(minutes=15),
        )
        dpop_keys = {name: DpopKey.generate() for name in tenants}
        tokens = {
            name: token_issuer.issue_access(
                user_id=users[name],
                tenant_id=tenants[name],
                roles=("contributor",),
                amr=("pwd",),
                jkt=dpop_keys[name].thumbprint,
                auth_time=int(time.time()),
            )[0]
            for name in tenants
        }
        procs["doubles"] = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve-doubles",
                str(ports["upstream"]),
                str(ports["issuer"]),
            ],
            **quiet,
        )
        for process in ("api", "gateway", "worker"):
            procs[process] = subprocess.Popen(
                [sys.executable, "-m", "bastion", "serve", process], env=env, **quiet
            )
        for process in ("api", "gateway", "worker"):
            await _wait_ready(f"http://127.0.0.1:{ports[process]}/readyz", procs[process], process)
        await _wait_ready(f"{issuer}/stats", procs["doubles"], "doubles")
        api, gateway = (f"http://127.0.0.1:{ports[p]}" for p in ("api", "gateway"))
        bench = Bench(
            api=api,
            gateway=gateway,
            token=tokens["b"],
            key=dpop_keys["b"],
            tenant=tenants["b"],
            customer=customer,
            secret=secret,
            next_created=int(time.time()) - 3600,
        )
        # B asks its 16 questions once: later, each must be a cache hit.
        warm = Probe()
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            chat = f"{gateway}/v1/chat/completions"
            for i in range(B_PROMPTS):
                body = bench.chat_body(f"B's question {i}", 0)
                headers = {**bench.auth("POST", chat), "Content-Type": "application/json"}
                await _timed(warm, http.post(chat, headers=headers, content=body))
        if warm.errors:
            raise RuntimeError(f"B's warm-up calls failed: {dict(warm.errors)}")
        print(
            f"stack up in {time.monotonic() - started:.1f} s: embedded PostgreSQL, api, "
            f"gateway, worker (2 ingest slots, extraction {EXTRACT_CPU_SECONDS} s CPU / "
            f"{EXTRACT_WALL_SECONDS} s wall), cache {CACHE_ENTRIES} entries / "
            f"{CACHE_TENANTS} tenants, slow issuer {SLOW_ISSUER_SECONDS:.0f} s per fetch"
        )
        spec_common = {
            "chat_url": f"{gateway}/v1/chat/completions",
            "upload_url": f"{api}/tenants/{tenants['a']}/knowledge/namespaces/docs/documents",
            "members_url": f"{api}/tenants/{tenants['a']}/members",
            "issuer": issuer,
            "token": tokens["a"],
            "dpop_key": dpop_keys["a"].to_json(),
            "seconds": attack_seconds,
        }
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            steady = await measure_b(bench, conn, steady_seconds)
            attacked: dict[str, dict[str, Probe]] = {}
            got: dict[str, str] = {}
            for kind, params in ATTACKS.items():
                spec_file = home / f"attack-{kind}.json"
                spec_file.write_text(json.dumps({**spec_common, **params}))
                spec_file.chmod(0o600)
                attacker = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--attacker",
                    kind,
                    str(spec_file),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=stderr,
                )
                await asyncio.sleep(0.5)  # let A's load build up
                attacked[kind] = await measure_b(bench, conn, attack_seconds - 0.5)
                try:
                    out, _ = await asyncio.wait_for(attacker.communicate(), HTTP_TIMEOUT + 5)
                    got[kind] = out.decode().strip()
                except TimeoutError:
                    attacker.kill()
                    got[kind] = "(attacker killed: did not finish)"
                if kind == "parser-bombs":
                    # A's bombs end within their limits, one at a time (A holds one slot).
                    deadline = time.monotonic() + ATTACKS[kind]["bombs"] * EXTRACT_WALL_SECONDS + 10
                    while await _pending_of(conn, tenants["a"]) and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                    rows = await (
                        await conn.execute(
                            "SELECT status, coalesce(failure_reason, '-'), count(*) "
                            "FROM bastion.documents WHERE tenant_id = %s GROUP BY 1, 2",
                            (tenants["a"],),
                        )
                    ).fetchall()
                    got[kind] += f"; A's documents: {sorted(rows)}"
        async with httpx.AsyncClient(timeout=5) as http:
            fetches = (await http.get(f"{issuer}/stats")).json()
        report(steady, attacked)
        print("\nwhat A got back (status: count):")
        for kind, text in got.items():
            print(f"  {kind:13} {text}")
        print(f"  slow issuer fetched (discovery, JWKS) by api and gateway: {fetches}")
        alive = {name: proc.poll() is None for name, proc in procs.items()}
        print(f"processes alive at the end: {alive}")
        print(f"total {time.monotonic() - started:.0f} s")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)
        if keys_dir.name == f"{home.name}-keys":  # the key ring beside the home
            shutil.rmtree(keys_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=float, default=12.0, help="seconds of steady state")
    parser.add_argument("--attack", type=float, default=15.0, help="seconds of each attack")
    parser.add_argument("--serve-doubles", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--attacker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_doubles:
        asyncio.run(serve_doubles(*args.serve_doubles))
    elif args.attacker:
        kind, spec_file = args.attacker
        spec = json.loads(Path(spec_file).read_text())
        print(json.dumps(asyncio.run(attack(kind, spec)), sort_keys=True))
    else:
        asyncio.run(run(args.steady, args.attack))


if __name__ == "__main__":
    main()
