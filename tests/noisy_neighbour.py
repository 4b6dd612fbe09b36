"""The noisy neighbour (issue 23): what tenant A attacks with and how tenant B is measured.

Shared by ``bench/noisy_neighbour.py`` (B's latency per attack, reported) and
``tests/test_noisy_neighbour.py`` (every attack at once, B's bounds asserted).

* The doubles, one process (``python -m tests.noisy_neighbour --serve-doubles
  UPSTREAM_PORT ISSUER_PORT``): an OpenAI-compatible upstream that refuses
  ``max_tokens`` above :data:`MODEL_MAX_TOKENS` with 400 as a real one does,
  fails (500) on a prompt carrying :data:`CRASH` (a fault a tenant can
  induce), and fails everything (503) while ``POST /control/outage`` says so;
  and a slow OIDC issuer (:data:`SLOW_ISSUER_SECONDS` per discovery or JWKS
  answer) whose ``/stats`` counts its fetches.
* Tenant A, its own process (``--attacker KIND[,KIND...] SPEC_FILE``): prints
  ``ready`` once loaded and waits for a line on stdin; then each kind runs
  ``concurrency`` lanes of its worst requests until ``seconds`` or
  ``max_requests``; last it prints a JSON line: per kind, how many answers of
  each status it got.
* Tenant B: sequential probes from the caller's event loop (api GET, chat,
  cached chat), and its upload until indexed and its signed Stripe webhook
  until applied, timed to the database's own status.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import itertools
import json
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from uuid import UUID, uuid4

import httpx
import psycopg
import stripe
import uvicorn

from bastion.billing.approvals import PlanApprovals
from bastion.billing.budgets import BudgetService
from bastion.billing.plans import Plan, PlanCatalogue
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, s256
from bastion.identity.tokens import TokenIssuer
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.pdf_bombs import operator_bomb

# Two plans that admit the model "bench" at any rate; B's webhooks flip between them.
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
        monthly_price=price,
        currency="usd",
    )
    for code, rank, price in (("bench", 100, 4900), ("bench2", 101, 9900))
]
PRICES = {str(plan.stripe_price_id): plan for plan in PLANS}
MODEL = "bench"
MODEL_MAX_TOKENS = 4096  # the mock upstream's limit, as a model's
CRASH = "<<upstream-crash>>"  # a prompt the upstream fails on (500): a fault A can induce
SLOW_ISSUER_SECONDS = 4.0
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
FAULT = json.dumps({"error": {"message": "internal error", "type": "server_error"}}).encode()

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


def upstream_app() -> Any:
    """OpenAI-compatible chat completions: 400 for max_tokens over the model's
    limit, 500 for a prompt carrying CRASH, 503 for everything during an outage."""
    outage = [False]

    async def app(scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await _body(receive)
        if scope["path"] == "/control/outage":
            outage[0] = json.loads(raw)["outage"]
            await _answer(send, 200, b"{}")
            return
        if outage[0]:
            await _answer(send, 503, FAULT)
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens > MODEL_MAX_TOKENS:
            await _answer(send, 400, REFUSAL)
        elif CRASH in json.dumps(body.get("messages")):
            await _answer(send, 500, FAULT)
        else:
            await _answer(send, 200, ANSWER)

    return app


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
        uvicorn.Server(uvicorn.Config(upstream_app(), port=upstream_port, **options)),
        uvicorn.Server(
            uvicorn.Config(
                issuer_app(f"http://127.0.0.1:{issuer_port}"), port=issuer_port, **options
            )
        ),
    ]
    await asyncio.gather(*(server.serve() for server in servers))


def gateway_models(upstream_port: int, api_key_ref: str) -> str:
    """``BASTION_GATEWAY_MODELS``: the model "bench", one target, the mock upstream."""
    return json.dumps(
        [
            {
                "name": MODEL,
                "provider": "openai_compatible",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key_ref": api_key_ref,
            }
        ]
    )


# -- the two tenants ----------------------------------------------------------------------


@dataclasses.dataclass
class Tenants:
    ids: dict[str, UUID]
    slugs: dict[str, str]
    writers: dict[str, UUID]  # a contributor of each: the one whose token is used


async def seed_tenants(
    db: Database, approvals: PlanApprovals, kb: KnowledgeService, names: Sequence[str]
) -> Tenants:
    """The plans, and per tenant: an owner, a contributor, a namespace "docs", the
    plan "bench" (two operators, outside Stripe) and a budget nothing exhausts."""
    catalogue = PlanCatalogue(db)
    for plan in PLANS:
        await catalogue.put(plan, actor="bench")
    service = TenantService(db)
    made = Tenants({}, {}, {})
    for name in names:
        slug = f"noisy-{name}-{uuid4().hex[:6]}"
        tenant = (await service.create_tenant(slug, f"Tenant {name}")).id
        owner = await service.add_member(tenant, f"owner@{name}.bench.example", "owner")
        made.writers[name] = await service.add_member(
            tenant, f"writer@{name}.bench.example", "contributor"
        )
        await kb.create_namespace(Actor(tenant, owner, "owner"), "docs")
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
        made.ids[name], made.slugs[name] = tenant, slug
    return made


def access_tokens(
    keystore: LocalKeystore, issuer: str, tenants: Tenants
) -> dict[str, tuple[str, DpopKey]]:
    """Each tenant's contributor: a DPoP-bound access token of the api at ``issuer``."""
    token_issuer = TokenIssuer(
        SigningKeys(keystore), issuer=issuer, audience=issuer, lifetime=timedelta(minutes=15)
    )
    tokens = {}
    for name, tenant in tenants.ids.items():
        key = DpopKey.generate()
        token = token_issuer.issue_access(
            user_id=tenants.writers[name],
            tenant_id=tenant,
            roles=("contributor",),
            amr=("pwd",),
            jkt=key.thumbprint,
            auth_time=int(time.time()),
        )[0]
        tokens[name] = (token, key)
    return tokens


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
# 1 MiB of tags with no text: the parse is the cost, then it is refused ("empty").
HTML_FLOOD = b"<div><b></b><i></i></div>" * ((1 << 20) // 25 - 8)
# A bomb: ~10 s of CPU to extract, unbounded; 15 KB, under the operator bounds.
PDF_BOMB_SHAPE = (5, 90_000)


def attack_requests(kind: str, spec: dict[str, Any]) -> Callable[[int], Request]:
    """The ``n``-th request of attack ``kind`` (method, url, headers, body):

    bad-requests    chat calls the upstream refuses with 400 (A1)
    induced-faults  chat calls the upstream fails on with 500 (A1)
    cache-flood     distinct deterministic prompts (A4)
    issuer-storm    anonymous tokens naming the slow issuer with unknown kids (A3)
    parser-bombs    ``spec['bombs']`` PDF bombs, then 1 MiB HTML uploads (A2/A3)
    password-flood  anonymous sign-ins to A with unknown e-mails: argon2 each (A3)
    """
    key = DpopKey.from_json(spec["dpop_key"])
    token = spec["token"]
    chat, upload = spec["chat_url"], spec["upload_url"]

    def authed(method: str, url: str) -> dict[str, str]:
        proof = key.proof(method, url, access_token=token)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    def chat_body(content: str, **extra: Any) -> bytes:
        messages = [{"role": "user", "content": content}]
        return json.dumps({"model": MODEL, "messages": messages, **extra}).encode()

    bomb = operator_bomb(*PDF_BOMB_SHAPE) if kind == "parser-bombs" else b""
    json_type = {"Content-Type": "application/json"}

    def make(n: int) -> Request:
        if kind == "bad-requests":
            body = chat_body(f"Summarise ticket {n}", max_tokens=32_768)
            return "POST", chat, {**authed("POST", chat), **json_type}, body
        if kind == "induced-faults":
            body = chat_body(f"Summarise ticket {n} {CRASH}", temperature=1)
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
                (bomb if bombing else HTML_FLOOD),
            )
        if kind == "password-flood":
            form = {
                "response_type": "code",
                "client_id": CLI_CLIENT_ID,
                "redirect_uri": CLI_REDIRECT_URI,
                "scope": "openid",
                "state": "st",
                "code_challenge": s256(secrets.token_urlsafe(48)),
                "code_challenge_method": "S256",
                "tenant": spec["tenant_slug"],
                "email": f"nobody-{n}-{secrets.token_hex(4)}@flood.example",
                "password": "not the password, at all",
            }
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            return "POST", spec["authorize_url"], headers, urlencode(form).encode()
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


async def attack_all(kinds: Sequence[str], spec: dict[str, Any]) -> dict[str, Any]:
    """Every kind at once; ``spec[kind]`` overrides the common fields for that kind."""
    results = await asyncio.gather(*(attack(kind, {**spec, **spec[kind]}) for kind in kinds))
    return dict(zip(kinds, results, strict=True))


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
    prompts: int = 16  # B's cached questions
    plan_flip: itertools.cycle[str] = dataclasses.field(
        default_factory=lambda: itertools.cycle(["price_bench2", "price_bench"])
    )

    def auth(self, method: str, url: str) -> dict[str, str]:
        proof = self.key.proof(method, url, access_token=self.token)
        return {"Authorization": f"DPoP {self.token}", "DPoP": proof}

    def chat_body(self, content: str, temperature: float) -> bytes:
        messages = [{"role": "user", "content": content}]
        body = {"model": MODEL, "messages": messages, "temperature": temperature}
        return json.dumps(body).encode()

    def question(self, n: int) -> str:
        """B's ``n``-th cached question (one of ``prompts``)."""
        return f"B's question {n % self.prompts}"

    async def ask(
        self, http: httpx.AsyncClient, content: str, temperature: float
    ) -> httpx.Response:
        chat = f"{self.gateway}/v1/chat/completions"
        headers = {**self.auth("POST", chat), "Content-Type": "application/json"}
        return await http.post(chat, headers=headers, content=self.chat_body(content, temperature))


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
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        for n in range(max_count):
            if time.monotonic() >= deadline:
                return
            if name == "api GET":
                headers = bench.auth("GET", members)
                await _timed(probe, http.get(members, headers=headers))
            else:
                cached = name == "cached chat"
                content = bench.question(n) if cached else "When was the refund issued?"
                response = await _timed(probe, bench.ask(http, content, 0 if cached else 1))
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
            plan = PRICES[next(bench.plan_flip)]
            # Exactly the plan's price: a recurring monthly price of its amount.
            price = {
                "id": plan.stripe_price_id,
                "object": "price",
                "unit_amount": plan.monthly_price,
                "currency": plan.currency,
                "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
            }
            sub = {
                "id": f"sub_{bench.customer}",
                "object": "subscription",
                "customer": bench.customer,
                "status": "active",
                "cancel_at_period_end": False,
                "items": {"object": "list", "data": [{"price": price, "quantity": 1}]},
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
    bench: Bench,
    db: psycopg.AsyncConnection[Any],
    seconds: float,
    probes: Sequence[str] = PROBES,
    max_pipeline: int = 20,
) -> dict[str, Probe]:
    """B's ``probes`` side by side for ``seconds`` (upload and webhook: at most
    ``max_pipeline`` of each, and each followed to its end)."""
    measured = {name: Probe() for name in PROBES}
    deadline = time.monotonic() + seconds
    requests = [name for name in probes if name in PROBES[:3]]
    pipeline = (
        [_pipeline(bench, db, measured["upload"], measured["webhook"], deadline, max_pipeline)]
        if "upload" in probes or "webhook" in probes
        else []
    )
    await asyncio.gather(
        *(_requests(bench, name, measured[name], deadline, 2000) for name in requests), *pipeline
    )
    return {name: measured[name] for name in probes}


def quantiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 (NaN of nothing; one value is both)."""
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description="the noisy neighbour's doubles and attacker")
    parser.add_argument("--serve-doubles", nargs=2, type=int, metavar=("UPSTREAM", "ISSUER"))
    parser.add_argument("--attacker", nargs=2, metavar=("KINDS", "SPEC_FILE"))
    args = parser.parse_args()
    if args.serve_doubles:
        asyncio.run(serve_doubles(*args.serve_doubles))
    elif args.attacker:
        kinds, spec_file = args.attacker
        spec = json.loads(Path(spec_file).read_text())
        print("ready", flush=True)  # loaded: the attack starts at the caller's "go"
        sys.stdin.readline()
        print(json.dumps(asyncio.run(attack_all(kinds.split(","), spec)), sort_keys=True))
    else:
        parser.error("--serve-doubles or --attacker")


if __name__ == "__main__":
    main()
