"""Crypto-shred removes what is derived from a tenant's text, not only its keys (issue 23, B9).

``tenant shred`` deleted the documents and destroyed the tenant's KEK, but
left behind what was computed from the text and stored outside the
ciphertext: the namespaces with their chunk partitions (their files keep the
dead tuples, vectors included, until a vacuum), the vault's rows, and the
documents' plain SHA-256 digests (a recognition oracle in every backup).

``bastion.shred_tenant_index()`` (SECURITY DEFINER: dropping a partition
needs the owner) runs in the shredding transaction, under the signed context
of the tenant with the ``system`` role only:

- deletes the tenant's documents (their chunks and cached embeddings go with
  them by cascade), then DROPs each of its namespaces' ``chunks_<id>``
  partitions, HNSW graph included, so no dead tuple is left to vacuum later,
  and deletes the namespaces;
- deletes the tenant's vault entries and its token key;
- announces the shred on ``bastion_tenant_shred`` as the SHA-256 of the
  tenant id (any session may listen, so no id in clear, as migration 0014
  did for memberships): gateways drop the tenant's cached answers.

Existing documents' plain body digests and idempotency keys (``bastion
ingest`` derives them from SHA-256 of path and body) are cleared: new ones are
HMAC-SHA256 under the tenant's data key (:mod:`bastion.knowledge.service`),
worthless once the key is destroyed. (The column ``sha256`` keeps its name;
it holds the keyed digest.)

Revision ID: 0023
Revises: 0022
"""

from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"

UPGRADE = f"""
-- No DELETE grant to bastion_app: reached only through shred_tenant_index.
CREATE POLICY pii_vault_shred ON bastion.pii_vault FOR DELETE USING ({TENANT} AND {SYSTEM});
CREATE POLICY pii_token_key_shred ON bastion.pii_token_keys FOR DELETE
    USING ({TENANT} AND {SYSTEM});

CREATE FUNCTION bastion.shred_tenant_index() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t  uuid := bastion.app_tenant_id();
    ns uuid;
    dropped integer := 0;
BEGIN
    IF t IS NULL OR bastion.app_role() IS DISTINCT FROM 'system' THEN
        RAISE EXCEPTION 'shredding a tenant needs the system role'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM bastion.documents WHERE tenant_id = t;
    FOR ns IN SELECT id FROM bastion.namespaces WHERE tenant_id = t LOOP
        EXECUTE format('DROP TABLE IF EXISTS bastion.%I',
                       'chunks_' || replace(ns::text, '-', ''));
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM bastion.namespaces WHERE tenant_id = t;
    DELETE FROM bastion.embedding_cache WHERE tenant_id = t;
    DELETE FROM bastion.pii_vault WHERE tenant_id = t;
    DELETE FROM bastion.pii_token_keys WHERE tenant_id = t;
    PERFORM pg_notify('bastion_tenant_shred',
                      encode(sha256(convert_to(t::text, 'UTF8')), 'hex'));
    RETURN dropped;
END;
$$;
REVOKE EXECUTE ON FUNCTION bastion.shred_tenant_index() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.shred_tenant_index() TO bastion_app;

-- Plain SHA-256 of bodies (and ingest's keys made from them): a "was this
-- file here?" oracle. Cleared; new ones are keyed. An earlier upload sent
-- again under its Idempotency-Key makes a new document. Row security is
-- forced on the owner too: lifted for this one statement of the migration.
ALTER TABLE bastion.documents NO FORCE ROW LEVEL SECURITY;
UPDATE bastion.documents SET sha256 = NULL, idempotency_key = NULL
    WHERE sha256 IS NOT NULL OR idempotency_key IS NOT NULL;
ALTER TABLE bastion.documents FORCE ROW LEVEL SECURITY;
"""


def upgrade() -> None:
    # psycopg itself: without parameters the '%' of format() strings stays.
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    conn.execute(UPGRADE)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION bastion.shred_tenant_index(); "
        "DROP POLICY pii_vault_shred ON bastion.pii_vault; "
        "DROP POLICY pii_token_key_shred ON bastion.pii_token_keys"
    )
