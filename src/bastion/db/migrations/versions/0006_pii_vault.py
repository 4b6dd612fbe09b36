"""PII vault: tenant-scoped encrypted originals behind deterministic tokens (CHECKLIST M3).

Placeholder; the schema arrives with its work.

Revision ID: 0006
Revises: 0005
"""

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
