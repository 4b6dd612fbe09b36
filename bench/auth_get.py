"""Benchmark: an authenticated, tenant-scoped GET through uvicorn.

Each request carries a DPoP-bound access token and a fresh DPoP proof; the api
verifies both, opens ``tenant_tx`` and runs one select
(``GET /tenants/{id}/members``). The api runs as its own process
(``bastion serve api``); this script is the load generator with 32 concurrent
clients on keep-alive connections. Proofs are made before the timed run so
the client's signing does not compete with the server for the CPU.

Needs ``wrk`` (Debian: ``apt-get install wrk``; ``make bench`` installs it).
Run: .venv/bin/python bench/auth_get.py [--clients 32] [--requests 8000]
Targets (issue 3): >= 800 requests/s, p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from _record import record_output
from bastion.db.launcher import EmbeddedPostgres
from bastion.db.service import app_database
from bastion.identity.client import login
from bastion.identity.passwords import PasswordService
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from wrk_dpop import THREADS, free_port, prepare, run_wrk


async def run(clients: int, requests: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    port = free_port()
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "BASTION_API_PORT": str(port),
        "BASTION_LOG_LEVEL": "warning",
        # The public path is measured; the mTLS listener has bench/mtls.py.
        "BASTION_INTERNAL_MTLS": "0",
        "BASTION_DEV_MODE": "1",
    }
    env.pop("DATABASE_URL", None)
    settings = Settings(home=home, api_port=port)
    password = secrets.token_urlsafe(18)
    api = None
    try:
        async with app_database(settings, migrate=True, max_size=2) as db:
            tenants = TenantService(db)
            tenant = await tenants.create_tenant("bench-desk", "Bench desk")
            for i in range(20):
                await tenants.add_member(tenant.id, f"member{i}@bench.example", "viewer")
            user = await tenants.add_member(tenant.id, "reader@bench.example", "viewer")
            async with db.tenant_tx(tenant.id, None, "system") as tx:
                await PasswordService().set_password(tx, user, password)
        api = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "api"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=10, limits=limits) as http:
            for _ in range(200):
                try:
                    if (await http.get(f"{base}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            tokens = await login(
                http, base, tenant="bench-desk", email="reader@bench.example", password=password
            )
            url = f"{base}/tenants/{tenant.id}/members"
            seconds = max(3, requests // 800)
            prepare(
                home,
                method="GET",
                key=tokens.key,
                url=url,
                token=tokens.access_token,
                per_thread=requests // THREADS + clients,
            )
            report = run_wrk(home, url, clients, seconds, f"DPoP {tokens.access_token}", dpop=True)
        print(
            f"{clients} concurrent connections (wrk, {THREADS} threads), one api process, "
            f"{seconds} s"
        )
        print(report)
    finally:
        if api is not None:
            api.terminate()
            api.wait(10)
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8000)
    args = parser.parse_args()
    record_output("auth_get")  # bench/results/auth_get.json, for bench/report.py
    asyncio.run(run(args.clients, args.requests))


if __name__ == "__main__":
    main()
