"""No NOTIFY on the audit trail's hot path: the detectors poll instead.

0033 announced every statement that added audit events with ``NOTIFY
bastion_audit``. PostgreSQL serialises the commits of all notifying
transactions in a database on one lock, held through the commit's WAL flush
(``PreCommit_Notify``; see the NOTIFY reference page, "Notes"), so every
audited write of every tenant waited on every other's: with 16 clients,
pgbench measured ~900 audited commits/s with the NOTIFY against ~4,700
without it on this machine. One tenant's burst slowed every tenant's writes.
The detector runner now polls (``detector_poll_seconds``, default 0.5 s),
which bounds detection latency well inside its 5 s target.

Revision ID: 0037
Revises: 0036
"""

from alembic import op

revision = "0037"
down_revision = "0036"
branch_labels = None
depends_on = None

UPGRADE = """
DROP TRIGGER audit_events_wakeup ON bastion.audit_events;
DROP FUNCTION bastion_private.audit_event_wakeup();
"""

DOWNGRADE = """
CREATE FUNCTION bastion_private.audit_event_wakeup() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('bastion_audit', '');
    RETURN NULL;
END $$;
CREATE TRIGGER audit_events_wakeup AFTER INSERT ON bastion.audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION bastion_private.audit_event_wakeup();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
