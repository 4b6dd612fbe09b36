"""Foundation schema: tenants, users, memberships, documents, audit events.

Every table in the ``bastion`` schema has row-level security ENABLEd and
FORCEd. Policies read the tenant, user and role that
:func:`bastion.db.pool.Database.tenant_tx` sets with ``set_config(..., true)``.
Those settings are signed with an HMAC (RFC 2104) whose key only the app
process and the owner-only ``bastion_private`` schema hold, so SQL running as
``bastion_app`` (an injection, say) cannot switch itself to another tenant with
``set_config``: a forged context raises ``insufficient_privilege``, and no
context at all reads as NULL, which matches no row.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ROLES = "('owner', 'billing-admin', 'auditor', 'contributor', 'viewer', 'system')"

UPGRADE = f"""
CREATE SCHEMA IF NOT EXISTS bastion_private;
REVOKE ALL ON SCHEMA bastion_private FROM PUBLIC;
CREATE SCHEMA bastion;
REVOKE ALL ON SCHEMA bastion FROM PUBLIC;

-- HMAC-SHA256 key of the tenant context, kept as its precomputed inner and
-- outer padded blocks (RFC 2104 section 2) so verification needs only sha256().
CREATE TABLE bastion_private.context_key (
    id        smallint PRIMARY KEY CHECK (id = 1),
    inner_pad bytea NOT NULL CHECK (length(inner_pad) = 64),
    outer_pad bytea NOT NULL CHECK (length(outer_pad) = 64)
);

-- Returns the setting ``name`` once the tenant context is verified: NULL when
-- no tenant is set (matches no row); raises when the settings do not carry the
-- application's signature. The policies call it through the accessors below,
-- each wrapped as (SELECT ...) so it runs once per query, not once per row.
CREATE FUNCTION bastion.verified_setting(name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t         text := coalesce(current_setting('app.tenant_id', true), '');
    inner_pad bytea;
    outer_pad bytea;
BEGIN
    IF name NOT IN ('app.tenant_id', 'app.user_id', 'app.role') THEN
        RAISE EXCEPTION 'not a tenant context setting' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF t = '' THEN
        RETURN NULL;
    END IF;
    SELECT k.inner_pad, k.outer_pad INTO inner_pad, outer_pad
    FROM bastion_private.context_key k WHERE k.id = 1;
    IF inner_pad IS NULL OR encode(sha256(outer_pad || sha256(inner_pad || convert_to(
            t || '|' || coalesce(current_setting('app.user_id', true), '')
              || '|' || coalesce(current_setting('app.role', true), ''), 'UTF8'))), 'hex')
        IS DISTINCT FROM current_setting('app.context_sig', true)
    THEN
        RAISE EXCEPTION 'tenant context is not signed by the application'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN nullif(current_setting(name, true), '');
END $$;

-- plpgsql rather than SQL: a non-inlinable SQL function is planned anew in
-- every query, which cost more than the HMAC itself.
CREATE FUNCTION bastion.app_tenant_id() RETURNS uuid LANGUAGE plpgsql STABLE
AS $$ BEGIN RETURN bastion.verified_setting('app.tenant_id')::uuid; END $$;
CREATE FUNCTION bastion.app_user_id() RETURNS uuid LANGUAGE plpgsql STABLE
AS $$ BEGIN RETURN bastion.verified_setting('app.user_id')::uuid; END $$;
CREATE FUNCTION bastion.app_role() RETURNS text LANGUAGE plpgsql STABLE
AS $$ BEGIN RETURN bastion.verified_setting('app.role'); END $$;

CREATE TABLE bastion.tenants (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug       text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{{1,62}}$'),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bastion.users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email        citext NOT NULL UNIQUE CHECK (length(email) BETWEEN 3 AND 320),
    display_name text NOT NULL DEFAULT '' CHECK (length(display_name) <= 200),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bastion.memberships (
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN {ROLES} AND role <> 'system'),
    granted_by uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id, role)
);
CREATE INDEX memberships_user ON bastion.memberships (user_id);

-- Placeholder for the knowledge base: a support ticket or any text document.
CREATE TABLE bastion.documents (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    title      text NOT NULL CHECK (length(title) BETWEEN 1 AND 500),
    body       text NOT NULL DEFAULT '',
    created_by uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX documents_tenant ON bastion.documents (tenant_id, created_at);

-- Append-only audit trail. seq is gapless per tenant (assigned under the row
-- lock of audit_heads) so the hash chain can link entries later.
CREATE TABLE bastion.audit_events (
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id),
    seq        bigint NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL DEFAULT '',
    details    jsonb NOT NULL DEFAULT '{{}}',
    request_id text,
    prev_hash  bytea,
    hash       bytea,
    PRIMARY KEY (tenant_id, seq)
);
CREATE TABLE bastion.audit_heads (
    tenant_id uuid PRIMARY KEY REFERENCES bastion.tenants (id),
    seq       bigint NOT NULL,
    hash      bytea
);

CREATE FUNCTION bastion_private.audit_assign_seq() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO bastion.audit_heads AS h (tenant_id, seq) VALUES (NEW.tenant_id, 1)
    ON CONFLICT (tenant_id) DO UPDATE SET seq = h.seq + 1
    RETURNING h.seq INTO NEW.seq;
    NEW.at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER audit_events_seq BEFORE INSERT ON bastion.audit_events
    FOR EACH ROW EXECUTE FUNCTION bastion_private.audit_assign_seq();

-- Refuses UPDATE, DELETE and TRUNCATE for every role, the owner included.
-- Statement-level, so it fires even when RLS hides every row from the caller.
CREATE FUNCTION bastion_private.audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON bastion.audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION bastion_private.audit_append_only();

-- Row-level security: ENABLE + FORCE everywhere (FORCE so the owner is held too).
ALTER TABLE bastion.tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.tenants FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.users ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.users FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.memberships ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.memberships FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.documents ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.documents FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_events FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_heads FORCE ROW LEVEL SECURITY;

-- A tenant sees its own row; only the system role (provisioning) creates one.
CREATE POLICY tenant_self ON bastion.tenants FOR SELECT
    USING (id = (SELECT bastion.app_tenant_id()));
CREATE POLICY tenant_create ON bastion.tenants FOR INSERT
    WITH CHECK (id = (SELECT bastion.app_tenant_id()) AND (SELECT bastion.app_role()) = 'system');
CREATE POLICY tenant_rename ON bastion.tenants FOR UPDATE
    USING (id = (SELECT bastion.app_tenant_id())
           AND (SELECT bastion.app_role()) IN ('owner', 'system'));

-- Users are global (one person may belong to several tenants); a tenant sees
-- only its members, a user sees themself, and Bastion's own provisioning
-- (role system, which only the app process can sign) finds users by email.
CREATE POLICY user_visible ON bastion.users FOR SELECT
    USING (id = (SELECT bastion.app_user_id())
           OR (SELECT bastion.app_role()) = 'system'
           OR EXISTS (SELECT 1 FROM bastion.memberships m
                      WHERE m.user_id = users.id
                        AND m.tenant_id = (SELECT bastion.app_tenant_id())));
CREATE POLICY user_create ON bastion.users FOR INSERT
    WITH CHECK ((SELECT bastion.app_tenant_id()) IS NOT NULL
                AND (SELECT bastion.app_role()) IN ('owner', 'system'));
CREATE POLICY user_update ON bastion.users FOR UPDATE
    USING (id = (SELECT bastion.app_user_id()) OR (SELECT bastion.app_role()) = 'system');

CREATE POLICY membership_read ON bastion.memberships FOR SELECT
    USING (tenant_id = (SELECT bastion.app_tenant_id()));
CREATE POLICY membership_write ON bastion.memberships FOR ALL
    USING (tenant_id = (SELECT bastion.app_tenant_id())
           AND (SELECT bastion.app_role()) IN ('owner', 'system'))
    WITH CHECK (tenant_id = (SELECT bastion.app_tenant_id())
                AND (SELECT bastion.app_role()) IN ('owner', 'system'));

CREATE POLICY document_read ON bastion.documents FOR SELECT
    USING (tenant_id = (SELECT bastion.app_tenant_id()));
CREATE POLICY document_write ON bastion.documents FOR ALL
    USING (tenant_id = (SELECT bastion.app_tenant_id())
           AND (SELECT bastion.app_role()) IN ('owner', 'contributor', 'system'))
    WITH CHECK (tenant_id = (SELECT bastion.app_tenant_id())
                AND (SELECT bastion.app_role()) IN ('owner', 'contributor', 'system'));

-- Anyone acting in a tenant leaves a trace; reading it is for owners and auditors.
CREATE POLICY audit_append ON bastion.audit_events FOR INSERT
    WITH CHECK (tenant_id = (SELECT bastion.app_tenant_id()));
CREATE POLICY audit_read ON bastion.audit_events FOR SELECT
    USING (tenant_id = (SELECT bastion.app_tenant_id())
           AND (SELECT bastion.app_role()) IN ('owner', 'auditor', 'system'));
CREATE POLICY audit_head ON bastion.audit_heads FOR ALL
    USING (tenant_id = (SELECT bastion.app_tenant_id()))
    WITH CHECK (tenant_id = (SELECT bastion.app_tenant_id()));

-- The app role gets exactly what it needs and nothing on bastion_private.
GRANT USAGE ON SCHEMA bastion TO bastion_app;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA bastion, bastion_private FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.app_tenant_id(), bastion.app_user_id(), bastion.app_role(),
    bastion.verified_setting(text) TO bastion_app;
GRANT SELECT, INSERT, UPDATE ON bastion.tenants, bastion.users TO bastion_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON bastion.memberships, bastion.documents TO bastion_app;
GRANT SELECT, INSERT ON bastion.audit_events TO bastion_app;
"""

DOWNGRADE = """
DROP SCHEMA bastion CASCADE;
DROP TABLE bastion_private.context_key;
DROP FUNCTION bastion_private.audit_assign_seq();
DROP FUNCTION bastion_private.audit_append_only();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
