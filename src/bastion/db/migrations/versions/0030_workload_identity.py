"""Workload identity (issue 18): the platform's record of refused internal calls.

``workload_refusals``: every call an internal (mTLS) listener refused — no
client certificate, another CA, an expired certificate, one signed by a
retired intermediate, or a SPIFFE ID the route does not admit — with the ID
that was presented (NULL when none was readable). Not a tenant's row: only
the platform context as the system role writes and reads it; it is
append-only for the app role (no UPDATE or DELETE granted).

The CA itself needs no table: the root and the intermediates (and which
intermediates are retired) live in the key ring.

Revision ID: 0030
Revises: 0029
"""

from alembic import op

revision = "0030"
down_revision = "0029"
branch_labels = None
depends_on = None

PLATFORM_SYSTEM = "(SELECT bastion.app_is_platform()) AND (SELECT bastion.app_role()) = 'system'"

UPGRADE = f"""
CREATE TABLE bastion.workload_refusals (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    listener     text NOT NULL CHECK (length(listener) BETWEEN 1 AND 64),
    route        text NOT NULL CHECK (length(route) <= 200),
    reason       text NOT NULL CHECK (length(reason) BETWEEN 1 AND 64),
    presented_id text CHECK (presented_id IS NULL OR length(presented_id) <= 2048),
    peer         text CHECK (peer IS NULL OR length(peer) <= 100)
);
ALTER TABLE bastion.workload_refusals ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.workload_refusals FORCE ROW LEVEL SECURITY;
CREATE POLICY workload_refusals_platform ON bastion.workload_refusals FOR ALL
    USING ({PLATFORM_SYSTEM}) WITH CHECK ({PLATFORM_SYSTEM});
GRANT SELECT, INSERT ON bastion.workload_refusals TO bastion_app;
"""

DOWNGRADE = "DROP TABLE bastion.workload_refusals;"


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
