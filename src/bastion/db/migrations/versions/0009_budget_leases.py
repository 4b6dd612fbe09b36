"""Budget leases: a reservation may hold a block of calls (CHECKLIST P3).

A gateway process takes a block of calls and tokens from a tenant's budget in
one conditional UPDATE (a lease), spends it call by call in memory, and
settles what it used when the lease closes. The database still holds every
reserved call, so concurrent processes cannot overshoot; the budget row is
written once per block instead of twice per call.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE bastion.budget_reservations
    ADD COLUMN calls      bigint NOT NULL DEFAULT 1 CHECK (calls >= 1),
    ADD COLUMN calls_used bigint CHECK (calls_used >= 0 AND calls_used <= calls);
"""

DOWNGRADE = """
ALTER TABLE bastion.budget_reservations DROP COLUMN calls_used, DROP COLUMN calls;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
