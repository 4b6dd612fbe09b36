"""A member's roles in one statement: the guard's per-request read.

``Database.member_roles`` runs on every guarded api request. Entering the
signed context (0014) and selecting the roles took a four-statement pipeline
(``BEGIN``, ``context_enter``, the select, ``COMMIT``); this function does
both in one statement, in the implicit transaction of an autocommit call: the
same MAC check, the same RLS (FORCEd, so it binds this definer too), one
round trip and no pipeline to drive from Python.

Revision ID: 0024
Revises: 0023
"""

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION bastion.member_roles(p_tenant uuid, p_user uuid, p_mac text)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM bastion.context_enter(p_tenant, p_user, 'viewer', p_mac);
    RETURN QUERY SELECT m.role FROM bastion.memberships m WHERE m.user_id = p_user;
END $$;
REVOKE EXECUTE ON FUNCTION bastion.member_roles(uuid, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.member_roles(uuid, uuid, text) TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.member_roles(uuid, uuid, text);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
