"""Prompt hooks: stages every prompt passes before it is routed to a provider.

A hook takes the messages and returns the messages to send (possibly
changed), or raises :class:`PromptRefused`. The defaults are deliberately
basic — the model-safety work deepens them:

* :func:`screen_injection` refuses a user turn that openly tries to override
  the instructions (OWASP LLM01 "prompt injection", direct form); retrieved
  context is screened by being marked as data in the system prompt instead.
* :func:`redact_pii` replaces e-mail addresses, phone numbers, card numbers,
  IBANs and national ids in every message before it leaves for a provider.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from bastion.api.problems import Problem, problem_type
from bastion.gateway.providers import Message
from bastion.knowledge.redact import BasicRedactor

PromptHook = Callable[[Sequence[Message]], list[Message]]


class PromptRefused(Problem):
    type = problem_type("prompt-refused")
    title = "The prompt was refused"
    status = 422


_OVERRIDE = re.compile(
    r"\b(ignore|disregard|forget)\s+(all\s+|any\s+|the\s+|your\s+)?"
    r"(previous|prior|above|earlier|system)\s+(instructions|prompts?|rules)\b"
    r"|\b(reveal|print|show|repeat)\s+(me\s+)?(your|the)\s+(system\s+prompt|instructions)\b",
    re.IGNORECASE,
)


def screen_injection(messages: Sequence[Message]) -> list[Message]:
    for message in messages:
        if message["role"] == "user" and _OVERRIDE.search(message["content"]):
            raise PromptRefused(
                "the request tries to override the model's instructions", reason="injection"
            )
    return list(messages)


_redactor = BasicRedactor()


def redact_pii(messages: Sequence[Message]) -> list[Message]:
    return [{**m, "content": _redactor.redact(m["content"]).text} for m in messages]


DEFAULT_HOOKS: tuple[PromptHook, ...] = (screen_injection, redact_pii)
