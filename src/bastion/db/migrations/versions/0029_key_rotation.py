"""Key rotation: the platform's audit trail, and re-wrapping tenants' data keys.

Key rotation (``bastion.rotation``) audits each rotation and retirement of a
deployment-wide key (JWT, envelope, tool-call, webhook, receipt, provider and
database-password keys) in the platform context (tenant id all zeros), the
context the billing intake and the audit checkpoints already run in. The
audit trail's per-tenant head (``audit_heads``) references ``tenants``, so
the platform needs its row; its slug ``platform`` is reserved by it. Key
rotation keeps no other state in the database: versions, ages and states are
the key ring's own.

A KEK rotation re-wraps each tenant's data keys and PII token key under the
new KEK version (the keys themselves, and every ciphertext, unchanged): the
app role may now UPDATE the ``wrapped`` column of both tables, and only that
column; the token key only in the tenant's system context.

Revision ID: 0029
Revises: 0028
"""

from alembic import op

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The owner is bound by FORCE too: lifted for this one row, in this transaction.
    op.execute("ALTER TABLE bastion.tenants NO FORCE ROW LEVEL SECURITY")
    op.execute(
        "INSERT INTO bastion.tenants (id, slug, name) "
        "VALUES ('00000000-0000-0000-0000-000000000000', 'platform', 'Platform') "
        "ON CONFLICT DO NOTHING"
    )
    op.execute("ALTER TABLE bastion.tenants FORCE ROW LEVEL SECURITY")
    op.execute(REWRAP)


TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"
REWRAP = f"""
GRANT UPDATE (wrapped) ON bastion.data_keys, bastion.pii_token_keys TO bastion_app;
CREATE POLICY pii_token_key_rewrap ON bastion.pii_token_keys FOR UPDATE
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
"""


def downgrade() -> None:
    # The platform's audit events keep their tenant row: it stays.
    op.execute("DROP POLICY pii_token_key_rewrap ON bastion.pii_token_keys")
    op.execute(
        "REVOKE UPDATE (wrapped) ON bastion.data_keys, bastion.pii_token_keys FROM bastion_app"
    )
