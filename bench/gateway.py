"""Benchmark: Bastion's gateway against LiteLLM's proxy, same mock upstream, same load.

Run: .venv/bin/python bench/gateway.py [--clients 32] [--seconds 10]
     [--litellm /path/to/venv/bin/litellm]

The upstream is bench/mock_upstream.py (a fixed completion with usage). Both
proxies run as one process on this machine. Load: ``wrk`` with 32 keep-alive
connections posting a chat completion. Bastion runs with every guardrail of
its pipeline on: token + DPoP proof (fresh per request, made before the run),
Cedar, budget reservation and settlement in PostgreSQL, the answer cache
consulted (temperature 1: never a hit), audit event, trace, log line.
LiteLLM runs with a master key, no database (its fastest setup).
Also: added p50 latency for one sequential client (proxy minus upstream
direct), and the proxies' RSS after the load.
Targets (issue 6): >= 20x LiteLLM's throughput, <= 1.5 ms added p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from _record import record_output
from bastion.billing.budgets import BudgetService
from bastion.billing.plans import Plan, PlanCatalogue
from bastion.billing.wiring import build_billing
from bastion.db.launcher import EmbeddedPostgres
from bastion.db.service import app_database
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.secrets.backends import open_keystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from wrk_dpop import THREADS, free_port, prepare, run_wrk

BENCH_PLAN = Plan(
    code="bench",
    name="Benchmark",
    rank=100,
    monthly_token_budget=10**12,
    monthly_call_budget=10**9,
    requests_per_minute=10**8,
    models_allowed=("*",),
    overage_policy="block",
)
BODY = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "When was the refund issued?"}]}
)


async def _wait_ready(url: str) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(600):
            try:
                await http.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time used by the process and its descendants (/proc)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, ticks = {pid}, 0
    for _ in range(5):  # a few generations deep
        tree |= {p for p, (parent, _t) in stats.items() if parent in tree}
    ticks = sum(stats[p][1] for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def _wrk(
    home: Path, url: str, clients: int, seconds: int, auth: str, *, dpop: bool, pid: int
) -> dict[str, float]:
    cpu_before = _cpu_seconds(pid)
    out = run_wrk(home, url, clients, seconds, auth, dpop=dpop)
    cpu = _cpu_seconds(pid) - cpu_before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
        # CPU the proxy process spent per request: steadier than req/s when
        # other work shares the machine.
        "cpu_ms": cpu * 1000 / max(requests, 1),
    }


async def _sequential_p50(
    url: str, headers: dict[str, str] | None, n: int = 300, proofs: list[str] | None = None
) -> float:
    timings = []
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(n):
            h = dict(headers or {})
            if proofs:
                h["DPoP"] = proofs[i]
            started = time.perf_counter()
            response = await http.post(
                url, content=BODY, headers={**h, "Content-Type": "application/json"}
            )
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return statistics.median(timings[n // 10 :])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(clients: int, seconds: int, litellm: str | None) -> None:
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    upstream_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    models = [
        {
            "name": "bench",
            "provider": "openai_compatible",
            "base_url": upstream_url,
            "api_key_ref": "local://providers/mock",
        }
    ]
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "BASTION_GATEWAY_PORT": str(gateway_port),
        "BASTION_LOG_LEVEL": "warning",
        "BASTION_GATEWAY_MODELS": json.dumps(models),
        # The public path is measured; the mTLS listener has bench/mtls.py.
        "BASTION_INTERNAL_MTLS": "0",
        "BASTION_DEV_MODE": "1",
    }
    env.pop("DATABASE_URL", None)
    settings = Settings(home=home, gateway_port=gateway_port)
    procs: list[subprocess.Popen[bytes]] = []
    # BENCH_VERBOSE=1 shows the processes' logs.
    stderr = None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL
    quiet = {"stdout": subprocess.DEVNULL, "stderr": stderr}
    try:
        keystore = open_keystore(settings)
        keystore.set("providers/mock", b"sk-mock")
        async with app_database(settings, migrate=True, max_size=2) as db:
            tenants = TenantService(db)
            tenant = (await tenants.create_tenant("bench-desk", "Bench desk")).id
            user = await tenants.add_member(tenant, "caller@bench.example", "contributor")
            # A plan that admits the bench model at any rate: the rate limit is
            # not what is measured (the budget and everything else is).
            await PlanCatalogue(db).put(BENCH_PLAN, actor="bench")
            # An upgrade outside the payment provider: two operators.
            approvals = build_billing(settings, db, keystore).approvals
            request = await approvals.request_tenant_plan(
                tenant, BENCH_PLAN.code, operator="operator:bench", reason="benchmark"
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
        issuer = settings.resolved_issuer
        key = DpopKey.generate()
        token, _ = TokenIssuer(
            SigningKeys(keystore), issuer=issuer, audience=issuer, lifetime=timedelta(minutes=15)
        ).issue_access(
            user_id=user,
            tenant_id=tenant,
            roles=("contributor",),
            amr=("pwd",),
            jkt=key.thumbprint,
            auth_time=int(time.time()),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "bench/mock_upstream.py", str(upstream_port)], **quiet
            )
        )
        gateway = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "gateway"], env=env, **quiet
        )
        procs.append(gateway)
        await _wait_ready(f"http://127.0.0.1:{upstream_port}/")
        await _wait_ready(f"http://127.0.0.1:{gateway_port}/healthz")
        bastion_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        direct = await _sequential_p50(f"{upstream_url}/chat/completions", None)
        proofs = [key.proof("POST", bastion_url, access_token=token) for _ in range(300)]
        via_bastion = await _sequential_p50(
            bastion_url, {"Authorization": f"DPoP {token}"}, proofs=proofs
        )
        prepare(
            home,
            method="POST",
            body=BODY,
            key=key,
            url=bastion_url,
            token=token,
            per_thread=int(3000 * seconds / THREADS) + clients,
        )
        bastion = _wrk(
            home, bastion_url, clients, seconds, f"DPoP {token}", dpop=True, pid=gateway.pid
        )
        bastion["rss"] = _rss_mb(gateway.pid)
        bastion["added_p50"] = via_bastion - direct
        results = {"bastion": bastion}
        if litellm:
            config = home / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n"
                f"      model: openai/bench\n      api_base: {upstream_url}\n"
                "      api_key: sk-mock\n"
                "general_settings:\n  master_key: sk-bench\n"
            )
            proxy = subprocess.Popen(
                [
                    litellm,
                    "--config",
                    str(config),
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    "1",
                ],
                **quiet,
            )
            procs.append(proxy)
            await _wait_ready(f"http://127.0.0.1:{litellm_port}/health/liveliness")
            litellm_url = f"http://127.0.0.1:{litellm_port}/v1/chat/completions"
            auth = {"Authorization": "Bearer sk-bench"}
            via_litellm = await _sequential_p50(litellm_url, auth)
            result = _wrk(
                home, litellm_url, clients, seconds, "Bearer sk-bench", dpop=False, pid=proxy.pid
            )
            result["rss"] = _rss_mb(proxy.pid)
            result["added_p50"] = via_litellm - direct
            results["litellm"] = result
        print(
            f"{clients} connections (wrk, {THREADS} threads), {seconds} s each; "
            f"upstream direct p50 {direct:.2f} ms (one client)"
        )
        print(
            f"{'proxy':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
            f"{'added p50 ms':>13} {'RSS MB':>8} {'CPU ms/req':>11}"
        )
        for name, r in results.items():
            print(
                f"{name:10} {r['rps']:>9,.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
                f"{r['errors']:>8,.0f} {r['added_p50']:>13.2f} {r['rss']:>8.0f} "
                f"{r['cpu_ms']:>11.2f}"
            )
        if "litellm" in results:
            print(
                f"throughput ratio bastion/litellm: "
                f"{results['bastion']['rps'] / results['litellm']['rps']:.2f}x"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--litellm",
        default=shutil.which("litellm"),
        help="the litellm CLI (its own venv: it is not a Bastion dependency)",
    )
    args = parser.parse_args()
    record_output("gateway")  # bench/results/gateway.json, for bench/report.py
    asyncio.run(run(args.clients, args.seconds, args.litellm))


if __name__ == "__main__":
    main()
