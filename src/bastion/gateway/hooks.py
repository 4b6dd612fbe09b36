"""Prompt hooks: stages every prompt passes before it is routed to a provider.

A hook takes the messages and returns the messages to send (possibly
changed), or raises :class:`PromptRefused`. The defaults are deliberately
basic — the model-safety work deepens them:

* :func:`screen_injection` screens every user turn with
  :func:`bastion.safety.injection.screen` (OWASP LLM01, direct form): a
  block is refused with 422 ``prompt-refused`` (its score and rule ids, never
  the text), smuggled invisible characters are stripped. Retrieved context is
  screened chunk by chunk by the api before it builds the prompt
  (:mod:`bastion.knowledge.answers`), which also fences it as data.

Personal data is not a hook's business: the gateway's PII stage
(:meth:`bastion.gateway.service.GatewayService.tokenized`) needs the tenant
and its vault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar

from bastion.gateway.providers import Message
from bastion.safety.injection import PromptRefused, Verdict, screen

PromptHook = Callable[[Sequence[Message]], list[Message]]

__all__ = ["DEFAULT_HOOKS", "PromptHook", "PromptRefused", "screen_injection"]

screened: ContextVar[tuple[Verdict, ...]] = ContextVar("bastion_screened", default=())
"""The current request's user-turn verdicts, for its audit event (decision, score)."""


def screen_injection(messages: Sequence[Message]) -> list[Message]:
    """Screen each user turn; raise :class:`PromptRefused` (422) on a block."""
    out: list[Message] = []
    verdicts: list[Verdict] = []
    for message in messages:
        if message["role"] != "user":
            out.append(message)
            continue
        verdict = screen(message["content"], "user")
        verdicts.append(verdict)
        screened.set(tuple(verdicts))
        if verdict.decision == "block":
            raise PromptRefused(
                "the request tries to override the model's instructions",
                reason="injection",
                score=verdict.score,
                rules=verdict.reasons,
            )
        out.append({**message, "content": verdict.text})
    return out


DEFAULT_HOOKS: tuple[PromptHook, ...] = (screen_injection,)
