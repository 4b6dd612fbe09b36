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
A request the upstream refuses as malformed (its 400, 413, 422) is answered 400
``upstream-rejected-request`` at once: it is tried on no other target, counts
against none (:class:`~bastion.gateway.routing.Outcome`), and costs one call of
the budget, no tokens.

Tool calls the model proposes, in plain and streamed answers, are passed on
only for tools the request declared and when Cedar lets the caller run them
(``tool:run``), each signed and bound to its declaration. Personal
data in an answer is masked (streamed answers are scanned sentence by sentence).
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar
from uuid import UUID

import structlog

from bastion.access.authorize import Authorizer, Resource, Subject
from bastion.api.problems import Problem, problem_type
from bastion.gateway.cache import AnswerCache
from bastion.gateway.entitlements import PlanGate
from bastion.gateway.hooks import (
    DEFAULT_HOOKS,
    PromptHook,
    PromptRefused,
    ScreeningBusy,
    ScreeningUnavailable,
    run_hooks,
    screened,
)
from bastion.gateway.ledger import AuditEntry, CallLedger, Slot
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
from bastion.gateway.trace import current_trace
from bastion.logs import get_logger
from bastion.offload import JobFailed, JobTimedOut, PoolBusy, shared_pool
from bastion.safety.pii import OutputScan, scan_output
from bastion.safety.signing import ToolCall, ToolCallSigner, declared_tool
from bastion.safety.vault import PiiVault

_log = get_logger("bastion.gateway")

RETRY_AFTER_SECONDS = 5
# Prompts longer than this are screened in the screening processes
# (bastion.offload), not on the event loop: ~1.5 ms of screening per KiB.
INLINE_PROMPT_CHARS = 4096

# Personal data found in this request's prompt and answer, by kind, for its audit event.
_NONE: Mapping[str, int] = MappingProxyType({})
pii_in: contextvars.ContextVar[Mapping[str, int]] = contextvars.ContextVar("pii_in", default=_NONE)
pii_out: contextvars.ContextVar[Mapping[str, int]] = contextvars.ContextVar(
    "pii_out", default=_NONE
)
# The vault tokens this request's prompt carried, real ones of its tenant (the only
# token-shaped text an answer may hold unscanned: a model that writes a value in
# token brackets, ⟦CARD_4111111111111111⟧, gets it masked like any other).
prompt_tokens: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "prompt_tokens", default=frozenset()
)
# This request's prompt as sent to the provider, when the tenant and the user
# consented to sampling (:mod:`bastion.gateway.sampling`); else None.
prompt_sample: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "prompt_sample", default=None
)
SAMPLE_CHARS = 4_000


class _StreamScrubber:
    """Masks personal data in a streamed answer. Text is held back to the last
    sentence or line end, so that no value is split between two scans."""

    BOUNDARY = re.compile(r"[.!?]\s|\n")
    MAX_HELD = 16_384  # a run-on answer is scanned in pieces this big

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> str:
        self.held += text
        ends = [m.end() for m in self.BOUNDARY.finditer(self.held)]
        cut = ends[-1] if ends else (len(self.held) if len(self.held) > self.MAX_HELD else 0)
        out, self.held = self.held[:cut], self.held[cut:]
        return self._scan(out)

    def close(self) -> str:
        out, self.held = self.held, ""
        return self._scan(out)

    @staticmethod
    def _scan(text: str) -> str:
        if not text:
            return text
        scan = scan_output(text, opaque=prompt_tokens.get())
        if not scan.clean:
            pii_out.set(dict(Counter(pii_out.get()) + Counter(scan.counts)))
        return scan.text


def _scanned(completion: Completion) -> Completion:
    """The answer with personal data a model produced masked (``[KIND]``)."""
    scan = scan_output(completion.text, opaque=prompt_tokens.get())
    if scan.clean:
        return completion
    pii_out.set(scan.counts)
    return dataclasses.replace(completion, text=scan.text)


T = TypeVar("T")


class ModelNotFound(Problem):
    type = problem_type("model-not-found")
    title = "No such model"
    status = 404


class ProviderUnavailable(Problem):
    type = problem_type("provider-unavailable")
    title = "The model's provider is unavailable"
    status = 503


def _unavailable(error: ProviderError) -> ProviderUnavailable:
    # The kind only: never the provider's URL, key or error body.
    problem = ProviderUnavailable(
        "the model's provider did not answer; retry later", reason=error.kind
    )
    problem.headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return problem


class UpstreamRejectedRequest(Problem):
    type = problem_type("upstream-rejected-request")
    title = "The model's provider rejected the request"
    status = 400


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
class Caller:
    tenant_id: UUID
    user_id: UUID
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SignedToolCall:
    call: ToolCall
    signature: str


def sticky_key(caller: Caller, messages: Sequence[Message]) -> str:
    """Tenant, user and conversation (its first message): one conversation, one target."""
    first = messages[0]["content"] if messages else ""
    return f"{caller.tenant_id}|{caller.user_id}|{first}"


def estimate_prompt_tokens(messages: Sequence[Message]) -> int:
    """A generous prompt-size estimate for the reservation (a token per 3 characters)."""
    return sum(len(m["content"]) // 3 + 4 for m in messages)


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
    ) -> None:
        self.ledger = ledger
        self.models = models
        self.cache = cache if cache is not None else AnswerCache()  # an empty one is falsy
        self.authorizer = authorizer
        self.tool_signer = tool_signer
        self.hooks = tuple(hooks)
        self.plan_gate = plan_gate
        self.vault = vault
        self.sampling = sampling  # None: prompts are never logged

    def guarded(self, messages: Sequence[Message]) -> list[Message]:
        """The messages after every prompt hook (injection screen, PII redaction)."""
        out = list(messages)
        for hook in self.hooks:
            out = hook(out)
        return out

    async def tokenized(self, caller: Caller, messages: Sequence[Message]) -> list[Message]:
        """Every message with its personal data replaced before it leaves for a
        provider: by the tenant's vault tokens (``⟦EMAIL_…⟧``, revealed only with
        ``pii:reveal``), or — without a vault — by ``[KIND]`` masks."""
        texts = [m["content"] for m in messages]
        if self.vault is not None:
            redactions = await self.vault.tokenize_many(
                self.ledger.db, caller.tenant_id, texts, user_id=caller.user_id
            )
            safe = [r.text for r in redactions]
            counts = Counter({k: n for r in redactions for k, n in r.counts.items()})
            prompt_tokens.set(
                frozenset(t.token for r in redactions for t in r.tokens).union(
                    *(r.kept for r in redactions)
                )
            )
        else:
            prompt_tokens.set(frozenset())
            scans = [await self._scan(caller, text) for text in texts]
            safe = [s.text for s in scans]
            counts = Counter({k: n for s in scans for k, n in s.counts.items()})
        pii_in.set(dict(counts))
        sent: list[Message] = [
            {**m, "content": text} for m, text in zip(messages, safe, strict=True)
        ]
        if self.sampling is not None and await self.sampling.sampled(
            caller.tenant_id, caller.user_id
        ):
            # The tokenized text only: what the provider sees, never raw PII.
            text = "\n".join(f"{m['role']}: {m['content']}" for m in sent)
            prompt_sample.set(text[:SAMPLE_CHARS])
        return sent

    async def _scan(self, caller: Caller, text: str) -> OutputScan:
        """``scan_output(text)``: on the event loop for a short text, else in the
        screening processes within the tenant's share (about 1 ms per KiB)."""
        if len(text) <= INLINE_PROMPT_CHARS:
            return scan_output(text)
        return await self._in_screening(caller, scan_output, text)

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
                headers={"Retry-After": str(busy.retry_after)},
            ) from None
        except (JobTimedOut, JobFailed):
            raise ScreeningUnavailable("the prompt could not be screened") from None

    async def _screened(
        self, caller: Caller, model: str, messages: Sequence[Message]
    ) -> list[Message]:
        """:meth:`guarded`: on the event loop for a short prompt, else in the
        screening processes, within the tenant's share of them (screening a
        hostile megabyte takes seconds of pure-Python work, which a thread would
        still take from the loop). A refusal is audited with the screen's
        verdicts. Raises :class:`PromptRefused`, :class:`ScreeningBusy` (429)
        or :class:`ScreeningUnavailable` (503: fail closed)."""
        try:
            if sum(len(m["content"]) for m in messages) <= INLINE_PROMPT_CHARS:
                return self.guarded(messages)
            outcome = await self._in_screening(caller, run_hooks, self.hooks, list(messages))
            screened.set(outcome.verdicts)  # for the audit
            return outcome.result()
        except PromptRefused:
            self._finish(caller, None, model, None, time.perf_counter(), "refused:injection")
            raise

    def sign_tool_calls(
        self,
        caller: Caller,
        calls: Sequence[ToolCall],
        *,
        declared: Sequence[Any] | None,
    ) -> tuple[list[SignedToolCall], list[str]]:
        """Sign the proposed calls of tools the request declared (``declared``: its
        ``tools``) that Cedar lets the caller run (``tool:run``), each bound to its
        declaration; return the signed ones and the names of the refused ones,
        which are not passed on. Each refusal is audited (``tool.refused``):
        ``undeclared`` (a tool nobody offered the model, or one declared twice),
        ``bad-declaration`` (not JSON), ``not-authorized``."""
        signed, refused = [], []
        subject = Subject(caller.user_id, caller.tenant_id, caller.roles, mfa=False)
        for call in calls:
            declaration = declared_tool(declared, call.name)
            resource = Resource("ToolRun", call.name, caller.tenant_id)
            if declaration is None:
                reason = "undeclared"
            elif (
                self.authorizer is None
                or self.tool_signer is None
                or not self.authorizer.authorize(subject, "tool:run", resource)
            ):
                reason = "not-authorized"
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
            refused.append(call.name)
            self._tool_refused(caller, call, reason)
        return signed, refused

    def _tool_refused(self, caller: Caller, call: ToolCall, reason: str) -> None:
        """Audit (with the ledger's next flush) and log a proposed call not passed on."""
        details = {"tool": call.name[:100], "reason": reason, "by": "gateway"}
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        target = f"tool_call:{call.id[:200]}"
        event = AuditEntry(f"user:{caller.user_id}", "tool.refused", target, details, request_id)
        self.ledger.record(caller.tenant_id, None, None, event)
        _log.info("tool_call_refused", tenant=str(caller.tenant_id), **details)

    async def router(self, caller: Caller, model: str) -> ModelRouter:
        """The model's router, once the caller's plan admits the call (model, rate)."""
        prompt_sample.set(None)  # a new call: nothing sampled yet
        router = self.models.get(model)
        if router is None:
            raise ModelNotFound(f"model {model!r} is not served here")
        if self.plan_gate is not None:
            await self.plan_gate.admit(caller.tenant_id, model)
        return router

    async def _first_answer(
        self,
        router: ModelRouter,
        caller: Caller,
        sticky: str,
        call: Callable[[Target], Awaitable[T]],
    ) -> tuple[T, Target]:
        """``call`` on the first target that answers, and that target; raise the last
        ProviderError, or at once the UpstreamRejected of a request the upstream
        refused (no other target is tried: the fault is the request's)."""
        tenant = str(caller.tenant_id)
        error = ProviderError("unavailable")  # every breaker open
        for target in router.candidates(sticky, tenant):
            admission = router.admit(target, tenant)
            if admission is None:
                continue  # half-open, and its probes are out
            outcome = Outcome.ABANDONED  # until known: cancelled, say
            started = time.perf_counter()
            try:
                result = await call(target)
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

    def _finish(
        self,
        caller: Caller,
        slot: Slot | None,
        model: str,
        usage: Usage | None,
        started: float,
        decision: str,
        target: Target | None = None,
    ) -> None:
        """Settle (or give back) the call's budget and record its audit event in the
        ledger (written with the next flush), and log it.

        ``target`` is who answered: its list price gives the call's cost.
        """
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        tokens = usage.total_tokens if usage else 0
        cost = round(target.price.cost(usage), 8) if target and usage else 0.0
        trace = current_trace.get()
        trace_id = trace.trace_id if trace else None
        details = {
            "decision": decision,
            "tokens": tokens,
            "cost_usd": cost,
            "latency_ms": latency_ms,
            "trace_id": trace_id,
            "target": target.name if target else None,
            "screen": [verdict.summary() for verdict in screened.get()],
            "pii_in": dict(pii_in.get()),
            "pii_out": dict(pii_out.get()),
        }
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        event = AuditEntry(f"user:{caller.user_id}", "model.invoke", model, details, request_id)
        self.ledger.record(caller.tenant_id, slot, usage, event)
        # One line per call; never the answer, and the prompt only when sampled.
        sample = prompt_sample.get()
        _log.info(
            "model_call",
            trace_id=trace_id,
            tenant=str(caller.tenant_id),
            model=model,
            tokens=tokens,
            cost_usd=cost,
            latency_ms=latency_ms,
            decision=decision,
            **({"prompt_sample": sample} if sample is not None else {}),
        )

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
        router = await self.router(caller, model)
        messages = await self._screened(caller, model, messages)
        messages = await self.tokenized(caller, messages)
        # What the provider is sent, and what the client asked (deny by default).
        sent = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "tools": tools,
        }
        key = self.cache.key(caller.tenant_id, caller.user_id, sent=sent, request=request)
        started = time.perf_counter()
        if temperature == 0 and not tools:  # only a deterministic answer may come from cache
            cached = self.cache.fresh(key)
            if cached is not None:
                self._finish(caller, None, model, None, started, "cache-hit")
                return cached, "hit"
        slot = await self.ledger.take(
            caller.tenant_id, estimate_prompt_tokens(messages) + max_tokens
        )
        try:
            completion, target = await self._first_answer(
                router,
                caller,
                sticky_key(caller, messages),
                lambda target: target.provider.complete(
                    model, messages, max_tokens=max_tokens, temperature=temperature, tools=tools
                ),
            )
        except ProviderError as error:
            stale = self.cache.stale_fallback(key)
            decision = "stale-fallback" if stale else f"failed:{error.kind}"
            self._finish(caller, slot, model, None, started, decision)
            if stale is None:
                raise _unavailable(error) from None
            return stale, "stale-fallback"
        except UpstreamRejected as rejected:
            self._finish(caller, slot, model, REJECTED_USAGE, started, "rejected:upstream")
            raise _rejected(rejected) from None
        except BaseException:
            self._finish(caller, slot, model, None, started, "client-disconnected")
            raise
        completion = _scanned(completion)
        # Kept only if complete and proposing no tool call (cache.storable).
        self.cache.put(key, completion)
        self._finish(caller, slot, model, completion.usage, started, "answered", target)
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
        router = await self.router(caller, model)
        messages = await self._screened(caller, model, messages)
        messages = await self.tokenized(caller, messages)
        slot = await self.ledger.take(
            caller.tenant_id, estimate_prompt_tokens(messages) + max_tokens
        )

        started = time.perf_counter()

        async def run(target: Target) -> AsyncGenerator[StreamItem, None]:
            # Settled here once the first item is out; a target that fails
            # before that leaves the call to the next target or to the caller.
            yielded = False
            produced = 0
            usage: Usage | None = None
            decision = "answered"
            scrubber = _StreamScrubber()
            try:
                async for item in target.provider.stream(
                    model, messages, max_tokens=max_tokens, temperature=temperature, tools=tools
                ):
                    if isinstance(item, Usage):
                        usage = item
                        held = scrubber.close()
                        if held:
                            yield held
                    elif isinstance(item, str):
                        produced += len(item.split()) or 1
                        item = scrubber.feed(item)
                        if not item:
                            continue
                    yielded = True
                    yield item
            except ProviderError as error:
                decision = f"failed:{error.kind}"
                raise
            except BaseException:
                decision = "client-disconnected"
                raise
            finally:
                if yielded:
                    if usage is None:
                        # The provider worked for it; bill the estimate, not nothing.
                        usage = Usage(estimate_prompt_tokens(messages), produced)
                    # No await here: a disconnect cancels the response's task,
                    # and the call must still be settled.
                    self._finish(caller, slot, model, usage, started, decision, target)

        async def start(target: Target) -> tuple[StreamItem, AsyncGenerator[StreamItem, None]]:
            stream = run(target)
            try:
                return await stream.__anext__(), stream
            except StopAsyncIteration:
                raise ProviderError("bad-response") from None

        try:
            first_and_rest, _target = await self._first_answer(
                router, caller, sticky_key(caller, messages), start
            )
        except ProviderError as error:
            self._finish(caller, slot, model, None, started, f"failed:{error.kind}")
            raise _unavailable(error) from None
        except UpstreamRejected as rejected:
            self._finish(caller, slot, model, REJECTED_USAGE, started, "rejected:upstream")
            raise _rejected(rejected) from None
        except BaseException:
            self._finish(caller, slot, model, None, started, "client-disconnected")
            raise
        return first_and_rest

    async def embed(
        self, caller: Caller, model: str, inputs: Sequence[str]
    ) -> tuple[list[list[float]], Usage]:
        router = await self.router(caller, model)
        slot = await self.ledger.take(caller.tenant_id, sum(len(text) // 3 + 1 for text in inputs))
        started = time.perf_counter()
        try:
            (vectors, usage), target = await self._first_answer(
                router,
                caller,
                f"{caller.tenant_id}|{caller.user_id}",
                lambda target: target.provider.embed(model, inputs),
            )
        except ProviderError as error:
            self._finish(caller, slot, model, None, started, f"failed:{error.kind}")
            raise _unavailable(error) from None
        except UpstreamRejected as rejected:
            self._finish(caller, slot, model, REJECTED_USAGE, started, "rejected:upstream")
            raise _rejected(rejected) from None
        except BaseException:
            self._finish(caller, slot, model, None, started, "client-disconnected")
            raise
        self._finish(caller, slot, model, usage, started, "answered", target)
        return vectors, usage
