"""Single use across processes: DPoP proofs (RFC 9449 section 11.1) and the
api's signed envelopes, when more than one api or gateway process serves.

Each process remembers the proofs and envelope nonces it has seen; a second
process does not, so with ``replay_store = "postgres"`` every process also
records the SHA-256 of what it accepted here, and the primary key makes the
same key arriving at any other process find the row and refuse.

The table is global (a key is a digest of a random identifier, never a
tenant's data) and lives in the owner-only ``bastion_private`` schema: the app
role can only call ``bastion.use_once``, never read, list or delete keys.

It is UNLOGGED (no WAL, so a write costs less): a key lives for its proof's or
envelope's window, about a minute. The price: after a database crash or a
failover to a standby the table is empty, so what was accepted in the minute
before could be used once more within that minute. Expiries are capped at an
hour, so no caller can make a row live long, and every hundredth call deletes
a batch of expired rows: the table stays about as large as the keys accepted
within one window.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE UNLOGGED TABLE bastion_private.used_once (
    key        bytea PRIMARY KEY CHECK (length(key) = 32),
    expires_at timestamptz NOT NULL
);
CREATE INDEX used_once_expiry ON bastion_private.used_once (expires_at);

-- True the first time p_key is used (or once its earlier use has expired),
-- false while it is known. Concurrent first uses of one key: the primary key
-- makes all but one wait and see the row, so exactly one gets true.
CREATE FUNCTION bastion.use_once(p_key bytea, p_expires timestamptz) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fresh boolean;
BEGIN
    IF p_key IS NULL OR length(p_key) <> 32 OR p_expires IS NULL THEN
        RAISE EXCEPTION 'use_once needs a 32-byte key and an expiry'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO bastion_private.used_once AS u (key, expires_at)
        VALUES (p_key, least(p_expires, now() + interval '1 hour'))
        ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at
            WHERE u.expires_at <= now()
        RETURNING true INTO fresh;
    IF random() < 0.01 THEN
        -- SKIP LOCKED: two sweeps never wait on each other.
        DELETE FROM bastion_private.used_once
            WHERE key IN (SELECT o.key FROM bastion_private.used_once o
                          WHERE o.expires_at <= now()
                          ORDER BY o.expires_at LIMIT 500 FOR UPDATE SKIP LOCKED);
    END IF;
    RETURN coalesce(fresh, false);
END $$;

REVOKE EXECUTE ON FUNCTION bastion.use_once(bytea, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.use_once(bytea, timestamptz) TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.use_once(bytea, timestamptz);
DROP TABLE bastion_private.used_once;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
