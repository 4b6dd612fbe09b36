"""The hosted model goes down: cached answers marked, 503 otherwise, then recovery."""

from __future__ import annotations

import asyncio
import time

from bastion import audit
from bastion.demo.common import STANDIN_MODEL, DemoTenant, GatewayLink, Report
from bastion.demo.upstream import StandInUpstream
from bastion.errors import Kind
from bastion.knowledge.answers import GatewayRefused
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets.protocols import Keystore


async def check_outage(
    report: Report,
    kb: KnowledgeService,
    tenants: list[DemoTenant],
    urls: dict[str, str],
    keystore: Keystore,
    upstream: StandInUpstream,
    link: GatewayLink,
) -> None:
    """The hosted model goes down: cached answers marked, 503 otherwise, then recovery."""
    acme = tenants[0]
    ask = link.ask(kb, keystore)
    asker = Actor(acme.id, acme.users["contributor"], "contributor")
    question = "Why was the customer charged twice?"
    before = upstream.calls
    fresh = await ask.ask(asker, "support", question, model=STANDIN_MODEL)
    report.check(
        "outage",
        f"{acme.slug} asks through {STANDIN_MODEL} (an OpenAI-compatible upstream on loopback)",
        upstream.calls == before + 1 and fresh.cache is None,
        f"answered by the upstream ({upstream.calls - before} call)",
    )
    upstream.stop()
    stale = await ask.ask(asker, "support", question, model=STANDIN_MODEL)
    report.check(
        "outage",
        "upstream stopped: the same question gets the cached answer, marked",
        stale.cache == "stale-fallback" and stale.text == fresh.text,
        f"Bastion-Cache: {stale.cache}",
    )
    other = "Is there a limit on API requests?"
    try:
        await ask.ask(asker, "support", other, model=STANDIN_MODEL)
        unavailable = None
    except GatewayRefused as problem:
        unavailable = problem
    report.check(
        "outage",
        "upstream stopped: a question never answered before gets 503",
        unavailable is not None
        and unavailable.kind is Kind.UNAVAILABLE
        and unavailable.retry_after is not None,
        f"503, Retry-After {unavailable.retry_after} s" if unavailable else "-",
    )
    noted: list[str] = []
    deadline = time.monotonic() + 5  # the gateway writes audit events in batches
    while len(noted) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        async with kb.db.tenant_tx(acme.id, acme.users["auditor"], "auditor") as tx:
            rows = await audit.events(tx, actions=["model.invoke"], target=STANDIN_MODEL)
        noted = [row["details"].get("decision") for row in rows]
    report.check(
        "outage",
        "the audit log notes each outcome",
        noted[-3:] == ["answered", "stale-fallback", "failed:unavailable"],
        ", ".join(noted[-3:]),
    )
    upstream.start()
    recovered = await ask.ask(asker, "support", other, model=STANDIN_MODEL)
    report.check(
        "outage",
        "upstream back: answers come from it again",
        recovered.cache is None and bool(recovered.text),
        "no cache marker",
    )
