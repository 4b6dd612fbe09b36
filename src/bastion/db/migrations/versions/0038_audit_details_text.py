"""The audit chain's canonical ``details``: written by the app, checked by the database.

0031 has the insert trigger serialise ``details`` as RFC 8785 (JCS) in
PL/pgSQL for every event: 0.12-0.15 ms of database CPU per event, the
database's largest cost per gateway call. The writer now also sends the
serialisation it made (``bastion.jcs``) in ``details_jcs``; the trigger uses
that text only when it parses to the very ``details`` being stored (``jsonb``
equality, in C), and otherwise serialises ``details`` itself as before. The
column is emptied before the row is stored (a CHECK proves it), and the link
to the previous event is computed by the database alone, as before.

What the equality does not prove is that the text is JCS's one spelling: a
writer holding the app role could have an event hashed over another spelling
of the same value. ``bastion audit verify`` recomputes JCS from the stored
fields, so such an event fails verification (found, never passed); that
writer could append any event it liked already.

Revision ID: 0038
Revises: 0037
"""

from alembic import op

revision = "0038"
down_revision = "0037"
branch_labels = None
depends_on = None

GENESIS = "'\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea"


def _assign_seq(details: str) -> str:
    """The insert trigger of 0031, with ``details`` serialised by ``details``."""
    return f"""
CREATE OR REPLACE FUNCTION bastion_private.audit_assign_seq() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    body bytea;
BEGIN
    NEW.at := now();
    body := convert_to('{{"action":' || to_json(NEW.action)::text
        || ',"actor":' || to_json(NEW.actor)::text
        || ',"at":' || (extract(epoch FROM NEW.at) * 1000000)::bigint::text
        || ',"details":' || {details}
        || ',"request_id":' || coalesce(to_json(NEW.request_id)::text, 'null')
        || ',"target":' || to_json(NEW.target)::text
        || ',"tenant_id":"' || NEW.tenant_id::text || '"}}', 'UTF8');
    INSERT INTO bastion.audit_heads AS h (tenant_id, seq, hash)
    VALUES (NEW.tenant_id, 1, sha256({GENESIS} || body))
    ON CONFLICT (tenant_id) DO UPDATE
        SET seq = h.seq + 1, hash = sha256(coalesce(h.hash, {GENESIS}) || body)
    RETURNING WITH (OLD AS o, NEW AS n) n.seq, coalesce(o.hash, {GENESIS}), n.hash
    INTO NEW.seq, NEW.prev_hash, NEW.hash;
    NEW.details_jcs := NULL;
    RETURN NEW;
END $$;
"""


# The writer's text when it is the value stored (a text that is not JSON is
# not that value either), else the database's own serialisation.
_CHECKED = """CASE WHEN NEW.details_jcs IS NOT NULL
            AND pg_input_is_valid(NEW.details_jcs, 'jsonb')
            AND NEW.details_jcs::jsonb = NEW.details
        THEN NEW.details_jcs ELSE bastion_private.jcs(NEW.details) END"""

UPGRADE = """
ALTER TABLE bastion.audit_events ADD COLUMN details_jcs text
    CONSTRAINT audit_details_jcs_never_stored CHECK (details_jcs IS NULL);
""" + _assign_seq(_CHECKED)

DOWNGRADE = (
    _assign_seq("bastion_private.jcs(NEW.details)").replace("    NEW.details_jcs := NULL;\n", "")
    + """
ALTER TABLE bastion.audit_events DROP COLUMN details_jcs;
"""
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
