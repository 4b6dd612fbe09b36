"""The gateway's pipeline for one model call (CHECKLIST M1, P3).

authenticate + authorize (the route's guard: token, DPoP, Cedar
``model:invoke``) → the tenant's plan (models allowed, requests per minute:
:mod:`bastion.gateway.entitlements`) → prompt hooks (injection screen) → PII
tokenized into the tenant's vault (:meth:`GatewayService.tokenized`) → route to
the model's provider → reserve budget → call
the provider → settle from the provider's ``usage`` (release on failure) →
audit event and one log line (with the tokenized prompt only when the tenant
and the user consented: :mod:`bastion.gateway.sampling`). Over budget, no
provider is called. Budget and
audit go through the process's :class:`CallLedger` (leases of budget, batched
writes), so the request path itself writes nothing to the database.

The route is the model's :class:`ModelRouter` (sticky canary, breakers,
fallbacks); when every target fails, a cached answer of the same tenant (and
user, by default) is served as ``stale-fallback`` (:mod:`bastion.gateway.cache`), else 503.
The same holds at once, with no provider called, for a model or provider an
operator set to ``serve-cached`` (:mod:`bastion.gateway.incident`).
A request the upstream refuses as malformed (its 400, 413, 422) is answered 400
``upstream-rejected-request`` at once: it is tried on no other target, counts
against none (:class:`~bastion.gateway.routing.Outcome`), and costs one call of
the budget, no tokens.

Tool calls the model proposes, in plain and streamed answers, are passed on
only for tools the request declared and when Cedar lets the caller run them
(``tool:run``), only with arguments valid against the declared JSON Schema,
each signed and bound to its declaration, and never carrying retrieved text,
tool results, vault tokens or secrets to a destination the tenant's egress
allow-list does not name (:mod:`bastion.safety.egress`; the tenant's action
blocks such a call or flags it). A request whose declared parameters
are not a schema :mod:`bastion.safety.tool_schema` accepts is refused (400
``invalid-tool-declaration``) before any provider is called. Personal
data in an answer is masked (streamed answers are scanned sentence by sentence).

The stages, in order, and the one :class:`~bastion.gateway.pipeline.CallContext`
they share (no per-call state in ContextVars): :mod:`bastion.gateway.pipeline`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from bastion.access.authorize import Authorizer, Resource, Subject
from bastion.billing.budgets import SpendFrozen
from bastion.errors import BastionError, Kind
from bastion.gateway.cache import AnswerCache
from bastion.gateway.entitlements import PlanGate
from bastion.gateway.hooks import (
    DEFAULT_HOOKS,
    PromptHook,
    PromptRefused,
    ScreeningBusy,
    ScreeningUnavailable,
    run_hooks,
)
from bastion.gateway.incident import IncidentSwitches, cached_only
from bastion.gateway.ledger import AuditEntry, CallLedger
from bastion.gateway.pipeline import CallContext, prepare
from bastion.gateway.pipeline import Caller as Caller  # re-exported: routes, tests
from bastion.gateway.providers import (
    Completion,
    Message,
    ProviderError,
    StreamItem,
    UpstreamRejected,
    Usage,
)
from bastion.gateway.routing import ModelRouter, Outcome, Target
from bastion.gateway.sampling import PromptSampling
from bastion.logs import get_logger
from bastion.offload import JobFailed, JobTimedOut, PoolBusy, shared_pool
from bastion.safety import egress, tool_schema
from bastion.safety.egress_lists import EgressPolicies, EgressUnavailable
from bastion.safety.scanning import ScanBusy, ScanUnavailable, scan_each
from bastion.safety.signing import ToolCall, ToolCallSigner, declared_tool
from bastion.safety.tenant_policies import SafetyPolicies
from bastion.safety.vault import PiiVault
from bastion.telemetry.tracing import current_trace_id, span

_log = get_logger("bastion.gateway")

RETRY_AFTER_SECONDS = 5
# Prompts longer than this are screened in the screening processes
# (bastion.offload), not on the event loop: ~1.5 ms of screening per KiB.
INLINE_PROMPT_CHARS = 4096

# A sampled prompt is logged up to this many characters (bastion.gateway.sampling).
SAMPLE_CHARS = 4_000


class _StreamScrubber:
    """Masks personal data in a streamed answer. Text is held back to the last
    sentence or line end, so that no value is split between two scans; a piece
    beyond a kilobyte is scanned off the event loop (:func:`scan_each`), within
    the tenant's share. What it finds is added to the call's ``pii_out``."""

    BOUNDARY = re.compile(r"[.!?]\s|\n")
    MAX_HELD = 16_384  # a run-on answer is scanned in pieces this big

    def __init__(self, call: CallContext) -> None:
        self.call = call
        self.held = ""

    async def feed(self, text: str) -> str:
        self.held += text
        ends = [m.end() for m in self.BOUNDARY.finditer(self.held)]
        cut = ends[-1] if ends else (len(self.held) if len(self.held) > self.MAX_HELD else 0)
        out, self.held = self.held[:cut], self.held[cut:]
        return await self._scan(out)

    async def close(self) -> str:
        out, self.held = self.held, ""
        return await self._scan(out)

    async def _scan(self, text: str) -> str:
        if not text:
            return text
        call = self.call
        (scan,) = await scan_each(call.caller.tenant_id, [text], opaque=call.prompt_tokens)
        if not scan.clean:
            call.found_in_answer(scan.counts)
        return scan.text


T = TypeVar("T")


class ModelNotFound(BastionError):
    slug = "model-not-found"
    title = "No such model"
    kind = Kind.NOT_FOUND


class ProviderUnavailable(BastionError):
    slug = "provider-unavailable"
    title = "The model's provider is unavailable"
    kind = Kind.UNAVAILABLE


def _unavailable(error: ProviderError) -> ProviderUnavailable:
    # The kind only: never the provider's URL, key or error body.
    return ProviderUnavailable(
        "the model's provider did not answer; retry later",
        retry_after=RETRY_AFTER_SECONDS,
        reason=error.kind,
    )


class ToolsDisabled(BastionError):
    """An operator disabled tools for the tenant, or everyone (``bastion incident
    disable-tools``): a request that declares tools is refused."""

    slug = "tools-disabled"
    title = "Tools are disabled"
    kind = Kind.FORBIDDEN


class UpstreamRejectedRequest(BastionError):
    slug = "upstream-rejected-request"
    title = "The model's provider rejected the request"
    kind = Kind.INVALID


class InvalidToolDeclaration(BastionError):
    slug = "invalid-tool-declaration"
    title = "A declared tool's parameters are not an accepted JSON Schema"
    kind = Kind.INVALID


# A refused request is one call of the budget, no tokens: not free to repeat.
REJECTED_USAGE = Usage(0, 0)


def _rejected(error: UpstreamRejected) -> UpstreamRejectedRequest:
    # Only the vetted members of the upstream's error (providers.rejection).
    upstream: dict[str, Any] = {"status": error.status}
    for name, value in (("type", error.error_type), ("code", error.code), ("param", error.param)):
        if value is not None:
            upstream[name] = value
    return UpstreamRejectedRequest(
        "the model's provider refused this request; change it before retrying",
        upstream=upstream,
    )


@dataclass(frozen=True)
class SignedToolCall:
    call: ToolCall
    signature: str


@dataclass(frozen=True)
class RefusedToolCall:
    """A proposed call not passed on, as the caller is told: the model's id,
    the tool's name and the stable reason (never the arguments)."""

    id: str
    name: str
    reason: str


def sticky_key(caller: Caller, messages: Sequence[Message]) -> str:
    """Tenant, user and conversation (its first message): one conversation, one target."""
    first = messages[0]["content"] if messages else ""
    return f"{caller.tenant_id}|{caller.user_id}|{first}"


def _calls(message: Message) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls (``tool_calls``), or none."""
    calls = message.get("tool_calls")
    return list(calls) if calls else []


def estimate_prompt_tokens(messages: Sequence[Message]) -> int:
    """A generous prompt-size estimate for the reservation (a token per 3 characters)."""
    return sum(len(m["content"]) // 3 + 4 for m in messages) + sum(
        len(c["function"]["arguments"]) // 3 + 4 for m in messages for c in _calls(m)
    )


class GatewayService:
    def __init__(
        self,
        ledger: CallLedger,
        models: dict[str, ModelRouter],
        cache: AnswerCache | None = None,
        *,
        authorizer: Authorizer | None = None,
        tool_signer: ToolCallSigner | None = None,
        hooks: Sequence[PromptHook] = DEFAULT_HOOKS,
        plan_gate: PlanGate | None = None,
        vault: PiiVault | None = None,
        sampling: PromptSampling | None = None,
        egress_policies: EgressPolicies | None = None,
        secret_values: Sequence[str] = (),
        safety_policies: SafetyPolicies | None = None,
        incident: IncidentSwitches | None = None,
        spent: Callable[[str, int], None] | None = None,
    ) -> None:
        self.ledger = ledger
        # Told each call's cost (model, integer micro-USD): the spend metric.
        self.spent = spent
        self.models = models
        self.cache = cache if cache is not None else AnswerCache()  # an empty one is falsy
        self.authorizer = authorizer
        self.tool_signer = tool_signer
        self.hooks = tuple(hooks)
        self.plan_gate = plan_gate
        self.vault = vault
        self.sampling = sampling  # None: prompts are never logged
        # Always on: without an explicit one, the tenants' policies in the ledger's database.
        self.egress_policies = (
            egress_policies if egress_policies is not None else EgressPolicies(ledger.db)
        )
        # Values no tool call may carry out unless allow-listed (the gateway's own keys).
        self.secret_values = tuple(secret_values)
        # Always on too: each tenant's screen policy (its defaults without a row).
        self.safety_policies = (
            safety_policies if safety_policies is not None else SafetyPolicies(ledger.db)
        )
        # Always on: the runbook's switches (serve-cached, freeze-spend, disable-tools).
        self.incident = incident if incident is not None else IncidentSwitches(ledger.db)

    # -- the stages (bastion.gateway.pipeline), in pipeline order -------------------------

    def open_call(
        self,
        caller: Caller,
        model: str,
        messages: Sequence[Message] = (),
        *,
        max_tokens: int = 0,
        temperature: float = 1.0,
        tools: Sequence[dict[str, Any]] | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> CallContext:
        """The call's context: the request, and the ambient request id and trace read once."""
        return CallContext(
            caller,
            model,
            request_id=structlog.contextvars.get_contextvars().get("request_id"),
            trace_id=current_trace_id(),
            messages=list(messages),
            max_tokens=max_tokens,
            temperature=temperature,
            tools=tools,
            request=request,
        )

    async def entitle(self, call: CallContext) -> None:
        """The model's router, once the caller's plan admits the call (model, rate)."""
        router = self.models.get(call.model)
        if router is None:
            raise ModelNotFound("that model is not served here")
        if self.plan_gate is not None:
            await self.plan_gate.admit(call.caller.tenant_id, call.model)
        call.router = router

    async def check_call_tools(self, call: CallContext) -> None:
        """:meth:`check_tools` on the call's declared tools; none may be declared
        while tools are disabled for the tenant (403 ``tools-disabled``)."""
        if call.tools and (await self.incident.of_tenant(call.caller.tenant_id)).tools_disabled:
            raise ToolsDisabled("tools are disabled for this tenant during an incident")
        await self.check_tools(call.caller, call.tools)

    async def screen_input(self, call: CallContext) -> None:
        """Every prompt hook (injection screen) over the call's messages: on the
        event loop for a short prompt, else in the screening processes, within
        the tenant's share of them (screening a hostile megabyte takes seconds
        of pure-Python work, which a thread would still take from the loop).
        The verdicts go to the call, for its audit event; a refusal is settled
        and audited here. The thresholds and actions are the tenant's
        (:class:`~bastion.safety.tenant_policies.SafetyPolicies`). Raises
        :class:`PromptRefused`, :class:`ScreeningBusy` (429),
        :class:`ScreeningUnavailable` or
        :class:`~bastion.safety.tenant_policies.SafetyPolicyUnavailable` (503:
        fail closed)."""
        policy = await self.safety_policies.screen_policy(call.caller.tenant_id)
        try:
            if sum(len(m["content"]) for m in call.messages) <= INLINE_PROMPT_CHARS:
                outcome = run_hooks(self.hooks, call.messages, policy)
            else:
                outcome = await self._in_screening(
                    call.caller, run_hooks, self.hooks, call.messages, policy
                )
            call.verdicts = outcome.verdicts
            call.messages = outcome.result()
        except PromptRefused:
            call.started = time.perf_counter()
            self._settle(call, "refused:injection")
            raise

    async def tokenize_input(self, call: CallContext) -> None:
        """Every message with its personal data replaced before it leaves for a
        provider: by the tenant's vault tokens (``⟦EMAIL_…⟧``, revealed only with
        ``pii:reveal``), or — without a vault — by ``[KIND]`` masks. What was
        found, the tokens the prompt carries and (if consented) the prompt sample
        go to the call."""
        caller = call.caller
        # The arguments of earlier turns' tool calls go to the provider too.
        arguments = [c["function"]["arguments"] for m in call.messages for c in _calls(m)]
        texts = [m["content"] for m in call.messages] + arguments
        if self.vault is not None:
            redactions = await self.vault.tokenize_many(
                self.ledger.db, caller.tenant_id, texts, user_id=caller.user_id
            )
            safe = [r.text for r in redactions]
            counts = Counter({k: n for r in redactions for k, n in r.counts.items()})
            call.prompt_tokens = frozenset(t.token for r in redactions for t in r.tokens).union(
                *(r.kept for r in redactions)
            )
        else:
            # All turns at once: inline only when small in all (bastion.safety.scanning).
            scans = await scan_each(caller.tenant_id, texts)
            safe = [s.text for s in scans]
            counts = Counter({k: n for s in scans for k, n in s.counts.items()})
        call.pii_in = dict(counts)
        safe_arguments = iter(safe[len(call.messages) :])
        call.messages = [
            {**m, "content": text}
            | (
                {
                    "tool_calls": [
                        {**c, "function": {**c["function"], "arguments": next(safe_arguments)}}
                        for c in _calls(m)
                    ]
                }
                if _calls(m)
                else {}
            )
            for m, text in zip(call.messages, safe, strict=False)
        ]
        if self.sampling is not None and await self.sampling.sampled(
            caller.tenant_id, caller.user_id
        ):
            # The tokenized text only: what the provider sees, never raw PII.
            text = "\n".join(f"{m['role']}: {m['content']}" for m in call.messages)
            call.prompt_sample = text[:SAMPLE_CHARS]

    async def reserve(self, call: CallContext, tokens: int) -> None:
        """Take the call's budget from the ledger's lease (402 over budget; 402
        ``spend-frozen`` while the tenant's spending is frozen: a lease opened
        before the freeze covers no more calls)."""
        tenant = call.caller.tenant_id
        if (await self.incident.of_tenant(tenant)).spend_frozen:
            raise SpendFrozen("spending is frozen for this tenant during an incident")
        call.slot = await self.ledger.take(tenant, tokens)

    async def _cached_only(self, call: CallContext) -> bool:
        """Whether every target of the call's model is to be served from the
        cache only (``bastion incident serve-cached``): then no budget is taken
        and no provider is called."""
        routes = await self.incident.served_cached()
        assert call.router is not None, "the entitle stage runs first"
        return bool(routes) and all(
            cached_only(routes, call.model, target) for target in call.router.targets
        )

    async def screen_output(self, call: CallContext, completion: Completion) -> Completion:
        """The answer with personal data a model produced masked (``[KIND]``); a long
        one is scanned off the event loop, within the caller's tenant's share."""
        (scan,) = await scan_each(
            call.caller.tenant_id, [completion.text], opaque=call.prompt_tokens
        )
        if scan.clean:
            return completion
        call.found_in_answer(scan.counts)
        return dataclasses.replace(completion, text=scan.text)

    @staticmethod
    async def _in_screening(caller: Caller, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in this process's screening processes, within the caller's
        tenant's share. Raises :class:`ScreeningBusy` (429) past that share and its
        queue, :class:`ScreeningUnavailable` (503) if the job ran out of time or
        its process died: a prompt is never sent unscreened."""
        try:
            return await shared_pool("screens").run(caller.tenant_id, fn, *args)
        except PoolBusy as busy:
            raise ScreeningBusy(
                "this tenant's prompts already fill its share of the screening",
                retry_after=busy.retry_after,
            ) from None
        except (JobTimedOut, JobFailed):
            raise ScreeningUnavailable("the prompt could not be screened") from None

    async def check_tools(self, caller: Caller, tools: Sequence[Any] | None) -> None:
        """Return if every function the request declares has parameters
        :mod:`bastion.safety.tool_schema` accepts (JSON Schema 2020-12, bounded,
        nothing outside the declaration); else raise :class:`InvalidToolDeclaration`
        (400) with the tool's index and a stable reason. Small declarations are
        checked on the event loop, larger ones in the screening processes
        (:class:`ScreeningBusy`, :class:`ScreeningUnavailable` as for prompts)."""
        if not tools:
            return
        refused, small = tool_schema.shape_of(tools)
        if refused is None and small:
            refused = tool_schema.check_declarations(tools)
        elif refused is None:
            try:
                refused = await self._in_screening(
                    caller, tool_schema.check_declarations, list(tools)
                )
            except RecursionError:  # too deep even to be sent to the pool
                raise InvalidToolDeclaration(
                    "a declared tool's parameters are nested too deep", reason="too-deep"
                ) from None
        if refused is not None:
            index, reason = refused
            raise InvalidToolDeclaration(
                f"the parameters of tools[{index}] are not an accepted JSON Schema "
                "(Draft 2020-12, references within the declaration only)",
                tool_index=index,
                reason=reason,
            )

    async def sign_tool_calls(
        self,
        caller: Caller,
        calls: Sequence[ToolCall],
        *,
        declared: Sequence[Any] | None,
        enabled: Sequence[Any] | None = None,
        taint: egress.Taint | None = None,
    ) -> tuple[list[SignedToolCall], list[RefusedToolCall]]:
        """Sign the proposed calls of tools the request declared (``declared``: its
        ``tools``) that Cedar lets the caller run (``tool:run``) and whose
        arguments are valid against the declared parameters, each bound to its
        declaration; return the signed ones and the names of the refused ones,
        which are not passed on. Each refusal is audited (``tool.refused``):
        ``undeclared`` (a tool nobody offered the model, or one declared twice),
        ``not-enabled`` (declared, but not among the tools the request's
        ``tool_choice`` let the model call: ``enabled``, all declared when None),
        ``bad-declaration`` (not JSON, or not an accepted schema),
        ``not-authorized``, ``bad-arguments`` (not an I-JSON object, or not
        valid against the schema), ``arguments-unchecked`` (the check ran out
        of time: :func:`bastion.safety.tool_schema.refusal_for`), ``egress``
        (tainted text — ``taint``, the request's retrieved spans and tool results —,
        a vault token or a secret to a destination not on the tenant's allow-list
        for the tool, under the ``block`` action), ``egress-unchecked`` (the
        allow-list could not be read: fail closed). Under the ``flag`` action
        such a call is signed and audited ``tool.flagged``. The arguments'
        values are never audited or logged."""
        signed: list[SignedToolCall] = []
        refused: list[RefusedToolCall] = []
        subject = Subject(caller.user_id, caller.tenant_id, caller.roles, mfa=False)
        for call in calls:
            declaration = declared_tool(declared, call.name)
            resource = Resource("ToolRun", call.name, caller.tenant_id)
            if declaration is None:
                reason = "undeclared"
            elif enabled is not None and declared_tool(enabled, call.name) is None:
                reason = "not-enabled"
            elif (
                self.authorizer is None
                or self.tool_signer is None
                or not self.authorizer.authorize(subject, "tool:run", resource)
            ):
                reason = "not-authorized"
            elif (
                refusal := await tool_schema.refusal_for(
                    caller.tenant_id, declaration, call.arguments
                )
            ) is not None:
                refused.append(RefusedToolCall(call.id, call.name, refusal.reason))
                self._tool_refused(caller, call, refusal.reason, refusal.details())
                continue
            elif (
                stopped := await self._egress_refusal(caller, call, declaration, taint)
            ) is not None:
                refused.append(RefusedToolCall(call.id, call.name, stopped[0]))
                self._tool_refused(caller, call, *stopped)
                continue
            else:
                try:
                    signature = self.tool_signer.sign(
                        call,
                        tenant_id=caller.tenant_id,
                        user_id=caller.user_id,
                        declaration=declaration,
                    )
                except (ValueError, RecursionError):  # NaN, a lone surrogate...
                    reason = "bad-declaration"
                else:
                    signed.append(SignedToolCall(call, signature))
                    continue
            refused.append(RefusedToolCall(call.id, call.name, reason))
            self._tool_refused(caller, call, reason)
        return signed, refused

    async def _egress_refusal(
        self,
        caller: Caller,
        call: ToolCall,
        declaration: Mapping[str, Any],
        taint: egress.Taint | None,
    ) -> tuple[str, dict[str, Any]] | None:
        """The refusal (reason, audit details) of a call that would carry tainted
        text, a vault token or a secret to a destination the tenant's allow-list
        does not name, under the ``block`` action; None to sign it (a violation
        under ``flag`` is audited ``tool.flagged`` here). The allow-list is read
        only for a call that carries something to somewhere."""
        seen = egress.exposure(
            call.arguments, declaration, taint or egress.Taint(), self.secret_values
        )
        if not seen.needs_check:
            return None
        try:
            rules = await self.egress_policies.rules(caller.tenant_id)
        except EgressUnavailable:
            return "egress-unchecked", {"carried": sorted(seen.carried)}
        decision = egress.decide(call.name, seen, rules)
        if not decision.violates:
            return None
        details = {**decision.details(), "action": rules.action}
        if rules.action == "block":
            return "egress", details
        self._tool_event(caller, call, "tool.flagged", "egress", details)
        return None

    def _tool_refused(
        self,
        caller: Caller,
        call: ToolCall,
        reason: str,
        check: Mapping[str, Any] | None = None,
    ) -> None:
        """Audit (with the ledger's next flush) and log a proposed call not passed on."""
        self._tool_event(caller, call, "tool.refused", reason, check)

    def _tool_event(
        self,
        caller: Caller,
        call: ToolCall,
        action: str,
        reason: str,
        check: Mapping[str, Any] | None = None,
    ) -> None:
        details = {**(check or {}), "tool": call.name[:100], "reason": reason, "by": "gateway"}
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        target = f"tool_call:{call.id[:200]}"
        event = AuditEntry(f"user:{caller.user_id}", action, target, details, request_id)
        self.ledger.record(caller.tenant_id, None, None, event)
        _log.info(
            "tool_call_refused" if action == "tool.refused" else "tool_call_flagged",
            tenant=str(caller.tenant_id),
            **details,
        )

    async def _first_answer(
        self,
        call: CallContext,
        sticky: str,
        attempt: Callable[[Target], Awaitable[T]],
    ) -> tuple[T, Target]:
        """The provider call: ``attempt`` on the first of the call's router's
        targets that answers, and that target; raise the last ProviderError, or
        at once the UpstreamRejected of a request the upstream refused (no other
        target is tried: the fault is the request's)."""
        router = call.router
        assert router is not None, "the entitle stage runs first"
        tenant = str(call.caller.tenant_id)
        error = ProviderError("unavailable")  # every breaker open
        routes = await self.incident.served_cached()
        for target in router.candidates(sticky, tenant):
            if cached_only(routes, call.model, target):
                continue  # bastion incident serve-cached: never called
            admission = router.admit(target, tenant)
            if admission is None:
                continue  # half-open, and its probes are out
            outcome = Outcome.ABANDONED  # until known: cancelled, say
            started = time.perf_counter()
            try:
                with span(
                    "gateway.provider",
                    {"gen_ai.request.model": call.model, "bastion.target": target.name},
                ):
                    result = await attempt(target)
                outcome = Outcome.ANSWERED
            except ProviderError as failure:
                outcome, error = Outcome.FAULT, failure
                continue
            except UpstreamRejected:
                outcome = Outcome.REJECTED
                raise
            finally:
                router.record(admission, outcome, time.perf_counter() - started)
            return result, target
        raise error

    def _settle(
        self,
        call: CallContext,
        decision: str,
        usage: Usage | None = None,
        target: Target | None = None,
    ) -> None:
        """The last stage: settle the call's reservation with ``usage`` (or give it
        back), record its audit event in the ledger (written with the next
        flush), and log it — all from the call's context.

        ``target`` is who answered: its list price gives the call's cost.
        """
        caller = call.caller
        latency_ms = round((time.perf_counter() - call.started) * 1000, 1)
        tokens = usage.total_tokens if usage else 0
        cost = target.price.cost(usage) if target and usage else 0
        details = {
            "decision": decision,
            "tokens": tokens,
            "cost_micro_usd": cost,
            "latency_ms": latency_ms,
            "trace_id": call.trace_id,
            "target": target.name if target else None,
            "screen": [{**v.summary(), "source": v.source} for v in call.verdicts],
            "pii_in": dict(call.pii_in),
            "pii_out": dict(call.pii_out),
            **({"caller_peer": caller.workload} if caller.workload else {}),
        }
        event = AuditEntry(
            f"user:{caller.user_id}", "model.invoke", call.model, details, call.request_id
        )
        self.ledger.record(caller.tenant_id, call.slot, usage, event)
        if cost and self.spent is not None and target is not None:
            self.spent(call.model, cost)
        # One line per call; never the answer, and the prompt only when sampled.
        sample = call.prompt_sample
        _log.info(
            "model_call",
            trace_id=call.trace_id,
            tenant=str(caller.tenant_id),
            model=call.model,
            tokens=tokens,
            cost_micro_usd=cost,
            latency_ms=latency_ms,
            decision=decision,
            **({"prompt_sample": sample} if sample is not None else {}),
        )

    # -- the pipelines ---------------------------------------------------------------------

    async def chat(
        self,
        caller: Caller,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> tuple[Completion, str | None]:
        """Answer; return the completion and how the cache served it (None, hit,
        stale-fallback). ``request`` is every field the client sent: all of them
        are part of the cache key unless known not to change the answer."""
        call = self.open_call(
            caller,
            model,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            tools=tools,
            request=request,
        )
        await prepare(self, call)  # entitle → check tools → screen → tokenize
        # cache: what the provider is sent, and what the client asked (deny by default).
        sent = {
            "model": model,
            "messages": call.messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "tools": tools,
        }
        key = self.cache.key(caller.tenant_id, caller.user_id, sent=sent, request=request)
        call.started = time.perf_counter()
        if temperature == 0 and not tools:  # only a deterministic answer may come from cache
            cached = self.cache.fresh(key)
            if cached is not None:
                self._settle(call, "cache-hit")
                return cached, "hit"
        if await self._cached_only(call):
            stale = self.cache.stale_fallback(key)
            self._settle(call, "stale-fallback" if stale else "failed:serve-cached")
            if stale is None:
                raise _unavailable(ProviderError("unavailable"))
            return stale, "stale-fallback"
        await self.reserve(call, estimate_prompt_tokens(call.messages) + max_tokens)
        try:
            completion, target = await self._first_answer(
                call,
                sticky_key(caller, call.messages),
                lambda target: target.provider.complete(
                    model,
                    call.messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    tools=tools,
                ),
            )
        except ProviderError as error:
            stale = self.cache.stale_fallback(key)
            decision = "stale-fallback" if stale else f"failed:{error.kind}"
            self._settle(call, decision)
            if stale is None:
                raise _unavailable(error) from None
            return stale, "stale-fallback"
        except UpstreamRejected as rejected:
            self._settle(call, "rejected:upstream", REJECTED_USAGE)
            raise _rejected(rejected) from None
        except BaseException:
            self._settle(call, "client-disconnected")
            raise
        try:
            completion = await self.screen_output(call, completion)
        except BaseException:
            # The provider did the work: billed, but nothing unscanned goes out.
            self._settle(call, "withheld:pii-scan", completion.usage, target)
            raise
        # Kept only if complete and proposing no tool call (cache.storable).
        self.cache.put(key, completion)
        self._settle(call, "answered", completion.usage, target)
        return completion, None

    async def chat_stream(
        self,
        caller: Caller,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> tuple[StreamItem, AsyncGenerator[StreamItem, None]]:
        """Reserve, start the provider's stream, return its first item and the rest.

        Items are text deltas, the tool calls the model proposed (whole, once
        the provider finished them; see :meth:`sign_tool_calls`) and the
        :class:`Usage` last.

        Over budget (402) and a provider that fails before its first token
        (503) are raised here, before any byte is sent. The rest must be
        closed (``aclose``) when done: that settles what was produced — also
        when the client went away mid-answer (estimated from the text when the
        provider's usage never came) — so nothing stays reserved.
        """
        call = self.open_call(
            caller, model, messages, max_tokens=max_tokens, temperature=temperature, tools=tools
        )
        await prepare(self, call)  # entitle → check tools → screen → tokenize
        if await self._cached_only(call):  # a stream is never served from the cache
            self._settle(call, "failed:serve-cached")
            raise _unavailable(ProviderError("unavailable"))
        await self.reserve(call, estimate_prompt_tokens(call.messages) + max_tokens)
        call.started = time.perf_counter()

        async def run(target: Target) -> AsyncGenerator[StreamItem, None]:
            # Settled here once the first item is out; a target that fails
            # before that leaves the call to the next target or to the caller.
            yielded = False
            produced = 0
            usage: Usage | None = None
            decision = "answered"
            scrubber = _StreamScrubber(call)  # screen output, piece by piece
            try:
                async for item in target.provider.stream(
                    model,
                    call.messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    tools=tools,
                ):
                    if isinstance(item, Usage):
                        usage = item
                        held = await scrubber.close()
                        if held:
                            yield held
                    elif isinstance(item, str):
                        produced += len(item.split()) or 1
                        item = await scrubber.feed(item)
                        if not item:
                            continue
                    yielded = True
                    yield item
            except ProviderError as error:
                decision = f"failed:{error.kind}"
                raise
            except (ScanBusy, ScanUnavailable):
                decision = "withheld:pii-scan"  # the rest is not sent unscanned
                raise
            except BaseException:
                decision = "client-disconnected"
                raise
            finally:
                if yielded:
                    if usage is None:
                        # The provider worked for it; bill the estimate, not nothing.
                        usage = Usage(estimate_prompt_tokens(call.messages), produced)
                    # No await here: a disconnect cancels the response's task,
                    # and the call must still be settled.
                    self._settle(call, decision, usage, target)

        async def start(target: Target) -> tuple[StreamItem, AsyncGenerator[StreamItem, None]]:
            stream = run(target)
            try:
                return await stream.__anext__(), stream
            except StopAsyncIteration:
                raise ProviderError("bad-response") from None

        try:
            first_and_rest, _target = await self._first_answer(
                call, sticky_key(caller, call.messages), start
            )
        except ProviderError as error:
            self._settle(call, f"failed:{error.kind}")
            raise _unavailable(error) from None
        except UpstreamRejected as rejected:
            self._settle(call, "rejected:upstream", REJECTED_USAGE)
            raise _rejected(rejected) from None
        except BaseException:
            self._settle(call, "client-disconnected")
            raise
        return first_and_rest

    async def embed(
        self, caller: Caller, model: str, inputs: Sequence[str]
    ) -> tuple[list[list[float]], Usage]:
        """Embeddings: entitle → reserve → provider call → settle (no prompt
        stages: embeddings are not sent on as a prompt)."""
        call = self.open_call(caller, model)
        await self.entitle(call)
        if await self._cached_only(call):  # embeddings are never cached
            self._settle(call, "failed:serve-cached")
            raise _unavailable(ProviderError("unavailable"))
        await self.reserve(call, sum(len(text) // 3 + 1 for text in inputs))
        call.started = time.perf_counter()
        try:
            (vectors, usage), target = await self._first_answer(
                call,
                f"{caller.tenant_id}|{caller.user_id}",
                lambda target: target.provider.embed(model, inputs),
            )
        except ProviderError as error:
            self._settle(call, f"failed:{error.kind}")
            raise _unavailable(error) from None
        except UpstreamRejected as rejected:
            self._settle(call, "rejected:upstream", REJECTED_USAGE)
            raise _rejected(rejected) from None
        except BaseException:
            self._settle(call, "client-disconnected")
            raise
        self._settle(call, "answered", usage, target)
        return vectors, usage
