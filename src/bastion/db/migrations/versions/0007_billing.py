"""Billing: plans, subscriptions, plan changes, provider webhook events (CHECKLIST P1, P2, P4).

Placeholder; the schema arrives with its work.

Revision ID: 0007
Revises: 0006
"""

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
