"""Metering and receipts: Stripe meter reports, signed receipts, checkout sessions
(CHECKLIST P1, P4).

The usage records themselves are the settled rows of
``bastion.budget_reservations`` (0005): the gateway writes one per call —
one per block of calls since 0009 — from the providers' own ``usage``, in
the transaction that settles the budget.
Here are only what metering adds to them — which records were reported to
Stripe's meters (one row per record: the record's id is the meter event's
``identifier``) — the signed receipts (one per paid invoice and per closed
usage period), and the Checkout Sessions a tenant opened (Stripe ids only:
card data never reaches Bastion).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"

UPGRADE = f"""
CREATE TABLE bastion.meter_reports (
    reservation_id uuid PRIMARY KEY
                   REFERENCES bastion.budget_reservations (id) ON DELETE CASCADE,
    tenant_id      uuid NOT NULL DEFAULT bastion.app_tenant_id()
                   REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    event_name     text NOT NULL CHECK (length(event_name) <= 100),
    value          bigint NOT NULL CHECK (value >= 0),
    reported_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bastion.receipts (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL DEFAULT bastion.app_tenant_id()
                 REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('invoice', 'usage_period')),
    -- the invoice ("stripe:in_...") or the period's start: one receipt each
    subject      text NOT NULL CHECK (length(subject) <= 300),
    period_start timestamptz,
    kid          text NOT NULL CHECK (length(kid) <= 128),
    jws          text NOT NULL CHECK (length(jws) <= 65536),
    issued_at    timestamptz NOT NULL,
    UNIQUE (tenant_id, kind, subject),
    CHECK ((kind = 'usage_period') = (period_start IS NOT NULL))
);

CREATE TABLE bastion.checkout_sessions (
    session_id  text PRIMARY KEY CHECK (session_id ~ '^cs_[A-Za-z0-9_]{{1,250}}$'),
    tenant_id   uuid NOT NULL DEFAULT bastion.app_tenant_id()
                REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    customer_id text CHECK (customer_id ~ '^cus_[A-Za-z0-9_]{{1,250}}$'),
    price_id    text NOT NULL CHECK (length(price_id) BETWEEN 1 AND 255),
    created_by  uuid,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX checkout_sessions_tenant ON bastion.checkout_sessions (tenant_id, created_at);

ALTER TABLE bastion.meter_reports ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.meter_reports FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.receipts ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.receipts FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.checkout_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.checkout_sessions FORCE ROW LEVEL SECURITY;

-- Tenants read their own rows; only the system role (the billing services
-- acting for the tenant set in the signed context) writes.
CREATE POLICY meter_report_read ON bastion.meter_reports FOR SELECT USING ({TENANT});
CREATE POLICY meter_report_write ON bastion.meter_reports FOR INSERT
    WITH CHECK ({TENANT} AND {SYSTEM});
CREATE POLICY receipt_read ON bastion.receipts FOR SELECT USING ({TENANT});
CREATE POLICY receipt_write ON bastion.receipts FOR INSERT WITH CHECK ({TENANT} AND {SYSTEM});
CREATE POLICY checkout_read ON bastion.checkout_sessions FOR SELECT USING ({TENANT});
CREATE POLICY checkout_write ON bastion.checkout_sessions FOR INSERT
    WITH CHECK ({TENANT} AND {SYSTEM});

-- Append-only for the app: a receipt or a report, once written, is not changed.
GRANT SELECT, INSERT ON bastion.meter_reports, bastion.receipts, bastion.checkout_sessions
    TO bastion_app;

-- Which tenants have an ended usage period without its receipt: the periodic
-- job asks in the platform context, then closes each tenant's periods in
-- that tenant's own context. Only tenant ids leave the function, and only to
-- the platform context; it runs as the schema owner, which alone may look.
CREATE POLICY budget_due_lookup ON bastion.budgets FOR SELECT TO CURRENT_USER USING (true);
CREATE POLICY receipt_due_lookup ON bastion.receipts FOR SELECT TO CURRENT_USER USING (true);
CREATE FUNCTION bastion.usage_periods_due() RETURNS SETOF uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT DISTINCT b.tenant_id FROM bastion.budgets b
    WHERE bastion.app_is_platform() AND b.period_end <= now()
      AND NOT EXISTS (SELECT 1 FROM bastion.receipts r
                      WHERE r.tenant_id = b.tenant_id AND r.kind = 'usage_period'
                        AND r.period_start = b.period_start)
$$;
REVOKE ALL ON FUNCTION bastion.usage_periods_due() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.usage_periods_due() TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.usage_periods_due();
DROP POLICY budget_due_lookup ON bastion.budgets;
DROP TABLE bastion.checkout_sessions, bastion.receipts, bastion.meter_reports;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
