"""Billing's problems (RFC 9457): each a stable ``type``, never the offending input."""

from __future__ import annotations

from bastion.errors import BastionError, Kind


class InvalidSignature(BastionError):
    """A webhook whose signature does not verify (wrong secret, stale, altered, absent)."""

    slug = "webhook-signature-invalid"
    title = "Webhook signature invalid"
    kind = Kind.INVALID


class MalformedEvent(BastionError):
    """A verified body that is not an event Bastion can read (not JSON, no id)."""

    slug = "webhook-malformed"
    title = "Webhook body malformed"
    kind = Kind.INVALID


class EventTooLarge(BastionError):
    slug = "webhook-too-large"
    title = "Webhook body too large"
    kind = Kind.TOO_LARGE


class WebhooksUnavailable(BastionError):
    """No webhook secret is configured, or the event could not be stored: refused
    (fail closed); the provider retries."""

    slug = "webhooks-unavailable"
    title = "Webhooks unavailable"
    kind = Kind.UNAVAILABLE


class UnknownPlan(BastionError):
    slug = "unknown-plan"
    title = "Unknown plan"
    kind = Kind.UNPROCESSABLE


class NoSubscription(BastionError):
    slug = "no-subscription"
    title = "No subscription"
    kind = Kind.NOT_FOUND


class PlanInactive(BastionError):
    """The plan is no longer sold: no one is moved onto it, by any path."""

    slug = "plan-inactive"
    title = "Plan inactive"
    kind = Kind.UNPROCESSABLE


class PlanUpgradeNeedsPayment(BastionError):
    """Self-service may only move down: a plan that costs or gives more is bought
    through the payment provider (checkout) or granted by two operators."""

    slug = "plan-upgrade-needs-payment"
    title = "An upgrade goes through payment"
    kind = Kind.FORBIDDEN


class CatalogueEditNeedsApproval(BastionError):
    """A catalogue edit that gives a plan's subscribers more needs a second operator."""

    slug = "catalogue-edit-needs-approval"
    title = "Catalogue edit needs approval"
    kind = Kind.CONFLICT


class PlanApprovalRefused(BastionError):
    """An operator's approval is refused; ``reason`` is a stable code: ``not-found``,
    ``self-approval``, ``decided``, ``expired``, ``plan-inactive``, ``plan-changed``."""

    slug = "plan-approval-refused"
    title = "Plan approval refused"
    kind = Kind.CONFLICT


class CustomerAlreadyBound(BastionError):
    """The tenant's provider customer is bound once; another one is refused."""

    slug = "billing-customer-bound"
    title = "Billing customer already bound"
    kind = Kind.CONFLICT
