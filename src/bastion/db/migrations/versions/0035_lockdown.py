"""Tenant lockdown and session cut-offs (issue 20, incident runbook).

* ``bastion.tenant_lockdowns``: one row per tenant that is read-only until an
  operator lifts it (``bastion incident lockdown`` / ``lift-lockdown``).
* ``bastion.session_cutoffs``: access tokens issued before ``not_before`` are
  refused (``bastion incident revoke-sessions``). The row's scope: the
  platform tenant with no user = everyone; the platform tenant with a user =
  that person in every tenant; a tenant with no user = every user of it.
* Both are written only in the ``system`` role of their own tenant (RLS);
  every change announces itself on ``bastion_restrictions`` (no payload: the
  listeners re-read the small snapshot), so api and gateway apply it within
  milliseconds without a per-request database round trip.
* ``bastion.access_restrictions()`` is that snapshot: the locked tenants and
  the cut-offs young enough to still matter (an access token lives at most
  60 minutes), for the guard of every process, read in the platform context.
* ``bastion.revoke_sessions_scoped`` ends refresh families (and unredeemed
  authorization codes) of a user, a tenant or everyone, for the ``system``
  role only: the tenant-wide and global scopes of ``revoke_sessions`` (0017).

Revision ID: 0035
Revises: 0034
"""

from alembic import op

revision = "0035"
down_revision = "0034"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
SYSTEM = "(SELECT bastion.app_role()) = 'system'"

UPGRADE = f"""
CREATE TABLE bastion.tenant_lockdowns (
    tenant_id  uuid PRIMARY KEY REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    locked_at  timestamptz NOT NULL DEFAULT now(),
    locked_by  text NOT NULL CHECK (length(locked_by) BETWEEN 1 AND 128),
    reason     text NOT NULL CHECK (length(reason) BETWEEN 1 AND 200)
);
ALTER TABLE bastion.tenant_lockdowns ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.tenant_lockdowns FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_lockdowns_read ON bastion.tenant_lockdowns FOR SELECT USING ({TENANT});
CREATE POLICY tenant_lockdowns_write ON bastion.tenant_lockdowns FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
GRANT SELECT, INSERT, DELETE ON bastion.tenant_lockdowns TO bastion_app;

CREATE TABLE bastion.session_cutoffs (
    tenant_id  uuid NOT NULL REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    user_id    uuid REFERENCES bastion.users (id) ON DELETE CASCADE,
    not_before timestamptz NOT NULL,
    UNIQUE NULLS NOT DISTINCT (tenant_id, user_id)
);
ALTER TABLE bastion.session_cutoffs ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.session_cutoffs FORCE ROW LEVEL SECURITY;
CREATE POLICY session_cutoffs_read ON bastion.session_cutoffs FOR SELECT USING ({TENANT});
CREATE POLICY session_cutoffs_write ON bastion.session_cutoffs FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
GRANT SELECT, INSERT, UPDATE ON bastion.session_cutoffs TO bastion_app;

CREATE FUNCTION bastion.announce_restrictions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('bastion_restrictions', '');
    RETURN NULL;
END $$;
CREATE TRIGGER tenant_lockdowns_announce AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON bastion.tenant_lockdowns FOR EACH STATEMENT
    EXECUTE FUNCTION bastion.announce_restrictions();
CREATE TRIGGER session_cutoffs_announce AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON bastion.session_cutoffs FOR EACH STATEMENT
    EXECUTE FUNCTION bastion.announce_restrictions();

-- The snapshot reads across tenants as the schema owner, for the platform
-- context only (as ``audit_heads_all`` does).
CREATE POLICY tenant_lockdowns_lookup ON bastion.tenant_lockdowns FOR SELECT
    TO CURRENT_USER USING (true);
CREATE POLICY session_cutoffs_lookup ON bastion.session_cutoffs FOR SELECT
    TO CURRENT_USER USING (true);
CREATE FUNCTION bastion.access_restrictions()
RETURNS TABLE (kind text, tenant_id uuid, user_id uuid, since timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'lockdown', l.tenant_id, NULL::uuid, l.locked_at FROM bastion.tenant_lockdowns l
    WHERE bastion.app_is_platform()
    UNION ALL
    SELECT 'cutoff', c.tenant_id, c.user_id, c.not_before FROM bastion.session_cutoffs c
    WHERE bastion.app_is_platform() AND c.not_before > now() - interval '62 minutes'
$$;
REVOKE EXECUTE ON FUNCTION bastion.access_restrictions() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.access_restrictions() TO bastion_app;

CREATE FUNCTION bastion.revoke_sessions_scoped(p_tenant uuid, p_user uuid, p_reason text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    families uuid[];
BEGIN
    IF p_reason IS NULL OR length(p_reason) NOT BETWEEN 1 AND 64 THEN
        RAISE EXCEPTION 'revoke_sessions_scoped needs a short reason'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF bastion.app_role() IS DISTINCT FROM 'system' THEN
        RAISE EXCEPTION 'only the system role may end sessions in bulk'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE bastion.auth_codes SET used_at = now()
        WHERE used_at IS NULL
          AND (p_user IS NULL OR user_id = p_user)
          AND (p_tenant IS NULL OR tenant_id = p_tenant);
    SELECT coalesce(array_agg(id), '{{}}') INTO families FROM (
        SELECT f.id FROM bastion.refresh_families f
        WHERE f.revoked_at IS NULL
          AND (p_user IS NULL OR f.user_id = p_user)
          AND (p_tenant IS NULL OR f.tenant_id = p_tenant)
        ORDER BY f.id FOR UPDATE
    ) locked;
    UPDATE bastion.refresh_families SET revoked_at = now(), revoked_reason = p_reason
        WHERE id = ANY (families);
    UPDATE bastion.refresh_tokens SET revoked_at = now()
        WHERE family_id = ANY (families) AND revoked_at IS NULL;
    RETURN cardinality(families);
END $$;
REVOKE EXECUTE ON FUNCTION bastion.revoke_sessions_scoped(uuid, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.revoke_sessions_scoped(uuid, uuid, text) TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.revoke_sessions_scoped(uuid, uuid, text);
DROP FUNCTION bastion.access_restrictions();
DROP TABLE bastion.session_cutoffs;
DROP TABLE bastion.tenant_lockdowns;
DROP FUNCTION bastion.announce_restrictions();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
