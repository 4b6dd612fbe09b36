"""``bastion demo``: the support-desk scenario, as far as Bastion has come.

Two tenants of a support desk, each with users in every role and its own
tickets. The demo starts the embedded stack, plays the scenario against it
(really: HTTP to the running processes, SQL as the app role), prints a report
of every check, and stops what it started. Each scene lives in its own module
under ``bastion.demo.scenes``; this one plays them in order and prints the report.
"""

from __future__ import annotations

import secrets
import socket
import time

import httpx
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from bastion.billing.wiring import build_billing
from bastion.db.provision import DatabaseError
from bastion.db.service import app_database, embedded_server, resolve_target
from bastion.demo.common import STANDIN_KEY, STANDIN_MODEL, GatewayLink, Report
from bastion.demo.scenes.answers import check_answers
from bastion.demo.scenes.audit import check_audit
from bastion.demo.scenes.billing import check_downgrade
from bastion.demo.scenes.closing import check_closing
from bastion.demo.scenes.identity import check_identity
from bastion.demo.scenes.injection import check_injection
from bastion.demo.scenes.isolation import check_isolation
from bastion.demo.scenes.knowledge import check_knowledge
from bastion.demo.scenes.outage import check_outage
from bastion.demo.scenes.policies import check_policies
from bastion.demo.scenes.tenants import seed
from bastion.demo.scenes.tools import check_tools
from bastion.demo.scenes.workload import check_workload
from bastion.demo.upstream import StandInUpstream
from bastion.gateway.providers import LocalProvider
from bastion.identity.workload import WorkloadCA, WorkloadTls, spiffe_id
from bastion.knowledge.service import build_knowledge
from bastion.processes import settings_env, stack, supervisor_tls
from bastion.secrets.backends import open_key_ring, open_keystore
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import SecretRef
from bastion.settings import ModelRoute, Settings

DEMO_DATABASE = "bastion_demo"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run_demo(settings: Settings, console: Console) -> bool:
    """Play the scenario; print the report; return True if every check passed."""
    if settings.database_url:
        raise DatabaseError("the demo runs on the embedded server; unset DATABASE_URL")
    keystore = open_keystore(settings)
    keystore.set(STANDIN_KEY, secrets.token_urlsafe(24).encode())
    # The Stripe webhook signing secret, as Stripe's dashboard would show it.
    stripe_secret = SecretRef.parse(settings.stripe_webhook_secret_ref).name
    keystore.set(stripe_secret, f"whsec_{secrets.token_urlsafe(24)}".encode())
    upstream = StandInUpstream(_free_port(), keystore.get(STANDIN_KEY).decode(), LocalProvider())
    settings = settings.model_copy(
        update={
            "database_name": DEMO_DATABASE,
            "api_port": _free_port(),
            "gateway_port": _free_port(),
            "worker_port": _free_port(),
            "gateway_internal_port": _free_port(),
            "api_internal_port": _free_port(),
            "worker_internal_port": _free_port(),
            "gateway_models": [
                ModelRoute(name="bastion-local", provider="local"),
                ModelRoute(
                    name=STANDIN_MODEL,
                    provider="openai_compatible",
                    base_url=upstream.base_url,
                    api_key_ref=f"local://{STANDIN_KEY}",
                    timeout_seconds=10,
                    micro_usd_per_mtok_prompt=150_000,
                    micro_usd_per_mtok_completion=600_000,
                ),
            ],
            # Every call goes to the provider, so that the outage scene shows
            # the stale fallback rather than a fresh cache hit.
            "gateway_cache_ttl_seconds": 0.0,
            # The public listeners on loopback: plain HTTP is development
            # (bastion.serve.public_tls), and each process logs it so.
            "dev_mode": settings.dev_mode or settings.public_tls_cert_file is None,
        }
    )
    report = Report()
    console.rule("[bold]Bastion demo: a support desk with two tenants")

    server = embedded_server(settings)
    started = time.perf_counter()
    was_running = server.status() is not None
    target = resolve_target(settings)  # starts the embedded server
    report.check(
        "database",
        "embedded PostgreSQL 18 + pgvector up",
        True,
        f"{'attached' if was_running else 'started'} in {time.perf_counter() - started:.2f} s, "
        f"scram-sha-256, socket in a 0700 dir",
    )
    _fresh_database(target.admin_conninfo, DEMO_DATABASE)
    try:
        with stack(settings, log_dir=settings.home / "log" / "demo") as urls:
            _check_processes(report, settings, urls)
            link = _gateway_link(settings, urls, keystore)
            db = app_database(settings, max_size=4)
            async with db:
                tenants = await seed(db)
                # acme-support pays for Pro (every model) on an invoice, outside Stripe:
                # an upgrade without the payment provider takes two operators.
                # globex-support stays on Free.
                approvals = build_billing(settings, db, keystore).approvals
                pending = await approvals.request_tenant_plan(
                    tenants[0].id, "pro", operator="operator:demo-sales", reason="signed up for Pro"
                )
                await approvals.approve(pending.id, operator="operator:demo-finance")
                report.check(
                    "tenants",
                    "two tenants with a user in every role and their own tickets",
                    True,
                    ", ".join(
                        f"{t.slug}: {len(t.users)} users, {len(t.tickets)} tickets" for t in tenants
                    )
                    + "; acme-support on Pro (two operators approved), globex-support on Free",
                )
                await check_isolation(report, db, tenants)
                check_policies(report, tenants)
                await check_audit(report, db, tenants)
                await check_identity(
                    report,
                    db,
                    tenants,
                    urls["api"],
                    open_keystore(settings),
                    settings_env(settings),
                )
                kb = build_knowledge(settings, db, open_key_ring(settings, keystore=keystore).kms)
                await check_knowledge(report, kb, tenants, urls["api"], console)
                await check_answers(report, kb, tenants, urls, keystore, console, link)
                if settings.internal_mtls:
                    await check_workload(
                        report, db, tenants, urls, keystore, link, settings.workload_trust_domain
                    )
                ask = link.ask(kb, keystore)
                await check_injection(report, kb, tenants, ask)
                upstream.start()
                try:
                    await check_outage(report, kb, tenants, urls, keystore, upstream, link)
                    await check_tools(report, settings, kb, tenants, keystore, link)
                finally:
                    upstream.stop()
                await check_downgrade(report, settings, kb, tenants, ask, keystore, urls["api"])
                await check_closing(report, settings, db, tenants, urls, keystore)
    finally:
        if not was_running:
            server.stop()
    report.check(
        "shutdown", "stopped what the demo started", server.status() is None or was_running
    )
    _print(console, report)
    return report.ok


def _fresh_database(admin_conninfo: str, dbname: str) -> None:
    with psycopg.connect(admin_conninfo, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _gateway_link(settings: Settings, urls: dict[str, str], keystore: Keystore) -> GatewayLink:
    """The demo asks in the api's place: over mTLS with an api SVID when the
    stack runs mTLS (the default), to the gateway's SPIFFE ID only."""
    if "gateway_internal" not in urls:
        return GatewayLink(urls["gateway"])
    td = settings.workload_trust_domain
    gateway_id = spiffe_id(td, "gateway")
    tls = WorkloadTls(WorkloadCA(keystore, td), "api")
    return GatewayLink(urls["gateway_internal"], tls.client_context([gateway_id]), gateway_id)


def _check_processes(report: Report, settings: Settings, urls: dict[str, str]) -> None:
    if "gateway_internal" in urls:
        gateway_id = spiffe_id(settings.workload_trust_domain, "gateway")
        scraper = supervisor_tls(settings).client_context([gateway_id])
        with httpx.Client(verify=scraper, timeout=5) as client:
            ready = client.get(f"{urls['gateway_internal']}/readyz")
        report.check(
            "processes",
            "gateway's internal listener ready over mTLS (TLS 1.3, a scraper's SVID)",
            ready.status_code == 200,
            f"{urls['gateway_internal']} as {gateway_id}",
        )
    with httpx.Client(timeout=5) as client:
        for process in ("api", "gateway", "worker"):
            url = urls[process]
            ready = client.get(f"{url}/readyz")
            report.check("processes", f"{process} ready", ready.status_code == 200, url)
        missing = client.get(f"{urls['api']}/no/such/route")
        report.check(
            "processes",
            "unknown route answers RFC 9457 problem+json",
            missing.status_code == 404
            and missing.headers.get("content-type", "").startswith("application/problem+json"),
            f"{missing.status_code} {missing.json().get('type', '')}",
        )


def _print(console: Console, report: Report) -> None:
    table = Table(show_lines=False)
    table.add_column("area")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for section, what, passed, detail in report.rows:
        table.add_row(section, what, "[green]PASS[/]" if passed else "[red]FAIL[/]", detail)
    console.print(table)
    passed_count = sum(1 for row in report.rows if row[2])
    colour = "green" if report.ok else "red"
    console.print(f"[bold {colour}]{passed_count}/{len(report.rows)} checks passed[/]")
