"""The worker's periodic metering job: close ended usage periods (their signed
receipts) and report new usage records to Stripe's meters.

It finds its tenants in the platform context — those with an ended period
without a receipt (``bastion.usage_periods_due()``) and those with a Stripe
customer — then works on each in that tenant's own system context. Both
steps are idempotent (one receipt per period, one meter report per record),
so a run that dies half-way is finished by the next; one tenant's failure is
logged and does not stop the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import procrastinate

from bastion.billing.budgets import BudgetService
from bastion.billing.metering import MeterReporter
from bastion.billing.models import PLATFORM
from bastion.billing.receipts import ReceiptService
from bastion.db.pool import Database
from bastion.logs import get_logger
from bastion.secrets.protocols import Keystore
from bastion.settings import Settings

PERIODS = "billing.usage_periods"
QUEUE = "billing"

_log = get_logger("bastion.billing")


@dataclass(frozen=True)
class PeriodRun:
    receipts: int
    reported: int
    failed_tenants: int


class UsagePeriodJob:
    def __init__(
        self, db: Database, receipts: ReceiptService, reporter: MeterReporter | None = None
    ) -> None:
        self.db = db
        self.receipts = receipts
        self.reporter = reporter

    async def _tenants(self) -> tuple[list[UUID], list[UUID]]:
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute("SELECT t FROM bastion.usage_periods_due() AS t")
            due = [row["t"] for row in await cur.fetchall()]
            metered: list[UUID] = []
            if self.reporter is not None:
                cur = await tx.execute(
                    "SELECT tenant_id FROM bastion.subscriptions "
                    "WHERE stripe_customer_id IS NOT NULL ORDER BY tenant_id"
                )
                metered = [row["tenant_id"] for row in await cur.fetchall()]
        return due, metered

    async def run(self) -> PeriodRun:
        """One pass over every tenant with work; returns what it did."""
        due, metered = await self._tenants()
        issued = reported = failed = 0
        budgets = BudgetService(self.db)
        for tenant in due:
            try:
                # A call whose caller died holds its period open until released.
                await budgets.release_expired(tenant)
                issued += len(await self.receipts.close_usage_periods(tenant))
            except Exception as exc:  # one tenant must not stop the others
                failed += 1
                _log.warning(
                    "usage_period_close_failed", tenant=str(tenant), error=type(exc).__name__
                )
        if self.reporter is not None:
            for tenant in metered:
                try:
                    reported += await self.reporter.report(tenant)
                except Exception as exc:
                    failed += 1
                    _log.warning(
                        "meter_report_failed", tenant=str(tenant), error=type(exc).__name__
                    )
        return PeriodRun(issued, reported, failed)


def register(queue: procrastinate.App, job: UsagePeriodJob) -> None:
    """Run the job every five minutes (one at a time: its queueing lock)."""

    @queue.periodic(cron="*/5 * * * *", periodic_id="billing-usage-periods")
    @queue.task(name=PERIODS, queue=QUEUE, queueing_lock=PERIODS)
    async def usage_periods_task(timestamp: int) -> None:
        done = await job.run()
        _log.info("usage_periods_run", **vars(done))


def register_from_settings(
    queue: procrastinate.App, settings: Settings, db: Database, keystore: Keystore
) -> UsagePeriodJob:
    """:func:`register` with the job built from ``settings`` (the worker's wiring)."""
    from bastion.billing.metering import StripeMeterSink, stripe_customer
    from bastion.billing.receipts import ReceiptKeys
    from bastion.billing.wiring import stripe_client

    client = stripe_client(settings, keystore)
    reporter = None
    if client is not None:
        reporter = MeterReporter(
            db,
            StripeMeterSink(client),
            lambda tenant: stripe_customer(db, tenant),
            event_name=settings.billing_meter_event_name,
        )
    receipts = ReceiptService(db, ReceiptKeys(keystore), issuer=settings.resolved_issuer)
    job = UsagePeriodJob(db, receipts, reporter)
    register(queue, job)
    return job
