"""Benchmark: tenant B's latency while tenant A attacks (issue 23, the noisy neighbour).

Run: .venv/bin/python bench/noisy_neighbour.py [--steady 12] [--attack 15]

The real stack, as in production: an embedded PostgreSQL and ``bastion serve
api``, ``gateway`` and ``worker`` as their own processes; the gateway's
upstream is a local mock (tests/noisy_neighbour.py's doubles: a fixed answer, and
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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg

from _record import record_output
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.billing.wiring import build_billing
from bastion.db.launcher import EmbeddedPostgres
from bastion.db.service import app_database, resolve_target
from bastion.knowledge.service import build_knowledge
from bastion.secrets.backends import open_key_ring, open_keystore
from bastion.settings import Settings
from wrk_dpop import free_port

# The doubles, the attacker and B's probes are the tests' own (tests/ is a
# package at the repo root): tests/test_noisy_neighbour.py asserts bounds on them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.noisy_neighbour import (
    HTTP_TIMEOUT,
    SLOW_ISSUER_SECONDS,
    Bench,
    Probe,
    _timed,
    access_tokens,
    gateway_models,
    measure_b,
    quantiles,
    seed_tenants,
)

ROOT = Path(__file__).resolve().parents[1]
# The cache: 512 entries, 4 expected tenants: a quota of 128 entries a tenant.
# One LRU shared by all would lose B's 16 entries to A's flood (2048 prompts).
CACHE_ENTRIES, CACHE_TENANTS = 512, 4
B_PROMPTS = 16
# A bomb costs ~10 s of CPU unbounded; the worker kills it at 3 s (8 s wall).
EXTRACT_CPU_SECONDS, EXTRACT_WALL_SECONDS = 3, 8


# -- the run ------------------------------------------------------------------------------

ATTACKS: dict[str, dict[str, Any]] = {
    "bad-requests": {"concurrency": 8, "max_requests": 20_000},
    "cache-flood": {"concurrency": 8, "max_requests": 4 * CACHE_ENTRIES},
    "issuer-storm": {"concurrency": 8, "max_requests": 20_000},
    "parser-bombs": {"concurrency": 2, "max_requests": 200, "bombs": 3},
}


def _errors(probe: Probe) -> str:
    return ", ".join(f"{k}x{v}" for k, v in probe.errors.items()) or "0"


def report(steady: dict[str, Probe], attacked: dict[str, dict[str, Probe]]) -> None:
    """The table; then the slowest upload and webhook of each phase, where the time went."""
    print(
        f"\n{'attack':13} {'B probe':12} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'steady p50':>10} {'steady p99':>10} {'p50 x':>6} {'p99 x':>6}  B errors"
    )
    for name, probe in steady.items():
        p50, p99 = quantiles(probe.timings)
        hits = f" (hits {probe.hits}/{len(probe.timings)})" if name == "cached chat" else ""
        print(
            f"{'(steady)':13} {name:12} {len(probe.timings):>5} {p50:>8.1f} {p99:>8.1f} "
            f"{'':>10} {'':>10} {'':>6} {'':>6}  {_errors(probe)}{hits}"
        )
    for attack_name, probes in attacked.items():
        for name, probe in probes.items():
            p50, p99 = quantiles(probe.timings)
            s50, s99 = quantiles(steady[name].timings)
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
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "BASTION_API_PORT": str(ports["api"]),
        "BASTION_GATEWAY_PORT": str(ports["gateway"]),
        "BASTION_WORKER_PORT": str(ports["worker"]),
        "BASTION_LOG_LEVEL": "warning",
        # The public path is measured; the mTLS listener has bench/mtls.py.
        "BASTION_INTERNAL_MTLS": "0",
        "BASTION_DEV_MODE": "1",
        "BASTION_EMBEDDER": "hashing",
        "BASTION_GATEWAY_MODELS": gateway_models(ports["upstream"], "local://providers/mock"),
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
        customer = f"cus_bench_{uuid4().hex[:10]}"
        async with app_database(settings, migrate=True, max_size=2) as db:
            approvals = build_billing(settings, db, keystore).approvals
            kb = build_knowledge(settings, db, open_key_ring(settings, keystore=keystore).kms)
            seeded = await seed_tenants(db, approvals, kb, ("a", "b"))
            tenants = seeded.ids
            await BillingService(db, EventCipher(keystore)).link_stripe_customer(
                tenants["b"], customer
            )
        admin = resolve_target(settings, start=False).admin_conninfo_on_db()
        tokens = access_tokens(keystore, settings.resolved_issuer, seeded)
        procs["doubles"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.noisy_neighbour",
                "--serve-doubles",
                str(ports["upstream"]),
                str(ports["issuer"]),
            ],
            cwd=ROOT,
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
            token=tokens["b"][0],
            key=tokens["b"][1],
            tenant=tenants["b"],
            customer=customer,
            secret=secret,
            next_created=int(time.time()) - 3600,
            prompts=B_PROMPTS,
        )
        # B asks its 16 questions once: later, each must be a cache hit.
        warm = Probe()
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            for i in range(B_PROMPTS):
                await _timed(warm, bench.ask(http, bench.question(i), 0))
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
            "token": tokens["a"][0],
            "dpop_key": tokens["a"][1].to_json(),
            "seconds": attack_seconds,
        }
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            steady = await measure_b(bench, conn, steady_seconds)
            attacked: dict[str, dict[str, Probe]] = {}
            got: dict[str, str] = {}
            for kind, params in ATTACKS.items():
                spec_file = home / f"attack-{kind}.json"
                spec_file.write_text(json.dumps({**spec_common, kind: params}))
                spec_file.chmod(0o600)
                attacker = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.noisy_neighbour",
                    "--attacker",
                    kind,
                    str(spec_file),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=stderr,
                    cwd=ROOT,
                )
                assert attacker.stdin is not None and attacker.stdout is not None
                await attacker.stdout.readline()  # "ready": loaded
                attacker.stdin.write(b"go\n")
                await asyncio.sleep(0.5)  # let A's load build up
                attacked[kind] = await measure_b(bench, conn, attack_seconds - 0.5)
                try:
                    out, _ = await asyncio.wait_for(attacker.communicate(), HTTP_TIMEOUT + 5)
                    got[kind] = out.decode().strip().splitlines()[-1]
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
    args = parser.parse_args()
    record_output("noisy_neighbour")  # bench/results/noisy_neighbour.json, for bench/report.py
    asyncio.run(run(args.steady, args.attack))


if __name__ == "__main__":
    main()
