"""Throttle keys name a counter kind chosen by code and an HMAC, nothing else.

``identity/throttle.py`` keys every counter ``<kind>:<HMAC-SHA256 hex>``, so
no typed e-mail can name another key space (an ``mfa:<victim>`` typed as an
e-mail once reached the victim's MFA counter). The database holds the same
line: the old clear-text keys (``acct:…``, ``ip:…``, e-mails and addresses)
are deleted, and a CHECK refuses any key of another shape.

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

KEY_SHAPE = (
    "'^(login-account|login-account-address|address|mfa-user|password-change-user):[0-9a-f]{64}$'"
)

# FORCE'd row-level security holds the owner too, and the migration runs with
# no tenant context: lifted for the one DELETE, inside this transaction.
UPGRADE = f"""
ALTER TABLE bastion.login_throttle NO FORCE ROW LEVEL SECURITY;
DELETE FROM bastion.login_throttle WHERE key !~ {KEY_SHAPE};
ALTER TABLE bastion.login_throttle FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.login_throttle ADD CONSTRAINT login_throttle_key_shape
    CHECK (key ~ {KEY_SHAPE});
"""

DOWNGRADE = """
ALTER TABLE bastion.login_throttle DROP CONSTRAINT login_throttle_key_shape;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
