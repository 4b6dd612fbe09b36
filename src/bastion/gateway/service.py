"""The gateway's pipeline for one model call (CHECKLIST M1, P3).

authenticate + authorize (the route's guard: token, DPoP, Cedar
``model:invoke``) → route to the model's provider → reserve budget → call
the provider → settle from the provider's ``usage`` (release on failure) →
audit event and one log line. Over budget, no provider is called.

Not yet here (issue 6 continues): signed prompt envelopes, PII and injection
hooks, canary routing, circuit breakers, the answer cache and traces.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from uuid import UUID

import anyio

from bastion.api.problems import Problem, problem_type
from bastion.audit import log as audit
from bastion.billing.budgets import BudgetService, Reservation
from bastion.db.pool import Database
from bastion.gateway.providers import Completion, Message, Provider, ProviderError, Usage
from bastion.logs import get_logger

_log = get_logger("bastion.gateway")

RETRY_AFTER_SECONDS = 5


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


@dataclass(frozen=True)
class Caller:
    tenant_id: UUID
    user_id: UUID


def estimate_prompt_tokens(messages: Sequence[Message]) -> int:
    """A generous prompt-size estimate for the reservation (~4 characters per token)."""
    return sum(len(m["content"]) // 3 + 4 for m in messages)


class GatewayService:
    def __init__(self, db: Database, budgets: BudgetService, models: dict[str, Provider]) -> None:
        self.db = db
        self.budgets = budgets
        self.models = models

    def provider(self, model: str) -> Provider:
        provider = self.models.get(model)
        if provider is None:
            raise ModelNotFound(f"model {model!r} is not served here")
        return provider

    async def _finish(
        self,
        caller: Caller,
        reservation: Reservation,
        model: str,
        usage: Usage | None,
        started: float,
        decision: str,
    ) -> None:
        """Settle (or release) and record the call: audit event and log line."""
        if usage is None:
            await self.budgets.release(reservation)
        else:
            await self.budgets.settle(reservation, usage.total_tokens)
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        tokens = usage.total_tokens if usage else 0
        async with self.db.tenant_tx(caller.tenant_id, caller.user_id, "system") as tx:
            await audit.record(
                tx,
                actor=f"user:{caller.user_id}",
                action="model.invoke",
                target=model,
                details={"decision": decision, "tokens": tokens, "latency_ms": latency_ms},
            )
        _log.info(
            "model_call",
            tenant=str(caller.tenant_id),
            model=model,
            tokens=tokens,
            latency_ms=latency_ms,
            decision=decision,
        )

    async def chat(
        self,
        caller: Caller,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
    ) -> Completion:
        provider = self.provider(model)
        reservation = await self.budgets.reserve(
            caller.tenant_id, estimate_prompt_tokens(messages) + max_tokens
        )
        started = time.perf_counter()
        try:
            completion = await provider.complete(
                model, messages, max_tokens=max_tokens, temperature=temperature
            )
        except ProviderError as error:
            await self._finish(caller, reservation, model, None, started, f"failed:{error.kind}")
            raise _unavailable(error) from None
        except BaseException:
            await self.budgets.release(reservation)
            raise
        await self._finish(caller, reservation, model, completion.usage, started, "answered")
        return completion

    async def chat_stream(
        self,
        caller: Caller,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
    ) -> tuple[str | Usage, AsyncGenerator[str | Usage, None]]:
        """Reserve, start the provider's stream, return its first item and the rest.

        Over budget (402) and a provider that fails before its first token
        (503) are raised here, before any byte is sent. The rest must be
        closed (``aclose``) when done: that settles what was produced — also
        when the client went away mid-answer (estimated from the text when the
        provider's usage never came) — so nothing stays reserved.
        """
        provider = self.provider(model)
        reservation = await self.budgets.reserve(
            caller.tenant_id, estimate_prompt_tokens(messages) + max_tokens
        )

        async def run() -> AsyncGenerator[str | Usage, None]:
            started = time.perf_counter()
            produced = 0
            usage: Usage | None = None
            decision = "answered"
            try:
                async for item in provider.stream(
                    model, messages, max_tokens=max_tokens, temperature=temperature
                ):
                    if isinstance(item, Usage):
                        usage = item
                    else:
                        produced += len(item.split()) or 1
                    yield item
            except ProviderError as error:
                decision = f"failed:{error.kind}"
                raise
            except BaseException:
                decision = "client-disconnected"
                raise
            finally:
                if usage is None and (produced or decision == "client-disconnected"):
                    # The provider worked for it; bill the estimate, not nothing.
                    usage = Usage(estimate_prompt_tokens(messages), produced)
                # Shielded: a disconnect cancels the response's task, and the
                # reservation must still be settled or released.
                with anyio.CancelScope(shield=True):
                    await self._finish(caller, reservation, model, usage, started, decision)

        stream = run()
        try:
            first = await stream.__anext__()
        except ProviderError as error:
            raise _unavailable(error) from None
        except StopAsyncIteration:
            raise _unavailable(ProviderError("bad-response")) from None
        return first, stream

    async def embed(
        self, caller: Caller, model: str, inputs: Sequence[str]
    ) -> tuple[list[list[float]], Usage]:
        provider = self.provider(model)
        reservation = await self.budgets.reserve(
            caller.tenant_id, sum(len(text) // 3 + 1 for text in inputs)
        )
        started = time.perf_counter()
        try:
            vectors, usage = await provider.embed(model, inputs)
        except ProviderError as error:
            await self._finish(caller, reservation, model, None, started, f"failed:{error.kind}")
            raise _unavailable(error) from None
        except BaseException:
            await self.budgets.release(reservation)
            raise
        await self._finish(caller, reservation, model, usage, started, "answered")
        return vectors, usage
