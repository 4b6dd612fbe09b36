"""Every change to a membership is announced on the ``bastion_memberships``
channel (PostgreSQL LISTEN/NOTIFY) with the payload ``tenant:user``, or ``*``
for a TRUNCATE. Processes that keep members' roles in memory
(:class:`bastion.access.roles.LiveRoles`) drop that entry when it arrives, so a
revoked role stops within milliseconds without a query per request.

A notification is only ever a reason to read again: anyone who can NOTIFY on
the channel can make a process read more, never make it trust stale roles.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION bastion_private.announce_membership_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('bastion_memberships', '*');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('bastion_memberships', OLD.tenant_id || ':' || OLD.user_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('bastion_memberships', NEW.tenant_id || ':' || NEW.user_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER memberships_announce
    AFTER INSERT OR UPDATE OR DELETE ON bastion.memberships
    FOR EACH ROW EXECUTE FUNCTION bastion_private.announce_membership_change();
CREATE TRIGGER memberships_announce_truncate
    AFTER TRUNCATE ON bastion.memberships
    FOR EACH STATEMENT EXECUTE FUNCTION bastion_private.announce_membership_change();
"""

DOWNGRADE = """
DROP TRIGGER memberships_announce_truncate ON bastion.memberships;
DROP TRIGGER memberships_announce ON bastion.memberships;
DROP FUNCTION bastion_private.announce_membership_change();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
