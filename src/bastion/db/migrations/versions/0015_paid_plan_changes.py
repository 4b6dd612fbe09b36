"""Plan changes that cost more go through payment or two operators (issue 13, finding 3 and 7b).

* ``plans.monthly_price`` / ``plans.currency``: what a plan costs a month, in
  the currency's minor units (integers, never floats). With the entitlements
  it decides whether a move is an upgrade (:mod:`bastion.billing.plans`).
  The defaults price the three plans of migration 0007.
* ``plan_requests``: an operator's plan change that needs a second operator —
  a tenant moved to a plan that costs or gives more (``tenant-plan``, in that
  tenant's context), or a catalogue edit that gives a plan's subscribers more
  for the same money (``catalogue``, platform context, ``tenant_id`` NULL).
  The pattern of ``role_requests`` (0003): pending, expiring, decided once,
  and the database refuses a decision by the requester.
* Triggers on ``subscriptions``, the backstop under the service's checks:
  a Stripe customer or Adyen shopper reference, once bound, is never replaced
  (another customer's checkout cannot take a tenant's billing identity), and
  no tenant is moved onto an inactive plan (the free fallback of a cancelled
  subscription excepted: it must always apply).

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"
PLATFORM = "(SELECT bastion.app_is_platform())"
READERS = "(SELECT bastion.app_role()) IN ('owner', 'billing-admin', 'auditor', 'system')"

UPGRADE = f"""
ALTER TABLE bastion.plans
    ADD COLUMN monthly_price bigint NOT NULL DEFAULT 0 CHECK (monthly_price >= 0),
    ADD COLUMN currency text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{{3}}$');
-- Only the platform context passes the catalogue's policies: the owner steps
-- out of FORCE for the two prices, and back.
ALTER TABLE bastion.plans NO FORCE ROW LEVEL SECURITY;
UPDATE bastion.plans SET monthly_price = 4900 WHERE code = 'pro';
UPDATE bastion.plans SET monthly_price = 99900 WHERE code = 'enterprise';
ALTER TABLE bastion.plans FORCE ROW LEVEL SECURITY;

CREATE TABLE bastion.plan_requests (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind         text NOT NULL CHECK (kind IN ('tenant-plan', 'catalogue')),
    tenant_id    uuid REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    plan_code    text NOT NULL CHECK (plan_code ~ '^[a-z0-9][a-z0-9_-]{{0,62}}$'),
    from_plan    text,
    -- catalogue: the plan as proposed (every column of bastion.plans).
    proposed     jsonb,
    reason       text NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
    requested_by text NOT NULL CHECK (length(requested_by) BETWEEN 1 AND 300),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'approved', 'rejected')),
    decided_by   text CHECK (length(decided_by) BETWEEN 1 AND 300),
    decided_at   timestamptz,
    CHECK ((kind = 'tenant-plan') = (tenant_id IS NOT NULL)),
    CHECK ((kind = 'catalogue') = (proposed IS NOT NULL)),
    -- The database holds the line too: no one approves their own request.
    CHECK (decided_by IS NULL OR decided_by <> requested_by)
);
CREATE INDEX plan_requests_pending ON bastion.plan_requests (status, created_at);

ALTER TABLE bastion.plan_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.plan_requests FORCE ROW LEVEL SECURITY;
-- A tenant's billing people see requests about their tenant; the platform
-- (the operator's CLI) sees all. Only the tenant's system role writes a
-- tenant's request, only the platform a catalogue request.
CREATE POLICY plan_request_read ON bastion.plan_requests FOR SELECT
    USING (({TENANT} AND {READERS}) OR {PLATFORM});
CREATE POLICY plan_request_write ON bastion.plan_requests FOR ALL
    USING (({TENANT} AND {SYSTEM}) OR ({PLATFORM} AND tenant_id IS NULL))
    WITH CHECK (({TENANT} AND {SYSTEM}) OR ({PLATFORM} AND tenant_id IS NULL));
GRANT SELECT, INSERT, UPDATE ON bastion.plan_requests TO bastion_app;

CREATE FUNCTION bastion_private.subscription_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.stripe_customer_id IS NOT NULL
           AND NEW.stripe_customer_id IS DISTINCT FROM OLD.stripe_customer_id THEN
            RAISE EXCEPTION 'the tenant''s Stripe customer is bound; it is not replaced'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        IF OLD.adyen_shopper_reference IS NOT NULL
           AND NEW.adyen_shopper_reference IS DISTINCT FROM OLD.adyen_shopper_reference THEN
            RAISE EXCEPTION 'the tenant''s Adyen shopper is bound; it is not replaced'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END IF;
    IF (TG_OP = 'INSERT' OR NEW.plan_code IS DISTINCT FROM OLD.plan_code)
       AND NEW.plan_code <> 'free'
       AND NOT EXISTS (SELECT 1 FROM bastion.plans p
                       WHERE p.code = NEW.plan_code AND p.active) THEN
        RAISE EXCEPTION 'an inactive plan is not assignable'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION bastion_private.subscription_guard() FROM PUBLIC;
CREATE TRIGGER subscriptions_guard BEFORE INSERT OR UPDATE ON bastion.subscriptions
    FOR EACH ROW EXECUTE FUNCTION bastion_private.subscription_guard();
"""

DOWNGRADE = """
DROP TRIGGER subscriptions_guard ON bastion.subscriptions;
DROP FUNCTION bastion_private.subscription_guard();
DROP TABLE bastion.plan_requests;
ALTER TABLE bastion.plans DROP COLUMN monthly_price, DROP COLUMN currency;
"""


def upgrade() -> None:
    # psycopg itself, as in 0007: PL/pgSQL bodies go through verbatim.
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    conn.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
