"""Each tenant ingests its tickets; searches return only its own, redacted."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
from rich.console import Console

from bastion.demo.common import DemoTenant, Report
from bastion.identity.client import login
from bastion.identity.passwords import PasswordService
from bastion.knowledge.cli import hits_table, run_ingest
from bastion.knowledge.ingest import discover
from bastion.knowledge.service import Actor, KnowledgeService

TICKETS = Path(__file__).parents[1] / "tickets"

# What must never come back from a search: the tickets' PII, unredacted.
PII_MARKERS = (
    "@",
    "4242 4242",
    "5555 5555",
    "GB82",
    "GB29",
    "DE89",
    "DE75",
    "123-45-6789",
    "219-09-9999",
    "AB 12 34 56",
    "JG 10 37 59",
)


async def check_knowledge(
    report: Report, kb: KnowledgeService, tenants: list[DemoTenant], api: str, console: Console
) -> None:
    """Each tenant ingests its tickets; searches return only its own, redacted."""
    ingested = {}
    for tenant in tenants:
        files = discover([TICKETS / tenant.slug.split("-")[0]])
        console.print(f"[bold]{tenant.slug}[/]: ingesting {len(files)} tickets (MiniLM)")
        started = time.perf_counter()
        result = await run_ingest(kb, tenant.id, "support", files, console)
        elapsed = time.perf_counter() - started
        ingested[tenant.slug] = result
        report.check(
            "knowledge",
            f"{tenant.slug} ingests its tickets (redact → chunk → embed → encrypt)",
            result.indexed + result.skipped == len(files) and not result.failed,
            f"{len(files)} files, {result.chunks} chunks, {elapsed:.1f} s, MiniLM on CPU",
        )
    acme, globex = tenants
    question = "customer was charged twice and wants a refund"
    for tenant in tenants:
        viewer = Actor(tenant.id, tenant.users["viewer"], "viewer")
        hits = await kb.search(viewer, "support", query=question, k=5)
        own = {d.id for d in await kb.documents(viewer, "support")}
        texts = " ".join(h.text for h in hits)
        leaked = [m for m in PII_MARKERS if m in texts]
        report.check(
            "knowledge",
            f"{tenant.slug} viewer searches “{question}”",
            bool(hits) and all(h.document_id in own for h in hits) and not leaked,
            f"{len(hits)} hits, all its own; best: {hits[0].title if hits else '-'}; "
            f"PII in hits: {leaked or 'none'}",
        )
        if tenant is acme:
            console.print(hits_table(hits[:3], width=80))
    # Over HTTP, through the api and the worker processes.
    password = secrets.token_urlsafe(18)
    async with kb.db.tenant_tx(acme.id, None, "system") as tx:
        await PasswordService().set_password(tx, acme.users["contributor"], password)
    async with httpx.AsyncClient(timeout=30) as http:
        writer = await login(
            http, api, tenant=acme.slug, email="contributor@acme.example", password=password
        )
        upload = f"{api}/tenants/{acme.id}/knowledge/namespaces/support/documents"
        sent = await http.post(
            upload,
            params={"title": "Webhook retries flood the endpoint"},
            content=b"Stripe retried invoice.paid 40 times; reach me at ops@acme.example.",
            headers={**writer.headers("POST", upload), "Content-Type": "text/plain"},
        )
        document = f"{api}/tenants/{acme.id}/knowledge/documents/{sent.json().get('id')}"
        status, deadline = "pending", time.monotonic() + 60
        while status == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            got = await http.get(document, headers=writer.headers("GET", document))
            status = got.json().get("status", "missing")
        report.check(
            "knowledge",
            "upload over HTTP; the worker process indexes it",
            sent.status_code == 202 and status == "indexed",
            f"{sent.status_code}, then {status} (procrastinate job, same transaction)",
        )
        globex_ns = (await kb.namespace(Actor(globex.id, None, "system"), "support")).id
        search = f"{api}/tenants/{acme.id}/knowledge/namespaces/{globex_ns}/search"
        cross = await http.post(
            search, headers=writer.headers("POST", search), json={"query": question}
        )
        report.check(
            "knowledge",
            f"{acme.slug} searches {globex.slug}'s namespace id",
            cross.status_code == 404,
            f"{cross.status_code} {cross.json().get('type', '').rsplit('/', 1)[-1]}",
        )
