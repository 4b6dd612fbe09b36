"""Signed tool calls run once across every worker process (CHECKLIST M1, M2).

A worker records the digest of a call's signature here before it runs the
call; the primary key makes a second run — the same job on another worker, a
replayed queue entry — find the row and refuse. Rows are kept past the
signature's expiry only as long as the audit needs none of them: a sweep may
delete expired ones.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"

UPGRADE = f"""
CREATE TABLE bastion.tool_call_runs (
    tenant_id        uuid NOT NULL DEFAULT bastion.app_tenant_id()
                     REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    signature_sha256 bytea NOT NULL CHECK (length(signature_sha256) = 32),
    call_id          text NOT NULL CHECK (length(call_id) <= 200),
    ran_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, signature_sha256)
);
ALTER TABLE bastion.tool_call_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.tool_call_runs FORCE ROW LEVEL SECURITY;
CREATE POLICY tool_call_run_read ON bastion.tool_call_runs FOR SELECT USING ({TENANT});
CREATE POLICY tool_call_run_write ON bastion.tool_call_runs FOR INSERT
    WITH CHECK ({TENANT} AND {SYSTEM});
GRANT SELECT, INSERT ON bastion.tool_call_runs TO bastion_app;
"""

DOWNGRADE = "DROP TABLE bastion.tool_call_runs;"


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
