"""No SECURITY DEFINER function is executable by PUBLIC (found by ``bastion check db``).

``tenant_id_by_slug`` (0002) kept PostgreSQL's default EXECUTE for PUBLIC; every
later definer function revoked it. Revoke it here, and make revoking the
default for functions the owner creates from now on, so the next one cannot
forget.

Revision ID: 0032
Revises: 0031
"""

from alembic import op

revision = "0032"
down_revision = "0031"
branch_labels = None
depends_on = None

UPGRADE = """
REVOKE EXECUTE ON FUNCTION bastion.tenant_id_by_slug(text) FROM PUBLIC;
-- Migrations run as the schema owner (whatever its name on an external server).
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
"""

DOWNGRADE = """
ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.tenant_id_by_slug(text) TO PUBLIC;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
