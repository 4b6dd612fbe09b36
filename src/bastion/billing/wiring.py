"""Billing's objects built from settings (shared by the api, the worker and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

import stripe

from bastion.billing.approvals import PlanApprovals
from bastion.billing.plans import PlanCatalogue
from bastion.billing.reconcile import Reconciler, StripeProvider
from bastion.billing.service import BillingService, InvoicePaidHook, PaymentAccounts
from bastion.billing.webhooks import ActiveSecrets, EventCipher, WebhookIntake
from bastion.billing.webhooks.adyen import AdyenWebhook
from bastion.billing.webhooks.stripe import StripeWebhook
from bastion.db.pool import Database
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import resolve_ref
from bastion.settings import Settings


def stripe_client(settings: Settings, keystore: Keystore) -> stripe.StripeClient | None:
    """The one Stripe API client of a process (Checkout, metering, reconciliation), or
    None when no Stripe key is configured.

    Built with the library's public parameters only: ``base_addresses`` (a plain
    mapping; tests point ``api`` at a local double of Stripe's API),
    ``stripe_account`` (the connected account Bastion sells through, the same
    one its webhooks must come from: without it, reconciliation would read the
    platform account's subscriptions) and an HTTPX transport that serves both
    the async calls of the api and the sync ones of the CLI and worker.
    """
    if not settings.billing_stripe_api_key_ref:
        return None
    api_key = resolve_ref(keystore, settings.billing_stripe_api_key_ref).decode()
    api_base = settings.billing_stripe_api_base
    return stripe.StripeClient(
        api_key,
        stripe_account=settings.stripe_account_id,
        base_addresses={"api": api_base} if api_base else {},
        max_network_retries=2,
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )


@dataclass(frozen=True)
class Billing:
    service: BillingService
    catalogue: PlanCatalogue
    intake: WebhookIntake
    stripe_webhook: StripeWebhook
    adyen_webhook: AdyenWebhook
    reconciler: Reconciler
    approvals: PlanApprovals


def build_billing(
    settings: Settings,
    db: Database,
    keystore: Keystore,
    *,
    invoice_paid_hook: InvoicePaidHook | None = None,
) -> Billing:
    cipher = EventCipher(keystore)
    accounts = PaymentAccounts(
        stripe_livemode=settings.stripe_livemode,
        stripe_account=settings.stripe_account_id,
        adyen_merchant_account=settings.adyen_merchant_account,
        adyen_live=settings.adyen_live,
    )
    service = BillingService(db, cipher, invoice_paid_hook=invoice_paid_hook, accounts=accounts)
    intake = WebhookIntake(db, cipher)
    client = stripe_client(settings, keystore)
    provider = StripeProvider(client) if client is not None else None
    return Billing(
        service=service,
        catalogue=PlanCatalogue(db),
        intake=intake,
        stripe_webhook=StripeWebhook(
            ActiveSecrets(keystore, settings.stripe_webhook_secret_ref).values,
            tolerance=settings.webhook_tolerance_seconds,
        ),
        adyen_webhook=AdyenWebhook(ActiveSecrets(keystore, settings.adyen_hmac_key_ref).values),
        reconciler=Reconciler(db, service, intake, provider),
        approvals=PlanApprovals(db, service),
    )
