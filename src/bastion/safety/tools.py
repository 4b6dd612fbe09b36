"""The tool executor: tool calls a model proposed run here, in the worker — only
with a valid gateway signature (CHECKLIST M1) and only inside the sandbox
(CHECKLIST M2). Nothing a call carries is ever evaluated in this process.

A call is checked first (signature, key, expiry, tenant, name, arguments,
the tool declaration it was signed for, single use —
:class:`~bastion.safety.signing.ToolCallSigner`), then its arguments: again,
as the gateway did before signing, against the JSON Schema of the declaration
the signature binds (:func:`bastion.safety.tool_schema.refusal_for`: an
I-JSON object, in a separate process, killed past its time limit), then by
the tool itself. A refused call runs nothing and is audited as ``tool.refused``.
Single use across every worker process and restart: the call's signed
``run_id`` is inserted into ``tool_call_runs`` and committed before the
sandbox starts, so a second attempt (another spelling, another worker, a job
requeued after a crash mid-run) finds it and is refused as ``replayed``.
A call that runs is audited as ``tool.run`` with its outcome, whatever the
program did (exit, limits, seccomp, timeout), and the worker keeps going.

Audit events outlive ``tenant shred`` (the trail is append-only), so what a
``tool.run`` event keeps of the tenant's content — the arguments, the
output, the declaration — is an HMAC-SHA256 (RFC 2104) under a key derived
from the tenant's data key (:func:`~bastion.secrets.tenant_keys.keyed_digest`),
never a plain hash and never the text: while the tenant exists, whoever holds
its keys can confirm a claimed argument or result
(:meth:`ToolExecutor.audit_digest`); once its keys are shredded, a dump of the
trail cannot confirm a guess ("was it ``2+2``?"). The output's size and the
outcome stay in the clear; the result itself is not kept.

Tools:

- ``calculate`` ``{"expression": "2 * (3 + 4)"}``: arithmetic on numbers
  (``+ - * / // % **``, parentheses), parsed and evaluated by ``python3 -I -S``
  inside the sandbox;
- ``run_python`` ``{"code": "..."}``: an arbitrary untrusted snippet.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from bastion import audit, jsonsafe
from bastion.db.pool import Database
from bastion.safety import tool_schema
from bastion.safety.sandbox import Limits, Outcome, Result, RunSpec, Sandbox, SandboxUnavailable
from bastion.safety.sandbox.spec import PYTHON
from bastion.safety.signing import EnvelopeInvalid, ToolCall, ToolCallSigner, VerifiedToolCall
from bastion.secrets.errors import KMSError
from bastion.secrets.tenant_keys import Conn, KeyUnavailable, TenantKeys, keyed_digest

MAX_ARGUMENTS = 64 * 1024
MAX_EXPRESSION = 200
# What a caller gets back of the output.
MAX_OUTPUT_CHARS = 16 * 1024
# keyed_digest's purpose for what a tool.run event keeps of the tenant's content.
AUDIT_DIGEST = "tool-audit"

# Evaluated in the sandbox: an AST walk over numbers and arithmetic only.
_CALCULATE = r"""
import ast, operator, sys
BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
       ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
       ast.Pow: operator.pow}
UN = {ast.UAdd: operator.pos, ast.USub: operator.neg}
def ev(n):
    if isinstance(n, ast.Constant) and type(n.value) in (int, float):
        return n.value
    if isinstance(n, ast.BinOp) and type(n.op) in BIN:
        a, b = ev(n.left), ev(n.right)
        if isinstance(n.op, ast.Pow) and abs(b) > 1000:
            raise ValueError("exponent too large")
        return BIN[type(n.op)](a, b)
    if isinstance(n, ast.UnaryOp) and type(n.op) in UN:
        return UN[type(n.op)](ev(n.operand))
    raise ValueError("only numbers and + - * / // % ** ( ) are allowed")
try:
    print(ev(ast.parse(sys.stdin.read(), mode="eval").body))
except (ArithmeticError, ValueError, SyntaxError, RecursionError) as e:
    print(type(e).__name__ + ": " + str(e)[:200], file=sys.stderr)
    sys.exit(2)
"""
_EXPRESSION = re.compile(r"[0-9+\-*/%().eE_ \t]+")


class ToolRefused(Exception):
    """The call was not run; ``reason`` is a stable slug (``unsigned``,
    ``bad-signature``, ``expired``, ``replayed``, ``call-altered``, ``unknown-key``,
    ``malformed``, ``undeclared``, ``declaration-altered``, ``wrong-user``,
    ``unknown-tool``, ``bad-arguments``, ``bad-declaration``,
    ``arguments-unchecked``, ``sandbox-unavailable``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignedToolCall:
    """A tool call as the gateway handed it out, for the tenant the job names, with
    the declaration (the request's ``tools`` entry) it was proposed and signed under."""

    tenant_id: UUID
    call: ToolCall
    signature: str | None
    declaration: Mapping[str, Any] | None


@dataclass(frozen=True)
class ToolResult:
    call_id: str
    name: str
    user_id: UUID
    outcome: Outcome
    output: str  # stdout, undecodable bytes replaced, at most MAX_OUTPUT_CHARS
    error: str  # the tail of stderr, same treatment
    exit_code: int | None
    truncated: bool
    backend: str

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True)
class Tool:
    name: str
    # Arguments (parsed JSON) -> (argv, stdin); raises ValueError for bad arguments.
    build: Callable[[Mapping[str, Any]], tuple[tuple[str, ...], bytes]]


def _calculate(arguments: Mapping[str, Any]) -> tuple[tuple[str, ...], bytes]:
    expression = arguments.get("expression")
    if not isinstance(expression, str) or not 0 < len(expression) <= MAX_EXPRESSION:
        raise ValueError("expression must be a string of 1..200 characters")
    if not _EXPRESSION.fullmatch(expression):
        raise ValueError("expression may hold only numbers, operators and parentheses")
    return (PYTHON, "-I", "-S", "-c", _CALCULATE), expression.encode()


def _run_python(arguments: Mapping[str, Any]) -> tuple[tuple[str, ...], bytes]:
    code = arguments.get("code")
    if not isinstance(code, str) or not code.strip():
        raise ValueError("code must be a non-empty string")
    return (PYTHON, "-I", "-S", "-"), code.encode()  # the program on stdin


TOOLS: Mapping[str, Tool] = {
    "calculate": Tool("calculate", _calculate),
    "run_python": Tool("run_python", _run_python),
}


def _text(data: bytes, limit: int) -> str:
    return data[: limit * 4].decode("utf-8", errors="replace")[:limit]


class ToolExecutor:
    """Verifies and runs signed tool calls; every outcome is audited.

    ``keys`` are the tenants' data keys, for the keyed digests of the audit
    (share the process's :class:`~bastion.secrets.tenant_keys.TenantKeys`, the
    one its shred listener clears).
    """

    def __init__(
        self,
        db: Database,
        signer: ToolCallSigner,
        sandbox: Sandbox,
        *,
        keys: TenantKeys,
        tools: Mapping[str, Tool] = TOOLS,
        limits: Limits | None = None,
    ) -> None:
        self.db = db
        self.signer = signer
        self.sandbox = sandbox
        self.keys = keys
        self.tools = tools
        self.limits = limits or sandbox.config.limits

    async def run(self, signed: SignedToolCall, *, user_id: UUID | None = None) -> ToolResult:
        """Run the call in the sandbox and return its result.

        ``user_id``, when given, is who the job runs for; the signature must name
        the same user. Raises :class:`ToolRefused` (audited, nothing run) for a
        call that is unsigned, altered, expired, replayed, for another tenant or
        user, not declared or declared otherwise than signed, of an unknown tool
        or with arguments not valid against its declared schema (or that the
        check could not finish in time), or while tools are disabled for its
        tenant (``tools-disabled``: a queued run is not started).
        """
        call, tenant = signed.call, signed.tenant_id
        try:
            verified = self.signer.verify(
                call, signed.signature, tenant_id=tenant, declaration=signed.declaration
            )
        except EnvelopeInvalid as exc:
            await self._refused(tenant, None, call, exc.reason)
            raise ToolRefused(exc.reason) from None
        signer_user = verified.user_id
        if user_id is not None and signer_user != user_id:
            await self._refused(tenant, user_id, call, "wrong-user")
            raise ToolRefused("wrong-user")
        tool = self.tools.get(call.name)
        if tool is None:
            await self._refused(tenant, signer_user, call, "unknown-tool")
            raise ToolRefused("unknown-tool")
        # The declaration is the one the signature binds (verify checked its hash).
        assert signed.declaration is not None
        refusal = await tool_schema.refusal_for(tenant, signed.declaration, call.arguments)
        if refusal is not None:
            await self._refused(tenant, signer_user, call, refusal.reason, check=refusal)
            raise ToolRefused(refusal.reason)
        try:
            if len(call.arguments) > MAX_ARGUMENTS:
                raise ValueError("arguments too large")
            # As the schema check read them: one value, however they are read.
            arguments = jsonsafe.loads_i_json(call.arguments)
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
            argv, stdin = tool.build(arguments)
        except ValueError:  # JSONDecodeError included
            await self._refused(tenant, signer_user, call, "bad-arguments")
            raise ToolRefused("bad-arguments") from None
        first = await self._first_run(tenant, signer_user, call, verified.run_id)
        if first is None:  # bastion incident disable-tools: the run id stays unused
            await self._refused(tenant, signer_user, call, "tools-disabled", verified.run_id)
            raise ToolRefused("tools-disabled")
        if not first:
            await self._refused(tenant, signer_user, call, "replayed", verified.run_id)
            raise ToolRefused("replayed")
        try:
            result = await self.sandbox.run_async(RunSpec(argv, stdin=stdin, limits=self.limits))
        except SandboxUnavailable:  # no free uid, or a backend that refuses to start
            await self._refused(tenant, signer_user, call, "sandbox-unavailable", verified.run_id)
            raise ToolRefused("sandbox-unavailable") from None
        tool_result = ToolResult(
            call_id=call.id,
            name=call.name,
            user_id=signer_user,
            outcome=result.outcome,
            output=_text(result.stdout, MAX_OUTPUT_CHARS),
            error=_text(result.stderr[-4096:], 2048),
            exit_code=result.exit_code,
            truncated=result.truncated,
            backend=result.backend,
        )
        await self._ran(tenant, call, verified, result)
        return tool_result

    async def audit_digest(self, tx: Conn, tenant_id: UUID, data: bytes) -> str:
        """The keyed digest (hex) a ``tool.run`` event of the tenant keeps of
        ``data`` (the arguments, the output, or a declaration's
        :func:`~bastion.safety.signing.declaration_sha256`): to confirm a claimed value
        against the trail. ``tx`` is a transaction of the tenant whose role may
        create its first data key; raises
        :class:`~bastion.secrets.tenant_keys.KeyUnavailable` once shredded."""
        version, key = await self.keys.current(tx, tenant_id)
        # Data key 1 is kept by a rotation: every event of the tenant, one key.
        first = key if version == 1 else await self.keys.get(tx, tenant_id, 1)
        return keyed_digest(first, AUDIT_DIGEST, data).hex()

    async def _first_run(
        self, tenant: UUID, user: UUID, call: ToolCall, run_id: UUID
    ) -> bool | None:
        """Record the run id as used, committed before anything runs; False if any
        worker process recorded it before, now or before a restart (the signer's
        own replay check only sees this process's calls, and forgets on exit).
        None, recording nothing, while tools are disabled for the tenant or
        everyone (``bastion incident disable-tools``): read in the same statement."""
        async with self.db.tenant_tx(tenant, user, "system") as tx:
            cur = await tx.execute(
                "WITH allowed AS (SELECT NOT bastion.tools_disabled(%(tenant)s) AS ok), "
                "ran AS (INSERT INTO bastion.tool_call_runs (run_id, call_id) "
                "SELECT %(run)s, %(call)s FROM allowed WHERE ok "
                "ON CONFLICT (run_id) DO NOTHING RETURNING 1) "
                "SELECT (SELECT ok FROM allowed) AS ok, EXISTS (SELECT 1 FROM ran) AS first",
                {"tenant": tenant, "run": run_id, "call": call.id[:200]},
            )
            row = await cur.fetchone()
            assert row is not None
            return None if not row["ok"] else bool(row["first"])

    async def _ran(
        self, tenant: UUID, call: ToolCall, verified: VerifiedToolCall, result: Result
    ) -> None:
        user = verified.user_id
        details: dict[str, Any] = {
            "tool": call.name,
            "run_id": str(verified.run_id),
            "outcome": str(result.outcome),
            "exit_code": result.exit_code,
            "signal": result.signal,
            "backend": result.backend,
            "isolation": self.sandbox.isolation.name.lower(),
            "wall_ms": round(result.wall_seconds * 1000),
            "cpu_ms": None if result.cpu_seconds is None else round(result.cpu_seconds * 1000),
            "stdout_bytes": len(result.stdout),
            "truncated": result.truncated,
        }
        if result.outcome is Outcome.SANDBOX_ERROR:
            details["detail"] = result.detail[:200]  # short, never output (spec.Result)
        async with self.db.tenant_tx(tenant, user, "system") as tx:
            try:
                details["arguments_hmac"] = await self.audit_digest(
                    tx, tenant, call.arguments.encode()
                )
                details["stdout_hmac"] = await self.audit_digest(tx, tenant, result.stdout)
                # The declaration it was proposed under, as the signature bound it.
                details["tool_hmac"] = await self.audit_digest(
                    tx, tenant, verified.tool_sha256.encode()
                )
            except (KeyUnavailable, KMSError):
                details["digests"] = "key-unavailable"  # the run is audited all the same
            await audit.record(
                tx, actor=f"user:{user}", action="tool.run", target=f"tool_call:{call.id}",
                details=details,
            )  # fmt: skip

    async def _refused(
        self,
        tenant: UUID,
        user: UUID | None,
        call: ToolCall,
        reason: str,
        run_id: UUID | None = None,
        *,
        check: tool_schema.Refusal | None = None,
    ) -> None:
        details = {**(check.details() if check else {}), "tool": call.name[:100], "reason": reason}
        if run_id is not None:  # only once the signature verified
            details["run_id"] = str(run_id)
        async with self.db.tenant_tx(tenant, user, "system") as tx:
            await audit.record(
                tx,
                actor=f"user:{user}" if user else "worker",
                action="tool.refused",
                target=f"tool_call:{call.id[:200]}",
                details=details,
            )


__all__ = ["TOOLS", "SignedToolCall", "Tool", "ToolExecutor", "ToolRefused", "ToolResult"]
