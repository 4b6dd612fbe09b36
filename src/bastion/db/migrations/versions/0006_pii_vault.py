"""PII vault: tenant-scoped encrypted originals behind deterministic tokens (CHECKLIST M3).

* ``pii_token_keys``: one HMAC key per tenant, stored only wrapped by the
  tenant's key-encryption key (the key ring's ``kms/tenants/<id>``, as for
  ``data_keys``), so shredding the tenant makes its tokens uncomputable too.
* ``pii_vault``: one row per distinct value a tenant has tokenized: the token
  (``⟦KIND_<16 hex>⟧``, an HMAC of the value under the tenant's token key),
  and the original as AES-256-GCM ciphertext under the tenant's data key,
  bound to (tenant, row id). Rows are only ever inserted (deterministic, so
  ``ON CONFLICT DO NOTHING``): no UPDATE or DELETE grant; a tenant's rows go
  with the tenant.

Any role of the tenant may *add* a row (tokenizing reveals nothing: the
caller already holds the value) and see which tokens exist, but the app role
has no SELECT on the ``ciphertext`` column: originals are read only through
``bastion.pii_reveal``, which refuses every role but ``owner`` and ``system``
of the signed context. The database refuses a reveal even if a route's Cedar
check were missing. (INSERT ... ON CONFLICT applies the SELECT policy to the
new row, so the row policy itself cannot be narrower than the tenant.)

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
REVEALERS = "(SELECT bastion.app_role()) IN ('owner', 'system')"

UPGRADE = f"""
CREATE TABLE bastion.pii_token_keys (
    tenant_id  uuid PRIMARY KEY DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    wrapped    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bastion.pii_vault (
    tenant_id   uuid NOT NULL DEFAULT bastion.app_tenant_id()
                REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    token       text NOT NULL CHECK (token ~ '^⟦[A-Z][A-Z_]{{1,30}}_[0-9a-f]{{16}}⟧$'),
    kind        text NOT NULL CHECK (kind ~ '^[a-z][a-z_]{{1,30}}$'),
    -- The associated data of the ciphertext: derived from the HMAC, so a
    -- token collision (two values, one token) shows as a different id.
    id          uuid NOT NULL,
    ciphertext  bytea NOT NULL,
    key_version integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, token)
);

ALTER TABLE bastion.pii_token_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.pii_token_keys FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.pii_vault ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.pii_vault FORCE ROW LEVEL SECURITY;

CREATE POLICY pii_token_key_read ON bastion.pii_token_keys FOR SELECT USING ({TENANT});
CREATE POLICY pii_token_key_add ON bastion.pii_token_keys FOR INSERT WITH CHECK ({TENANT});
CREATE POLICY pii_vault_read ON bastion.pii_vault FOR SELECT USING ({TENANT});
CREATE POLICY pii_vault_add ON bastion.pii_vault FOR INSERT WITH CHECK ({TENANT});

-- The originals of the caller's tenant, for owner and system only. Runs as the
-- owner (who may read the ciphertext column); forced RLS still applies.
CREATE FUNCTION bastion.pii_reveal(p_tokens text[])
RETURNS TABLE (token text, kind text, id uuid, ciphertext bytea, key_version integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF bastion.app_tenant_id() IS NULL OR NOT {REVEALERS} THEN
        RAISE EXCEPTION 'revealing PII needs the owner role'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY SELECT v.token, v.kind, v.id, v.ciphertext, v.key_version
        FROM bastion.pii_vault v
        WHERE v.tenant_id = bastion.app_tenant_id() AND v.token = ANY (p_tokens);
END;
$$;

REVOKE EXECUTE ON FUNCTION bastion.pii_reveal(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.pii_reveal(text[]) TO bastion_app;
GRANT SELECT, INSERT ON bastion.pii_token_keys TO bastion_app;
GRANT INSERT ON bastion.pii_vault TO bastion_app;
GRANT SELECT (tenant_id, token, kind, id, key_version, created_at) ON bastion.pii_vault
    TO bastion_app;
"""

DOWNGRADE = (
    "DROP FUNCTION bastion.pii_reveal(text[]); "
    "DROP TABLE bastion.pii_vault, bastion.pii_token_keys;"
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
