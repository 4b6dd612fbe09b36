"""Questions answered through the gateway from each tenant's own tickets; budgets."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import httpx
from rich.console import Console

from bastion.billing.budgets import BudgetService
from bastion.demo.common import DemoTenant, GatewayLink, Report
from bastion.errors import Kind
from bastion.identity.client import login
from bastion.identity.passwords import PasswordService
from bastion.knowledge.answers import GatewayRefused
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets.protocols import Keystore


async def check_answers(
    report: Report,
    kb: KnowledgeService,
    tenants: list[DemoTenant],
    urls: dict[str, str],
    keystore: Keystore,
    console: Console,
    link: GatewayLink,
) -> None:
    """Questions answered through the gateway from each tenant's own tickets; budgets."""
    acme, globex = tenants
    budgets = BudgetService(kb.db)
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    for tenant, calls in ((acme, 20), (globex, 1)):
        await budgets.set_budget(
            tenant.id, period_start=start, period_end=end, call_limit=calls, token_limit=10**6
        )
    question = "How do I get a refund for a double charge?"
    password = secrets.token_urlsafe(18)
    async with kb.db.tenant_tx(acme.id, None, "system") as tx:
        await PasswordService().set_password(tx, acme.users["contributor"], password)
    api = urls["api"]
    async with httpx.AsyncClient(timeout=60) as http:
        asker = await login(
            http, api, tenant=acme.slug, email="contributor@acme.example", password=password
        )
        url = f"{api}/tenants/{acme.id}/knowledge/namespaces/support/questions"
        asked = await http.post(
            url, headers=asker.headers("POST", url), json={"question": question}
        )
    own = {str(d.id) for d in await kb.documents(Actor(acme.id, None, "system"), "support")}
    body = asked.json() if asked.status_code == 200 else {}
    cited = {s["document_id"] for s in body.get("sources", [])}
    report.check(
        "gateway",
        f"{acme.slug} asks “{question}” (api → signed envelope → gateway → local model)",
        asked.status_code == 200 and bool(cited) and cited <= own,
        f"{asked.status_code}; {len(cited)} of its own tickets as context",
    )
    if body:
        console.print(f"[bold]{acme.slug}[/] answer: {body['answer'][:300]}", highlight=False)
    ask = link.ask(kb, keystore)
    viewer = Actor(globex.id, globex.users["viewer"], "viewer")
    answer = await ask.ask(viewer, "support", question, model="bastion-local")
    theirs = {d.id for d in await kb.documents(Actor(globex.id, None, "system"), "support")}
    report.check(
        "gateway",
        f"{globex.slug} asks the same question",
        all(h.document_id in theirs for h in answer.sources) and bool(answer.sources),
        "answered from its own tickets only",
    )
    try:
        await ask.ask(viewer, "support", "And the invoice?", model="bastion-local")
        refused = None
    except GatewayRefused as problem:
        refused = problem
    report.check(
        "gateway",
        f"{globex.slug} over its budget (1 call this month)",
        refused is not None
        and refused.kind is Kind.PAYMENT_REQUIRED
        and refused.retry_after is not None,
        f"402, Retry-After {refused.retry_after if refused else '-'} s, no model call",
    )
