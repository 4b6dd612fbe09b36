"""Signed tool calls from the gateway, run by the worker in the sandbox."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bastion import audit
from bastion.db.service import queue_conninfo, queue_password
from bastion.demo.common import STANDIN_MODEL, DemoTenant, GatewayLink, Report
from bastion.knowledge.service import KnowledgeService
from bastion.safety import tasks as safety_tasks
from bastion.safety.sandbox import Sandbox, SandboxConfig, SandboxUnavailable
from bastion.safety.signing import HEADER, EnvelopeSigner, ToolCall, declared_tool
from bastion.secrets.protocols import Keystore
from bastion.settings import Settings
from bastion.worker.queue import queue_app

# Tool calls the stand-in model is scripted to propose (it proposes what it is told to).
TOOL_SCENES = (
    (
        "a calculation the model asks for",
        'calculate {"expression": "1188 * 2 - 1188"}',
        "ok",
    ),
    (
        "a malicious call (a fork bomb) is contained",
        'run_python {"code": "import os\\nwhile True: os.fork()"}',
        "pids_limit",
    ),
)

# The gateway signs a proposed call only for a tool the request declared, bound to
# that declaration; the worker is handed the same declaration with the call.
TOOLS_OFFERED = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {argument: {"type": "string"}},
                "required": [argument],
                "additionalProperties": False,
            },
        },
    }
    for name, argument in (("calculate", "expression"), ("run_python", "code"))
]


async def check_tools(
    report: Report,
    settings: Settings,
    kb: KnowledgeService,
    tenants: list[DemoTenant],
    keystore: Keystore,
    link: GatewayLink,
) -> None:
    """Signed tool calls from the gateway, run by the worker in the sandbox."""
    acme = tenants[0]
    user = acme.users["contributor"]
    try:  # what the worker will find (the sandbox needs root and bubblewrap)
        Sandbox.probe(SandboxConfig.from_settings(settings))
        missing = None
    except SandboxUnavailable as why:
        missing = str(why)
    queue = queue_app(queue_conninfo(settings), password=queue_password(settings))
    async with queue.open_async(), link.client(timeout=30) as http:
        for what, script, expected in TOOL_SCENES:
            body = json.dumps(
                {
                    "model": STANDIN_MODEL,
                    "messages": [{"role": "user", "content": f"/tool {script}"}],
                    "tools": TOOLS_OFFERED,
                }
            ).encode()
            envelope = EnvelopeSigner(keystore).sign(
                tenant_id=acme.id, user_id=user, body=body, action="question:ask"
            )
            answer = await http.post(
                f"{link.url}/v1/chat/completions",
                content=body,
                headers={"Content-Type": "application/json", HEADER: envelope},
            )
            proposed = answer.json()["choices"][0]["message"].get("tool_calls") or [{}]
            raw = proposed[0]
            if "bastion_signature" not in raw:
                report.check(
                    "tools", what, False, f"no signed call came back ({answer.status_code})"
                )
                continue
            call = ToolCall(raw["id"], raw["function"]["name"], raw["function"]["arguments"])
            declaration = declared_tool(TOOLS_OFFERED, call.name) or {}
            await safety_tasks.defer(
                queue, acme.id, user, call, raw["bastion_signature"], declaration
            )
            event = await _tool_outcome(kb, acme, call.id)
            details = event["details"] if event else {}
            outcome = details.get("outcome") or details.get("reason", "no outcome")
            if missing is not None:
                # No sandbox here: every call is refused and nothing runs (fail closed).
                report.check(
                    "tools",
                    f"{what}: refused, no sandbox here",
                    outcome == "sandbox-unavailable",
                    f"{call.name}: {outcome} ({missing}; run as root with bubblewrap)",
                )
                continue
            shown = f"{call.name}: {outcome} in the {details.get('backend', '?')} sandbox"
            if details.get("result"):
                shown += f", result {details['result']}"
            report.check("tools", what, outcome == expected, shown)


async def _tool_outcome(kb: KnowledgeService, tenant: DemoTenant, call_id: str) -> Any:
    """The worker's audit event for the call (run or refused), waiting up to 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with kb.db.tenant_tx(tenant.id, tenant.users["auditor"], "auditor") as tx:
            rows = await audit.events(
                tx, actions=["tool.run", "tool.refused"], target=f"tool_call:{call_id}"
            )
        if rows:
            return rows[0]
        await asyncio.sleep(0.2)
    return None
