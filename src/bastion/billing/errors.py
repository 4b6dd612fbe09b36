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


class PlanInactive(Problem):
    """The plan is no longer sold: no one is moved onto it, by any path."""

    type = problem_type("plan-inactive")
    title = "Plan inactive"
    status = 422


class PlanUpgradeNeedsPayment(Problem):
    """Self-service may only move down: a plan that costs or gives more is bought
    through the payment provider (checkout) or granted by two operators."""

    type = problem_type("plan-upgrade-needs-payment")
    title = "An upgrade goes through payment"
    status = 403


class CatalogueEditNeedsApproval(Problem):
    """A catalogue edit that gives a plan's subscribers more needs a second operator."""

    type = problem_type("catalogue-edit-needs-approval")
    title = "Catalogue edit needs approval"
    status = 409


class PlanApprovalRefused(Problem):
    """An operator's approval is refused; ``reason`` is a stable code: ``not-found``,
    ``self-approval``, ``decided``, ``expired``, ``plan-inactive``, ``plan-changed``."""

    type = problem_type("plan-approval-refused")
    title = "Plan approval refused"
    status = 409


class CustomerAlreadyBound(Problem):
    """The tenant's provider customer is bound once; another one is refused."""

    type = problem_type("billing-customer-bound")
    title = "Billing customer already bound"
    status = 409
