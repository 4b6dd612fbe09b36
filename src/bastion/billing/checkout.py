"""Hosted checkout through Stripe; card numbers never enter Bastion (CHECKLIST P4).

A billing-admin asks for a Checkout Session; Stripe hosts the page where the
card is typed, and Bastion keeps only Stripe's ids (session, customer,
price). The request names a plan; its price comes from the plans catalogue
(``bastion.plans.stripe_price_id``), never from the request, and the return
URLs come from settings (no open redirect through Bastion).

Any billing request whose body (or query string) carries a payment card
number — a Luhn-valid PAN, ISO/IEC 7812-1, found by the knowledge base's
redactor (:mod:`bastion.knowledge.redact`) — is refused before anything
reads it further: no row is written and no log line carries it. Card data
that reached Bastion would put the whole deployment in PCI DSS scope.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus
from uuid import UUID

from bastion import jsonsafe
from bastion.audit import log as audit
from bastion.billing.metering import stripe_customer
from bastion.db.pool import Database
from bastion.errors import BastionError, Kind
from bastion.knowledge.redact import CARD, BasicRedactor
from bastion.logs import get_logger

_log = get_logger("bastion.billing")
_redactor = BasicRedactor()
_MAX_JSON_DEPTH = 32
# A billing request is a plan name and a few URLs. The card check runs before
# the caller is known and costs about 1 ms per KiB (2 ms per KiB of JSON
# strings): a larger body is refused unread, not scanned on the event loop.
MAX_BILLING_BODY_BYTES = 4096


class CardDataRefused(BastionError):
    slug = "card-data-refused"
    title = "Card numbers are not accepted"
    kind = Kind.UNPROCESSABLE


class UnknownPlan(BastionError):
    slug = "plan-not-found"
    title = "No such plan"
    kind = Kind.NOT_FOUND


class CheckoutKeyReused(BastionError):
    slug = "idempotency-key-reused"
    title = "The idempotency key was used for a different checkout"
    kind = Kind.CONFLICT


class CheckoutUnavailable(BastionError):
    slug = "payment-provider-unavailable"
    title = "The payment provider is unavailable"
    kind = Kind.UNAVAILABLE


def _has_card(text: str) -> bool:
    return _redactor.redact(text).counts.get(CARD, 0) > 0


def _strings(value: Any, depth: int = 0) -> list[str]:
    """Every string, number and key of a parsed JSON value (escapes already decoded)."""
    if depth > _MAX_JSON_DEPTH:
        return []
    if isinstance(value, dict):
        out: list[str] = []
        for key, item in value.items():
            out.append(str(key))
            out.extend(_strings(item, depth + 1))
        return out
    if isinstance(value, list):
        return [s for item in value for s in _strings(item, depth + 1)]
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [str(value)]
    return []


def contains_card_number(body: bytes, query: str = "") -> bool:
    """Whether ``body`` or ``query`` holds a Luhn-valid card number in any spelling.

    Looks at the raw text, its URL-decoded form (form posts, query strings)
    and, for JSON, every decoded string and number — so ``\\u0034…`` escapes
    or a PAN sent as a JSON number are found too.
    """
    text = body.decode("utf-8", "replace")
    candidates = [text, query, unquote_plus(text), unquote_plus(query)]
    with contextlib.suppress(ValueError):
        candidates.extend(_strings(jsonsafe.loads(text, max_depth=_MAX_JSON_DEPTH)))
    return any(_has_card(candidate) for candidate in candidates if candidate)


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    url: str


class CheckoutService:
    """Creates Stripe Checkout Sessions (subscription mode) for a tenant's plan."""

    def __init__(
        self,
        db: Database,
        client: Any,  # stripe.StripeClient
        *,
        success_url: str,
        cancel_url: str,
    ) -> None:
        self.db = db
        self.client = client
        self.success_url = success_url
        self.cancel_url = cancel_url

    async def price_of(self, tenant_id: UUID, plan: str) -> str | None:
        """The Stripe price that sells ``plan`` (the plans catalogue), if it is for sale."""
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            cur = await tx.execute(
                "SELECT stripe_price_id FROM bastion.plans "
                "WHERE code = %s AND active AND stripe_price_id IS NOT NULL",
                (plan,),
            )
            row = await cur.fetchone()
        return None if row is None else str(row["stripe_price_id"])

    async def create(
        self,
        tenant_id: UUID,
        user_id: UUID,
        plan: str,
        *,
        idempotency_key: str | None = None,
    ) -> CheckoutSession:
        """Open a hosted Checkout Session for ``plan``; return its id and URL.

        Raises :class:`UnknownPlan` for a plan without a Stripe price,
        :class:`CheckoutKeyReused` for an idempotency key Stripe saw with other
        parameters, and :class:`CheckoutUnavailable` when Stripe does not answer.
        """
        import stripe

        price = await self.price_of(tenant_id, plan)
        if price is None:
            raise UnknownPlan("this plan cannot be bought through checkout")
        customer = await stripe_customer(self.db, tenant_id)
        params: dict[str, Any] = {
            "mode": "subscription",
            "line_items": [{"price": price, "quantity": 1}],
            "success_url": self.success_url,
            "cancel_url": self.cancel_url,
            # The webhook maps the session and its subscription back to the tenant.
            "client_reference_id": str(tenant_id),
            "metadata": {"tenant_id": str(tenant_id), "plan": plan},
            "subscription_data": {"metadata": {"tenant_id": str(tenant_id), "plan": plan}},
        }
        if customer is not None:
            params["customer"] = customer
        options: dict[str, Any] = {}
        if idempotency_key is not None:
            # Scoped to the tenant: another tenant's key can never replay this one's session.
            options["idempotency_key"] = f"bastion-checkout-{tenant_id}-{idempotency_key}"
        try:
            session = await self.client.v1.checkout.sessions.create_async(
                params=params, options=options
            )
        except stripe.IdempotencyError:
            raise CheckoutKeyReused("this Idempotency-Key was used for another plan") from None
        except stripe.StripeError as exc:
            _log.warning("checkout_failed", tenant=str(tenant_id), error=type(exc).__name__)
            raise CheckoutUnavailable("the payment provider did not answer; retry later") from None
        session_id, url = str(session.id), str(session.url)
        returned = getattr(session, "customer", None)
        session_customer = returned if isinstance(returned, str) and returned else customer
        async with self.db.tenant_tx(tenant_id, user_id, "system") as tx:
            await tx.execute(
                "INSERT INTO bastion.checkout_sessions (session_id, customer_id, price_id, "
                "created_by) VALUES (%s, %s, %s, %s) ON CONFLICT (session_id) DO NOTHING",
                (session_id, session_customer, price, user_id),
            )
            await audit.record(
                tx,
                actor=f"user:{user_id}",
                action="billing.checkout",
                target=session_id,
                details={"plan": plan, "price_id": price},
            )
        return CheckoutSession(session_id, url)
