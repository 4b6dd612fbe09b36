"""The safety domain's worker job: ``tool.run`` executes one signed tool call.

The job runs for the user the call was proposed to, through the
:class:`JobRegistry` (Cedar action ``tool:run`` on a ``ToolRun``): a user who
may no longer run tools when the job starts gets nothing run. The executor
then checks the gateway's signature — over the call and over the tool's
declaration from the request it was proposed in, which the job carries — and
runs the call in the sandbox. A tool call is never retried: it is single-use
by design, and a second attempt would be refused as a replay anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import procrastinate

from bastion import audit
from bastion.access.authorize import Subject
from bastion.db.pool import Database
from bastion.logs import get_logger
from bastion.safety.signing import ToolCall
from bastion.safety.tools import SignedToolCall, ToolExecutor, ToolRefused, ToolResult
from bastion.secrets.protocols import Keystore
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from bastion.telemetry.tracing import job_trace_args
from bastion.worker.jobs import JobRefused, JobRegistry

_log = get_logger("bastion.safety")

RUN = "tool.run"
QUEUE = "tools"


def register_from_settings(
    queue: procrastinate.App,
    registry: JobRegistry,
    settings: Settings,
    db: Database,
    keystore: Keystore,
    keys: TenantKeys,
) -> None:
    """Probe the sandbox and register ``tool.run``. Where no sandbox meets the
    configured minimum isolation, the job is still registered, and refuses every
    call (``sandbox-unavailable``, audited): fail closed, nothing left queued.
    ``keys`` key the digests the audit keeps (the worker's, which its shred
    listener clears)."""
    from bastion.safety.sandbox import Sandbox, SandboxConfig, SandboxUnavailable
    from bastion.safety.signing import ToolCallSigner

    executor: ToolExecutor | None = None
    try:
        sandbox = Sandbox.probe(SandboxConfig.from_settings(settings))
        executor = ToolExecutor(db, ToolCallSigner(keystore), sandbox, keys=keys)
        _log.info("sandbox_ready", backend=sandbox.name, isolation=sandbox.isolation.name)
    except SandboxUnavailable as exc:
        _log.warning("sandbox_unavailable", reason=str(exc))
    register(queue, registry, db, executor)


def register(
    queue: procrastinate.App,
    registry: JobRegistry,
    db: Database,
    executor: ToolExecutor | None,
) -> None:
    """Register ``tool.run`` on the queue (queue ``tools``) and in the registry;
    without an executor (no sandbox here) every call is refused."""

    @registry.job(RUN, action="tool:run", resource_type="ToolRun")
    async def run_tool(
        subject: Subject,
        resource_id: str,
        *,
        call: ToolCall,
        signature: str | None,
        declaration: Mapping[str, Any] | None,
        **_: Any,
    ) -> ToolResult:
        if executor is None:
            await _refuse(db, subject.tenant_id, subject.user_id, call, "sandbox-unavailable")
            raise ToolRefused("sandbox-unavailable")
        signed = SignedToolCall(subject.tenant_id, call, signature, declaration)
        return await executor.run(signed, user_id=subject.user_id)

    @queue.task(name=RUN, queue=QUEUE)
    async def run_tool_task(
        tenant_id: str,
        user_id: str,
        call_id: str,
        name: str,
        arguments: str,
        signature: str | None = None,
        tool: Any = None,  # the declaration, as JSON; anything else is refused
    ) -> None:
        declaration = tool if isinstance(tool, Mapping) else None
        call = ToolCall(call_id, name, arguments)
        await run_job(registry, db, tenant_id, user_id, call, signature, declaration)


async def run_job(
    registry: JobRegistry,
    db: Database,
    tenant_id: str,
    user_id: str,
    call: ToolCall,
    signature: str | None,
    declaration: Mapping[str, Any] | None = None,
) -> ToolResult | None:
    """The job's body: the result, or None when refused (already audited)."""
    tenant, user = UUID(tenant_id), UUID(user_id)
    roles = await db.member_roles(tenant, user)
    subject = Subject(user, tenant, roles, mfa=False)
    try:
        result: ToolResult = await registry.run(
            RUN, subject, call.id, call=call, signature=signature, declaration=declaration
        )
    except JobRefused:
        await _refuse(db, tenant, user, call, "not-authorized")
        return None
    except ToolRefused:
        return None  # the executor audited why
    return result


async def _refuse(db: Database, tenant: UUID, user: UUID, call: ToolCall, reason: str) -> None:
    async with db.tenant_tx(tenant, user, "system") as tx:
        await audit.record(
            tx,
            actor=f"user:{user}",
            action="tool.refused",
            target=f"tool_call:{call.id[:200]}",
            details={"tool": call.name[:100], "reason": reason},
        )


async def defer(
    queue: procrastinate.App,
    tenant_id: UUID,
    user_id: UUID,
    call: ToolCall,
    signature: str,
    declaration: Mapping[str, Any],
) -> int:
    """Enqueue a signed tool call with the declaration of its tool from the request
    that proposed it (the ``tools`` entry the signature is bound to); return the job id."""
    job_id: int = await queue.configure_task(name=RUN, queue=QUEUE).defer_async(
        tenant_id=str(tenant_id),
        user_id=str(user_id),
        call_id=call.id,
        name=call.name,
        arguments=call.arguments,
        signature=signature,
        tool=dict(declaration),
        **job_trace_args(),  # the job's span joins the enqueuing request's trace
    )
    return job_id
