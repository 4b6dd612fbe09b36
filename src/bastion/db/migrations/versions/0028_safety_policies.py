"""Per-tenant safety configuration (issue 15 item 5, issue 16 item 2).

``screen_policies``: the tenant's prompt-injection screen policy — per
surface (user input, retrieved documents, tool results) the score at which
the screen acts and what it does there (:class:`bastion.safety.injection.
ScreenPolicy`). No row: Bastion's defaults.

``pii_allow_entries``: values of one PII kind the tenant keeps in clear
(product names, staff names, its support address), stored normalised,
matched exactly (:mod:`bastion.safety.pii_allow`).

Read within the tenant (the gateway and ingestion read as the system role;
owners and auditors list them); written only by owners (the route also needs
MFA and Cedar ``safety:configure``) or the system role. The CHECKs repeat
the service's bounds so that no other writer can store a value the readers
would refuse.

Revision ID: 0028
Revises: 0027
"""

from alembic import op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
OWNER = "(SELECT bastion.app_role()) IN ('owner', 'system')"


def _surface(name: str, actions: str) -> str:
    # Retrieved documents and tool results are sanitized from one score, and
    # acted on (block, drop, flag) from another.
    return f"""
    {name}_sanitize_at smallint NOT NULL,
    {name}_block_at    smallint NOT NULL,
    {name}_action      text NOT NULL CHECK ({name}_action IN ({actions})),
    CHECK (1 <= {name}_sanitize_at AND {name}_sanitize_at <= {name}_block_at
           AND {name}_block_at <= 100),"""


USER = """
    user_block_at      smallint NOT NULL CHECK (user_block_at BETWEEN 1 AND 100),
    user_action        text NOT NULL CHECK (user_action IN ('block', 'flag')),"""
RETRIEVED = _surface("retrieved", "'block', 'drop', 'flag'")
TOOL = _surface("tool", "'block', 'drop', 'flag'")

UPGRADE = f"""
CREATE TABLE bastion.screen_policies (
    tenant_id  uuid PRIMARY KEY DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,{USER}{RETRIEVED}{TOOL}
    set_by     uuid,
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE bastion.screen_policies ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.screen_policies FORCE ROW LEVEL SECURITY;
CREATE POLICY screen_policy_read ON bastion.screen_policies FOR SELECT USING ({TENANT});
CREATE POLICY screen_policy_insert ON bastion.screen_policies FOR INSERT
    WITH CHECK ({TENANT} AND {OWNER});
CREATE POLICY screen_policy_update ON bastion.screen_policies FOR UPDATE
    USING ({TENANT} AND {OWNER}) WITH CHECK ({TENANT} AND {OWNER});
GRANT SELECT, INSERT, UPDATE ON bastion.screen_policies TO bastion_app;

CREATE TABLE bastion.pii_allow_entries (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    kind       text NOT NULL CHECK (kind ~ '^[a-z][a-z_]{{0,31}}$'),
    -- Printable text only: no control characters (NUL cannot be stored anyway).
    value      text NOT NULL CHECK (length(value) BETWEEN 1 AND 320
                                    AND value !~ '[[:cntrl:]]'),
    created_by uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, kind, value)
);
ALTER TABLE bastion.pii_allow_entries ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.pii_allow_entries FORCE ROW LEVEL SECURITY;
CREATE POLICY pii_allow_read ON bastion.pii_allow_entries FOR SELECT USING ({TENANT});
CREATE POLICY pii_allow_insert ON bastion.pii_allow_entries FOR INSERT
    WITH CHECK ({TENANT} AND {OWNER});
CREATE POLICY pii_allow_delete ON bastion.pii_allow_entries FOR DELETE
    USING ({TENANT} AND {OWNER});
GRANT SELECT, INSERT, DELETE ON bastion.pii_allow_entries TO bastion_app;
"""

DOWNGRADE = """
DROP TABLE bastion.pii_allow_entries;
DROP TABLE bastion.screen_policies;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
