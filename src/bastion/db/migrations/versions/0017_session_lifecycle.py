"""Session lifecycle: refresh-token families as lockable rows, revoking a
user's other sessions in every tenant, and a tenant that keeps an owner.

* ``bastion.refresh_families`` holds one row per sign-in (RFC 9700 section
  4.14.2's token family). Rotation locks that row before it reads the token,
  revocation updates it before it revokes the tokens, so the two serialise on
  the family: a revocation that waited for a rotation revokes the token the
  rotation just issued, and a rotation that waited for a revocation finds the
  family revoked. A trigger refuses a token into a revoked family whatever
  the caller, and a revocation is final (``revoked_at`` never goes back).
* ``bastion.revoke_sessions`` ends a user's sessions (all families but the
  one kept) in every tenant, after a password or MFA change or a "sign out
  everywhere". Credentials and factors are the person's, not a tenant's, so a
  tenant context cannot reach the other tenants' rows: the function runs as
  its definer, for the user themself (or Bastion's ``system`` role) only. It
  spends the user's unredeemed authorization codes first, so a code issued
  before the change cannot start a new family after it.
* A constraint trigger refuses any statement that leaves a tenant without an
  owner (a revoke, a downgrade, a user's deletion). It takes a per-tenant
  transaction lock before counting, so two owners removing each other at once
  are serialised and the second sees the first's removal.

Revision ID: 0017
Revises: 0016
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

SYSTEM = "(SELECT bastion.app_role()) = 'system'"
SELF = "user_id = (SELECT bastion.app_user_id())"
TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"

UPGRADE = f"""
CREATE TABLE bastion.refresh_families (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      uuid NOT NULL REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    client_id      text NOT NULL REFERENCES bastion.oauth_clients (client_id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    revoked_reason text CHECK (length(revoked_reason) <= 64)
);
CREATE INDEX refresh_families_user_live ON bastion.refresh_families (user_id)
    WHERE revoked_at IS NULL;

ALTER TABLE bastion.refresh_families ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.refresh_families FORCE ROW LEVEL SECURITY;
CREATE POLICY refresh_families_tenant ON bastion.refresh_families FOR ALL
    USING ({TENANT} AND ({SYSTEM} OR {SELF})) WITH CHECK ({TENANT} AND {SYSTEM});

-- The definer of the functions below (the schema owner, which runs this
-- migration) acts across tenants; no app session is ever this role.
CREATE POLICY refresh_families_definer ON bastion.refresh_families FOR ALL TO CURRENT_USER
    USING (true) WITH CHECK (true);
CREATE POLICY refresh_tokens_definer ON bastion.refresh_tokens FOR ALL TO CURRENT_USER
    USING (true) WITH CHECK (true);
CREATE POLICY auth_codes_definer ON bastion.auth_codes FOR ALL TO CURRENT_USER
    USING (true) WITH CHECK (true);
CREATE POLICY memberships_definer ON bastion.memberships FOR SELECT TO CURRENT_USER
    USING (true);

-- Existing tokens: one family row each, revoked if every token of it is.
INSERT INTO bastion.refresh_families (id, tenant_id, user_id, client_id, created_at, revoked_at)
SELECT family_id, (array_agg(tenant_id))[1], (array_agg(user_id))[1],
       (array_agg(client_id))[1], min(created_at),
       CASE WHEN bool_and(revoked_at IS NOT NULL) THEN max(revoked_at) END
FROM bastion.refresh_tokens GROUP BY family_id;
ALTER TABLE bastion.refresh_tokens ADD CONSTRAINT refresh_tokens_family_fk
    FOREIGN KEY (family_id) REFERENCES bastion.refresh_families (id) ON DELETE CASCADE;

-- A token joins only a live family, and holds the family row until commit:
-- a revocation (which updates that row first) waits, then sees the token.
CREATE FUNCTION bastion_private.refresh_family_open() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM bastion.refresh_families f
        WHERE f.id = NEW.family_id AND f.revoked_at IS NULL FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the refresh-token family is revoked'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'refresh_family_open';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refresh_tokens_family_open BEFORE INSERT ON bastion.refresh_tokens
    FOR EACH ROW EXECUTE FUNCTION bastion_private.refresh_family_open();

-- Revocation is final, for families and tokens alike.
CREATE FUNCTION bastion_private.revocation_is_final() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'a revocation cannot be undone'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'revocation_is_final';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refresh_families_revocation_final BEFORE UPDATE ON bastion.refresh_families
    FOR EACH ROW EXECUTE FUNCTION bastion_private.revocation_is_final();
CREATE TRIGGER refresh_tokens_revocation_final BEFORE UPDATE ON bastion.refresh_tokens
    FOR EACH ROW EXECUTE FUNCTION bastion_private.revocation_is_final();

-- Ends every session of p_user except the family p_keep, in every tenant;
-- returns how many families it revoked. Codes first (an exchange in flight
-- holds its code's row: we wait, then skip it, then see its new family),
-- then the families in id order, then, in a statement of its own (a fresh
-- snapshot), every token of those families.
CREATE FUNCTION bastion.revoke_sessions(p_user uuid, p_keep uuid, p_reason text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    families uuid[];
BEGIN
    IF p_user IS NULL OR p_reason IS NULL OR length(p_reason) > 64 THEN
        RAISE EXCEPTION 'revoke_sessions needs a user and a short reason'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_user IS DISTINCT FROM bastion.app_user_id()
       AND bastion.app_role() IS DISTINCT FROM 'system' THEN
        RAISE EXCEPTION 'only the user themself may end their sessions'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE bastion.auth_codes SET used_at = now()
        WHERE user_id = p_user AND used_at IS NULL;
    SELECT coalesce(array_agg(id), '{{}}') INTO families FROM (
        SELECT f.id FROM bastion.refresh_families f
        WHERE f.user_id = p_user AND f.revoked_at IS NULL AND f.id IS DISTINCT FROM p_keep
        ORDER BY f.id FOR UPDATE
    ) locked;
    UPDATE bastion.refresh_families SET revoked_at = now(), revoked_reason = p_reason
        WHERE id = ANY (families);
    UPDATE bastion.refresh_tokens SET revoked_at = now()
        WHERE family_id = ANY (families) AND revoked_at IS NULL;
    RETURN cardinality(families);
END $$;

-- A tenant that has owners keeps at least one. Statements are checked as they
-- end (a transaction may defer it to hand ownership over), under a lock per
-- tenant: of two concurrent removals, the second counts after the first commits.
CREATE FUNCTION bastion_private.tenant_keeps_an_owner() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.role = 'owner' AND NEW.tenant_id = OLD.tenant_id THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(
        hashtextextended('bastion.tenant-owners:' || OLD.tenant_id::text, 0));
    IF EXISTS (SELECT 1 FROM bastion.tenants t WHERE t.id = OLD.tenant_id)
       AND NOT EXISTS (SELECT 1 FROM bastion.memberships m
                       WHERE m.tenant_id = OLD.tenant_id AND m.role = 'owner') THEN
        RAISE EXCEPTION 'a tenant keeps at least one owner'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_keeps_an_owner';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER memberships_keep_an_owner
    AFTER DELETE OR UPDATE ON bastion.memberships
    DEFERRABLE INITIALLY IMMEDIATE
    FOR EACH ROW WHEN (OLD.role = 'owner')
    EXECUTE FUNCTION bastion_private.tenant_keeps_an_owner();

REVOKE EXECUTE ON FUNCTION bastion.revoke_sessions(uuid, uuid, text),
    bastion_private.refresh_family_open(), bastion_private.revocation_is_final(),
    bastion_private.tenant_keeps_an_owner() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.revoke_sessions(uuid, uuid, text) TO bastion_app;
GRANT SELECT, INSERT, UPDATE ON bastion.refresh_families TO bastion_app;
"""

DOWNGRADE = """
DROP TRIGGER memberships_keep_an_owner ON bastion.memberships;
DROP FUNCTION bastion_private.tenant_keeps_an_owner();
DROP FUNCTION bastion.revoke_sessions(uuid, uuid, text);
DROP TRIGGER refresh_tokens_revocation_final ON bastion.refresh_tokens;
DROP TRIGGER refresh_families_revocation_final ON bastion.refresh_families;
DROP FUNCTION bastion_private.revocation_is_final();
DROP TRIGGER refresh_tokens_family_open ON bastion.refresh_tokens;
DROP FUNCTION bastion_private.refresh_family_open();
ALTER TABLE bastion.refresh_tokens DROP CONSTRAINT refresh_tokens_family_fk;
DROP POLICY memberships_definer ON bastion.memberships;
DROP POLICY auth_codes_definer ON bastion.auth_codes;
DROP POLICY refresh_tokens_definer ON bastion.refresh_tokens;
DROP TABLE bastion.refresh_families;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
