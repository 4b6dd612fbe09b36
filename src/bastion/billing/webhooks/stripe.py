"""Stripe webhooks: ``Stripe-Signature`` verified by the ``stripe`` library.

Stripe signs ``f"{t}.{body}"`` with HMAC-SHA256 under the endpoint's secret
and sends ``t=<unix time>,v1=<hex>`` (https://docs.stripe.com/webhooks#verify-manually).
:func:`stripe.WebhookSignature.verify_header` checks it and refuses a
timestamp older than the tolerance (300 s), which bounds replays of an old
delivery; a replay inside the window is a duplicate event id, stored once.
During a secret rotation every active version is tried.

Ordering: a Stripe subscription object carries no version number, so its
events are ordered by the event's ``created`` and then its id (the order
Stripe generated them in); a dispute's events likewise.

Routing: an event goes to the tenant whose bound customer it names; a
dispute, which names only its charge, to the tenant of that charge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

import stripe

from bastion import jsonsafe
from bastion.billing.errors import (
    EventTooLarge,
    InvalidSignature,
    MalformedEvent,
    WebhooksUnavailable,
)
from bastion.billing.webhooks import MAX_BODY_BYTES, IncomingEvent

PROVIDER = "stripe"
TOLERANCE_SECONDS = 300

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    }
)
# A charge of the customer (recorded: a dispute names only its charge), and a
# refund of one.
CHARGE_EVENTS = frozenset({"charge.succeeded", "charge.refunded"})
# A chargeback is a dispute of a charge; each of its events carries the
# dispute's whole current state (``status``).
DISPUTE_EVENTS = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)
HANDLED = (
    SUBSCRIPTION_EVENTS
    | CHARGE_EVENTS
    | DISPUTE_EVENTS
    | {"checkout.session.completed", "invoice.paid"}
)


def _tenant_hint(obj: dict[str, Any]) -> UUID | None:
    """The tenant a Checkout Session names (``client_reference_id``, set by Bastion)."""
    for value in (obj.get("client_reference_id"), (obj.get("metadata") or {}).get("tenant_id")):
        if isinstance(value, str):
            try:
                return UUID(value)
            except ValueError:
                continue
    return None


class StripeWebhook:
    """Verifies and reads Stripe deliveries."""

    def __init__(
        self, secrets: Callable[[], tuple[bytes, ...]], *, tolerance: int = TOLERANCE_SECONDS
    ) -> None:
        self.secrets = secrets
        self.tolerance = tolerance

    def verify(self, body: bytes, header: str | None) -> IncomingEvent:
        """Return the verified event.

        Raises :class:`EventTooLarge`, :class:`InvalidSignature` (no header,
        wrong secret, outside tolerance, altered body) or :class:`MalformedEvent`
        (signed but not a Stripe event). Never reads an unverified body.
        """
        if len(body) > MAX_BODY_BYTES:
            raise EventTooLarge(f"webhook bodies are limited to {MAX_BODY_BYTES} bytes")
        if not header:
            raise InvalidSignature("no Stripe-Signature header")
        secrets = self.secrets()
        if not secrets:  # fail closed; the provider retries a 503
            raise WebhooksUnavailable("no webhook secret is configured")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidSignature("the signature does not match the body") from None
        for secret in secrets:
            try:
                stripe.WebhookSignature.verify_header(text, header, secret.decode(), self.tolerance)
                break
            except stripe.SignatureVerificationError as exc:
                stale = "tolerance" in str(exc)
                if stale:
                    raise InvalidSignature("the signature's timestamp is too old") from None
        else:
            raise InvalidSignature("the signature does not match the body")
        return parse(body)


def parse(body: bytes) -> IncomingEvent:
    """Read a (verified) Stripe event; raise :class:`MalformedEvent`."""
    try:
        event = jsonsafe.loads(body)
    except ValueError:  # not JSON, or nested too deep to read
        raise MalformedEvent("the body is not JSON") from None
    if not isinstance(event, dict) or event.get("object") != "event":
        raise MalformedEvent("the body is not a Stripe event")
    event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if (
        not isinstance(event_id, str)
        or not 0 < len(event_id) <= 255
        or not isinstance(event_type, str)
        or len(event_type) > 255
        or not isinstance(created, int)
        or isinstance(created, bool)
        or not 0 <= created < 2**62
        or not isinstance(obj, dict)
    ):
        raise MalformedEvent("the event lacks an id, a type, a created time or an object")
    customer = obj.get("customer")
    if isinstance(customer, dict):  # expanded
        customer = customer.get("id")
    if obj.get("object") == "customer":
        customer = obj.get("id")
    if event_type in DISPUTE_EVENTS:
        # A dispute names no customer: it is routed by its charge (migration 0026).
        customer = obj.get("charge")
        if isinstance(customer, dict):
            customer = customer.get("id")
    object_id = obj.get("id")
    return IncomingEvent(
        provider=PROVIDER,
        event_id=event_id,
        event_type=event_type,
        handled=event_type in HANDLED,
        customer=customer if isinstance(customer, str) and len(customer) <= 255 else None,
        tenant_hint=_tenant_hint(obj) if event_type == "checkout.session.completed" else None,
        object_id=object_id if isinstance(object_id, str) and len(object_id) <= 255 else None,
        version=created,
        raw=body,
    )
