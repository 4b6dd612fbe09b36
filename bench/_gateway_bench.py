"""What the gateway benchmarks share (bench/gateway.py, gateway_screen.py,
gateway_openbao.py): the bench plan and tenant, a DPoP-bound token, the
gateway's environment, and the measurements (``wrk`` with the proxy's CPU per
request, one sequential client's p50, RSS).

The tenant is on a plan that admits the bench model at any rate and has an
ample budget: the rate limit is not what is measured, the budget (reserved and
settled in PostgreSQL) and everything else on the call's path is.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import httpx
import uvicorn

from bastion.billing.budgets import BudgetService
from bastion.billing.plans import Plan, PlanCatalogue
from bastion.billing.wiring import build_billing
from bastion.db.service import app_database
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.secrets.backends import open_keystore
from bastion.secrets.protocols import Keystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from wrk_dpop import run_wrk

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
QUESTION = "When was the refund issued?"
# The upstream key the bench model's route names (bench/mock_upstream.py ignores it).
PROVIDER_REF = "local://providers/mock"


def chat_body(prompt: str = QUESTION) -> str:
    """A chat completion request for the bench model with one user turn."""
    return json.dumps({"model": "bench", "messages": [{"role": "user", "content": prompt}]})


def gateway_env(home: Path, upstream_url: str) -> dict[str, str]:
    """The ``BASTION_*`` settings of a bench gateway in ``home`` in front of the
    mock upstream: the public path (the mTLS listener has bench/mtls.py), dev mode."""
    models = [
        {
            "name": "bench",
            "provider": "openai_compatible",
            "base_url": upstream_url,
            "api_key_ref": PROVIDER_REF,
        }
    ]
    return {
        "BASTION_HOME": str(home),
        "BASTION_LOG_LEVEL": "warning",
        "BASTION_GATEWAY_MODELS": json.dumps(models),
        "BASTION_INTERNAL_MTLS": "0",
        "BASTION_DEV_MODE": "1",
    }


async def bench_tenant(settings: Settings, name: str) -> tuple[UUID, UUID]:
    """A tenant on :data:`BENCH_PLAN` (migrations run, plan put, the upgrade
    approved by two operators outside the payment provider) with a budget of
    a day, and its contributor: ``(tenant, user)``."""
    keystore = open_keystore(settings)
    keystore.set("providers/mock", b"sk-mock")
    async with app_database(settings, migrate=True, max_size=2) as db:
        await PlanCatalogue(db).put(BENCH_PLAN, actor="bench")
        tenants = TenantService(db)
        tenant = (await tenants.create_tenant(name, name)).id
        user = await tenants.add_member(tenant, f"caller@{name}.example", "contributor")
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
    return tenant, user


def access_token(
    keystore: Keystore, settings: Settings, tenant: UUID, user: UUID, *, minutes: int = 30
) -> tuple[str, DpopKey]:
    """A contributor's access token bound to a fresh DPoP key, and the key."""
    issuer = settings.resolved_issuer
    key = DpopKey.generate()
    token, _ = TokenIssuer(
        SigningKeys(keystore), issuer=issuer, audience=issuer, lifetime=timedelta(minutes=minutes)
    ).issue_access(
        user_id=user,
        tenant_id=tenant,
        roles=("contributor",),
        amr=("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    return token, key


async def wait_ready(url: str) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(600):
            try:
                await http.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used by the process and its descendants (/proc)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree = {pid}
    for _ in range(5):  # a few generations deep
        tree |= {p for p, (parent, _t) in stats.items() if parent in tree}
    ticks = sum(stats[p][1] for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def wrk_run(
    home: Path,
    url: str,
    clients: int,
    seconds: int,
    auth: str,
    *,
    dpop: bool,
    pid: int,
    db_pid: int | None = None,
) -> dict[str, float]:
    """One ``wrk`` run: req/s, p50/p99 ms, non-2xx count, and the CPU the proxy
    process (``pid`` and its children) spent per request; with ``db_pid`` (the
    postmaster) also the database's CPU per request, which shares the cores."""
    cpu_before = cpu_seconds(pid)
    db_before = cpu_seconds(db_pid) if db_pid else 0.0
    out = run_wrk(home, url, clients, seconds, auth, dpop=dpop)
    cpu = cpu_seconds(pid) - cpu_before
    db_cpu = cpu_seconds(db_pid) - db_before if db_pid else 0.0
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
        "db_cpu_ms": db_cpu * 1000 / max(requests, 1),
    }


async def sequential_p50(
    url: str,
    headers: dict[str, str] | None,
    n: int = 300,
    proofs: list[str] | None = None,
    body: str | None = None,
) -> float:
    """p50 ms of ``n`` requests one after another (the first tenth not counted)."""
    content = body if body is not None else chat_body()
    timings = []
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(n):
            h = dict(headers or {})
            if proofs:
                h["DPoP"] = proofs[i]
            started = time.perf_counter()
            response = await http.post(
                url, content=content, headers={**h, "Content-Type": "application/json"}
            )
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return statistics.median(timings[n // 10 :])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def serve_in_thread(app: object, port: int) -> uvicorn.Server:
    """``app`` on 127.0.0.1:``port`` in a daemon thread (set ``should_exit`` to stop)."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")  # type: ignore[arg-type]
    )
    threading.Thread(target=server.run, daemon=True).start()
    return server
