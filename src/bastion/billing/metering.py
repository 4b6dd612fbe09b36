"""Metering: usage per tenant and period, reported to Stripe's meters (CHECKLIST P1).

The usage records are the gateway's settled budget reservations
(``bastion.budget_reservations`` with ``status = 'settled'``), not a table
of their own:

* each is written by the gateway alone, from the providers' ``usage``
  replies, in the transaction that settles the budget and records the calls'
  audit events — a client has no route to write or change one (P1:
  client-sent meters are ignored because there is nowhere to send them);
* one per budget lease — the calls a gateway process made on one block of
  budget (``calls_used`` of them, see :mod:`bastion.gateway.ledger`) — with a
  UUID primary key: exactly the "identifier per record" Stripe's meter events
  want, so a report can be repeated safely;
* a second table would add a write per model call on the gateway's hot path
  (its benchmark is bound by the database) and could drift from the budgets
  it should equal.

What metering adds is which records were reported (``bastion.meter_reports``,
one row per record) — see :class:`MeterReporter`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from bastion.db.pool import Database
from bastion.logs import get_logger

_log = get_logger("bastion.billing")

# Stripe accepts meter events up to 35 days old; older records cannot be sent.
STRIPE_METER_WINDOW = timedelta(days=35)
DEFAULT_EVENT_NAME = "bastion_tokens"


@dataclass(frozen=True)
class UsagePeriod:
    period_start: datetime
    period_end: datetime
    calls: int
    tokens: int
    calls_reported: int
    closed: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "calls": self.calls,
            "tokens": self.tokens,
            "calls_reported": self.calls_reported,
            "closed": self.closed,
        }


class MeteringService:
    """Usage of a tenant, aggregated per budget period, from the settled records."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def usage(
        self, tenant_id: UUID, user_id: UUID | None, role: str, *, limit: int = 24
    ) -> list[UsagePeriod]:
        """The tenant's last ``limit`` periods, newest first.

        Runs in the caller's own context: row-level security keeps it to the
        caller's tenant whatever the route asked for.
        """
        async with self.db.tenant_tx(tenant_id, user_id, role) as tx:
            cur = await tx.execute(
                "SELECT b.period_start, b.period_end, b.period_end <= now() AS closed, "
                "coalesce(sum(r.calls_used), 0)::bigint AS calls, "
                "coalesce(sum(r.tokens_used), 0)::bigint AS tokens, "
                "coalesce(sum(r.calls_used) FILTER (WHERE m.reservation_id IS NOT NULL), 0)"
                "::bigint AS calls_reported "
                "FROM bastion.budgets b LEFT JOIN bastion.budget_reservations r "
                "ON r.tenant_id = b.tenant_id AND r.period_start = b.period_start "
                "AND r.status = 'settled' "
                "LEFT JOIN bastion.meter_reports m ON m.reservation_id = r.id "
                "GROUP BY b.period_start, b.period_end ORDER BY b.period_start DESC LIMIT %s",
                (limit,),
            )
            rows = await cur.fetchall()
        return [
            UsagePeriod(
                period_start=row["period_start"],
                period_end=row["period_end"],
                calls=int(row["calls"]),
                tokens=int(row["tokens"]),
                calls_reported=int(row["calls_reported"]),
                closed=bool(row["closed"]),
            )
            for row in rows
        ]


@dataclass(frozen=True)
class MeterEvent:
    """One Stripe meter event (``POST /v1/billing/meter_events``)."""

    identifier: str  # the usage record's id: Stripe keeps one event per identifier
    event_name: str
    customer_id: str
    value: int
    timestamp: int


class MeterSink(Protocol):
    """Where meter events go (Stripe in production; any real HTTP double in tests)."""

    async def send(self, event: MeterEvent) -> None: ...


class StripeMeterSink:
    """Meter events through the ``stripe`` library.

    The record id is both the event's ``identifier`` (Stripe de-duplicates on
    it) and the request's ``Idempotency-Key``: a report retried after a crash
    or a lost answer is one event at Stripe.
    """

    def __init__(self, client: Any) -> None:  # stripe.StripeClient
        self.client = client

    async def send(self, event: MeterEvent) -> None:
        await self.client.v1.billing.meter_events.create_async(
            params={
                "event_name": event.event_name,
                "identifier": event.identifier,
                "timestamp": event.timestamp,
                "payload": {
                    "stripe_customer_id": event.customer_id,
                    "value": str(event.value),
                },
            },
            options={"idempotency_key": f"bastion-meter-{event.identifier}"},
        )


CustomerLookup = Callable[[UUID], Awaitable[str | None]]


async def stripe_customer(db: Database, tenant_id: UUID) -> str | None:
    """The tenant's Stripe customer id: its subscription's, else its last checkout's."""
    async with db.tenant_tx(tenant_id, None, "system") as tx:
        cur = await tx.execute(
            "SELECT stripe_customer_id AS customer FROM bastion.subscriptions "
            "WHERE stripe_customer_id IS NOT NULL "
            "UNION ALL (SELECT customer_id FROM bastion.checkout_sessions "
            "WHERE customer_id IS NOT NULL ORDER BY created_at DESC LIMIT 1) LIMIT 1"
        )
        row = await cur.fetchone()
    return None if row is None else str(row["customer"])


class MeterReporter:
    """Sends each settled usage record to the meter once.

    A batch is claimed with ``FOR UPDATE SKIP LOCKED`` in one transaction that
    also records what was sent, so two reporters never send the same record
    twice at once, and a record is marked reported only with the send that
    succeeded. If the process dies between Stripe's answer and the commit, the
    next run sends the record again with the same identifier and idempotency
    key, which Stripe counts once.
    """

    def __init__(
        self,
        db: Database,
        sink: MeterSink,
        customer_of: CustomerLookup,
        *,
        event_name: str = DEFAULT_EVENT_NAME,
        batch_size: int = 100,
    ) -> None:
        self.db = db
        self.sink = sink
        self.customer_of = customer_of
        self.event_name = event_name
        self.batch_size = batch_size

    async def report(self, tenant_id: UUID) -> int:
        """Report the tenant's unreported records; return how many were sent.

        Stops at the first failure (the rest waits for the next run); records
        older than Stripe's 35-day window are skipped and logged.
        """
        customer = await self.customer_of(tenant_id)
        if customer is None:
            return 0
        sent = 0
        while True:
            done, more = await self._batch(tenant_id, customer)
            sent += done
            if not more:
                return sent

    async def _batch(self, tenant_id: UUID, customer: str) -> tuple[int, bool]:
        cutoff = datetime.now(UTC) - STRIPE_METER_WINDOW + timedelta(hours=1)
        sent = 0
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            # One reporter per tenant at a time: a second one waits here, and
            # its query then sees every report the first committed. (Row locks
            # with SKIP LOCKED would not do: a record whose report was committed
            # after this statement's snapshot is not re-checked.)
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"bastion.meter-report:{tenant_id}",),
            )
            cur = await tx.execute(
                "SELECT r.id, r.tokens_used, r.created_at FROM bastion.budget_reservations r "
                "WHERE r.status = 'settled' AND r.created_at > %s AND NOT EXISTS "
                "(SELECT 1 FROM bastion.meter_reports m WHERE m.reservation_id = r.id) "
                "ORDER BY r.created_at, r.id LIMIT %s",
                (cutoff, self.batch_size),
            )
            records: Sequence[dict[str, Any]] = await cur.fetchall()
            for record in records:
                event = MeterEvent(
                    identifier=str(record["id"]),
                    event_name=self.event_name,
                    customer_id=customer,
                    value=int(record["tokens_used"] or 0),
                    timestamp=int(record["created_at"].timestamp()),
                )
                try:
                    await self.sink.send(event)
                except Exception as exc:
                    # Keep what was sent (commit below); the rest waits for the next run.
                    _log.warning(
                        "meter_report_failed", tenant=str(tenant_id), error=type(exc).__name__
                    )
                    return sent, False
                await tx.execute(
                    "INSERT INTO bastion.meter_reports (reservation_id, event_name, value) "
                    "VALUES (%s, %s, %s)",
                    (record["id"], self.event_name, event.value),
                )
                sent += 1
        return sent, len(records) == self.batch_size
