"""Stripe charges and their disputes (issue 23, finding 5, for Stripe).

A Stripe chargeback is a *dispute* (``charge.dispute.created``, ``.updated``,
``.closed``, ``.funds_withdrawn``, ``.funds_reinstated``) of a charge, and a
dispute object names no customer: only its charge. ``stripe_charges`` keeps
the tenant's charges Bastion has seen (``charge.succeeded``, ``charge.refunded``,
or fetched by reconciliation): when Stripe made each, and the latest state of
its dispute with that state's ordering key (event ``created``, event id), so
that a dispute's events apply in Stripe's order whatever order they arrive in.

A charge disputed and not (yet) won voids the period it was made in: the
subscription's events and reconciliation do not entitle to the plan for that
period (:mod:`bastion.billing.service`). ``webhook_receive`` routes a dispute
event to the tenant of its charge (the charge id is its routing reference,
``customer_ref``); a dispute of a charge not yet seen stays ``unrouted`` until
the charge is, and is then routed like any other.

Read by the tenant's billing people and the platform (routing); written only by
the tenant's system role (the worker applying a verified event, reconciliation).

Revision ID: 0026
Revises: 0025
"""

from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"
PLATFORM = "(SELECT bastion.app_is_platform())"
READERS = "(SELECT bastion.app_role()) IN ('owner', 'billing-admin', 'auditor', 'system')"

UPGRADE = f"""
CREATE TABLE bastion.stripe_charges (
    tenant_id       uuid NOT NULL DEFAULT bastion.app_tenant_id()
                    REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    charge_id       text NOT NULL UNIQUE CHECK (length(charge_id) BETWEEN 1 AND 255),
    -- When Stripe made the charge: the period it paid is the one it falls in.
    created         timestamptz NOT NULL,
    amount          bigint CHECK (amount >= 0),
    currency        text CHECK (currency ~ '^[a-z]{{3}}$'),
    recorded_event  text NOT NULL CHECK (length(recorded_event) <= 300),
    dispute_id      text CHECK (length(dispute_id) <= 255),
    dispute_status  text CHECK (dispute_status ~ '^[a-z_]{{1,40}}$'),
    -- Ordering key of the dispute state applied: (event created, event id).
    dispute_version bigint NOT NULL DEFAULT 0,
    dispute_event   text NOT NULL DEFAULT '' CHECK (length(dispute_event) <= 255),
    PRIMARY KEY (tenant_id, charge_id)
);
CREATE INDEX stripe_charges_disputed ON bastion.stripe_charges (tenant_id, created)
    WHERE dispute_status IS NOT NULL;
ALTER TABLE bastion.stripe_charges ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.stripe_charges FORCE ROW LEVEL SECURITY;
CREATE POLICY stripe_charge_read ON bastion.stripe_charges FOR SELECT
    USING (({TENANT} AND {READERS}) OR {PLATFORM});
CREATE POLICY stripe_charge_write ON bastion.stripe_charges FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
GRANT SELECT, INSERT, UPDATE ON bastion.stripe_charges TO bastion_app;

CREATE OR REPLACE FUNCTION bastion.webhook_receive(
    p_provider text, p_event_id text, p_type text, p_handled boolean,
    p_customer text, p_tenant_hint uuid, p_object_id text, p_version bigint,
    p_payload bytea, p_key_version integer, p_via text DEFAULT 'webhook'
) RETURNS TABLE (event_row bigint, event_status text, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_tenant uuid;
    v_paused boolean;
    v_status text;
    v_id bigint;
BEGIN
    IF NOT bastion.app_is_platform() THEN
        RAISE EXCEPTION 'webhook intake needs the platform context'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_customer IS NOT NULL THEN
        IF p_provider = 'stripe' THEN
            SELECT s.tenant_id INTO v_tenant FROM bastion.subscriptions s
                WHERE s.stripe_customer_id = p_customer;
            -- A dispute names no customer, only its charge: the charge's tenant.
            IF v_tenant IS NULL THEN
                SELECT c.tenant_id INTO v_tenant FROM bastion.stripe_charges c
                    WHERE c.charge_id = p_customer;
            END IF;
        ELSE
            SELECT s.tenant_id INTO v_tenant FROM bastion.subscriptions s
                WHERE s.adyen_shopper_reference = p_customer;
        END IF;
    END IF;
    IF v_tenant IS NULL AND p_tenant_hint IS NOT NULL THEN
        SELECT t.id INTO v_tenant FROM bastion.tenants t WHERE t.id = p_tenant_hint;
    END IF;
    -- KEY SHARE: a resume (which takes the row FOR UPDATE) waits for this
    -- transaction, so no event is held after the resume has collected them.
    SELECT c.paused INTO v_paused FROM bastion.webhook_control c WHERE c.id = 1 FOR KEY SHARE;
    v_status := CASE WHEN NOT p_handled THEN 'ignored'
                     WHEN v_tenant IS NULL THEN 'unrouted'
                     WHEN v_paused THEN 'held'
                     ELSE 'queued' END;
    INSERT INTO bastion.webhook_events (provider, event_id, tenant_id, event_type, customer_ref,
                                        object_id, object_version, payload, key_version,
                                        status, via)
        VALUES (p_provider, p_event_id, v_tenant, p_type, p_customer, p_object_id, p_version,
                p_payload, p_key_version, v_status, p_via)
        ON CONFLICT (provider, event_id) DO NOTHING
        RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN QUERY SELECT e.id, e.status, true FROM bastion.webhook_events e
            WHERE e.provider = p_provider AND e.event_id = p_event_id;
        RETURN;
    END IF;
    IF v_status = 'queued' THEN
        PERFORM bastion.enqueue_billing_drain(v_tenant);
    END IF;
    RETURN QUERY SELECT v_id, v_status, false;
END;
$$;
"""

DOWNGRADE = """
CREATE OR REPLACE FUNCTION bastion.webhook_receive(
    p_provider text, p_event_id text, p_type text, p_handled boolean,
    p_customer text, p_tenant_hint uuid, p_object_id text, p_version bigint,
    p_payload bytea, p_key_version integer, p_via text DEFAULT 'webhook'
) RETURNS TABLE (event_row bigint, event_status text, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_tenant uuid;
    v_paused boolean;
    v_status text;
    v_id bigint;
BEGIN
    IF NOT bastion.app_is_platform() THEN
        RAISE EXCEPTION 'webhook intake needs the platform context'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_customer IS NOT NULL THEN
        IF p_provider = 'stripe' THEN
            SELECT s.tenant_id INTO v_tenant FROM bastion.subscriptions s
                WHERE s.stripe_customer_id = p_customer;
        ELSE
            SELECT s.tenant_id INTO v_tenant FROM bastion.subscriptions s
                WHERE s.adyen_shopper_reference = p_customer;
        END IF;
    END IF;
    IF v_tenant IS NULL AND p_tenant_hint IS NOT NULL THEN
        SELECT t.id INTO v_tenant FROM bastion.tenants t WHERE t.id = p_tenant_hint;
    END IF;
    -- KEY SHARE: a resume (which takes the row FOR UPDATE) waits for this
    -- transaction, so no event is held after the resume has collected them.
    SELECT c.paused INTO v_paused FROM bastion.webhook_control c WHERE c.id = 1 FOR KEY SHARE;
    v_status := CASE WHEN NOT p_handled THEN 'ignored'
                     WHEN v_tenant IS NULL THEN 'unrouted'
                     WHEN v_paused THEN 'held'
                     ELSE 'queued' END;
    INSERT INTO bastion.webhook_events (provider, event_id, tenant_id, event_type, customer_ref,
                                        object_id, object_version, payload, key_version,
                                        status, via)
        VALUES (p_provider, p_event_id, v_tenant, p_type, p_customer, p_object_id, p_version,
                p_payload, p_key_version, v_status, p_via)
        ON CONFLICT (provider, event_id) DO NOTHING
        RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN QUERY SELECT e.id, e.status, true FROM bastion.webhook_events e
            WHERE e.provider = p_provider AND e.event_id = p_event_id;
        RETURN;
    END IF;
    IF v_status = 'queued' THEN
        PERFORM bastion.enqueue_billing_drain(v_tenant);
    END IF;
    RETURN QUERY SELECT v_id, v_status, false;
END;
$$;

DROP TABLE bastion.stripe_charges;
"""


def upgrade() -> None:
    # psycopg itself, as in 0007: PL/pgSQL bodies go through verbatim.
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    conn.execute(UPGRADE)


def downgrade() -> None:
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    conn.execute(DOWNGRADE)
