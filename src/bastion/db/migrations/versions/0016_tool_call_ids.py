"""A signed tool call runs once: the run record is keyed on the call's signed run id.

Migration 0010 keyed ``tool_call_runs`` on the SHA-256 of the signature's
text. A text has more than one spelling when its decoder is lenient
(``sig + "="``, a stray ``!``), and every spelling made a new key: one call
ran seven times. Now the gateway signs a random ``run_id`` (a UUID) into each
tool call, and the worker inserts that id here, in its own committed
transaction, before the sandbox starts; the primary key makes every other
attempt — a second spelling, the same job on another worker, a job requeued
after its worker was killed mid-run — find the row and refuse. ``uuid`` has
one value per id whatever the spelling, and the row is never deleted, so a
restart or a clock that runs behind cannot make a call run twice.

The old rows are emptied: they are keyed on signatures that carry no
``run_id``, which the verifier now refuses anyway, and each run is still in
the audit log (``tool.run``). TRUNCATE, because FORCE ROW LEVEL SECURITY
would hide the rows from a DELETE by the owner.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

UPGRADE = """
TRUNCATE bastion.tool_call_runs;
ALTER TABLE bastion.tool_call_runs DROP CONSTRAINT tool_call_runs_pkey;
ALTER TABLE bastion.tool_call_runs DROP COLUMN signature_sha256;
ALTER TABLE bastion.tool_call_runs ADD COLUMN run_id uuid NOT NULL;
-- Global, not per tenant: a run id is random, and the signature binds it to
-- one tenant already; an id that ran anywhere never runs again.
ALTER TABLE bastion.tool_call_runs ADD PRIMARY KEY (run_id);
COMMENT ON COLUMN bastion.tool_call_runs.run_id IS
    'the signed run id of the tool call; inserted before the run starts';
"""

DOWNGRADE = """
TRUNCATE bastion.tool_call_runs;
ALTER TABLE bastion.tool_call_runs DROP CONSTRAINT tool_call_runs_pkey;
ALTER TABLE bastion.tool_call_runs DROP COLUMN run_id;
ALTER TABLE bastion.tool_call_runs ADD COLUMN signature_sha256 bytea NOT NULL
    CHECK (length(signature_sha256) = 32);
ALTER TABLE bastion.tool_call_runs ADD PRIMARY KEY (tenant_id, signature_sha256);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
