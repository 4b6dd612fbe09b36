"""Billing: plans, subscriptions, plan changes, provider webhook events (CHECKLIST P2, P3, P4).

* ``plans`` is the catalogue (plans as data): budgets, rate, models, overage
  policy and the Stripe price that sells it. It is global, not a tenant's: any
  verified context reads it; only the *platform context* writes it.
* ``subscriptions``: one row per tenant, the tenant's plan and the provider
  ids that link it (Stripe customer / subscription / price, Adyen shopper
  reference). Bastion stores ids only, never card data (P4). ``source_version``
  is the provider object's own ordering key (Stripe: the event's ``created``,
  then its id) of the state last applied: an older event never overwrites it.
* ``plan_changes``: append-only who / what / when / why of every plan change.
* ``webhook_events``: every verified provider event, stored raw as AES-256-GCM
  ciphertext, unique per (provider, event_id) so a redelivery is a no-op.
  ``tenant_id`` is NULL while the event's customer is unknown (``unrouted``:
  flagged for reconciliation).
* ``webhook_control``: the single row saying whether webhooks are paused.

The *platform context* is the tenant context signed for the nil tenant
(``00000000-…``) with the ``system`` role: only the app process holds the key
that signs it, so SQL injected as ``bastion_app`` cannot take it, and it owns
no tenant's rows except where a policy below names it: the webhook intake,
which must store an event before it knows whose it is and find the tenant from
the customer id, and reconciliation, which walks every subscription.

Webhook intake is one call of :func:`bastion.webhook_receive`: store the event,
resolve its tenant, and enqueue (in the same transaction) a drain job for the
tenant, unless webhooks are paused (``held``) or the event is of an unknown
type (``ignored``) or customer (``unrouted``). One job per tenant and not per
event: its ``queueing_lock`` keeps at most one waiting, and its ``lock`` (the
tenant id) runs a tenant's drains one at a time, in order.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"
PLATFORM = "(SELECT bastion.app_is_platform())"
READERS = "(SELECT bastion.app_role()) IN ('owner', 'billing-admin', 'auditor', 'system')"

UPGRADE = f"""
-- True in the platform context: the nil tenant with the system role, signed by the app.
CREATE FUNCTION bastion.app_is_platform() RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(bastion.app_tenant_id() = '00000000-0000-0000-0000-000000000000'::uuid
                    AND bastion.app_role() = 'system', false);
END $$;

CREATE TABLE bastion.plans (
    code                 text PRIMARY KEY CHECK (code ~ '^[a-z0-9][a-z0-9_-]{{0,62}}$'),
    name                 text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    rank                 integer NOT NULL DEFAULT 0,
    monthly_token_budget bigint NOT NULL CHECK (monthly_token_budget >= 0),
    monthly_call_budget  bigint NOT NULL CHECK (monthly_call_budget >= 0),
    requests_per_minute  integer NOT NULL CHECK (requests_per_minute >= 0),
    -- '*' alone means every model the gateway serves.
    models_allowed       text[] NOT NULL DEFAULT '{{*}}',
    overage_policy       text NOT NULL DEFAULT 'block'
                         CHECK (overage_policy IN ('block', 'metered')),
    stripe_price_id      text UNIQUE CHECK (length(stripe_price_id) <= 255),
    active               boolean NOT NULL DEFAULT true,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    updated_by           text NOT NULL DEFAULT 'migration'
);

INSERT INTO bastion.plans (code, name, rank, monthly_token_budget, monthly_call_budget,
                           requests_per_minute, models_allowed, overage_policy)
VALUES ('free', 'Free', 0, 200000, 1000, 20, '{{bastion-local}}', 'block'),
       ('pro', 'Pro', 10, 20000000, 100000, 600, '{{*}}', 'block'),
       ('enterprise', 'Enterprise', 20, 500000000, 2000000, 6000, '{{*}}', 'metered');

CREATE TABLE bastion.subscriptions (
    tenant_id               uuid PRIMARY KEY DEFAULT bastion.app_tenant_id()
                            REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    plan_code               text NOT NULL REFERENCES bastion.plans (code),
    status                  text NOT NULL DEFAULT 'active'
                            CHECK (status ~ '^[a-z_]{{1,40}}$'),
    provider                text NOT NULL DEFAULT 'manual'
                            CHECK (provider IN ('manual', 'stripe', 'adyen')),
    stripe_customer_id      text UNIQUE CHECK (length(stripe_customer_id) <= 255),
    stripe_subscription_id  text UNIQUE CHECK (length(stripe_subscription_id) <= 255),
    stripe_price_id         text CHECK (length(stripe_price_id) <= 255),
    adyen_shopper_reference text UNIQUE CHECK (length(adyen_shopper_reference) <= 255),
    current_period_start    timestamptz,
    current_period_end      timestamptz,
    cancel_at_period_end    boolean NOT NULL DEFAULT false,
    -- Ordering key of the provider state last applied: (object time, event id).
    source_version          bigint NOT NULL DEFAULT 0,
    source_event_id         text NOT NULL DEFAULT '',
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    updated_by              text NOT NULL DEFAULT ''
);

CREATE TABLE bastion.plan_changes (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL DEFAULT bastion.app_tenant_id()
              REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL CHECK (length(actor) BETWEEN 1 AND 300),
    from_plan text,
    to_plan   text NOT NULL,
    reason    text NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
    source    text NOT NULL CHECK (source IN ('admin', 'operator', 'webhook', 'reconcile')),
    provider  text,
    event_id  text,
    -- One event changes a plan at most once, however often it is delivered.
    UNIQUE (tenant_id, provider, event_id)
);
CREATE INDEX plan_changes_tenant ON bastion.plan_changes (tenant_id, at);

CREATE TABLE bastion.webhook_events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider       text NOT NULL CHECK (provider IN ('stripe', 'adyen')),
    event_id       text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 255),
    tenant_id      uuid REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    event_type     text NOT NULL CHECK (length(event_type) <= 255),
    customer_ref   text CHECK (length(customer_ref) <= 255),
    object_id      text CHECK (length(object_id) <= 255),
    object_version bigint NOT NULL DEFAULT 0,
    payload        bytea NOT NULL,
    key_version    integer NOT NULL,
    status         text NOT NULL CHECK (status IN ('queued', 'held', 'unrouted', 'ignored',
                                                   'applied', 'stale', 'failed')),
    outcome        text,
    via            text NOT NULL DEFAULT 'webhook' CHECK (via IN ('webhook', 'reconcile')),
    received_at    timestamptz NOT NULL DEFAULT now(),
    applied_at     timestamptz,
    UNIQUE (provider, event_id)
);
CREATE INDEX webhook_events_pending ON bastion.webhook_events (tenant_id, id)
    WHERE status = 'queued';
CREATE INDEX webhook_events_waiting ON bastion.webhook_events (status, id)
    WHERE status IN ('held', 'unrouted');

CREATE TABLE bastion.webhook_control (
    id         smallint PRIMARY KEY CHECK (id = 1),
    paused     boolean NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL DEFAULT 'migration',
    reason     text NOT NULL DEFAULT ''
);
INSERT INTO bastion.webhook_control (id) VALUES (1);

ALTER TABLE bastion.plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.plans FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.subscriptions FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.plan_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.plan_changes FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.webhook_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.webhook_events FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.webhook_control ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.webhook_control FORCE ROW LEVEL SECURITY;

-- The catalogue is read by any verified context, written by the platform only.
CREATE POLICY plan_read ON bastion.plans FOR SELECT
    USING ((SELECT bastion.app_tenant_id()) IS NOT NULL);
CREATE POLICY plan_write ON bastion.plans FOR ALL USING ({PLATFORM}) WITH CHECK ({PLATFORM});

-- A tenant's billing people read their subscription; only the system role
-- (the worker applying a provider event, a checked plan change) writes it.
CREATE POLICY subscription_read ON bastion.subscriptions FOR SELECT
    USING (({TENANT} AND {READERS}) OR {PLATFORM});
CREATE POLICY subscription_write ON bastion.subscriptions FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});

CREATE POLICY plan_change_read ON bastion.plan_changes FOR SELECT
    USING ({TENANT} AND {READERS});
CREATE POLICY plan_change_append ON bastion.plan_changes FOR INSERT
    WITH CHECK ({TENANT} AND {SYSTEM});

-- Events: stored by the platform intake; applied (status) by the tenant's
-- system role; routed by reconciliation (platform).
CREATE POLICY webhook_event_read ON bastion.webhook_events FOR SELECT
    USING (({TENANT} AND {READERS}) OR {PLATFORM});
CREATE POLICY webhook_event_store ON bastion.webhook_events FOR INSERT
    WITH CHECK ({PLATFORM});
CREATE POLICY webhook_event_update ON bastion.webhook_events FOR UPDATE
    USING (({TENANT} AND {SYSTEM}) OR {PLATFORM})
    WITH CHECK (({TENANT} AND {SYSTEM}) OR {PLATFORM});

CREATE POLICY webhook_control_read ON bastion.webhook_control FOR SELECT
    USING ((SELECT bastion.app_tenant_id()) IS NOT NULL);
-- USING lets any verified context *lock* the row (a drain takes it FOR KEY
-- SHARE, which RLS checks against UPDATE policies); WITH CHECK lets only the
-- platform change it.
CREATE POLICY webhook_control_write ON bastion.webhook_control FOR UPDATE
    USING ((SELECT bastion.app_tenant_id()) IS NOT NULL) WITH CHECK ({PLATFORM});

-- Enqueue the drain of a tenant's stored events (procrastinate, in the
-- caller's transaction). At most one waiting drain per tenant; drains of one
-- tenant run one at a time.
CREATE FUNCTION bastion.enqueue_billing_drain(p_tenant uuid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = procrastinate, pg_catalog, pg_temp AS $$
BEGIN
    IF NOT (bastion.app_is_platform()
            OR (bastion.app_tenant_id() = p_tenant AND bastion.app_role() = 'system')) THEN
        RAISE EXCEPTION 'enqueuing billing work needs the system role'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, queueing_lock, args)
        VALUES ('billing', 'billing.drain', 0, 'billing:' || p_tenant::text,
                'billing:' || p_tenant::text, jsonb_build_object('tenant_id', p_tenant))
        ON CONFLICT (queueing_lock) WHERE status = 'todo' DO NOTHING;
END;
$$;

-- Store one verified event and route it, in one round trip (the intake's
-- whole database work). Returns the row's id and status, and whether the
-- (provider, event_id) was already there: a redelivery changes nothing.
CREATE FUNCTION bastion.webhook_receive(
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

REVOKE EXECUTE ON FUNCTION bastion.app_is_platform(), bastion.enqueue_billing_drain(uuid),
    bastion.webhook_receive(text, text, text, boolean, text, uuid, text, bigint, bytea,
                            integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.app_is_platform(), bastion.enqueue_billing_drain(uuid),
    bastion.webhook_receive(text, text, text, boolean, text, uuid, text, bigint, bytea,
                            integer, text) TO bastion_app;
GRANT SELECT, INSERT, UPDATE ON bastion.plans, bastion.subscriptions TO bastion_app;
GRANT SELECT, INSERT ON bastion.plan_changes TO bastion_app;
GRANT SELECT, INSERT, UPDATE ON bastion.webhook_events TO bastion_app;
GRANT SELECT, UPDATE ON bastion.webhook_control TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.webhook_receive(text, text, text, boolean, text, uuid, text, bigint, bytea,
                                      integer, text);
DROP FUNCTION bastion.enqueue_billing_drain(uuid);
DROP TABLE bastion.webhook_control, bastion.webhook_events, bastion.plan_changes,
    bastion.subscriptions, bastion.plans;
DROP FUNCTION bastion.app_is_platform();
"""


def upgrade() -> None:
    # psycopg itself, as in 0004: PL/pgSQL bodies go through verbatim.
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    conn.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
