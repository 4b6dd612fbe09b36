"""Billing's worker jobs: apply stored provider events; reconcile periodically.

``billing.drain`` is enqueued by the database itself (``bastion.webhook_receive``,
``bastion.enqueue_billing_drain``) in the transaction that stores an event;
one waiting per tenant (its ``queueing_lock``), one running per tenant (its
``lock``). It runs as the tenant's system role: no user asked for it, a
verified provider event did. Its Cedar action (``billing:manage``) is
declared in the registry like every job's.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import procrastinate

from bastion.access.authorize import Subject
from bastion.billing.reconcile import Reconciler
from bastion.billing.service import BillingService, InvoicePaidHook
from bastion.db.pool import Database
from bastion.logs import get_logger
from bastion.secrets.protocols import Keystore
from bastion.settings import Settings
from bastion.worker.jobs import JobRegistry

DRAIN = "billing.drain"
RECONCILE = "billing.reconcile"
SWEEP = "billing.sweep"
QUEUE = "billing"

_log = get_logger("bastion.billing")


def register(
    queue: procrastinate.App,
    registry: JobRegistry,
    service: BillingService,
    reconciler: Reconciler | None = None,
) -> None:
    """Register the billing jobs on the queue and in the registry."""

    @registry.job(DRAIN, action="billing:manage", resource_type="Billing")
    async def drain(subject: Subject, resource_id: str, **_: Any) -> int:
        return await service.drain(subject.tenant_id)

    # Retries cover infrastructure failures; an event that cannot be applied
    # is marked failed with its reason, not retried.
    @queue.task(
        name=DRAIN,
        queue=QUEUE,
        retry=procrastinate.RetryStrategy(max_attempts=10, exponential_wait=2),
    )
    async def drain_task(tenant_id: str) -> None:
        applied = await service.drain(UUID(tenant_id))
        _log.info("billing_drained", tenant_id=tenant_id, events=applied)

    # Every minute: route events whose customer became known, queue any event
    # still held while webhooks run (none should be: a resume queues them all),
    # give any tenant whose events still wait (its drain gave up) a new drain,
    # and move back tenants whose Adyen-paid month has ended.
    @queue.periodic(cron="* * * * *", periodic_id="billing-sweep")
    @queue.task(name=SWEEP, queue=QUEUE, queueing_lock=SWEEP)
    async def sweep_task(timestamp: int) -> None:
        routed = await service.route_unrouted()
        released = await service.release_held()
        requeued = await service.requeue_pending()
        expired = await service.expire_lapsed()  # Adyen-paid months that ended
        if routed or released or requeued or expired:
            _log.info(
                "billing_swept",
                routed=routed,
                held_released=released,
                tenants_requeued=requeued,
                adyen_expired=expired,
            )

    if reconciler is not None:

        @queue.periodic(cron="*/15 * * * *", periodic_id="billing-reconcile")
        @queue.task(name=RECONCILE, queue=QUEUE, queueing_lock=RECONCILE)
        async def reconcile_task(timestamp: int) -> None:
            report = await reconciler.run()
            _log.info("billing_reconciled", **vars(report))


def register_from_settings(
    queue: procrastinate.App,
    registry: JobRegistry,
    settings: Settings,
    db: Database,
    keystore: Keystore,
    *,
    invoice_paid_hook: InvoicePaidHook | None = None,
) -> None:
    """:func:`register` with billing built from ``settings`` (the worker's wiring);
    ``invoice_paid_hook`` runs in the transaction applying each paid invoice
    (the receipts issuer)."""
    from bastion.billing.wiring import build_billing

    billing = build_billing(settings, db, keystore, invoice_paid_hook=invoice_paid_hook)
    register(queue, registry, billing.service, billing.reconciler)
