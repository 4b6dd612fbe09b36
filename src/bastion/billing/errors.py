"""Billing's problems (RFC 9457): each a stable ``type``, never the offending input."""

from __future__ import annotations

from bastion.api.problems import Problem, problem_type


class InvalidSignature(Problem):
    """A webhook whose signature does not verify (wrong secret, stale, altered, absent)."""

    type = problem_type("webhook-signature-invalid")
    title = "Webhook signature invalid"
    status = 400


class MalformedEvent(Problem):
    """A verified body that is not an event Bastion can read (not JSON, no id)."""

    type = problem_type("webhook-malformed")
    title = "Webhook body malformed"
    status = 400


class EventTooLarge(Problem):
    type = problem_type("webhook-too-large")
    title = "Webhook body too large"
    status = 413


class WebhooksUnavailable(Problem):
    """No webhook secret is configured, or the event could not be stored: refused
    (fail closed); the provider retries."""

    type = problem_type("webhooks-unavailable")
    title = "Webhooks unavailable"
    status = 503


class UnknownPlan(Problem):
    type = problem_type("unknown-plan")
    title = "Unknown plan"
    status = 422


class NoSubscription(Problem):
    type = problem_type("no-subscription")
    title = "No subscription"
    status = 404
