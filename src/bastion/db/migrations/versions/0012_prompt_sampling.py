"""Prompt sampling: a tenant's rate and its users' consents (issue 6, §8 Traces).

The gateway logs a request's prompt (as sent to the provider: tokenized) only
when both sides opted in: the tenant's owner set a rate above zero in
``prompt_sampling`` and the user has a row in ``prompt_sampling_consents``.
No row means no sampling, so it is off by default.

Only owners (or the system role) write the rate; a user inserts and deletes
only their own consent. Both are read within the tenant.

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
OWNER = "(SELECT bastion.app_role()) IN ('owner', 'system')"
SELF = "user_id = (SELECT bastion.app_user_id())"

UPGRADE = f"""
CREATE TABLE bastion.prompt_sampling (
    tenant_id  uuid PRIMARY KEY DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    rate       double precision NOT NULL CHECK (rate >= 0 AND rate <= 1),
    set_by     uuid,
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE bastion.prompt_sampling ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.prompt_sampling FORCE ROW LEVEL SECURITY;
CREATE POLICY prompt_sampling_read ON bastion.prompt_sampling FOR SELECT USING ({TENANT});
CREATE POLICY prompt_sampling_insert ON bastion.prompt_sampling FOR INSERT
    WITH CHECK ({TENANT} AND {OWNER});
CREATE POLICY prompt_sampling_update ON bastion.prompt_sampling FOR UPDATE
    USING ({TENANT} AND {OWNER}) WITH CHECK ({TENANT} AND {OWNER});
GRANT SELECT, INSERT, UPDATE ON bastion.prompt_sampling TO bastion_app;

CREATE TABLE bastion.prompt_sampling_consents (
    tenant_id    uuid NOT NULL DEFAULT bastion.app_tenant_id()
                 REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    user_id      uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    consented_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
ALTER TABLE bastion.prompt_sampling_consents ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.prompt_sampling_consents FORCE ROW LEVEL SECURITY;
CREATE POLICY prompt_consent_read ON bastion.prompt_sampling_consents FOR SELECT
    USING ({TENANT});
CREATE POLICY prompt_consent_give ON bastion.prompt_sampling_consents FOR INSERT
    WITH CHECK ({TENANT} AND {SELF});
CREATE POLICY prompt_consent_withdraw ON bastion.prompt_sampling_consents FOR DELETE
    USING ({TENANT} AND {SELF});
GRANT SELECT, INSERT, DELETE ON bastion.prompt_sampling_consents TO bastion_app;
"""

DOWNGRADE = """
DROP TABLE bastion.prompt_sampling_consents;
DROP TABLE bastion.prompt_sampling;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
