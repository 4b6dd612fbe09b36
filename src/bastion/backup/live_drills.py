"""Drills against running processes under steady load (issue 20, item 3):
key revocation and a provider outage.

Each drill talks real HTTP to a running api and gateway (whoever started them:
``bastion drill`` starts them in-process on a scratch server, the tests on
theirs), with DPoP-bound access tokens minted from the key ring the processes
verify with, and records every request's moment and outcome:

* ``revoke-keys``: old tokens are sent to the api and the gateway without
  pause; ``bastion incident revoke-keys`` runs mid-way. The figure is the
  time from the revocation's start until *every* process refuses the old
  token for good (the first refusal after its last acceptance; target ≤ 2 s).
  A token minted after the revocation must work at once on both, and each
  refusal must be RFC 9457 problem+json of type ``unauthorized``.
* ``provider-outage``: a warm cache (each question answered once live), steady
  chat load, then the provider double goes down (5xx). The figure is the time
  until the first answer from the tenant's cache marked ``Bastion-Cache:
  stale-fallback`` (target ≤ 1 s), then the time until a live answer after
  the provider is back. Every request during the outage must be answered.

A request's outcome falls in one of three bins per quarter second: ``ok``,
``refused`` (what the drill expects to be refused: an old token after the
revocation) and ``failed`` (an error: the error rate over time). Ctrl-C (a
cancellation) ends the load, brings the provider double back up through
:func:`bastion.incident.controls.reverted_on_exit` and says so in the result.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, Protocol
from uuid import UUID, uuid4

import httpx
import stripe

from bastion import audit
from bastion.backup.drills import BIN_SECONDS, DrillResult
from bastion.billing.service import BillingService
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.incident.controls import reverted_on_exit
from bastion.incident.service import IncidentService
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets.protocols import Keystore
from bastion.tenants.service import TenantService

REVOCATION_TARGET_SECONDS = 2.0
CACHED_ANSWER_TARGET_SECONDS = 1.0
PROBLEM = "https://bastion.dev/problems/"
Outcome = Literal["ok", "refused", "failed"]


@dataclass
class Load:
    """Every request a drill made: (seconds since the drill began, label, outcome)."""

    started: float = field(default_factory=time.monotonic)
    requests: list[tuple[float, str, Outcome]] = field(default_factory=list)

    def note(self, label: str, outcome: Outcome) -> float:
        moment = time.monotonic() - self.started
        self.requests.append((moment, label, outcome))
        return moment

    def timeline(self) -> list[dict[str, float | int]]:
        bins: dict[int, dict[str, int]] = {}
        for moment, _label, outcome in self.requests:
            slot = bins.setdefault(int(moment / BIN_SECONDS), {"ok": 0, "refused": 0, "failed": 0})
            slot[outcome] += 1
        return [{"t": round(k * BIN_SECONDS, 2), **v} for k, v in sorted(bins.items())]

    def failed(self) -> int:
        return sum(1 for _m, _l, outcome in self.requests if outcome == "failed")


@dataclass(frozen=True)
class Member:
    """Who the drill's load acts as: a contributor of a tenant."""

    tenant: UUID
    user: UUID


class Caller:
    """A member's DPoP client with an access token the key ring signs now."""

    def __init__(self, keystore: Keystore, issuer: str, member: Member) -> None:
        self.key = DpopKey.generate()
        self.token, _ = TokenIssuer(
            SigningKeys(keystore), issuer=issuer, audience=issuer, lifetime=timedelta(minutes=15)
        ).issue_access(
            user_id=member.user,
            tenant_id=member.tenant,
            roles=("contributor",),
            amr=("pwd", "mfa"),
            jkt=self.key.thumbprint,
            auth_time=int(time.time()),
        )

    async def send(
        self, client: httpx.AsyncClient, method: str, url: str, **kw: object
    ) -> httpx.Response:
        headers = {
            "Authorization": f"DPoP {self.token}",
            "DPoP": self.key.proof(method, url, access_token=self.token),
        }
        return await client.request(method, url, headers=headers, **kw)  # type: ignore[arg-type]


def _unauthorized(answer: httpx.Response) -> bool:
    """A refusal as the drill expects it: 401 problem+json of type ``unauthorized``."""
    return (
        answer.status_code == 401
        and answer.headers.get("content-type", "").startswith("application/problem+json")
        and answer.json().get("type") == f"{PROBLEM}unauthorized"
    )


# -- revoke-keys ---------------------------------------------------------------------------


async def revoke_keys_drill(
    *,
    api_url: str,
    gateway_url: str,
    issuer: str,
    member: Member,
    keystore: Keystore,
    incident: IncidentService,
    before: float = 1.0,
    after: float = 2.5,
    actor: str = "operator:drill",
) -> DrillResult:
    """Old tokens under steady load on the api and the gateway; revoke the keys;
    measure until every process refuses them; new tokens work at once."""
    result = DrillResult(
        "revoke-keys",
        targets={
            "every_process_refuses_seconds": f"<= {REVOCATION_TARGET_SECONDS:g}",
            "new_token_failures": "0",
            "old_token_accepted_after_refusal": "0",
        },
    )
    targets = {
        "api": f"{api_url}/tenants/{member.tenant}/knowledge/namespaces",
        "gateway": f"{gateway_url}/v1/models",
    }
    load = Load()
    revoked_at: float | None = None
    new: Caller | None = None
    # Per process: the moments the old token was accepted / refused after the revocation.
    old_ok: dict[str, list[float]] = {name: [] for name in targets}
    old_refused: dict[str, list[float]] = {name: [] for name in targets}
    new_ok: dict[str, list[float]] = {name: [] for name in targets}
    new_refused: dict[str, list[float]] = {name: [] for name in targets}
    stop = asyncio.Event()

    async def hammer(client: httpx.AsyncClient, name: str, url: str) -> None:
        old = Caller(keystore, issuer, member)
        while not stop.is_set():
            for who, caller in (("old", old), ("new", new)):
                if caller is None:
                    continue
                try:
                    answer = await caller.send(client, "GET", url)
                except httpx.HTTPError:
                    load.note(f"{who}:{name}", "failed")
                    continue
                label = f"{who}:{name}"
                if answer.status_code == 200:
                    moment = load.note(label, "ok")
                    if revoked_at is not None:
                        (old_ok if who == "old" else new_ok)[name].append(moment)
                elif revoked_at is not None and _unauthorized(answer):
                    # Expected: the old token from now on; the new one until the
                    # process re-reads the key ring (at most a second).
                    moment = load.note(label, "refused")
                    (old_refused if who == "old" else new_refused)[name].append(moment)
                else:
                    load.note(label, "failed")
            await asyncio.sleep(0.01)

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            tasks = [asyncio.create_task(hammer(client, n, u)) for n, u in targets.items()]
            try:
                await asyncio.sleep(before)
                revoked_at = time.monotonic() - load.started
                result.mark("revoke-keys", revoked_at)
                kinds = await incident.revoke_keys(actor=actor, reason="drill revoke-keys")
                new = Caller(keystore, issuer, member)  # signed by the new keys
                await asyncio.sleep(after)
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        result.interrupted = True
        result.note = (
            "interrupted: the load stopped; revoked keys are not restored (they are "
            "presumed leaked): the new keys stay"
        )
        result.timeline = load.timeline()
        return result
    assert revoked_at is not None
    refuses = {n: _settled(old_ok[n], old_refused[n], revoked_at) for n in targets}
    accepts = {n: _settled(new_refused[n], new_ok[n], revoked_at) for n in targets}
    regressions = sum(_after_first(old_ok[n], old_refused[n]) for n in targets)
    new_regressions = sum(_after_first(new_refused[n], new_ok[n]) for n in targets)
    every = _worst(refuses.values())
    every_new = _worst(accepts.values())
    failed = load.failed()
    result.figures = {
        "kinds_revoked": len(kinds),
        "api_refuses_seconds": _figure(refuses["api"]),
        "gateway_refuses_seconds": _figure(refuses["gateway"]),
        "every_process_refuses_seconds": _figure(every),
        "old_token_accepted_after_refusal": regressions,
        "every_process_accepts_new_seconds": _figure(every_new),
        "new_token_refused_after_acceptance": new_regressions,
        "new_token_requests_ok": sum(len(v) for v in new_ok.values()),
        "failed_requests": failed,
        "requests": len(load.requests),
    }
    result.passed = (
        every is not None
        and every <= REVOCATION_TARGET_SECONDS
        and every_new is not None
        and every_new <= REVOCATION_TARGET_SECONDS
        and regressions == 0
        and new_regressions == 0
        and failed == 0
        and bool(kinds)
    )
    result.note = (
        f"kinds revoked: {', '.join(kinds) or 'none (already revoked within a minute)'}; "
        "refused = a 401 unauthorized the drill expects: an old token after the "
        "revocation, a new one until the process re-reads the key ring"
    )
    result.timeline = load.timeline()
    return result


def _settled(before: list[float], after: list[float], origin: float) -> float | None:
    """Seconds from ``origin`` until the outcome ``after`` held for good: the
    first one after the last ``before`` (None if it never held)."""
    last = max(before, default=origin)
    held = [moment for moment in after if moment >= last]
    return held[0] - origin if held else None


def _after_first(wrong: list[float], right: list[float]) -> int:
    """How many ``wrong`` outcomes came after the first ``right`` one (a relapse)."""
    first = min(right, default=None)
    return 0 if first is None else sum(1 for moment in wrong if moment > first)


def _worst(values: Iterable[float | None]) -> float | None:
    collected = list(values)
    return None if any(v is None for v in collected) else max(v for v in collected if v is not None)


def _figure(value: float | None) -> float:
    """A figure for the report: seconds to 3 places, -1 for "never"."""
    return -1 if value is None else round(value, 3)


# -- provider-outage -----------------------------------------------------------------------


async def provider_outage_drill(
    *,
    gateway_url: str,
    model: str,
    issuer: str,
    member: Member,
    keystore: Keystore,
    provider_down: Callable[[bool], Awaitable[None]],
    questions: int = 4,
    before: float = 0.5,
    outage: float = 1.5,
    after: float = 0.5,
    recover_within: float = 40.0,
) -> DrillResult:
    """Warm the cache, keep asking, take the provider down, bring it back; measure
    the first cached answer (marked) and the first live one after recovery."""
    result = DrillResult(
        "provider-outage",
        targets={
            "first_cached_answer_seconds": f"<= {CACHED_ANSWER_TARGET_SECONDS:g}",
            "failed_during_outage": "0",
            "recovered": "1",
        },
    )
    url = f"{gateway_url}/v1/chat/completions"
    asked = [
        f"Why was the customer charged twice? ({n}, {uuid4().hex[:8]})" for n in range(questions)
    ]
    caller = Caller(keystore, issuer, member)
    load = Load()
    down_at: float | None = None
    up_at: float | None = None
    first_cached: float | None = None
    first_live_after: float | None = None
    cached = 0
    unmarked_during_outage = 0

    async def ask(client: httpx.AsyncClient, question: str) -> httpx.Response:
        body = {
            "model": model,
            "temperature": 0.7,
            "max_tokens": 50,
            "messages": [{"role": "user", "content": question}],
        }
        return await caller.send(client, "POST", url, json=body)

    stop = asyncio.Event()

    async def steady(client: httpx.AsyncClient) -> None:
        nonlocal first_cached, first_live_after, cached, unmarked_during_outage
        n = 0
        while not stop.is_set():
            question = asked[n % len(asked)]
            n += 1
            sent = time.monotonic() - load.started
            try:
                answer = await ask(client, question)
            except httpx.HTTPError:
                load.note("chat", "failed")
                continue
            if answer.status_code != 200:
                load.note("chat", "failed")
                continue
            moment = load.note("chat", "ok")
            marker = answer.headers.get("bastion-cache")
            if marker == "stale-fallback":
                cached += 1
                if first_cached is None and down_at is not None:
                    first_cached = moment - down_at
            elif down_at is not None and up_at is None and sent >= down_at:
                unmarked_during_outage += 1  # a live answer while the provider is down?
            if marker is None and up_at is not None and sent >= up_at and first_live_after is None:
                first_live_after = moment - up_at
            await asyncio.sleep(0.01)

    async with reverted_on_exit() as reverts:
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                for question in asked:  # the warm cache: each answered once, live
                    warm = await ask(client, question)
                    if warm.status_code != 200 or "bastion-cache" in warm.headers:
                        raise RuntimeError(f"warming the cache failed: {warm.status_code}")
                load = Load()
                task = asyncio.create_task(steady(client))
                try:
                    await asyncio.sleep(before)
                    reverts.push("provider double up", lambda: provider_down(False))
                    down_at = time.monotonic() - load.started
                    result.mark("provider down", down_at)
                    await provider_down(True)
                    await asyncio.sleep(outage)
                    await provider_down(False)
                    up_at = time.monotonic() - load.started
                    result.mark("provider up", up_at)
                    # The gateway tries the provider again once its breaker half-opens
                    # (30 s in production): wait for the first live answer, then a tail.
                    deadline = time.monotonic() + recover_within
                    while first_live_after is None and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(after)
                finally:
                    stop.set()
                    await asyncio.gather(task, return_exceptions=True)
        except asyncio.CancelledError:
            result.interrupted = True
    if result.interrupted:
        result.note = "interrupted: the load stopped; restored: " + (
            ", ".join(reverts.restored) or "nothing"
        )
        result.timeline = load.timeline()
        return result
    assert down_at is not None and up_at is not None
    outage_failures = sum(
        1 for m, _l, outcome in load.requests if outcome == "failed" and down_at <= m < up_at
    )
    result.figures = {
        "first_cached_answer_seconds": round(first_cached, 3) if first_cached is not None else -1,
        "cached_answers": cached,
        "unmarked_answers_during_outage": unmarked_during_outage,
        "failed_during_outage": outage_failures,
        "recovery_seconds": round(first_live_after, 3) if first_live_after is not None else -1,
        "recovered": int(first_live_after is not None),
        "failed_total": load.failed(),
        "requests": len(load.requests),
    }
    result.passed = (
        first_cached is not None
        and first_cached <= CACHED_ANSWER_TARGET_SECONDS
        and outage_failures == 0
        and unmarked_during_outage == 0
        and first_live_after is not None
    )
    result.note = "the provider double answered 5xx during the outage; restored on exit: " + (
        ", ".join(reverts.restored) or "nothing"
    )
    result.timeline = load.timeline()
    return result


# -- webhook-storm -------------------------------------------------------------------------


@dataclass
class Storm:
    """The drill's ground truth: its tenants (customer -> tenant), every event, and
    the invoices each tenant must see paid exactly once."""

    tenants: dict[str, UUID]
    events: list[dict[str, object]]
    invoices: dict[UUID, set[str]]
    ignored: int


async def _storm(
    tenants: TenantService, billing: BillingService, *, count: int, invoices: int
) -> Storm:
    made: dict[str, UUID] = {}
    for n in range(count):
        tenant = (await tenants.create_tenant(f"storm-{uuid4().hex[:10]}", f"Storm {n}")).id
        customer = f"cus_drill_{uuid4().hex[:12]}"
        await billing.link_stripe_customer(tenant, customer, actor="operator:drill")
        made[customer] = tenant
    created = int(time.time()) - 600
    events: list[dict[str, object]] = []
    paid: dict[UUID, set[str]] = {tenant: set() for tenant in made.values()}
    for customer, tenant in made.items():
        for _ in range(invoices):
            invoice = f"in_drill_{uuid4().hex[:12]}"
            paid[tenant].add(f"invoice:{invoice}")
            events.append(
                _event(
                    "invoice.paid",
                    {
                        "id": invoice,
                        "object": "invoice",
                        "customer": customer,
                        "amount_paid": 4900,
                        "currency": "eur",
                    },
                    created,
                )
            )
        # A type Bastion does not handle: stored, acknowledged, ignored.
        events.append(_event("customer.updated", {"id": customer, "object": "customer"}, created))
    return Storm(made, events, paid, ignored=count)


def _event(kind: str, obj: dict[str, object], created: int) -> dict[str, object]:
    """A Stripe event as Stripe sends it (https://docs.stripe.com/api/events/object)."""
    return {
        "id": f"evt_drill_{uuid4().hex[:16]}",
        "object": "event",
        "api_version": "2025-09-30.clover",
        "created": created,
        "type": kind,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "data": {"object": obj},
    }


async def _paid_invoices(db: Database, storm: Storm) -> dict[UUID, list[str]]:
    """Each tenant's ``billing.invoice.paid`` audit events (one per application)."""
    seen: dict[UUID, list[str]] = {}
    for tenant in storm.tenants.values():
        async with db.tenant_tx(tenant, None, "auditor") as tx:
            rows = await audit.events(tx, actions=["billing.invoice.paid"])
        seen[tenant] = [str(row["target"]) for row in rows]
    return seen


async def webhook_storm_drill(
    *,
    api_url: str,
    secret: str,
    db: Database,
    billing: BillingService,
    tenants: int = 5,
    invoices: int = 6,
    copies: tuple[int, int] = (2, 5),
    senders: int = 8,
    settle_within: float = 60.0,
    seed: int = 7,
    actor: str = "operator:drill",
) -> DrillResult:
    """Pause webhooks; a storm of duplicated, shuffled, freshly signed Stripe events;
    resume while the last third still arrives; every event applied exactly once."""
    result = DrillResult(
        "webhook-storm",
        targets={
            "events_lost": "0",
            "applied_more_than_once": "0",
            "applied_while_paused": "0",
            "failed_deliveries": "0",
        },
    )
    storm = await _storm(TenantService(db), billing, count=tenants, invoices=invoices)
    rng = random.Random(seed)  # noqa: S311 - a reproducible shuffle, not a secret
    bodies = [
        json.dumps(event, separators=(",", ":"))
        for event in storm.events
        for _ in range(rng.randint(*copies))
    ]
    rng.shuffle(bodies)
    load = Load()
    duplicates = 0
    url = f"{api_url}/webhooks/stripe"

    async def deliver(client: httpx.AsyncClient, batch: list[str]) -> None:
        nonlocal duplicates
        pending = list(reversed(batch))

        async def sender() -> None:
            nonlocal duplicates
            while pending:
                body = pending.pop()
                # Signed afresh at each delivery, as Stripe's retries are.
                headers = {
                    "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(
                        body, secret
                    ),
                    "Content-Type": "application/json",
                }
                try:
                    answer = await client.post(url, content=body.encode(), headers=headers)
                except httpx.HTTPError:
                    load.note("delivery", "failed")
                    continue
                if answer.status_code == 200:
                    load.note("delivery", "ok")
                    duplicates += bool(answer.json().get("duplicate"))
                else:
                    load.note("delivery", "failed")

        await asyncio.gather(*(sender() for _ in range(senders)))

    cut = len(bodies) * 2 // 3
    applied_while_paused = -1
    held = 0
    resumed_at: float | None = None
    async with reverted_on_exit() as reverts:
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                await billing.pause(actor=actor, reason="drill webhook-storm")
                reverts.push("webhooks resumed", lambda: billing.resume(actor=actor))
                load = Load()
                result.mark("webhooks paused", 0.0)
                await deliver(client, bodies[:cut])
                seen = await _paid_invoices(db, storm)
                applied_while_paused = sum(len(v) for v in seen.values())
                # Resume while the rest of the storm is still arriving.
                rest = asyncio.create_task(deliver(client, bodies[cut:]))
                await asyncio.sleep(0)
                resumed_at = time.monotonic()
                result.mark("webhooks resumed", resumed_at - load.started)
                held = await billing.resume(actor=actor)
                await rest
            deadline = time.monotonic() + settle_within
            while True:
                seen = await _paid_invoices(db, storm)
                if all(len(seen[t]) >= len(storm.invoices[t]) for t in storm.invoices):
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            settled = time.monotonic() - resumed_at
            await asyncio.sleep(0.3)  # a late duplicate application would show now
            seen = await _paid_invoices(db, storm)
        except asyncio.CancelledError:
            result.interrupted = True
    if result.interrupted:
        result.note = "interrupted: the storm stopped; restored: " + (
            ", ".join(reverts.restored) or "nothing"
        )
        result.timeline = load.timeline()
        return result
    lost = sum(len(storm.invoices[t] - set(seen[t])) for t in storm.invoices)
    doubled = sum(
        sum(1 for target in set(seen[t]) if seen[t].count(target) > 1) for t in storm.invoices
    )
    failed = load.failed()
    result.figures = {
        "events": len(storm.events),
        "deliveries": len(bodies),
        "answered_duplicate": duplicates,
        "held_at_resume": held,
        "applied_while_paused": applied_while_paused,
        "invoices_paid": sum(len(set(v)) for v in seen.values()),
        "events_lost": lost,
        "applied_more_than_once": doubled,
        "failed_deliveries": failed,
        "settled_seconds_after_resume": round(settled, 3),
    }
    result.passed = (
        lost == 0
        and doubled == 0
        and applied_while_paused == 0
        and failed == 0
        and duplicates == len(bodies) - len(storm.events)
    )
    result.note = (
        f"{len(storm.events)} events ({storm.ignored} of a type Bastion ignores) delivered "
        f"{len(bodies)} times, shuffled; restored on exit: "
        + (", ".join(reverts.restored) or "nothing")
    )
    result.timeline = load.timeline()
    return result


# -- worker-kill ---------------------------------------------------------------------------


class WorkerControl(Protocol):
    """Starts a worker process and kills it with SIGKILL (the caller owns it)."""

    def start(self) -> None: ...

    def kill(self) -> None: ...


PARAGRAPH = (
    "Ticket {n}.{p}: the customer reports that the export of invoices to CSV stops "
    "halfway, retries do not help, and the webhook for invoice.paid fired twice. "
)


async def worker_kill_drill(
    *,
    kb: KnowledgeService,
    owner: Actor,
    writer: Actor,
    worker: WorkerControl,
    documents: int = 8,
    paragraphs: int = 300,
    finish_within: float = 120.0,
) -> DrillResult:
    """Uploads under ingestion; ``kill -9`` of the worker once some are indexed;
    a new worker; every document indexed exactly once. RTO = the kill to the next
    document indexed (the killed job comes back after its heartbeats stop)."""
    result = DrillResult(
        "worker-kill",
        targets={"documents_lost": "0", "indexed_more_than_once": "0"},
    )
    namespace = f"drill-{uuid4().hex[:8]}"
    await kb.create_namespace(owner, namespace)
    ids: list[UUID] = []
    for n in range(documents):
        body = "\n\n".join(PARAGRAPH.format(n=n, p=p) for p in range(paragraphs))
        upload = await kb.upload(
            writer,
            namespace,
            title=f"drill {n}",
            body=body.encode(),
            content_type="text/plain",
        )
        ids.append(upload.document.id)
    load = Load()
    indexed_at: dict[UUID, float] = {}

    async def poll() -> None:
        for info in await kb.documents(owner, namespace):
            if info.status == "indexed" and info.id not in indexed_at:
                indexed_at[info.id] = load.note("document", "ok")
            elif info.status == "failed" and info.id not in indexed_at:
                indexed_at[info.id] = load.note("document", "failed")

    killed_at: float | None = None
    running = False
    before_kill = at_kill = 0
    try:
        load = Load()
        worker.start()
        running = True
        deadline = time.monotonic() + finish_within
        while not indexed_at and time.monotonic() < deadline:
            await poll()
            await asyncio.sleep(0.05)
        before_kill = len(indexed_at)
        worker.kill()
        running = False
        killed_at = time.monotonic() - load.started
        result.mark("worker kill -9", killed_at)
        await asyncio.sleep(0.2)
        await poll()  # what committed before the kill
        at_kill = len(indexed_at)
        worker.start()  # as a supervisor would
        result.mark("worker started", time.monotonic() - load.started)
        running = True
        while len(indexed_at) < documents and time.monotonic() < deadline:
            await poll()
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        result.interrupted = True
        if not running:
            worker.start()  # the drill killed it: bring it back before leaving
        result.note = (
            "interrupted: the drill stopped; "
            + ("the worker it had killed was started again" if not running else "")
            + " (the scratch server and its worker are stopped on the way out)"
        )
        result.timeline = load.timeline()
        return result
    assert killed_at is not None
    async with kb.db.tenant_tx(owner.tenant_id, owner.user_id, "auditor") as tx:
        events = await audit.events(tx, actions=["document.indexed"])
    ours = {str(i) for i in ids}
    indexed_events = [str(e["target"]) for e in events if str(e["target"]) in ours]
    after = sorted(m - killed_at for m in indexed_at.values() if m > killed_at)
    lost = documents - sum(1 for d in ids if d in indexed_at)
    doubled = len(indexed_events) - len(set(indexed_events))
    result.figures = {
        "documents": documents,
        "indexed_before_kill": before_kill,
        "indexed_at_kill": at_kill,
        "rto_seconds": round(after[0], 3) if after else -1,
        "all_indexed_seconds_after_kill": round(after[-1], 3) if after else -1,
        "documents_lost": lost,
        "indexed_more_than_once": doubled,
        "failed_documents": load.failed(),
    }
    result.passed = lost == 0 and doubled == 0 and load.failed() == 0 and bool(after)
    result.note = (
        "RTO includes the stalled-job timeout: a killed worker's job is requeued once its "
        "heartbeats stop (bastion.worker.queue.STALLED_SECONDS)"
    )
    result.timeline = load.timeline()
    return result
