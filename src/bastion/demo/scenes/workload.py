"""Workload identity: the answer path over mTLS, and the wrong workload refused."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from bastion import audit
from bastion.db.pool import Database
from bastion.demo.common import DemoTenant, GatewayLink, Report
from bastion.identity import workload_refusals
from bastion.identity.workload import WorkloadCA, WorkloadTls, spiffe_id
from bastion.safety.signing import HEADER, EnvelopeSigner
from bastion.secrets.protocols import Keystore

CHAT = "/v1/chat/completions"


async def check_workload(
    report: Report,
    db: Database,
    tenants: list[DemoTenant],
    urls: dict[str, str],
    keystore: Keystore,
    link: GatewayLink,
    trust_domain: str,
) -> None:
    """The api → gateway hop of the questions asked so far went over mTLS, with
    each side's SPIFFE ID in its audit event; a worker's certificate posting
    to the gateway's chat route, and an envelope over plain HTTP, are refused."""
    acme = tenants[0]
    api_id, gateway_id = spiffe_id(trust_domain, "api"), spiffe_id(trust_domain, "gateway")
    # The question acme asked through the api process (the answers scene).
    screened: list[str] = []
    invoked: list[str] = []
    deadline = time.monotonic() + 5  # the gateway writes its audit events in batches
    while not invoked and time.monotonic() < deadline:
        async with db.tenant_tx(acme.id, acme.users["auditor"], "auditor") as tx:
            rows = await audit.events(tx, actions=["question.screened", "model.invoke"])
        screened = [
            r["details"].get("gateway_peer", "") for r in rows if r["action"] == "question.screened"
        ]
        invoked = [
            r["details"].get("caller_peer", "") for r in rows if r["action"] == "model.invoke"
        ]
        if not invoked:
            await asyncio.sleep(0.2)
    report.check(
        "workload",
        "the answer path api → gateway → provider runs over mTLS (TLS 1.3, SVIDs ≤ 1 h)",
        gateway_id in screened and api_id in invoked,
        f"question.screened names the gateway {gateway_id}; model.invoke names the caller {api_id}",
    )
    # A process holding a real certificate of Bastion's CA, for the wrong workload.
    worker = WorkloadTls(WorkloadCA(keystore, trust_domain), "worker")
    body = json.dumps({"model": "bastion-local", "messages": [{"role": "user", "content": "hi"}]})
    envelope = EnvelopeSigner(keystore).sign(
        tenant_id=acme.id,
        user_id=acme.users["contributor"],
        body=body.encode(),
        action="question:ask",
    )
    headers = {"Content-Type": "application/json", HEADER: envelope}
    pinned = worker.client_context(expect=[gateway_id])
    async with httpx.AsyncClient(verify=pinned, timeout=10) as http:
        posed = await http.post(f"{link.url}{CHAT}", content=body, headers=headers)
    reason = posed.json().get("reason", "") if posed.status_code == 403 else ""
    recorded = [
        r
        for r in await workload_refusals.recent(db, limit=20)
        if r["presented_id"] == worker.spiffe_id and r["route"] == CHAT
    ]
    report.check(
        "workload",
        "the worker's certificate posting to the gateway's chat route is refused",
        posed.status_code == 403 and reason == "spiffe-id-not-allowed" and bool(recorded),
        f"{posed.status_code} workload-refused ({reason}); recorded with {worker.spiffe_id}",
    )
    async with httpx.AsyncClient(timeout=10) as http:
        plain = await http.post(f"{urls['gateway']}{CHAT}", content=body, headers=headers)
    report.check(
        "workload",
        "an envelope over plain HTTP to the public gateway is refused",
        plain.status_code == 401 and plain.json().get("reason") == "not-from-api",
        f"{plain.status_code} envelope-refused ({plain.json().get('reason', '')})",
    )
