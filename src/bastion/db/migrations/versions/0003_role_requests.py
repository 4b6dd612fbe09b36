"""Two-person approval of admin-grade roles (CHECKLIST R4).

Granting owner, billing-admin or auditor creates a pending request; another
owner of the same tenant approves it. Rows are tenant-isolated like all
others; only owners (and the system role) create or decide requests, and the
database refuses a decision by the requester.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
ADMIN = "(SELECT bastion.app_role()) IN ('owner', 'system')"

UPGRADE = f"""
CREATE TABLE bastion.role_requests (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL DEFAULT bastion.app_tenant_id()
                 REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    user_id      uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    role         text NOT NULL CHECK (role IN ('owner', 'billing-admin', 'auditor')),
    requested_by uuid NOT NULL REFERENCES bastion.users (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'approved', 'rejected')),
    decided_by   uuid REFERENCES bastion.users (id),
    decided_at   timestamptz,
    -- The database holds the line too: no one approves their own request.
    CHECK (decided_by IS NULL OR decided_by <> requested_by)
);
CREATE INDEX role_requests_pending ON bastion.role_requests (tenant_id, status);

ALTER TABLE bastion.role_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.role_requests FORCE ROW LEVEL SECURITY;
CREATE POLICY role_requests_read ON bastion.role_requests FOR SELECT USING ({TENANT});
CREATE POLICY role_requests_write ON bastion.role_requests FOR ALL
    USING ({TENANT} AND {ADMIN}) WITH CHECK ({TENANT} AND {ADMIN});

GRANT SELECT, INSERT, UPDATE ON bastion.role_requests TO bastion_app;
"""

DOWNGRADE = "DROP TABLE bastion.role_requests;"


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
