"""The noisy neighbour (issue 23, "what the tests must prove"): while tenant A runs
the worst case of every class at once, tenant B is answered within stated bounds.

The real stack: ``bastion serve api``, ``gateway`` and ``worker`` as their own
processes on this module's embedded PostgreSQL, an OpenAI-compatible upstream
and a slow external OIDC issuer (4 s per fetch) in a process of their own
(:mod:`tests.noisy_neighbour`, shared with ``bench/noisy_neighbour.py``).

Tenant A, a separate process, all at once for :data:`ATTACK_SECONDS`:
  bad-requests    chat calls the upstream refuses (400): once five opened the
                  breaker for every tenant (A1)
  induced-faults  prompts the upstream fails on (500): a fault only A causes (A1)
  cache-flood     16x the cache's size of distinct prompts (A4)
  issuer-storm    anonymous tokens naming the slow issuer with unknown kids: once
                  a synchronous 4 s fetch on the event loop of api and gateway (A3)
  parser-bombs    two PDF bombs (~10 s of CPU each, unbounded), then 1 MiB HTML
                  uploads parsed, once, on the api's event loop (A2, A3)
  password-flood  anonymous sign-ins, an argon2 hash each (A3)

Tenant B, from this process: its api GET and chat calls (p99 against its own
steady state, measured first in this module), its uploads until indexed, its
signed Stripe webhooks until applied, and, after the attack, its stale answers
served through an upstream outage. B sees no error at all.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest

from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.billing.wiring import build_billing
from bastion.db.pool import Database
from bastion.knowledge.service import KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from tests.conftest import DbHandles, short_tempdir
from tests.noisy_neighbour import (
    HTTP_TIMEOUT,
    Bench,
    Probe,
    Tenants,
    access_tokens,
    gateway_models,
    measure_b,
    quantiles,
    seed_tenants,
)
from tests.served import free_port, serving_process

pytestmark = pytest.mark.serial  # timing bounds: see Makefile `test`

ROOT = Path(__file__).resolve().parents[1]
STEADY_SECONDS = 4.0
ATTACK_SECONDS = 10.0
B_PROMPTS = 6
# The cache: 16 entries. A floods it with up to 4x that many distinct prompts:
# one LRU for all kept none of B's 6; partitioned, A gives up its own first.
CACHE_ENTRIES, CACHE_TENANTS = 16, 4
# Answers A must have had stored for one shared LRU to have dropped all of B's.
FLOOD_ENOUGH = CACHE_ENTRIES + B_PROMPTS
# B's answers go stale after this; through the outage they are served as stale-fallback.
CACHE_TTL_SECONDS = 3
# Each bomb is killed at 2 s of CPU (6 s of wall clock on a starved box).
EXTRACT_CPU_SECONDS, EXTRACT_WALL_SECONDS = 2, 6
ATTACKS: dict[str, dict[str, Any]] = {
    "bad-requests": {"concurrency": 2, "max_requests": 20_000},
    "induced-faults": {"concurrency": 1, "max_requests": 20_000},
    "cache-flood": {"concurrency": 3, "max_requests": 4 * CACHE_ENTRIES},
    "issuer-storm": {"concurrency": 2, "max_requests": 20_000},
    "parser-bombs": {"concurrency": 1, "max_requests": 200, "bombs": 2},
    "password-flood": {"concurrency": 1, "max_requests": 20_000},
}

# -- the bounds -----------------------------------------------------------------------
# B's api GET and chat p99 under attack: at most P99_FACTOR x its steady p99 plus
# P99_SLACK_MS. Six attacks, the bombs' extraction and A's own client share two
# cores with B's servers (and with other engineers' tests): the p99 of a
# sequential client then rises several-fold from CPU contention alone (measured
# here: x3-x8 of a 20-60 ms steady p99). What the bound excludes is waiting
# behind A: a 4 s issuer fetch on the event loop, a 1.3 s HTML parse on it, a
# connection held by argon2 — seconds, not a factor of a few tens of milliseconds.
P99_FACTOR = 10.0
P99_SLACK_MS = 600.0
# And no single request of B waited behind A: the slow issuer takes 4 s a
# fetch (discovery, then keys), a 1 MiB HTML parse 1.3 s idle and several
# times that here. (A p99 of ~100 samples hides one such freeze.)
MAX_WAIT_MS = 3000.0
# B's document indexed within INGEST_BOUND s of its upload: A holds at most one
# ingest slot (one job per tenant), B gets the other. Behind A's bombs in one
# FIFO (before issue 23), B waited ~10 s of CPU per bomb.
INGEST_BOUND = 6.0
# B's Stripe event applied within BILLING_BOUND s of arriving: billing has its
# own worker loop (polled every 0.5 s). Before, it queued behind the bombs.
BILLING_BOUND = 4.0


@dataclass
class Outcome:
    steady: dict[str, Probe]
    attacked: dict[str, Probe]
    attacker: dict[str, dict[str, Any]]  # per kind: A's statuses
    a_documents: Counter[tuple[str, str]]  # (status, reason) of A's documents
    stale: Counter[str]  # B's cached questions through the outage: status/Bastion-Cache
    issuer_fetches: dict[str, int]


def _ready(url: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert all(proc.poll() is None for proc in procs), "a process exited while starting"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.1)


def _report(outcome: Outcome) -> str:
    lines = []
    for name, probe in outcome.attacked.items():
        s50, s99 = quantiles(outcome.steady[name].timings)
        p50, p99 = quantiles(probe.timings)
        lines.append(
            f"{name:8} n={len(probe.timings):4} steady p50/p99 {s50:7.1f}/{s99:7.1f} ms, "
            f"attacked {p50:7.1f}/{p99:7.1f}/max {max(probe.timings, default=0):7.1f} ms, "
            f"errors {dict(probe.errors)}"
        )
    lines.append(f"A got {outcome.attacker}; A's documents {dict(outcome.a_documents)}")
    lines.append(f"stale {dict(outcome.stale)}; issuer fetches {outcome.issuer_fetches}")
    return "\n".join(lines)


async def _scenario(
    bench: Bench, database: DbHandles, spec: dict[str, Any], upstream: str, issuer: str
) -> Outcome:
    spec_file = Path(spec["home"]) / "attack.json"
    spec_file.write_text(json.dumps(spec))
    spec_file.chmod(0o600)
    # A's process loads while B warms up; it attacks once told to.
    attacker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.noisy_neighbour",
        "--attacker",
        ",".join(ATTACKS),
        str(spec_file),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert attacker.stdin is not None and attacker.stdout is not None
    probes = ("api GET", "chat", "upload", "webhook")
    async with await psycopg.AsyncConnection.connect(database.superuser, autocommit=True) as db:
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                # B asks its questions once (stored), and warms each path up.
                for n in range(B_PROMPTS):
                    answered = await bench.ask(http, bench.question(n), 0)
                    assert answered.status_code == 200, answered.text
            await measure_b(bench, db, 1.0, probes, 1)
            assert await attacker.stdout.readline() == b"ready\n"
            steady = await measure_b(bench, db, STEADY_SECONDS, probes)
            attacker.stdin.write(b"go\n")
            await asyncio.sleep(0.5)  # A's load builds up
            attacked = await measure_b(bench, db, ATTACK_SECONDS - 0.5, probes)
            out, _ = await asyncio.wait_for(attacker.communicate(), HTTP_TIMEOUT + 10)
        finally:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
        got = json.loads(out.splitlines()[-1])

        # A's bombs end at their limits, one at a time (bounded: the old code never ends them).
        deadline = time.monotonic() + 2 * EXTRACT_WALL_SECONDS + 5
        query = "SELECT status, coalesce(failure_reason, '-') FROM bastion.documents "
        query += "WHERE tenant_id = %s"
        while True:
            rows = await (await db.execute(query, (spec["tenant_a"],))).fetchall()
            if all(status != "pending" for status, _ in rows) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)

        # The upstream goes down: B's answers, stale long since, are still served.
        stale: Counter[str] = Counter()
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            await http.post(f"{upstream}/control/outage", json={"outage": True})
            try:
                for n in range(B_PROMPTS):
                    answered = await bench.ask(http, bench.question(n), 0)
                    stale[f"{answered.status_code}/{answered.headers.get('bastion-cache')}"] += 1
            finally:
                await http.post(f"{upstream}/control/outage", json={"outage": False})
            fetches = (await http.get(f"{issuer}/stats")).json()
    return Outcome(
        steady,
        attacked,
        {kind: result["statuses"] for kind, result in got.items()},
        Counter((status, reason) for status, reason in rows),
        stale,
        fetches,
    )


@pytest.fixture(scope="module")
def outcome(database: DbHandles, keystore: LocalKeystore) -> Iterator[Outcome]:
    home = short_tempdir("bastion-noisy-")
    ports = {name: free_port() for name in ("api", "gateway", "worker", "upstream", "issuer")}
    api, gateway = (f"http://127.0.0.1:{ports[p]}" for p in ("api", "gateway"))
    upstream, issuer = (f"http://127.0.0.1:{ports[p]}" for p in ("upstream", "issuer"))
    suffix = uuid4().hex[:8]
    keystore.set(f"providers/noisy-{suffix}", b"sk-noisy")
    secret = f"whsec_noisy_{uuid4().hex}"
    keystore.set(f"billing/noisy-{suffix}", secret.encode())
    customer = f"cus_noisy_{suffix}"

    async def seed() -> Tenants:
        async with Database(database.app, database.context_key, max_size=2) as db:
            approvals = build_billing(Settings(home=home), db, keystore).approvals
            kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
            tenants = await seed_tenants(db, approvals, kb, ("a", "b"))
            await BillingService(db, EventCipher(keystore)).link_stripe_customer(
                tenants.ids["b"], customer
            )
            return tenants

    tenants = asyncio.run(seed())
    tokens = access_tokens(keystore, api, tenants)
    extra = {
        "BASTION_ISSUER": api,
        "BASTION_GATEWAY_MODELS": gateway_models(
            ports["upstream"], f"local://providers/noisy-{suffix}"
        ),
        "BASTION_GATEWAY_CACHE_ENTRIES": str(CACHE_ENTRIES),
        "BASTION_GATEWAY_CACHE_EXPECTED_TENANTS": str(CACHE_TENANTS),
        "BASTION_GATEWAY_CACHE_TTL_SECONDS": str(CACHE_TTL_SECONDS),
        "BASTION_EXTERNAL_ISSUERS": json.dumps([{"issuer": issuer, "audience": "bench"}]),
        "BASTION_EXTRACT_CPU_SECONDS": str(EXTRACT_CPU_SECONDS),
        "BASTION_EXTRACT_WALL_SECONDS": str(EXTRACT_WALL_SECONDS),
        "BASTION_STRIPE_WEBHOOK_SECRET_REF": f"local://billing/noisy-{suffix}",
    }

    with ExitStack() as stack:
        doubles = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.noisy_neighbour",
                "--serve-doubles",
                str(ports["upstream"]),
                str(ports["issuer"]),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(doubles.wait, 15)
        stack.callback(doubles.terminate)
        procs = [doubles]
        for process in ("api", "gateway", "worker"):
            proc, _url = stack.enter_context(
                serving_process(
                    process, database, keystore, home, extra, wait_ready=False, port=ports[process]
                )
            )
            procs.append(proc)
        for process in ("api", "gateway", "worker"):
            _ready(f"http://127.0.0.1:{ports[process]}", procs)
        bench = Bench(
            api=api,
            gateway=gateway,
            token=tokens["b"][0],
            key=tokens["b"][1],
            tenant=tenants.ids["b"],
            customer=customer,
            secret=secret,
            next_created=int(time.time()) - 3600,
            prompts=B_PROMPTS,
        )
        token_a, key_a = tokens["a"]
        spec: dict[str, Any] = {
            "home": str(home),
            "tenant_a": str(tenants.ids["a"]),
            "chat_url": f"{gateway}/v1/chat/completions",
            "upload_url": f"{api}/tenants/{tenants.ids['a']}/knowledge/namespaces/docs/documents",
            "members_url": f"{api}/tenants/{tenants.ids['a']}/members",
            "authorize_url": f"{api}/authorize",
            "tenant_slug": tenants.slugs["a"],
            "issuer": issuer,
            "token": token_a,
            "dpop_key": key_a.to_json(),
            "seconds": ATTACK_SECONDS,
            **ATTACKS,
        }
        result = asyncio.run(_scenario(bench, database, spec, upstream, issuer))
        assert all(proc.poll() is None for proc in procs), "a process died under the attack"
        print("\n" + _report(result))
        yield result


def test_tenant_a_ran_every_attack(outcome: Outcome) -> None:
    """Not a test of B, but of the test: every class of A's attack reached the stack."""
    got = outcome.attacker
    assert sum(got["bad-requests"].values()) >= 20, got
    assert sum(got["induced-faults"].values()) >= 5, got
    assert sum(got["cache-flood"].values()) >= FLOOD_ENOUGH, got
    assert sum(got["issuer-storm"].values()) >= 20, got
    assert got["parser-bombs"].get("202", 0) >= 2, got  # the bombs were queued
    assert sum(got["parser-bombs"].values()) >= 3, got  # and HTML uploads followed
    assert sum(got["password-flood"].values()) >= 2, got
    assert outcome.issuer_fetches, "nobody asked the slow issuer for its keys"
    # A's own outcomes: refused as its own requests deserve; its bombs killed at their limit.
    assert set(got["bad-requests"]) <= {"400", "503"}, got
    assert set(got["issuer-storm"]) == {"401"}, got
    assert outcome.a_documents[("failed", "too-complex")] == 2, outcome.a_documents


def test_b_requests_p99_stays_within_its_bound(outcome: Outcome) -> None:
    """B's api GET and chat: no error, and p99 within P99_FACTOR x steady + P99_SLACK_MS."""
    report = _report(outcome)
    for name in ("api GET", "chat"):
        attacked, steady = outcome.attacked[name], outcome.steady[name]
        assert not steady.errors and not attacked.errors, report
        assert len(steady.timings) >= 20 and len(attacked.timings) >= 20, report
        steady_p99 = quantiles(steady.timings)[1]
        attacked_p99 = quantiles(attacked.timings)[1]
        assert attacked_p99 <= P99_FACTOR * steady_p99 + P99_SLACK_MS, report
        assert max(attacked.timings) <= MAX_WAIT_MS, report


def test_b_documents_are_indexed_within_their_bound(outcome: Outcome) -> None:
    uploads = outcome.attacked["upload"]
    report = _report(outcome)
    assert not uploads.errors, report
    assert len(uploads.timings) >= 3, report
    assert max(uploads.timings) <= INGEST_BOUND * 1000, report


def test_b_billing_events_are_applied_within_their_bound(outcome: Outcome) -> None:
    webhooks = outcome.attacked["webhook"]
    report = _report(outcome)
    assert not webhooks.errors, report
    assert len(webhooks.timings) >= 3, report
    assert max(webhooks.timings) <= BILLING_BOUND * 1000, report


def test_b_stale_answers_survive_a_cache_flood(outcome: Outcome) -> None:
    """Through an upstream outage after A's flood, each of B's questions is
    answered from B's own (stale) cache entries."""
    flood = outcome.attacker["cache-flood"]
    assert flood.get("200", 0) >= FLOOD_ENOUGH, flood  # the flood did turn the cache over
    assert outcome.stale == Counter({"200/stale-fallback": B_PROMPTS}), _report(outcome)
