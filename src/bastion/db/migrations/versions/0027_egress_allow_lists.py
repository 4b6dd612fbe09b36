"""Egress allow-lists and the egress action, per tenant (issue 15, item 4).

``egress_allow_entries``: where the tenant's tool calls may send retrieved
text, tool results, vault tokens or secrets — a host (``*.example.com`` for
its subdomains), a URL prefix or an e-mail domain, for one tool or for all
(``tool`` NULL). ``egress_policies``: what happens to a call that would send
them anywhere else — ``block`` (refused; the default when no row exists) or
``flag`` (signed, and audited as flagged).

Read within the tenant (the gateway reads as the system role; owners and
auditors list them); written only by owners (the route also needs MFA and
Cedar ``egress:configure``) or the system role.

Revision ID: 0027
Revises: 0026
"""

from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
OWNER = "(SELECT bastion.app_role()) IN ('owner', 'system')"

UPGRADE = f"""
CREATE TABLE bastion.egress_allow_entries (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    kind       text NOT NULL CHECK (kind IN ('host', 'url_prefix', 'email_domain')),
    value      text NOT NULL CHECK (length(value) BETWEEN 1 AND 2048),
    tool       text CHECK (tool IS NULL OR length(tool) BETWEEN 1 AND 64),
    created_by uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- One entry per (tenant, tool or every tool, kind, value).
CREATE UNIQUE INDEX egress_allow_entries_unique
    ON bastion.egress_allow_entries (tenant_id, coalesce(tool, ''), kind, value);
ALTER TABLE bastion.egress_allow_entries ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.egress_allow_entries FORCE ROW LEVEL SECURITY;
CREATE POLICY egress_allow_read ON bastion.egress_allow_entries FOR SELECT USING ({TENANT});
CREATE POLICY egress_allow_insert ON bastion.egress_allow_entries FOR INSERT
    WITH CHECK ({TENANT} AND {OWNER});
CREATE POLICY egress_allow_delete ON bastion.egress_allow_entries FOR DELETE
    USING ({TENANT} AND {OWNER});
GRANT SELECT, INSERT, DELETE ON bastion.egress_allow_entries TO bastion_app;

CREATE TABLE bastion.egress_policies (
    tenant_id  uuid PRIMARY KEY DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    action     text NOT NULL CHECK (action IN ('block', 'flag')),
    set_by     uuid,
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE bastion.egress_policies ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.egress_policies FORCE ROW LEVEL SECURITY;
CREATE POLICY egress_policy_read ON bastion.egress_policies FOR SELECT USING ({TENANT});
CREATE POLICY egress_policy_insert ON bastion.egress_policies FOR INSERT
    WITH CHECK ({TENANT} AND {OWNER});
CREATE POLICY egress_policy_update ON bastion.egress_policies FOR UPDATE
    USING ({TENANT} AND {OWNER}) WITH CHECK ({TENANT} AND {OWNER});
GRANT SELECT, INSERT, UPDATE ON bastion.egress_policies TO bastion_app;
"""

DOWNGRADE = """
DROP TABLE bastion.egress_policies;
DROP TABLE bastion.egress_allow_entries;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
