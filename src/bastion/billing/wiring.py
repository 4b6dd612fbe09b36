"""Billing's objects built from settings (shared by the api, the worker and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

import stripe
from stripe._base_address import BaseAddresses

from bastion.billing.approvals import PlanApprovals
from bastion.billing.plans import PlanCatalogue
from bastion.billing.reconcile import Reconciler, StripeProvider
from bastion.billing.service import BillingService, InvoicePaidHook, PaymentAccounts
from bastion.billing.webhooks import ActiveSecrets, EventCipher, WebhookIntake
from bastion.billing.webhooks.adyen import AdyenWebhook
from bastion.billing.webhooks.stripe import StripeWebhook
from bastion.db.pool import Database
from bastion.secrets.store import LocalKeystore, resolve_ref
from bastion.settings import Settings


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
    keystore: LocalKeystore,
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
    provider = None
    if settings.billing_stripe_api_key_ref:
        api_key = resolve_ref(keystore, settings.billing_stripe_api_key_ref).decode()
        base: BaseAddresses = {}
        if settings.billing_stripe_api_base:
            base["api"] = settings.billing_stripe_api_base
        provider = StripeProvider(
            stripe.StripeClient(api_key, base_addresses=base, max_network_retries=2)
        )
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
