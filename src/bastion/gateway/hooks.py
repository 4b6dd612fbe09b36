"""Prompt hooks: stages every prompt passes before it is routed to a provider.

A hook takes the messages and the :class:`HookRun` in progress (the tenant's
screen policy, and where the hook reports its verdicts) and returns the
messages to send (possibly changed), or raises :class:`PromptRefused`. The defaults are deliberately
basic — the model-safety work deepens them:

* :func:`screen_injection` screens every user turn with
  :func:`bastion.safety.injection.screen` (OWASP LLM01, direct form): a
  block is refused with 422 ``prompt-refused`` (its score and rule ids, never
  the text), smuggled invisible characters are stripped. Every tool result
  (a ``tool`` turn: untrusted content, the indirect form) is screened as a
  retrieved document is: sanitized, dropped (its content replaced, so the
  turn still answers its call) or the prompt refused, as the tenant's policy
  says. The thresholds and actions are the tenant's
  (:class:`~bastion.safety.tenant_policies.TenantScreenPolicy`), given to
  :func:`run_hooks`. Retrieved context is
  screened chunk by chunk by the api before it builds the prompt
  (:mod:`bastion.knowledge.answers`), which also fences it as data.

Personal data is not a hook's business: the gateway's PII stage
(:meth:`bastion.gateway.service.GatewayService.tokenize_input`) needs the
tenant and its vault.

The gateway runs the hooks with :func:`run_hooks` (on the event loop or in a
screening process), which hands back the messages and the verdicts; the
verdicts then travel in the call's :class:`~bastion.gateway.pipeline.CallContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bastion.errors import BastionError, Kind
from bastion.gateway.providers import Message
from bastion.safety.injection import REMOVED, PromptRefused, Verdict, screen
from bastion.safety.tenant_policies import DEFAULT_TENANT_POLICY, TenantScreenPolicy

__all__ = [
    "DEFAULT_HOOKS",
    "HookRun",
    "HooksOutcome",
    "PromptHook",
    "PromptRefused",
    "ScreeningBusy",
    "ScreeningUnavailable",
    "run_hooks",
    "screen_injection",
]


@dataclass
class HookRun:
    """One run of the hooks over one prompt: the tenant's screen ``policy``, and
    the ``verdicts`` the hooks report (for the call's audit event)."""

    policy: TenantScreenPolicy = DEFAULT_TENANT_POLICY
    verdicts: list[Verdict] = field(default_factory=list)


PromptHook = Callable[[Sequence[Message], HookRun], list[Message]]


class ScreeningBusy(BastionError):
    """The tenant's prompts fill its share of the screening processes and its
    queue: retry after ``Retry-After``. Other tenants are not affected."""

    slug = "busy"
    title = "Too many prompts of this tenant are being screened"
    kind = Kind.RATE_LIMITED


class ScreeningUnavailable(BastionError):
    """The screen could not finish (its process ran out of time or died): the
    prompt is not sent unscreened."""

    slug = "screening-unavailable"
    title = "The prompt could not be screened"
    kind = Kind.UNAVAILABLE


def screen_injection(messages: Sequence[Message], run: HookRun) -> list[Message]:
    """Screen each user turn and tool result under the tenant's policy; raise
    :class:`PromptRefused` (422) on a block."""
    policy = run.policy
    out: list[Message] = []
    for message in messages:
        role = message["role"]
        if role not in ("user", "tool"):
            out.append(message)
            continue
        source: Literal["user", "tool"] = "user" if role == "user" else "tool"
        verdict = screen(message["content"], source, policy.for_source(source))
        run.verdicts.append(verdict)
        if verdict.decision == "block" and verdict.action == "block":
            raise PromptRefused(
                "the request tries to override the model's instructions"
                if source == "user"
                else "a tool result carries instructions to the model",
                reason="injection",
                score=verdict.score,
                rules=verdict.reasons,
            )
        # A dropped tool result: the turn stays (it answers a call), its text does not.
        text = REMOVED if verdict.decision == "block" else verdict.text
        out.append({**message, "content": text})
    return out


DEFAULT_HOOKS: tuple[PromptHook, ...] = (screen_injection,)


@dataclass(frozen=True)
class HooksOutcome:
    """What :func:`run_hooks` found: the messages to send, or a refusal (its
    detail and members); with the screen's verdicts either way, for the audit."""

    messages: list[Message] | None
    refusal: tuple[str | None, dict[str, Any]] | None
    verdicts: tuple[Verdict, ...]

    def result(self) -> list[Message]:
        """The messages; raise the refusal again (:class:`PromptRefused`)."""
        if self.refusal is not None:
            detail, members = self.refusal
            raise PromptRefused(detail, **members)
        assert self.messages is not None
        return self.messages


def run_hooks(
    hooks: Sequence[PromptHook],
    messages: Sequence[Message],
    policy: TenantScreenPolicy = DEFAULT_TENANT_POLICY,
) -> HooksOutcome:
    """Run ``hooks`` over ``messages`` under the tenant's screen ``policy``;
    return the messages or the refusal, with the verdicts.

    A refusal is returned, not raised, so that from another process
    (:mod:`bastion.offload`) it crosses back whole with the verdicts of the
    turns screened.
    """
    run = HookRun(policy)
    out = list(messages)
    try:
        for hook in hooks:
            out = hook(out, run)
    except PromptRefused as refused:
        return HooksOutcome(None, (refused.detail, dict(refused.extensions)), tuple(run.verdicts))
    return HooksOutcome(out, None, tuple(run.verdicts))
