"""Incident controls (issue 20): freeze spend, disable tools, serve cached.

``incident_controls``: one row per tenant that an operator (or a detector)
switched — ``spend_frozen``, ``tools_disabled`` — and the platform tenant's
row (id all zeros, created here) for the global switches. A tenant reads its
own row and the platform's (a global switch applies to it); only the system
role writes, within the tenant (the platform row in the platform context).

``incident_cached_routes``: the models and providers the gateway must answer
from its answer cache only (``serve-cached``): platform rows, read and written
in the platform context.

The switches are read where they are enforced, inside statements that run
anyway, through the functions below (owned by ``bastion.incident``):

* ``bastion.spend_frozen(tenant)`` in the budget reservation and lease
  statements (:mod:`bastion.billing.budgets`): a frozen tenant reserves
  nothing, with no extra round trip;
* ``bastion.tools_disabled(tenant)`` in the tool run's first-run insert
  (:mod:`bastion.safety.tools`): a queued run of a disabled tenant is not
  started;
* ``bastion.spend_frozen``, ``bastion.tools_disabled`` and ``bastion.served_cached()`` in
  the gateway's short-lived switch cache (:mod:`bastion.gateway.incident`).

Revision ID: 0034
Revises: 0033
"""

from alembic import op

revision = "0034"
down_revision = "0033"
branch_labels = None
depends_on = None

PLATFORM = "'00000000-0000-0000-0000-000000000000'::uuid"
TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"
# A tenant's context sees the global row too; no context sees nothing.
OWN_OR_GLOBAL = (
    f"({TENANT} OR (tenant_id = {PLATFORM} AND (SELECT bastion.app_tenant_id()) IS NOT NULL))"
)

UPGRADE = f"""
CREATE TABLE bastion.incident_controls (
    tenant_id      uuid PRIMARY KEY DEFAULT bastion.app_tenant_id()
                   REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    spend_frozen   boolean NOT NULL DEFAULT false,
    tools_disabled boolean NOT NULL DEFAULT false,
    updated_by     text NOT NULL CHECK (length(updated_by) BETWEEN 1 AND 200),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bastion.incident_controls (tenant_id, updated_by)
    VALUES ({PLATFORM}, 'migration:0034');
ALTER TABLE bastion.incident_controls ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.incident_controls FORCE ROW LEVEL SECURITY;
CREATE POLICY incident_controls_read ON bastion.incident_controls FOR SELECT
    USING ({OWN_OR_GLOBAL});
CREATE POLICY incident_controls_insert ON bastion.incident_controls FOR INSERT
    WITH CHECK ({TENANT} AND {SYSTEM});
CREATE POLICY incident_controls_update ON bastion.incident_controls FOR UPDATE
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
GRANT SELECT, INSERT, UPDATE ON bastion.incident_controls TO bastion_app;

CREATE TABLE bastion.incident_cached_routes (
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE
               CHECK (tenant_id = {PLATFORM}),
    kind       text NOT NULL CHECK (kind IN ('model', 'provider')),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    set_by     text NOT NULL CHECK (length(set_by) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, name)
);
ALTER TABLE bastion.incident_cached_routes ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.incident_cached_routes FORCE ROW LEVEL SECURITY;
CREATE POLICY incident_cached_routes_read ON bastion.incident_cached_routes FOR SELECT
    USING ({TENANT});
CREATE POLICY incident_cached_routes_insert ON bastion.incident_cached_routes FOR INSERT
    WITH CHECK ({TENANT} AND {SYSTEM});
CREATE POLICY incident_cached_routes_delete ON bastion.incident_cached_routes FOR DELETE
    USING ({TENANT} AND {SYSTEM});
GRANT SELECT, INSERT, DELETE ON bastion.incident_cached_routes TO bastion_app;

-- Invoker's rights: they see what the caller's context may see (its row, the global row).
CREATE FUNCTION bastion.spend_frozen(tenant uuid) RETURNS boolean
    LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_or(spend_frozen), false) FROM bastion.incident_controls
    WHERE tenant_id IN (tenant, {PLATFORM})
$$;
CREATE FUNCTION bastion.tools_disabled(tenant uuid) RETURNS boolean
    LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_or(tools_disabled), false) FROM bastion.incident_controls
    WHERE tenant_id IN (tenant, {PLATFORM})
$$;
CREATE FUNCTION bastion.served_cached() RETURNS text[]
    LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(kind || ':' || name ORDER BY kind, name), '{{}}')
    FROM bastion.incident_cached_routes
$$;
REVOKE EXECUTE ON FUNCTION bastion.spend_frozen(uuid), bastion.tools_disabled(uuid),
    bastion.served_cached() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.spend_frozen(uuid), bastion.tools_disabled(uuid),
    bastion.served_cached() TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.served_cached();
DROP FUNCTION bastion.tools_disabled(uuid);
DROP FUNCTION bastion.spend_frozen(uuid);
DROP TABLE bastion.incident_cached_routes;
DROP TABLE bastion.incident_controls;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
