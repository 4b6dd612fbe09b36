"""Budgets: calls and tokens per tenant and period, reserved before an LLM call (CHECKLIST P3).

One row per tenant and period holds the limits, what is settled (used) and
what is reserved by calls in flight. A reservation is one conditional UPDATE
of that row: PostgreSQL re-checks the condition after waiting for the row
lock (READ COMMITTED re-evaluation), so concurrent callers never overshoot.
Each reservation is also a row of its own, so settlement and release are
idempotent and a reservation whose caller died can be found and released.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
# The gateway and the billing worker act as the system role; tenants' admins read.
SYSTEM = "(SELECT bastion.app_role()) = 'system'"

UPGRADE = f"""
CREATE TABLE bastion.budgets (
    tenant_id       uuid NOT NULL DEFAULT bastion.app_tenant_id()
                    REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    call_limit      bigint NOT NULL CHECK (call_limit >= 0),
    token_limit     bigint NOT NULL CHECK (token_limit >= 0),
    calls_used      bigint NOT NULL DEFAULT 0 CHECK (calls_used >= 0),
    tokens_used     bigint NOT NULL DEFAULT 0 CHECK (tokens_used >= 0),
    calls_reserved  bigint NOT NULL DEFAULT 0 CHECK (calls_reserved >= 0),
    tokens_reserved bigint NOT NULL DEFAULT 0 CHECK (tokens_reserved >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, period_start),
    -- No CHECK of used + reserved against the limits: a plan downgrade may
    -- lower a limit below what is already used. The reservation's
    -- conditional UPDATE is what keeps new calls within it.
    CHECK (period_end > period_start)
);

CREATE TABLE bastion.budget_reservations (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL DEFAULT bastion.app_tenant_id(),
    period_start timestamptz NOT NULL,
    tokens       bigint NOT NULL CHECK (tokens >= 0),
    status       text NOT NULL DEFAULT 'held' CHECK (status IN ('held', 'settled', 'released')),
    tokens_used  bigint,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    FOREIGN KEY (tenant_id, period_start)
        REFERENCES bastion.budgets (tenant_id, period_start) ON DELETE CASCADE
);
CREATE INDEX budget_reservations_held ON bastion.budget_reservations (expires_at)
    WHERE status = 'held';

ALTER TABLE bastion.budgets ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.budgets FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.budget_reservations ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.budget_reservations FORCE ROW LEVEL SECURITY;

CREATE POLICY budget_read ON bastion.budgets FOR SELECT USING ({TENANT});
CREATE POLICY budget_write ON bastion.budgets FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
CREATE POLICY reservation_read ON bastion.budget_reservations FOR SELECT USING ({TENANT});
CREATE POLICY reservation_write ON bastion.budget_reservations FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});

GRANT SELECT, INSERT, UPDATE ON bastion.budgets, bastion.budget_reservations TO bastion_app;
"""

DOWNGRADE = "DROP TABLE bastion.budget_reservations, bastion.budgets;"


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
