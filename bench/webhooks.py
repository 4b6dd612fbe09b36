"""Benchmark: Stripe webhook intake (verify + store + ack) and the worker's apply rate.

The api runs as its own process (``bastion serve api``) on an embedded
PostgreSQL; ``wrk`` posts pre-signed deliveries (one distinct event each, made
before the timed run so signing does not compete with the server) to
``POST /webhooks/stripe`` on keep-alive connections. Every answer must be 200.
Then ``bastion serve worker`` starts and the time it takes to apply every
stored event is the apply rate.

Needs ``wrk``. Run: .venv/bin/python bench/webhooks.py [--clients 32] [--events 6000]
Target (issue 7): intake >= 500 events/s on this machine; apply rate: reported.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import stripe

from _record import record_output
from bastion.billing.plans import PlanCatalogue
from bastion.billing.service import BillingService
from bastion.billing.webhooks import EventCipher
from bastion.db.launcher import EmbeddedPostgres
from bastion.db.service import app_database, resolve_target
from bastion.secrets.backends import open_keystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from wrk_dpop import THREADS, free_port

TENANTS = 50
_LUA = """
local lines, n = {}, 0
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  for line in io.lines("@HOME@/deliveries-" .. id .. ".txt") do lines[#lines + 1] = line end
end
function request()
  n = n + 1
  if n > #lines then n = 1 end
  local tab = string.find(lines[n], "\\t", 1, true)
  local headers = {["Stripe-Signature"] = string.sub(lines[n], 1, tab - 1),
                   ["Content-Type"] = "application/json"}
  return wrk.format("POST", nil, headers, string.sub(lines[n], tab + 1))
end
function done(summary, latency, requests)
  io.write(string.format("non2xx=%d\\n", summary.errors.status))
end
"""


_PRO_PRICE: dict[str, Any] = {
    "object": "price",
    "type": "recurring",
    "unit_amount": 4900,
    "currency": "usd",
    "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
}


def _event(customer: str, price: str, created: int) -> str:
    sub = {
        "id": f"sub_{customer}",
        "object": "subscription",
        "customer": customer,
        "status": "active",
        # Exactly the plan's price (issue 23 B5 refuses any other): Pro, 49.00 a month.
        "items": {"object": "list", "data": [{"price": _PRO_PRICE | {"id": price}}]},
    }
    event = {
        "id": f"evt_{uuid4().hex}",
        "object": "event",
        "livemode": False,  # the bench configures test mode (issue 23 B5 refuses the other)
        "created": created,
        "type": "customer.subscription.updated",
        "data": {"object": sub},
    }
    return json.dumps(event, separators=(",", ":"))


def _db_counts(conninfo: str) -> tuple[int, int]:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status IN ('applied', 'stale')), count(*) "
            "FROM bastion.webhook_events"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def run(clients: int, events: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    port, worker_port = free_port(), free_port()
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "BASTION_API_PORT": str(port),
        "BASTION_WORKER_PORT": str(worker_port),
        "BASTION_LOG_LEVEL": "warning",
        # Plain HTTP on loopback and no internal listener, as the other
        # benchmarks run their processes (the intake path is what is measured).
        "BASTION_DEV_MODE": "1",
        "BASTION_INTERNAL_MTLS": "0",
    }
    env.pop("DATABASE_URL", None)
    settings = Settings(home=home, api_port=port)
    keystore = open_keystore(settings)
    secret = f"whsec_{uuid4().hex}"
    keystore.set(settings.stripe_webhook_secret_ref.removeprefix("local://"), secret.encode())
    api = worker = None
    try:
        customers: list[str] = []
        async with app_database(settings, migrate=True, max_size=2) as db:
            billing = BillingService(db, EventCipher(keystore))
            catalogue = PlanCatalogue(db)
            pro = await catalogue.get("pro")
            await catalogue.put(
                dataclasses.replace(pro, stripe_price_id="price_pro"), actor="bench"
            )
            for i in range(TENANTS):
                tenant = await TenantService(db).create_tenant(f"hook-{i}", f"Hooks {i}")
                customers.append(f"cus_bench_{i}")
                await billing.link_stripe_customer(tenant.id, customers[-1])
        target = resolve_target(settings, start=False)
        admin = target.admin_conninfo_on_db()
        api = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "api"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(400):
                try:
                    if (await http.get(f"{base}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            else:
                sys.exit("the api did not start (run it by hand to see why)")
        # Deliveries signed just before the run (well inside the 300 s tolerance).
        rng = random.Random(1)
        now = int(time.time())
        per_thread = events // THREADS
        for thread in range(THREADS):
            lines = []
            for _ in range(per_thread):
                body = _event(rng.choice(customers), "price_pro", now - rng.randrange(600))
                header = stripe.WebhookSignature.generate_signature_header(body, secret)
                lines.append(f"{header}\t{body}")
            (home / f"deliveries-{thread}.txt").write_text("\n".join(lines) + "\n")
        (home / "bench.lua").write_text(_LUA.replace("@HOME@", str(home)))
        # Time-boxed so that each delivery is sent about once.
        seconds = max(3, events // 700)
        report = subprocess.run(
            ["wrk", f"-t{THREADS}", f"-c{clients}", f"-d{seconds}s", "--latency",
             "-s", str(home / "bench.lua"), f"{base}/webhooks/stripe"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        _, stored = _db_counts(admin)
        print(f"intake: {clients} connections (wrk, {THREADS} threads), one api process, "
              f"{seconds} s; distinct events stored: {stored}")  # fmt: skip
        print(report)
        api.terminate()
        api.wait(10)
        api = None
        # The worker starts with every event queued: its apply rate, alone on the machine.
        started = time.perf_counter()
        worker = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first: tuple[float, int] | None = None
        while True:
            done, _ = _db_counts(admin)
            if first is None and done:
                first = (time.perf_counter(), done)
            if done >= stored:
                break
            await asyncio.sleep(0.05)
        end = time.perf_counter()
        assert first is not None
        rate = (stored - first[1]) / max(end - first[0], 1e-9)
        print(
            f"worker: {stored} events applied in {end - started:.1f} s including start-up; "
            f"apply rate {rate:.0f} events/s (one worker process, {TENANTS} tenants)"
        )
    finally:
        for proc in (api, worker):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--events", type=int, default=6000)
    args = parser.parse_args()
    record_output("webhooks")  # bench/results/webhooks.json, for bench/report.py
    asyncio.run(run(args.clients, args.events))


if __name__ == "__main__":
    main()
