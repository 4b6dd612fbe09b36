"""Adyen payments, each bound to what it paid for and reversible (issue 23, finding 5).

An Adyen authorisation bought the plan named in its reference, for good:
the amount, the account and the mode were not checked, and a refund,
cancellation or chargeback changed nothing. ``adyen_payments`` keeps one
row per payment (its pspReference) of a tenant: the plan it bought, the
exact amount and currency, the period it pays for (a month from when
Bastion received it), and whether it was reversed — a reversal arriving
*before* its authorisation is recorded too, so the authorisation that
follows buys nothing. ``subscriptions.adyen_payment`` names the payment
that bought the current plan: reversing that one, or its period ending,
moves the tenant back (:mod:`bastion.billing.service`).

Stripe: ``subscriptions.reversed_until`` is the end of the last period whose
payment was refunded (``charge.refunded``); until a later period is paid,
the subscription's events do not entitle to its plan.

Read by the tenant's billing people, written only by its system role (the
worker applying a verified event), like ``subscriptions``.

Revision ID: 0020
Revises: 0019
"""

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"
PLATFORM = "(SELECT bastion.app_is_platform())"
READERS = "(SELECT bastion.app_role()) IN ('owner', 'billing-admin', 'auditor', 'system')"

UPGRADE = f"""
CREATE TABLE bastion.adyen_payments (
    tenant_id        uuid NOT NULL DEFAULT bastion.app_tenant_id()
                     REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    psp_reference    text NOT NULL CHECK (length(psp_reference) BETWEEN 1 AND 255),
    -- Null while only a reversal is known (it arrived before its authorisation).
    plan_code        text REFERENCES bastion.plans (code),
    amount           bigint CHECK (amount >= 0),
    currency         text CHECK (currency ~ '^[a-z]{{3}}$'),
    sequence         bigint NOT NULL DEFAULT 0,
    authorised_event text CHECK (length(authorised_event) <= 255),
    period_start     timestamptz,
    period_end       timestamptz,
    reversed_at      timestamptz,
    reversed_event   text CHECK (length(reversed_event) <= 255),
    PRIMARY KEY (tenant_id, psp_reference),
    CHECK (period_end IS NULL OR period_end > period_start),
    CHECK ((plan_code IS NULL) = (authorised_event IS NULL))
);
ALTER TABLE bastion.adyen_payments ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.adyen_payments FORCE ROW LEVEL SECURITY;
CREATE POLICY adyen_payment_read ON bastion.adyen_payments FOR SELECT
    USING (({TENANT} AND {READERS}) OR {PLATFORM});
CREATE POLICY adyen_payment_write ON bastion.adyen_payments FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
GRANT SELECT, INSERT, UPDATE ON bastion.adyen_payments TO bastion_app;

ALTER TABLE bastion.subscriptions
    ADD COLUMN adyen_payment text CHECK (length(adyen_payment) <= 255),
    ADD COLUMN reversed_until timestamptz;
"""

DOWNGRADE = """
ALTER TABLE bastion.subscriptions DROP COLUMN adyen_payment, DROP COLUMN reversed_until;
DROP TABLE bastion.adyen_payments;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
