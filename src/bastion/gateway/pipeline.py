"""The gateway's pipeline: one :class:`CallContext` per model call, passed
explicitly through named stages (CHECKLIST M1, P3).

A chat call, top to bottom (plain and streamed alike; the stages are the
methods of :class:`~bastion.gateway.service.GatewayService` named here):

1. **authenticate + authorize** — the route's dependency
   (:class:`~bastion.gateway.auth.GatewayAuth`: token and DPoP proof, or the
   api's signed envelope; Cedar ``model:invoke``) gives the :class:`Caller`;
   the service then opens the call's context (``open_call``).
2. **entitle** — the model is served here and the tenant's plan admits it
   (models allowed, requests per minute).
3. **check tools** — declared tool parameters are accepted JSON Schemas.
4. **screen input** — the prompt hooks (injection screen), off the event loop
   for a long prompt; a refusal is settled and audited here.
5. **tokenize input** — personal data replaced by the tenant's vault tokens
   (or masks); the prompt sample taken, if consented.

   Steps 2 to 5 are :func:`prepare`, shared by both kinds of call.
6. **cache** — a deterministic request may be answered from the tenant's cache.
7. **reserve** — budget taken from the call ledger's lease (402 over budget).
8. **provider call** — the model's router: first target that answers
   (stale cached answer, or 503, when none does).
9. **screen output** — personal data a model produced masked (a stream
   sentence by sentence).
10. **settle + audit** — usage settled (or the reservation given back), one
    audit event and one log line, all from this context.

Tool calls the model proposed are then checked and signed by the route
(:meth:`~bastion.gateway.service.GatewayService.sign_tool_calls`), each
refusal audited on its own. Embeddings take entitle, reserve, provider call
and settle only.

Per-call state lives in the :class:`CallContext` and nowhere else.
ContextVars are left only for what logging and tracing read from the
ambient context: structlog's ``request_id`` and the OpenTelemetry span
(:mod:`bastion.telemetry.tracing`; the provider client forwards it as
``traceparent``); the context captures the trace id once, when opened. Each
input stage is a span of its own, and so is each provider attempt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from bastion.gateway.ledger import Slot
from bastion.gateway.providers import Message
from bastion.gateway.routing import ModelRouter
from bastion.safety.injection import Verdict
from bastion.telemetry.tracing import span

__all__ = ["CallContext", "Caller", "InputStages", "prepare"]


@dataclass(frozen=True)
class Caller:
    """Who the call is for, as the route's authentication established it."""

    tenant_id: UUID
    user_id: UUID
    roles: frozenset[str] = frozenset()
    # The SPIFFE ID of the workload that relayed the call over mTLS (the api,
    # for an envelope), recorded in the call's audit event; None for a user's
    # own token.
    workload: str | None = None


@dataclass(eq=False, slots=True)
class CallContext:
    """One model call's state, created once by the gateway and handed to each stage.

    The request fields are set when the call is opened; each stage fills in what
    it found, and the settle stage reads all of it for the audit event and the
    log line.
    """

    caller: Caller
    model: str
    # Set when the call is opened: the ambient logging and tracing context, read once.
    request_id: str | None = None
    trace_id: str | None = None
    # The request: the messages as the client sent them until the screen and the
    # PII stage replace them with what the provider is sent.
    messages: list[Message] = field(default_factory=list)
    max_tokens: int = 0
    temperature: float = 1.0
    tools: Sequence[dict[str, Any]] | None = None
    request: Mapping[str, Any] | None = None
    # entitle: the model's router.
    router: ModelRouter | None = None
    # screen input: the verdicts on the user turns, for the audit (decision, score).
    verdicts: tuple[Verdict, ...] = ()
    # tokenize input: personal data found in the prompt, by kind; the vault tokens
    # the prompt carried (real ones of this tenant: the only token-shaped text an
    # answer may hold unscanned — a model that writes a value in token brackets,
    # ⟦CARD_4111111111111111⟧, gets it masked like any other); and the prompt as
    # sent, when the tenant and the user consented to sampling.
    pii_in: Mapping[str, int] = field(default_factory=dict)
    prompt_tokens: frozenset[str] = frozenset()
    prompt_sample: str | None = None
    # reserve: the budget taken, settled (or given back) once.
    slot: Slot | None = None
    # screen output: personal data found in the answer, by kind.
    pii_out: Mapping[str, int] = field(default_factory=dict)

    # The clock of the call's latency (audit, log line), started where it always was:
    # after the input stages for a plain call, after the reservation for a stream.
    started: float = 0.0

    def found_in_answer(self, counts: Mapping[str, int]) -> None:
        """Add what one scan of the answer (or of a streamed piece) found."""
        self.pii_out = dict(Counter(self.pii_out) + Counter(counts))


class InputStages(Protocol):
    """The stages a prompt passes before any provider is called."""

    async def entitle(self, call: CallContext) -> None: ...

    async def check_call_tools(self, call: CallContext) -> None: ...

    async def screen_input(self, call: CallContext) -> None: ...

    async def tokenize_input(self, call: CallContext) -> None: ...


async def prepare(stages: InputStages, call: CallContext) -> None:
    """Steps 2 to 5, in order: what every chat call passes before it may use the
    cache, the budget or a provider. Each stage raises to stop the call."""
    with span("gateway.entitle"):
        await stages.entitle(call)
    with span("gateway.check_tools"):
        await stages.check_call_tools(call)
    with span("gateway.screen_input"):
        await stages.screen_input(call)
    with span("gateway.tokenize_input"):
        await stages.tokenize_input(call)
