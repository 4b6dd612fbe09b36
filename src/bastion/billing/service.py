"""Subscriptions, plan changes and the application of provider events (CHECKLIST P2, P3).

Exactly once: the intake stores each (provider, event_id) once; the worker's
drain takes a tenant's stored events in arrival order, each in its own
transaction that locks the event row, applies its effects (subscription,
plan change, budget, audit, receipt hook) and marks it applied. A crash
rolls back effects and status together; a rerun finds the event no longer
``queued``. Redeliveries never reach the worker at all.

Out of order: a subscription event older (by the object's ordering key,
:mod:`bastion.billing.webhooks.stripe`) than the state already applied is
marked ``stale`` and changes nothing.

A plan change — by a billing-admin, a provider event or reconciliation —
writes who / what / when / why to ``plan_changes``, one audit event, and the
current period's limits in ``bastion.budgets`` in the same transaction: the
gateway's next reservation sees the new limits (a downgrade caps calls from
the next call on).

Paid plans (issue 13): a billing-admin, or one operator, only moves a tenant
*down* (:func:`bastion.billing.plans.is_upgrade`); a plan that costs or gives
more comes from the payment provider — a verified event whose subscription
pays for it (:func:`paid_plan`; Adyen: a signed amount that covers the
plan's price) — or from two operators (:mod:`bastion.billing.approvals`). No
path moves a tenant onto an inactive plan, and a tenant's Stripe customer
(Adyen shopper) is bound once: another one is refused and audited.

Payments bound to what was paid (issue 23, finding 5). An event changes a
plan only if it comes from the configured account in the configured mode
(:class:`PaymentAccounts`: Stripe ``livemode`` and ``account``, Adyen
merchant account and ``live``). Stripe: a tenant's plan follows one
subscription, the bound one; another subscription of the same customer is
refused while the bound one entitles. Adyen: an AUTHORISATION buys its plan
only for exactly the plan's price, in its currency, for one month from when
Bastion received it (``adyen_payments``, migration 0020); a CANCELLATION,
REFUND or CHARGEBACK of that payment, in whichever order it arrives, takes it
back, and when the month ends the tenant falls back (:meth:`expire_lapsed`,
run by the worker's sweep; a lapsed plan entitles to nothing meanwhile). The
fallback is the latest other payment still running, or free.

Stripe, likewise exact (:func:`paid_plan`): the plan's item must bill exactly
the plan's price — amount, currency, monthly, licensed, quantity one, no
discount — and an invoice opening a period must bill it so (a 100 % coupon,
a trial line: :meth:`_check_invoice`); a trial gives no paid plan. What the
current period's payment bought is taken back by a refund (for good) or a
dispute (chargeback), in whichever order the events arrive: a dispute
voids the period its charge was made in (:meth:`period_disputed`, migration
0026) until the merchant wins it, which gives the plan back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from bastion import jsonsafe
from bastion.audit.log import record
from bastion.billing.errors import (
    CustomerAlreadyBound,
    NoSubscription,
    PlanInactive,
    PlanUpgradeNeedsPayment,
)
from bastion.billing.models import ENTITLED, FREE_PLAN, PLATFORM, PlanChange, Subscription
from bastion.billing.plans import (
    Entitlements,
    Plan,
    is_upgrade,
    plan_by_code,
    plan_by_stripe_price,
)
from bastion.billing.webhooks import EventCipher
from bastion.billing.webhooks import adyen as adyen_hooks
from bastion.billing.webhooks import stripe as stripe_hooks
from bastion.db.pool import Conn, Database
from bastion.logs import get_logger
from bastion.telemetry.tracing import current_traceparent

_log = get_logger("bastion.billing")

# Called inside the transaction that applies a paid invoice (receipts plug in here).
InvoicePaidHook = Callable[[Conn, UUID, dict[str, Any]], Awaitable[None]]

_BINDING_COLUMNS = frozenset({"stripe_customer_id", "adyen_shopper_reference"})
_SUB_COLUMNS = (
    "tenant_id, plan_code, status, provider, stripe_customer_id, stripe_subscription_id, "
    "stripe_price_id, adyen_shopper_reference, current_period_start, current_period_end, "
    "source_version, source_event_id, updated_at, updated_by, adyen_payment, reversed_until"
)
# The status of a Stripe subscription whose current period's payment was
# refunded: that period entitles to nothing; the next one paid does.
PAYMENT_REVERSED = "payment_reversed"


@dataclass(frozen=True)
class PaymentAccounts:
    """Where a payment must come from to change a plan (settings ``stripe_livemode``,
    ``stripe_account_id``, ``adyen_merchant_account``, ``adyen_live``).

    A Stripe event of the other mode, or naming an ``account`` other than
    ``stripe_account``, is refused (no ``account``: Bastion's own). An Adyen
    item of another merchant account or mode is refused, and every Adyen item
    while no merchant account is configured (fail closed).
    """

    stripe_livemode: bool = False
    stripe_account: str | None = None
    adyen_merchant_account: str | None = None
    adyen_live: bool = False


def voided(sub: Subscription | None, period_end: datetime | None) -> bool:
    """Whether a Stripe period ending at ``period_end`` was taken back (its payment
    refunded): it ends no later than the last period refunded."""
    until = sub.reversed_until if sub is not None else None
    return until is not None and (period_end is None or period_end <= until)


def entitles(sub: Subscription | None, now: datetime | None = None) -> bool:
    """Whether ``sub`` gives its plan now: a status that entitles and, for a plan
    bought with an Adyen payment, a paid period that has not ended."""
    if sub is None or sub.status not in ENTITLED:
        return False
    end = sub.current_period_end
    return not (sub.provider == "adyen" and end is not None and end <= (now or datetime.now(UTC)))


def pays_for_plan(status: str, plan: Plan) -> bool:
    """Whether a Stripe subscription in ``status`` gives its plan: an entitling
    status, and for a plan with a price not a trial (nothing was paid yet; the
    plan starts with the first period paid)."""
    return status in ENTITLED and not (status == "trialing" and plan.monthly_price > 0)


def _month(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def timestamp(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return datetime.fromtimestamp(value, UTC)
    return None


async def paid_plan(tx: Conn, subscription: dict[str, Any]) -> tuple[Plan, dict[str, Any]] | str:
    """The catalogue plan a Stripe subscription pays for, and its item; or why none.

    The plan is the one whose Stripe price an item of the subscription bills (a
    subscription may carry other items, a metered usage price say, that sell
    no plan). It is bought only for exactly its price (:func:`price_refusal`),
    as an Adyen payment is: less did not pay for it, and more is not its
    price either. Refused (the outcome returned): no such item
    (``unknown-price``), items of two plans or two items of one
    (``several-plans``), a price that is not the plan's (``price-not-plan-price``),
    a quantity other than one (``quantity-not-one``), or a discount on the
    subscription or the plan's item (``discounted``: a coupon, 100 % off say,
    makes what is paid less than the price).
    """
    items = (subscription.get("items") or {}).get("data")
    found: list[tuple[Plan, dict[str, Any]]] = []
    for item in items if isinstance(items, list) else []:
        price = item.get("price") if isinstance(item, dict) else None
        if not isinstance(price, dict) or not isinstance(price.get("id"), str):
            continue
        plan = await plan_by_stripe_price(tx, price["id"])
        if plan is not None:
            found.append((plan, item))
    if not found:
        return "unknown-price"
    if len(found) > 1:
        return "several-plans"
    plan, item = found[0]
    refusal = price_refusal(plan, item["price"])
    if refusal is not None:
        return refusal
    quantity = item.get("quantity", 1)
    if quantity != 1 or isinstance(quantity, bool):
        return "quantity-not-one"
    if _discounted(subscription) or _discounted(item):
        return "discounted"
    return plan, item


def price_refusal(plan: Plan, price: dict[str, Any]) -> str | None:
    """Why a Stripe price is not exactly ``plan``'s, or None if it is: a recurring,
    licensed, per-unit price of ``plan.monthly_price`` minor units of its
    currency (one spelling: ISO 4217 compared in lower case, as the catalogue
    stores it) every month (interval ``month``, count 1)."""
    amount, recurring = price.get("unit_amount"), price.get("recurring")
    currency = price.get("currency")
    if (
        not isinstance(amount, int)
        or isinstance(amount, bool)
        or amount != plan.monthly_price
        or not isinstance(currency, str)
        or currency.lower() != plan.currency.lower()
        or price.get("billing_scheme", "per_unit") != "per_unit"
        or not isinstance(recurring, dict)
        or recurring.get("interval") != "month"
        or recurring.get("interval_count", 1) != 1
        or recurring.get("usage_type", "licensed") != "licensed"
    ):
        return "price-not-plan-price"
    return None


# A dispute in these states leaves the payment with the merchant.
DISPUTE_SETTLED_FOR_MERCHANT = frozenset({"won", "warning_closed"})


def _amounts(items: Any) -> int:
    """The sum of a Stripe list of ``{"amount": ...}`` (discount amounts)."""
    total = 0
    for item in items if isinstance(items, list) else []:
        amount = item.get("amount") if isinstance(item, dict) else None
        if isinstance(amount, int) and not isinstance(amount, bool):
            total += amount
    return total


def _invoice_subscription(invoice: dict[str, Any]) -> Any:
    """The subscription an invoice bills (``subscription``; since API 2025-03-31
    ``parent.subscription_details.subscription``)."""
    found = invoice.get("subscription")
    parent = invoice.get("parent")
    if found is None and isinstance(parent, dict):
        details = parent.get("subscription_details")
        found = details.get("subscription") if isinstance(details, dict) else None
    return found.get("id") if isinstance(found, dict) else found


def _line_price(line: dict[str, Any]) -> str | None:
    """The price an invoice line bills (``price.id``; since API 2025-03-31
    ``pricing.price_details.price``)."""
    price = line.get("price")
    found = price.get("id") if isinstance(price, dict) else price
    pricing = line.get("pricing")
    if found is None and isinstance(pricing, dict):
        details = pricing.get("price_details")
        found = details.get("price") if isinstance(details, dict) else None
    return found if isinstance(found, str) else None


def _line_is_proration(line: dict[str, Any]) -> bool:
    if line.get("proration"):
        return True
    parent = line.get("parent")
    for key in ("subscription_item_details", "invoice_item_details"):
        details = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(details, dict) and details.get("proration"):
            return True
    return False


def _discounted(obj: dict[str, Any]) -> bool:
    """Whether a Stripe subscription or item carries a discount (``discount``, the
    older API's one coupon, or ``discounts``, the current list)."""
    return bool(obj.get("discount")) or bool(obj.get("discounts"))


class BillingService:
    """Plans of tenants and the events that change them. Dependencies explicit."""

    def __init__(
        self,
        db: Database,
        cipher: EventCipher,
        *,
        invoice_paid_hook: InvoicePaidHook | None = None,
        accounts: PaymentAccounts | None = None,
    ) -> None:
        self.db = db
        self.cipher = cipher
        self.invoice_paid_hook = invoice_paid_hook
        self.accounts = accounts or PaymentAccounts()

    # -- reading -------------------------------------------------------------------------

    async def subscription(self, tenant_id: UUID, role: str = "system") -> Subscription:
        """Return the tenant's subscription; raise :class:`NoSubscription`."""
        async with self.db.tenant_tx(tenant_id, None, role) as tx:
            sub = await self.read_subscription(tx, tenant_id)
        if sub is None:
            raise NoSubscription("this tenant has no subscription")
        return sub

    async def entitlements(self, tenant_id: UUID) -> Entitlements:
        """What the tenant may use now: its plan's, or the free plan's when it has
        no subscription or one in a status that does not entitle (canceled, ...)."""
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            sub = await self.read_subscription(tx, tenant_id)
            plan = await self.current_plan(tx, sub)
        return Entitlements(
            plan=plan.code,
            status=sub.status if sub is not None else "none",
            monthly_token_budget=plan.monthly_token_budget,
            monthly_call_budget=plan.monthly_call_budget,
            requests_per_minute=plan.requests_per_minute,
            models_allowed=plan.models_allowed,
            overage_policy=plan.overage_policy,
        )

    async def plan_changes(self, tenant_id: UUID, role: str) -> list[PlanChange]:
        async with self.db.tenant_tx(tenant_id, None, role) as tx:
            cur = await tx.execute(
                "SELECT at, actor, from_plan, to_plan, reason, source, provider, event_id "
                "FROM bastion.plan_changes ORDER BY id"
            )
            return [PlanChange(**row) for row in await cur.fetchall()]

    @staticmethod
    async def read_subscription(
        tx: Conn, tenant_id: UUID, *, lock: bool = False
    ) -> Subscription | None:
        cur = await tx.execute(
            f"SELECT {_SUB_COLUMNS} FROM bastion.subscriptions WHERE tenant_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (tenant_id,),
        )
        row = await cur.fetchone()
        return None if row is None else Subscription(**row)

    # -- plan changes --------------------------------------------------------------------

    async def current_plan(self, tx: Conn, sub: Subscription | None) -> Plan:
        """The plan ``sub`` entitles to now: its own, or free when there is none, its
        status does not entitle (canceled, unpaid, ...) or its paid month ended."""
        entitled = sub is not None and entitles(sub)
        return await plan_by_code(tx, sub.plan_code if entitled and sub else FREE_PLAN)

    async def is_upgrade(self, tenant_id: UUID, plan_code: str) -> bool:
        """Whether moving the tenant to ``plan_code`` is an upgrade
        (:func:`bastion.billing.plans.is_upgrade`). Raises :class:`UnknownPlan`."""
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            target = await plan_by_code(tx, plan_code)
            current = await self.current_plan(tx, await self.read_subscription(tx, tenant_id))
        return is_upgrade(current, target)

    async def change_plan(
        self,
        tenant_id: UUID,
        plan_code: str,
        *,
        actor: str,
        reason: str,
        source: str = "admin",
        user_id: UUID | None = None,
    ) -> Subscription:
        """Move the tenant down to ``plan_code`` now: a billing-admin's self-service,
        or an operator's downgrade.

        Only a move that is not an upgrade (:func:`bastion.billing.plans.is_upgrade`)
        is made here; an upgrade is bought through the payment provider, or
        granted by two operators (:mod:`bastion.billing.approvals`). The caller
        has checked ``plan:change``; this runs as the system role so that the
        budget row (system-only) changes in the same transaction.

        Raises :class:`UnknownPlan`, :class:`PlanInactive` or
        :class:`PlanUpgradeNeedsPayment`. A refused move writes only its audit
        event (``billing.plan.change_refused``); the plan, budget and
        entitlements stay as they were.
        """
        refusal: PlanInactive | PlanUpgradeNeedsPayment | None = None
        async with self.db.tenant_tx(tenant_id, user_id, "system") as tx:
            plan = await plan_by_code(tx, plan_code)
            sub = await self.read_subscription(tx, tenant_id, lock=True)
            current = await self.current_plan(tx, sub)
            if not plan.active:
                refusal = PlanInactive("this plan is no longer offered")
            elif is_upgrade(current, plan):
                refusal = PlanUpgradeNeedsPayment(
                    "this plan costs or gives more than the current one: buy it through "
                    "checkout, or ask the operator"
                )
            if refusal is not None:
                await record(
                    tx,
                    actor=actor,
                    action="billing.plan.change_refused",
                    target=f"tenant:{tenant_id}",
                    details={
                        "from": current.code,
                        "to": plan.code,
                        "source": source,
                        "refusal": refusal.type.rsplit("/", 1)[-1],
                    },
                )
            else:
                await self.assign(
                    tx, tenant_id, sub, plan, actor=actor, reason=reason, source=source
                )
                new = await self.read_subscription(tx, tenant_id)
        if refusal is not None:
            raise refusal
        assert new is not None
        return new

    async def assign(
        self,
        tx: Conn,
        tenant_id: UUID,
        sub: Subscription | None,
        plan: Plan,
        *,
        actor: str,
        reason: str,
        source: str,
    ) -> None:
        """Put the tenant on ``plan`` in ``tx`` (``sub``: its locked subscription),
        with its record, audit event and budget. Unchecked: the callers decide
        whether the move is allowed (a downgrade, or an approved request)."""
        if sub is None:
            await tx.execute(
                "INSERT INTO bastion.subscriptions (tenant_id, plan_code, updated_by) "
                "VALUES (%s, %s, %s)",
                (tenant_id, plan.code, actor),
            )
        else:
            await tx.execute(
                "UPDATE bastion.subscriptions SET plan_code = %s, updated_at = now(), "
                "updated_by = %s WHERE tenant_id = %s",
                (plan.code, actor, tenant_id),
            )
        await self.record_change(
            tx,
            tenant_id,
            sub.plan_code if sub else None,
            plan,
            actor=actor,
            reason=reason,
            source=source,
        )

    async def link_stripe_customer(
        self, tenant_id: UUID, customer_id: str, *, actor: str = "system"
    ) -> None:
        """Bind the tenant's Stripe customer (created before its Checkout Session),
        so that the customer's events route to the tenant.

        Bound once: linking the same customer again changes nothing; another
        customer is refused (:class:`CustomerAlreadyBound`, audited as
        ``billing.customer.refused``), as is a customer bound to another tenant.
        """
        await self._bind(tenant_id, "stripe_customer_id", customer_id, actor=actor)
        await self.route_unrouted()

    async def link_adyen_shopper(
        self, tenant_id: UUID, shopper_reference: str, *, actor: str = "system"
    ) -> None:
        """Bind the tenant's Adyen shopper reference, once (as :meth:`link_stripe_customer`)."""
        await self._bind(tenant_id, "adyen_shopper_reference", shopper_reference, actor=actor)
        await self.route_unrouted()

    async def _bind(self, tenant_id: UUID, column: str, value: str, *, actor: str) -> None:
        # A real check, not an assert (gone under python -O): the column name is
        # composed into SQL, so only the two binding columns may ever reach it.
        if column not in _BINDING_COLUMNS:
            raise ValueError(f"not a customer-binding column: {column!r}")
        refusal: str | None = None
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            sub = await self.read_subscription(tx, tenant_id, lock=True)
            bound = getattr(sub, column) if sub is not None else None
            if bound == value:
                return
            if bound is not None:
                refusal = "another-customer-is-bound"
            else:
                try:
                    async with tx.transaction():  # a savepoint: the refusal is still audited
                        await tx.execute(
                            sql.SQL(
                                "INSERT INTO bastion.subscriptions (tenant_id, plan_code, {0}, "
                                "updated_by) VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id) DO "
                                "UPDATE SET {0} = EXCLUDED.{0}, updated_at = now(), "
                                "updated_by = EXCLUDED.updated_by"
                            ).format(sql.Identifier(column)),
                            (tenant_id, FREE_PLAN, value, actor),
                        )
                except psycopg.errors.UniqueViolation:
                    refusal = "customer-bound-to-another-tenant"
            await record(
                tx,
                actor=actor,
                action="billing.customer.refused" if refusal else "billing.customer.bound",
                target=f"tenant:{tenant_id}",
                details={"field": column, "reason": refusal or "bound"},
            )
        if refusal is not None:
            raise CustomerAlreadyBound(
                "the tenant is bound to another customer"
                if refusal == "another-customer-is-bound"
                else "this customer is bound to another tenant"
            )

    async def record_change(
        self,
        tx: Conn,
        tenant_id: UUID,
        from_plan: str | None,
        plan: Plan,
        *,
        actor: str,
        reason: str,
        source: str,
        provider: str | None = None,
        event_id: str | None = None,
        period: tuple[datetime | None, datetime | None] = (None, None),
    ) -> None:
        """Who / what / when / why, the audit event and the budget, in ``tx``."""
        await tx.execute(
            "INSERT INTO bastion.plan_changes (tenant_id, actor, from_plan, to_plan, reason, "
            "source, provider, event_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (tenant_id, actor, from_plan, plan.code, reason[:1000], source, provider, event_id),
        )
        await record(
            tx,
            actor=actor,
            action="billing.plan.changed",
            target=f"tenant:{tenant_id}",
            details={"from": from_plan, "to": plan.code, "source": source, "event": event_id},
        )
        await self._set_budget(tx, tenant_id, plan, period)

    @staticmethod
    async def _set_budget(
        tx: Conn,
        tenant_id: UUID,
        plan: Plan,
        period: tuple[datetime | None, datetime | None],
    ) -> None:
        """Change the current period's limits (usage kept), or open the period."""
        cur = await tx.execute(
            "UPDATE bastion.budgets SET call_limit = %s, token_limit = %s, updated_at = now() "
            "WHERE tenant_id = %s AND period_start <= now() AND now() < period_end",
            (plan.monthly_call_budget, plan.monthly_token_budget, tenant_id),
        )
        if cur.rowcount:
            return
        now = datetime.now(UTC)
        start, end = period
        if start is None or end is None or not start <= now < end:
            start, end = _month(now)
        # An earlier period still running at ``start`` ends there (no overlap).
        await tx.execute(
            "UPDATE bastion.budgets SET period_end = %(start)s, updated_at = now() "
            "WHERE tenant_id = %(tenant)s AND period_start < %(start)s AND period_end > %(start)s",
            {"tenant": tenant_id, "start": start},
        )
        await tx.execute(
            "INSERT INTO bastion.budgets (tenant_id, period_start, period_end, call_limit, "
            "token_limit) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant_id, period_start) "
            "DO UPDATE SET period_end = EXCLUDED.period_end, call_limit = EXCLUDED.call_limit, "
            "token_limit = EXCLUDED.token_limit, updated_at = now()",
            (tenant_id, start, end, plan.monthly_call_budget, plan.monthly_token_budget),
        )

    # -- applying stored events (the worker) ---------------------------------------------

    async def drain(self, tenant_id: UUID) -> int:
        """Apply the tenant's queued events in arrival order, each in its own
        transaction; stop (leaving them ``held``) if webhooks are paused.
        Returns how many events were processed."""
        done = 0
        while True:
            async with self.db.tenant_tx(tenant_id, None, "system") as tx:
                paused = await self._paused_locked(tx)
                cur = await tx.execute(
                    "SELECT id, provider, event_id, event_type, object_version, payload, "
                    "key_version FROM bastion.webhook_events WHERE tenant_id = %s "
                    "AND status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                    (tenant_id,),
                )
                row = await cur.fetchone()
                if row is None:
                    return done
                if paused:
                    await tx.execute(
                        "UPDATE bastion.webhook_events SET status = 'held' "
                        "WHERE tenant_id = %s AND status = 'queued'",
                        (tenant_id,),
                    )
                    return done
                try:
                    async with tx.transaction():  # a savepoint: a bad event undoes only itself
                        status, outcome = await self._apply(tx, tenant_id, row)
                except (
                    KeyError,
                    TypeError,
                    ValueError,
                    AttributeError,
                    IndexError,
                    psycopg.errors.DataError,
                    psycopg.errors.IntegrityError,
                ) as exc:
                    # Verified but not what its type promises: failed, never retried
                    # forever (it would block the tenant's later events).
                    _log.error(
                        "billing_event_unusable", event_row=row["id"], error=type(exc).__name__
                    )
                    status, outcome = "failed", "malformed-event"
                await tx.execute(
                    "UPDATE bastion.webhook_events SET status = %s, outcome = %s, "
                    "applied_at = now() WHERE id = %s",
                    (status, outcome, row["id"]),
                )
                await record(
                    tx,
                    actor=f"{row['provider']}:webhook",
                    action="billing.webhook.applied",
                    target=f"{row['provider']}:{row['event_id']}",
                    details={"type": row["event_type"], "status": status, "outcome": outcome},
                )
            done += 1
            if outcome == "charge-recorded" or row["event_type"] == "charge.refunded":
                # A dispute of this charge that arrived first waits unrouted: route it.
                await self.route_unrouted()

    async def _apply(self, tx: Conn, tenant_id: UUID, row: dict[str, Any]) -> tuple[str, str]:
        """Apply one event inside ``tx``; return its final status and outcome."""
        try:
            raw = self.cipher.open(
                row["provider"], row["event_id"], row["key_version"], row["payload"]
            )
        except (ValueError, LookupError):
            return "failed", "payload-unreadable"
        body = jsonsafe.loads(raw)  # a ValueError fails the event (malformed)
        if row["provider"] == stripe_hooks.PROVIDER:
            return await self._apply_stripe(tx, tenant_id, row, body)
        return await self._apply_adyen(tx, tenant_id, row, body)

    async def _apply_stripe(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], event: dict[str, Any]
    ) -> tuple[str, str]:
        kind = row["event_type"]
        obj = event["data"]["object"]
        # The whole event is signed: its mode and account are the provider's word.
        if event.get("livemode") is not self.accounts.stripe_livemode:
            return "failed", "livemode-mismatch"
        account = event.get("account")
        if account is not None and account != self.accounts.stripe_account:
            return "failed", "account-mismatch"
        if kind in stripe_hooks.SUBSCRIPTION_EVENTS:
            return await self._apply_subscription(tx, tenant_id, row, obj)
        if kind == "checkout.session.completed":
            return await self._apply_checkout(tx, tenant_id, row, obj)
        if kind == "invoice.paid":
            await self.on_invoice_paid(tx, tenant_id, event)
            return await self._check_invoice(tx, tenant_id, row, obj)
        if kind in stripe_hooks.CHARGE_EVENTS:
            actor = f"stripe:{row['event_id']}"
            recorded = await self.record_charge(tx, tenant_id, obj, actor=actor)
            if kind == "charge.refunded":
                return await self._apply_refund(tx, tenant_id, row, obj)
            return ("applied", "charge-recorded") if recorded else ("failed", "customer-mismatch")
        if kind in stripe_hooks.DISPUTE_EVENTS:
            return await self._apply_dispute(tx, tenant_id, row, obj)
        return "ignored", "unhandled-type"

    async def _apply_refund(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], charge: dict[str, Any]
    ) -> tuple[str, str]:
        """A refunded charge of the bound customer, made in the current period (the
        payment of that period): the period entitles to nothing any more — the
        tenant is on free, and later events of the same period keep it there
        (:func:`voided`) until a next period is paid. A partial refund counts:
        what remains is no longer the plan's price. A refund of an earlier
        period's charge changes nothing now."""
        sub = await self.read_subscription(tx, tenant_id, lock=True)
        if sub is None or sub.provider != "stripe" or sub.stripe_subscription_id is None:
            return "applied", "no-stripe-subscription"
        if charge.get("customer") != sub.stripe_customer_id:
            return "failed", "customer-mismatch"
        created, start = charge.get("created"), sub.current_period_start
        if not isinstance(created, int) or isinstance(created, bool):
            return "failed", "malformed-event"
        # An invoice is charged when its period starts (a day of grace for retries).
        if start is not None and created < start.timestamp() - 86400:
            return "applied", "refund-of-an-earlier-period"
        return await self._void_period(
            tx,
            tenant_id,
            sub,
            until=sub.current_period_end or datetime.now(UTC),
            event_id=str(row["event_id"]),
            reason="charge.refunded: the period's payment was refunded",
        )

    async def _void_period(
        self,
        tx: Conn,
        tenant_id: UUID,
        sub: Subscription,
        *,
        until: datetime | None,
        event_id: str,
        reason: str,
    ) -> tuple[str, str]:
        """Take back what the current period's payment bought: the tenant is on free
        with status ``payment_reversed``. ``until``: for good, every period ending
        by then (:func:`voided`: a refund, an underpaid invoice); None: only while
        the cause lasts (a dispute, which the merchant may win)."""
        actor = f"stripe:{event_id}"
        free = await plan_by_code(tx, FREE_PLAN)
        await tx.execute(
            "UPDATE bastion.subscriptions SET plan_code = %s, status = %s, "
            "reversed_until = greatest(reversed_until, %s), updated_at = now(), "
            "updated_by = %s WHERE tenant_id = %s",
            (free.code, PAYMENT_REVERSED, until, actor, tenant_id),
        )
        if sub.plan_code == free.code:
            return "applied", "period-reversed"
        await self.record_change(
            tx,
            tenant_id,
            sub.plan_code,
            free,
            actor=actor,
            reason=reason,
            source="webhook",
            provider="stripe",
            event_id=event_id,
        )
        return "applied", f"plan {sub.plan_code} -> {free.code}"

    # -- Stripe charges, disputes and invoices ---------------------------------------------

    async def record_charge(
        self, tx: Conn, tenant_id: UUID, charge: dict[str, Any], *, actor: str
    ) -> bool:
        """Record a charge of the tenant's bound customer (once; a dispute names only
        its charge, migration 0026). Returns False, recording nothing, for a charge
        of another customer or one without an id or creation time."""
        sub = await self.read_subscription(tx, tenant_id)
        charge_id, created = charge.get("id"), timestamp(charge.get("created"))
        customer = charge.get("customer")
        if isinstance(customer, dict):
            customer = customer.get("id")
        if (
            sub is None
            or sub.stripe_customer_id is None
            or customer != sub.stripe_customer_id
            or not isinstance(charge_id, str)
            or not 0 < len(charge_id) <= 255
            or created is None
        ):
            return False
        amount, currency = charge.get("amount"), charge.get("currency")
        await tx.execute(
            "INSERT INTO bastion.stripe_charges (tenant_id, charge_id, created, amount, currency, "
            "recorded_event) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                tenant_id,
                charge_id,
                created,
                amount if isinstance(amount, int) and not isinstance(amount, bool) else None,
                currency.lower()
                if isinstance(currency, str) and currency.isalpha() and len(currency) == 3
                else None,
                actor[:300],
            ),
        )
        return True

    @staticmethod
    async def period_disputed(
        tx: Conn, tenant_id: UUID, start: datetime | None, end: datetime | None
    ) -> bool:
        """Whether a charge made in the period ``[start, end)`` (a day of grace before
        ``start``, as for refunds) is disputed and the dispute not won."""
        if start is None or end is None:
            return False
        cur = await tx.execute(
            "SELECT 1 FROM bastion.stripe_charges WHERE tenant_id = %s "
            "AND dispute_status IS NOT NULL AND dispute_status <> ALL(%s) "
            "AND created >= %s - interval '1 day' AND created < %s LIMIT 1",
            (tenant_id, list(DISPUTE_SETTLED_FOR_MERCHANT), start, end),
        )
        return await cur.fetchone() is not None

    async def _apply_dispute(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], dispute: dict[str, Any]
    ) -> tuple[str, str]:
        """A dispute (chargeback) of a charge of the tenant, in Stripe's order.

        Open, or lost: the period the charge was made in entitles to nothing
        (the tenant is on free now if it is the current period; a subscription
        event of that period, or reconciliation, later keeps it there:
        :meth:`period_disputed`). Won by the merchant (``won``; an inquiry
        closed without a chargeback, ``warning_closed``): the money is back,
        and so is the plan the period paid for, unless something else voids
        the period. A dispute event older than the dispute state applied is
        ``stale``."""
        charge_id, status = dispute.get("charge"), dispute.get("status")
        if isinstance(charge_id, dict):
            charge_id = charge_id.get("id")
        dispute_id = dispute.get("id")
        if (
            not isinstance(charge_id, str)
            or not isinstance(dispute_id, str)
            or len(dispute_id) > 255
            or not isinstance(status, str)
            or not 0 < len(status) <= 40
            or not status.replace("_", "").isalpha()
            or not status.islower()
        ):
            return "failed", "malformed-event"
        version, event_id = int(row["object_version"]), str(row["event_id"])
        cur = await tx.execute(
            "SELECT created, dispute_version, dispute_event FROM bastion.stripe_charges "
            "WHERE tenant_id = %s AND charge_id = %s FOR UPDATE",
            (tenant_id, charge_id),
        )
        charge = await cur.fetchone()
        if charge is None:
            return "failed", "unknown-charge"
        if (version, event_id) <= (charge["dispute_version"], charge["dispute_event"]):
            return "stale", "older-than-applied-state"
        await tx.execute(
            "UPDATE bastion.stripe_charges SET dispute_id = %s, dispute_status = %s, "
            "dispute_version = %s, dispute_event = %s WHERE tenant_id = %s AND charge_id = %s",
            (dispute_id, status, version, event_id, tenant_id, charge_id),
        )
        sub = await self.read_subscription(tx, tenant_id, lock=True)
        start = sub.current_period_start if sub is not None else None
        end = sub.current_period_end if sub is not None else None
        if (
            sub is None
            or sub.provider != "stripe"
            or start is None
            or end is None
            or not start.timestamp() - 86400 <= charge["created"].timestamp() < end.timestamp()
        ):
            # Not the current period's payment: an earlier period's changes nothing
            # now; a period not yet known is checked when its events arrive.
            return "applied", "dispute-recorded"
        if status not in DISPUTE_SETTLED_FOR_MERCHANT:
            return await self._void_period(
                tx,
                tenant_id,
                sub,
                until=None,
                event_id=event_id,
                reason=f"{row['event_type']} ({status}): the period's payment is disputed",
            )
        return await self._restore_period(tx, tenant_id, sub, event_id=event_id, status=status)

    async def _restore_period(
        self, tx: Conn, tenant_id: UUID, sub: Subscription, *, event_id: str, status: str
    ) -> tuple[str, str]:
        """A dispute of the current period's payment settled for the merchant: the
        plan the period paid for (its price, checked exact when it was applied)
        again, unless a refund or another open dispute still voids the period."""
        if sub.status != PAYMENT_REVERSED or sub.stripe_price_id is None:
            return "applied", "dispute-settled"
        start, end = sub.current_period_start, sub.current_period_end
        if voided(sub, end) or await self.period_disputed(tx, tenant_id, start, end):
            return "applied", "period-still-reversed"
        plan = await plan_by_stripe_price(tx, sub.stripe_price_id)
        if plan is None or not plan.active:
            return "applied", "dispute-settled"
        actor = f"stripe:{event_id}"
        await tx.execute(
            "UPDATE bastion.subscriptions SET plan_code = %s, status = 'active', "
            "updated_at = now(), updated_by = %s WHERE tenant_id = %s",
            (plan.code, actor, tenant_id),
        )
        if sub.plan_code == plan.code:
            return "applied", "dispute-settled"
        await self.record_change(
            tx,
            tenant_id,
            sub.plan_code,
            plan,
            actor=actor,
            reason=f"dispute {status}: the period's payment stands",
            source="webhook",
            provider="stripe",
            event_id=event_id,
        )
        return "applied", f"plan {sub.plan_code} -> {plan.code}"

    async def _check_invoice(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], invoice: dict[str, Any]
    ) -> tuple[str, str]:
        """A paid invoice of the bound subscription that opens a period
        (``subscription_create``, ``subscription_cycle``) must bill each plan it
        sells at exactly the plan's price: a line of the plan's price (not a
        proration), quantity one, with no discount on it or on the invoice. A
        coupon (100 % off: a paid plan for free), a trial line of 0 or a
        quantity other than one voids the period the line is for, for good
        (:func:`voided`), in whichever order it arrives."""
        sub = await self.read_subscription(tx, tenant_id, lock=True)
        if (
            sub is None
            or sub.stripe_subscription_id is None
            or _invoice_subscription(invoice) != sub.stripe_subscription_id
            or invoice.get("billing_reason") not in ("subscription_create", "subscription_cycle")
        ):
            return "applied", "invoice-paid"
        discounted = _amounts(invoice.get("total_discount_amounts")) != 0
        lines = (invoice.get("lines") or {}).get("data")
        short: list[datetime] = []
        for line in lines if isinstance(lines, list) else []:
            if not isinstance(line, dict) or _line_is_proration(line):
                continue
            price_id = _line_price(line)
            plan = await plan_by_stripe_price(tx, price_id) if price_id else None
            if plan is None or plan.monthly_price == 0:
                continue
            amount, quantity = line.get("amount"), line.get("quantity", 1)
            net = (
                amount - _amounts(line.get("discount_amounts"))
                if isinstance(amount, int) and not isinstance(amount, bool)
                else None
            )
            if discounted or net != plan.monthly_price or quantity != 1:
                period = line.get("period")
                end = timestamp(period.get("end")) if isinstance(period, dict) else None
                short.append(end or sub.current_period_end or datetime.now(UTC))
        if not short:
            return "applied", "invoice-paid"
        until = max(short)
        if sub.current_period_end is not None and sub.current_period_end > until:
            # An earlier period's invoice: voided for the record, nothing to take now.
            await tx.execute(
                "UPDATE bastion.subscriptions SET reversed_until = greatest(reversed_until, %s) "
                "WHERE tenant_id = %s",
                (until, tenant_id),
            )
            return "applied", "invoice-below-plan-price"
        return await self._void_period(
            tx,
            tenant_id,
            sub,
            until=until,
            event_id=str(row["event_id"]),
            reason="invoice.paid: the period was not paid at the plan's price",
        )

    async def _apply_checkout(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], obj: dict[str, Any]
    ) -> tuple[str, str]:
        """A completed Checkout Session binds its customer to the tenant it names —
        once: a session whose customer differs from the tenant's bound one is
        refused and audited (``billing.customer.refused``), the bound id kept.
        It changes no plan: the subscription's own events do."""
        customer, subscription = obj.get("customer"), obj.get("subscription")
        metadata = obj.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        for named in (obj.get("client_reference_id"), metadata.get("tenant_id")):
            if isinstance(named, str) and named != str(tenant_id):
                # The session names one tenant, its customer belongs to another.
                return "failed", "tenant-mismatch"
        customer = customer if isinstance(customer, str) else None
        sub = await self.read_subscription(tx, tenant_id, lock=True)
        bound = sub.stripe_customer_id if sub is not None else None
        if bound is not None and customer is not None and customer != bound:
            await record(
                tx,
                actor=f"stripe:{row['event_id']}",
                action="billing.customer.refused",
                target=f"tenant:{tenant_id}",
                details={
                    "field": "stripe_customer_id",
                    "reason": "another-customer-is-bound",
                    "session": str(obj.get("id"))[:255],
                },
            )
            return "failed", "customer-mismatch"
        try:
            async with tx.transaction():  # a savepoint: a clash must not undo the rest
                await tx.execute(
                    "INSERT INTO bastion.subscriptions (tenant_id, plan_code, provider, "
                    "stripe_customer_id, stripe_subscription_id, updated_by) "
                    "VALUES (%s, %s, 'stripe', %s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE "
                    "SET provider = 'stripe', "
                    "stripe_customer_id = coalesce(subscriptions.stripe_customer_id, "
                    "EXCLUDED.stripe_customer_id), "
                    # The bound subscription stays bound while it entitles.
                    "stripe_subscription_id = CASE WHEN subscriptions.status IN "
                    "('active', 'trialing', 'past_due') AND "
                    "subscriptions.stripe_subscription_id IS NOT NULL "
                    "THEN subscriptions.stripe_subscription_id ELSE "
                    "coalesce(EXCLUDED.stripe_subscription_id, "
                    "subscriptions.stripe_subscription_id) END, updated_at = now(), "
                    "updated_by = EXCLUDED.updated_by",
                    (
                        tenant_id,
                        FREE_PLAN,
                        customer,
                        subscription if isinstance(subscription, str) else None,
                        f"stripe:{row['event_id']}",
                    ),
                )
        except psycopg.errors.UniqueViolation:
            return "failed", "customer-linked-to-another-tenant"
        return "applied", "linked"

    async def _apply_subscription(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], obj: dict[str, Any]
    ) -> tuple[str, str]:
        version, event_id = int(row["object_version"]), str(row["event_id"])
        sub = await self.read_subscription(tx, tenant_id, lock=True)
        if sub is not None and (version, event_id) <= (sub.source_version, sub.source_event_id):
            return "stale", "older-than-applied-state"
        customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
        bound = sub.stripe_customer_id if sub is not None else None
        if bound is not None and customer is not None and customer != bound:
            return "failed", "customer-mismatch"
        # One subscription makes the plan: another of the same customer (a second
        # checkout, one made in the dashboard) changes nothing while the bound
        # one entitles; once that one has ended, the next one is bound.
        bound_sub = sub.stripe_subscription_id if sub is not None else None
        if bound_sub is not None and obj.get("id") != bound_sub and entitles(sub):
            return "failed", "another-subscription-is-bound"
        paid = await paid_plan(tx, obj)
        if isinstance(paid, str):
            return "failed", paid
        plan, item = paid
        status = str(obj.get("status") or "active")[:40]
        if row["event_type"] == "customer.subscription.deleted":
            status = "canceled"
        start = timestamp(item.get("current_period_start") or obj.get("current_period_start"))
        end = timestamp(item.get("current_period_end") or obj.get("current_period_end"))
        if status in ENTITLED and (
            voided(sub, end) or await self.period_disputed(tx, tenant_id, start, end)
        ):
            status = PAYMENT_REVERSED  # this period's payment was refunded or disputed
        if not pays_for_plan(status, plan):
            plan = await plan_by_code(tx, FREE_PLAN)
        before = sub.plan_code if sub is not None else None
        if not plan.active and plan.code not in (before, FREE_PLAN):
            return "failed", "plan-inactive"
        if not status.replace("_", "").isalpha():
            status = "unknown"
        actor = f"stripe:{event_id}"
        price = item["price"]["id"]
        await tx.execute(
            "INSERT INTO bastion.subscriptions (tenant_id, plan_code, status, provider, "
            "stripe_customer_id, stripe_subscription_id, stripe_price_id, current_period_start, "
            "current_period_end, cancel_at_period_end, source_version, source_event_id, "
            "updated_by) VALUES (%s, %s, %s, 'stripe', %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (tenant_id) DO UPDATE SET plan_code = EXCLUDED.plan_code, "
            "status = EXCLUDED.status, provider = 'stripe', "
            "stripe_customer_id = coalesce(subscriptions.stripe_customer_id, "
            "EXCLUDED.stripe_customer_id), "
            "stripe_subscription_id = EXCLUDED.stripe_subscription_id, "
            "stripe_price_id = EXCLUDED.stripe_price_id, "
            "current_period_start = EXCLUDED.current_period_start, "
            "current_period_end = EXCLUDED.current_period_end, "
            "cancel_at_period_end = EXCLUDED.cancel_at_period_end, "
            "source_version = EXCLUDED.source_version, source_event_id = EXCLUDED.source_event_id, "
            "updated_at = now(), updated_by = EXCLUDED.updated_by",
            (
                tenant_id,
                plan.code,
                status,
                customer,
                obj.get("id") if isinstance(obj.get("id"), str) else None,
                price,
                start,
                end,
                bool(obj.get("cancel_at_period_end")),
                version,
                event_id,
                actor,
            ),
        )
        if before != plan.code:
            await self.record_change(
                tx,
                tenant_id,
                before,
                plan,
                actor=actor,
                reason=f"{row['event_type']} ({status})",
                source="webhook",
                provider="stripe",
                event_id=event_id,
                period=(start, end),
            )
            return "applied", f"plan {before} -> {plan.code}"
        return "applied", "state-updated"

    async def _apply_adyen(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], item: dict[str, Any]
    ) -> tuple[str, str]:
        code = row["event_type"]
        if code not in adyen_hooks.HANDLED or str(item.get("success")).lower() != "true":
            return "ignored", "not-a-successful-payment-event"
        # Signed by Adyen (merchantAccountCode) or checked against the batch that
        # carried it (live): a payment to another account or in the other mode
        # buys and reverts nothing here.
        merchant = self.accounts.adyen_merchant_account
        if merchant is None:
            return "failed", "merchant-account-not-configured"
        if item.get("merchantAccountCode") != merchant:
            return "failed", "merchant-account-mismatch"
        if item.get(adyen_hooks.LIVE_KEY) is not self.accounts.adyen_live:
            return "failed", "live-mode-mismatch"
        psp = adyen_hooks.payment_reference(item)
        if psp is None:
            return "failed", "no-payment-reference"
        if code in adyen_hooks.REVERSALS:
            return await self._reverse_adyen(tx, tenant_id, row, psp)
        return await self._authorise_adyen(tx, tenant_id, row, item, psp)

    async def _authorise_adyen(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], item: dict[str, Any], psp: str
    ) -> tuple[str, str]:
        """A successful AUTHORISATION: buys the plan its reference names for one
        month, if its amount is exactly the plan's price and the payment was not
        reversed already."""
        reference = adyen_hooks.parse_reference(str(item.get("merchantReference", "")))
        if reference is None:
            return "failed", "bad-merchant-reference"
        _shopper, plan_code, sequence = reference
        sub = await self.read_subscription(tx, tenant_id, lock=True)
        event_id = str(row["event_id"])
        if sub is not None and (sequence, event_id) <= (sub.source_version, sub.source_event_id):
            return "stale", "older-than-applied-state"
        cur = await tx.execute("SELECT 1 FROM bastion.plans WHERE code = %s", (plan_code,))
        if await cur.fetchone() is None:
            return "failed", "unknown-plan"
        plan = await plan_by_code(tx, plan_code)
        before = sub.plan_code if sub is not None else None
        if not plan.active and plan.code not in (before, FREE_PLAN):
            return "failed", "plan-inactive"
        # The reference names the plan; the signed amount must be its price, exactly
        # (integer minor units, ISO 4217 as Adyen writes it): less did not pay for
        # it, and more is not this order's amount either.
        amount = item.get("amount")
        amount = amount if isinstance(amount, dict) else {}
        value, currency = amount.get("value"), amount.get("currency")
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value != plan.monthly_price
            or currency != plan.currency.upper()
        ):
            return "failed", "amount-not-plan-price"
        cur = await tx.execute(
            "SELECT reversed_at, authorised_event FROM bastion.adyen_payments "
            "WHERE tenant_id = %s AND psp_reference = %s FOR UPDATE",
            (tenant_id, psp),
        )
        known = await cur.fetchone()
        if known is not None and known["reversed_at"] is not None:
            return "failed", "payment-reversed"  # its reversal arrived first
        if known is not None:
            return "failed", "payment-already-applied"
        # One month from when Bastion received it (eventDate is not signed).
        cur = await tx.execute(
            "INSERT INTO bastion.adyen_payments (tenant_id, psp_reference, plan_code, amount, "
            "currency, sequence, authorised_event, period_start, period_end) "
            "SELECT %s, %s, %s, %s, %s, %s, %s, e.received_at, "
            "e.received_at + interval '1 month' FROM bastion.webhook_events e WHERE e.id = %s "
            "RETURNING period_start, period_end, period_end <= now() AS ended",
            (tenant_id, psp, plan.code, value, plan.currency, sequence, event_id, row["id"]),
        )
        period = await cur.fetchone()
        assert period is not None
        if period["ended"]:
            return "applied", "paid-period-already-ended"
        actor = f"adyen:{event_id}"
        await tx.execute(
            "UPDATE bastion.subscriptions SET plan_code = %s, status = 'active', "
            "provider = 'adyen', adyen_payment = %s, current_period_start = %s, "
            "current_period_end = %s, source_version = %s, source_event_id = %s, "
            "updated_at = now(), updated_by = %s WHERE tenant_id = %s",
            (
                plan.code,
                psp,
                period["period_start"],
                period["period_end"],
                sequence,
                event_id,
                actor,
                tenant_id,
            ),
        )
        if before != plan.code:
            await self.record_change(
                tx,
                tenant_id,
                before,
                plan,
                actor=actor,
                reason="AUTHORISATION (success)",
                source="webhook",
                provider="adyen",
                event_id=event_id,
            )
            return "applied", f"plan {before} -> {plan.code}"
        return "applied", "period-renewed"

    async def _reverse_adyen(
        self, tx: Conn, tenant_id: UUID, row: dict[str, Any], psp: str
    ) -> tuple[str, str]:
        """A cancellation, refund or chargeback of payment ``psp``: recorded (before
        its authorisation too, which then buys nothing), and the plan it bought,
        if still current, falls back."""
        event_id = str(row["event_id"])
        await tx.execute(
            "INSERT INTO bastion.adyen_payments (tenant_id, psp_reference, reversed_at, "
            "reversed_event) VALUES (%s, %s, now(), %s) "
            "ON CONFLICT (tenant_id, psp_reference) DO UPDATE SET "
            "reversed_at = coalesce(adyen_payments.reversed_at, EXCLUDED.reversed_at), "
            "reversed_event = coalesce(adyen_payments.reversed_event, EXCLUDED.reversed_event)",
            (tenant_id, psp, event_id),
        )
        sub = await self.read_subscription(tx, tenant_id, lock=True)
        if sub is None or sub.provider != "adyen" or sub.adyen_payment != psp:
            return "applied", "payment-reversed"  # what it bought is no longer current
        moved = await self._fall_back(
            tx,
            tenant_id,
            sub,
            actor=f"adyen:{event_id}",
            reason=f"{row['event_type']} of the payment that bought it",
            source="webhook",
            event_id=event_id,
        )
        return "applied", moved

    async def _fall_back(
        self,
        tx: Conn,
        tenant_id: UUID,
        sub: Subscription,
        *,
        actor: str,
        reason: str,
        source: str,
        event_id: str,
    ) -> str:
        """Put the tenant on what its Adyen payments still pay for: the latest other
        unreversed payment whose month is running, or free. Returns the outcome."""
        cur = await tx.execute(
            "SELECT p.psp_reference, p.plan_code, p.period_start, p.period_end "
            "FROM bastion.adyen_payments p JOIN bastion.plans l ON l.code = p.plan_code "
            "WHERE p.tenant_id = %s AND p.reversed_at IS NULL AND l.active "
            "AND p.period_start <= now() AND now() < p.period_end AND p.psp_reference <> %s "
            "ORDER BY p.sequence DESC, p.period_end DESC LIMIT 1",
            (tenant_id, sub.adyen_payment or ""),
        )
        other = await cur.fetchone()
        plan = await plan_by_code(tx, other["plan_code"] if other else FREE_PLAN)
        await tx.execute(
            "UPDATE bastion.subscriptions SET plan_code = %s, adyen_payment = %s, "
            "current_period_start = %s, current_period_end = %s, updated_at = now(), "
            "updated_by = %s WHERE tenant_id = %s",
            (
                plan.code,
                other["psp_reference"] if other else None,
                other["period_start"] if other else None,
                other["period_end"] if other else None,
                actor,
                tenant_id,
            ),
        )
        if sub.plan_code == plan.code:
            return "payment-reversed"
        await self.record_change(
            tx,
            tenant_id,
            sub.plan_code,
            plan,
            actor=actor,
            reason=reason,
            source=source,
            provider="adyen",
            event_id=event_id,
        )
        return f"plan {sub.plan_code} -> {plan.code}"

    async def expire_lapsed(self) -> int:
        """Move every tenant whose Adyen-paid month has ended back (:meth:`_fall_back`);
        returns how many. Run by the worker's sweep every minute; until then the
        lapsed plan already entitles to nothing (:func:`entitles`)."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT tenant_id FROM bastion.subscriptions WHERE provider = 'adyen' "
                "AND current_period_end <= now() ORDER BY tenant_id"
            )
            tenants = [r["tenant_id"] for r in await cur.fetchall()]
        expired = 0
        for tenant_id in tenants:
            async with self.db.tenant_tx(tenant_id, None, "system") as tx:
                sub = await self.read_subscription(tx, tenant_id, lock=True)
                if sub is None or entitles(sub) or sub.current_period_end is None:
                    continue  # renewed, or moved, meanwhile
                await self._fall_back(
                    tx,
                    tenant_id,
                    sub,
                    actor="billing:expiry",
                    reason="the paid month ended",
                    source="reconcile",
                    event_id=f"expiry:{sub.adyen_payment}:{int(sub.current_period_end.timestamp())}",
                )
                expired += 1
        return expired

    async def reconcile_adyen(self) -> tuple[int, int]:
        """Check every tenant on an Adyen-bought plan against its stored payments:
        the payment that bought the plan must exist, be unreversed and its month
        running; otherwise the tenant falls back. A plan an AUTHORISATION bought
        before payments were recorded (no payment named) is unbacked too.
        Returns (checked, repaired).

        Adyen offers no API that lists a merchant's payments or notifications,
        so this reconciles from the verified events Bastion stored."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT tenant_id FROM bastion.subscriptions WHERE provider = 'adyen' "
                "AND plan_code <> %s ORDER BY tenant_id",
                (FREE_PLAN,),
            )
            tenants = [r["tenant_id"] for r in await cur.fetchall()]
        repaired = 0
        for tenant_id in tenants:
            async with self.db.tenant_tx(tenant_id, None, "system") as tx:
                sub = await self.read_subscription(tx, tenant_id, lock=True)
                if sub is None or sub.provider != "adyen" or sub.plan_code == FREE_PLAN:
                    continue
                cur = await tx.execute(
                    "SELECT 1 FROM bastion.adyen_payments WHERE tenant_id = %s "
                    "AND psp_reference = %s AND reversed_at IS NULL AND plan_code IS NOT NULL "
                    "AND period_start <= now() AND now() < period_end",
                    (tenant_id, sub.adyen_payment or ""),
                )
                if await cur.fetchone() is not None:
                    continue
                await self._fall_back(
                    tx,
                    tenant_id,
                    sub,
                    actor="reconcile",
                    reason="no running, unreversed Adyen payment pays for this plan",
                    source="reconcile",
                    event_id=f"reconcile:{sub.adyen_payment}:{int(datetime.now(UTC).timestamp())}",
                )
                repaired += 1
        return len(tenants), repaired

    async def on_invoice_paid(self, tx: Conn, tenant_id: UUID, event: dict[str, Any]) -> None:
        """A paid invoice, inside the transaction that applies its event (once).

        The call site for receipts: ``invoice_paid_hook`` (the receipts
        module's issuer) runs here, so a receipt commits with the event's
        ``applied`` status or not at all.
        """
        invoice = event["data"]["object"]
        await record(
            tx,
            actor=f"stripe:{event['id']}",
            action="billing.invoice.paid",
            target=f"invoice:{str(invoice.get('id'))[:200]}",
            details={
                "amount_paid": invoice.get("amount_paid")
                if isinstance(invoice.get("amount_paid"), int)
                else None,
                "currency": str(invoice.get("currency"))[:10],
            },
        )
        if self.invoice_paid_hook is not None:
            await self.invoice_paid_hook(tx, tenant_id, event)

    # -- pause, resume, routing (platform) -------------------------------------------------
    #
    # Exactly once across a pause: every writer that decides whether an event is
    # ``held`` or ``queued`` reads the flag with :meth:`_paused_locked` (FOR KEY
    # SHARE on the control row, kept to its commit), and pause and resume take the
    # row FOR UPDATE, which waits for those writers. So the flag never changes
    # under a writer that read it, and a resume collects every event held before
    # it. Migration 0021 makes the database hold any writer to the same rule, and
    # the worker's sweep queues a held event whenever webhooks run.

    @staticmethod
    async def _paused_locked(tx: Conn) -> bool:
        """Whether webhooks are paused, read FOR KEY SHARE: a pause or resume waits
        for ``tx`` to end. No control row reads as paused (fail closed)."""
        cur = await tx.execute(
            "SELECT paused FROM bastion.webhook_control WHERE id = 1 FOR KEY SHARE"
        )
        row = await cur.fetchone()
        return row is None or bool(row["paused"])

    async def paused(self) -> bool:
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute("SELECT paused FROM bastion.webhook_control WHERE id = 1")
            row = await cur.fetchone()
        return row is None or bool(row["paused"])

    async def pause(self, *, actor: str, reason: str) -> None:
        """Store-and-ack from now on: events are verified and stored, not applied.

        Returns once no event is being applied: the pause waits for intakes and
        drains that read the flag before it (their KEY SHARE), and every later
        one reads it paused."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            await tx.execute("SELECT 1 FROM bastion.webhook_control WHERE id = 1 FOR UPDATE")
            await tx.execute(
                "UPDATE bastion.webhook_control SET paused = true, changed_at = now(), "
                "changed_by = %s, reason = %s WHERE id = 1",
                (actor[:300], reason[:1000]),
            )
        _log.warning("webhooks_paused", actor=actor)

    async def resume(self, *, actor: str) -> int:
        """Apply again: every held event is queued in arrival order; returns how many."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            # FOR UPDATE waits for intakes, drains and routings that read the flag
            # (KEY SHARE): none can hold an event after this transaction has
            # collected them.
            await tx.execute("SELECT 1 FROM bastion.webhook_control WHERE id = 1 FOR UPDATE")
            await tx.execute(
                "UPDATE bastion.webhook_control SET paused = false, changed_at = now(), "
                "changed_by = %s, reason = '' WHERE id = 1",
                (actor[:300],),
            )
            held = await self._queue_held(tx)
        _log.warning("webhooks_resumed", actor=actor, events=held)
        return held

    async def release_held(self) -> int:
        """Queue every ``held`` event while webhooks are not paused; returns how many.

        The sweep's backstop (every minute, :mod:`bastion.billing.tasks`): by the
        rule above none is left held after a resume, but an event held by any
        other path (a writer that skipped the lock, an operator's SQL) waits at
        most until the next sweep, never for good. Changes nothing while paused.
        """
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            if await self._paused_locked(tx):
                return 0
            released = await self._queue_held(tx)
        if released:
            _log.warning("webhook_holds_released", events=released)
        return released

    @staticmethod
    async def _queue_held(tx: Conn) -> int:
        """Queue the held events in ``tx`` and enqueue their tenants' drains (which
        apply them in arrival order); returns how many."""
        cur = await tx.execute(
            "UPDATE bastion.webhook_events SET status = 'queued' WHERE status = 'held' "
            "RETURNING tenant_id"
        )
        rows = await cur.fetchall()
        for tenant in sorted({row["tenant_id"] for row in rows}, key=str):
            await tx.execute(
                "SELECT bastion.enqueue_billing_drain(%s, %s)", (tenant, current_traceparent())
            )
        return len(rows)

    async def route_unrouted(self) -> int:
        """Give unrouted events whose customer (a dispute: whose charge) is now known
        to their tenant; returns how many. The rest stay flagged for reconciliation."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            # Held or queued as the flag says, read under the lock a resume waits for.
            status = "held" if await self._paused_locked(tx) else "queued"
            cur = await tx.execute(
                "UPDATE bastion.webhook_events e SET tenant_id = s.tenant_id, status = %s "
                "FROM bastion.subscriptions s WHERE e.status = 'unrouted' AND ("
                "(e.provider = 'stripe' AND s.stripe_customer_id = e.customer_ref) OR "
                "(e.provider = 'adyen' AND s.adyen_shopper_reference = e.customer_ref)) "
                "RETURNING e.tenant_id",
                (status,),
            )
            rows = await cur.fetchall()
            # A dispute names only its charge: the tenant of a charge recorded since.
            cur = await tx.execute(
                "UPDATE bastion.webhook_events e SET tenant_id = c.tenant_id, status = %s "
                "FROM bastion.stripe_charges c WHERE e.status = 'unrouted' "
                "AND e.provider = 'stripe' AND c.charge_id = e.customer_ref "
                "RETURNING e.tenant_id",
                (status,),
            )
            rows += await cur.fetchall()
            if status == "queued":
                for tenant in sorted({r["tenant_id"] for r in rows}, key=str):
                    await tx.execute(
                        "SELECT bastion.enqueue_billing_drain(%s, %s)",
                        (tenant, current_traceparent()),
                    )
        return len(rows)

    async def requeue_pending(self, older_than_seconds: float = 30.0) -> int:
        """Enqueue a drain for every tenant with events queued longer than that (a
        drain job that gave up after its retries, say); returns how many tenants."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT DISTINCT tenant_id FROM bastion.webhook_events WHERE status = 'queued' "
                "AND received_at < now() - make_interval(secs => %s)",
                (older_than_seconds,),
            )
            tenants = [row["tenant_id"] for row in await cur.fetchall()]
            for tenant in tenants:
                await tx.execute(
                    "SELECT bastion.enqueue_billing_drain(%s, %s)", (tenant, current_traceparent())
                )
        return len(tenants)

    async def event_counts(self) -> dict[str, int]:
        """Stored events by status, every tenant's (unknown types: ``ignored``)."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT status, count(*) AS n FROM bastion.webhook_events GROUP BY status"
            )
            return {row["status"]: row["n"] for row in await cur.fetchall()}
