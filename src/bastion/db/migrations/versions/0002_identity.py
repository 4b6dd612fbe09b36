"""Identity: credentials, password history, TOTP, recovery codes, login
throttling, OAuth clients, authorization codes and refresh-token families.

Rows that belong to a tenant (codes, refresh tokens) are isolated by tenant
like every other table. Rows that belong to a person or to the deployment
(credentials, factors, throttle counters, clients) are reachable only by the
``system`` role, i.e. the identity service itself, or by the user they belong
to. Every table has RLS ENABLEd and FORCEd.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SYSTEM = "(SELECT bastion.app_role()) = 'system'"
SELF = "user_id = (SELECT bastion.app_user_id())"
TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"

UPGRADE = f"""
CREATE TABLE bastion.credentials (
    user_id       uuid PRIMARY KEY REFERENCES bastion.users (id) ON DELETE CASCADE,
    password_hash text NOT NULL,
    changed_at    timestamptz NOT NULL DEFAULT now()
);

-- The last N password hashes of each user, so none of them can be reused.
CREATE TABLE bastion.password_history (
    user_id       uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX password_history_user ON bastion.password_history (user_id, created_at DESC);

-- TOTP secret encrypted with AES-256-GCM (key in the key ring; AAD = user id).
CREATE TABLE bastion.mfa_totp (
    user_id        uuid PRIMARY KEY REFERENCES bastion.users (id) ON DELETE CASCADE,
    secret_sealed  bytea NOT NULL,
    confirmed_at   timestamptz,
    last_timestep  bigint NOT NULL DEFAULT 0,  -- a code is accepted once
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bastion.recovery_codes (
    user_id   uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    code_hash bytea NOT NULL,
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- Failed-login counters per account (normalised e-mail, whether or not such a
-- user exists) and per client IP.
CREATE TABLE bastion.login_throttle (
    key          text PRIMARY KEY CHECK (length(key) <= 400),
    attempts     integer NOT NULL DEFAULT 0,
    window_start timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz
);

-- OAuth 2.0 clients of the built-in provider; redirect URIs match exactly.
CREATE TABLE bastion.oauth_clients (
    client_id     text PRIMARY KEY CHECK (client_id ~ '^[A-Za-z0-9._-]{{3,64}}$'),
    name          text NOT NULL,
    redirect_uris text[] NOT NULL CHECK (cardinality(redirect_uris) BETWEEN 1 AND 20),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Authorization codes (RFC 6749 4.1) with their PKCE challenge (RFC 7636);
-- stored hashed, single use, short-lived.
CREATE TABLE bastion.auth_codes (
    code_hash      bytea PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    client_id      text NOT NULL REFERENCES bastion.oauth_clients (client_id),
    redirect_uri   text NOT NULL,
    code_challenge text NOT NULL,
    scope          text NOT NULL DEFAULT '',
    nonce          text,
    amr            text[] NOT NULL,
    auth_time      timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz
);

-- Refresh tokens rotate on every use; all tokens of one login share a family,
-- and reuse of a used token revokes the whole family.
CREATE TABLE bastion.refresh_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    family_id   uuid NOT NULL,
    token_hash  bytea NOT NULL UNIQUE,
    tenant_id   uuid NOT NULL REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES bastion.users (id) ON DELETE CASCADE,
    client_id   text NOT NULL REFERENCES bastion.oauth_clients (client_id),
    jkt         text,
    scope       text NOT NULL DEFAULT '',
    amr         text[] NOT NULL,
    auth_time   timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family ON bastion.refresh_tokens (family_id);

ALTER TABLE bastion.credentials ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.credentials FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.password_history ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.password_history FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.mfa_totp ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.mfa_totp FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.recovery_codes ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.recovery_codes FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.login_throttle ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.login_throttle FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.oauth_clients ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.oauth_clients FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.auth_codes ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.auth_codes FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.refresh_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.refresh_tokens FORCE ROW LEVEL SECURITY;

CREATE POLICY credentials_owner ON bastion.credentials FOR ALL
    USING ({SYSTEM} OR {SELF}) WITH CHECK ({SYSTEM} OR {SELF});
CREATE POLICY password_history_owner ON bastion.password_history FOR ALL
    USING ({SYSTEM} OR {SELF}) WITH CHECK ({SYSTEM} OR {SELF});
CREATE POLICY mfa_totp_owner ON bastion.mfa_totp FOR ALL
    USING ({SYSTEM} OR {SELF}) WITH CHECK ({SYSTEM} OR {SELF});
CREATE POLICY recovery_codes_owner ON bastion.recovery_codes FOR ALL
    USING ({SYSTEM} OR {SELF}) WITH CHECK ({SYSTEM} OR {SELF});
CREATE POLICY login_throttle_system ON bastion.login_throttle FOR ALL
    USING ({SYSTEM}) WITH CHECK ({SYSTEM});
CREATE POLICY oauth_clients_read ON bastion.oauth_clients FOR SELECT USING (true);
CREATE POLICY oauth_clients_write ON bastion.oauth_clients FOR ALL
    USING ({SYSTEM}) WITH CHECK ({SYSTEM});
CREATE POLICY auth_codes_tenant ON bastion.auth_codes FOR ALL
    USING ({TENANT} AND {SYSTEM}) WITH CHECK ({TENANT} AND {SYSTEM});
CREATE POLICY refresh_tokens_tenant ON bastion.refresh_tokens FOR ALL
    USING ({TENANT} AND ({SYSTEM} OR {SELF})) WITH CHECK ({TENANT} AND {SYSTEM});

-- Resolving a tenant's slug at login, before any tenant context exists: the
-- function runs as the schema owner, which alone may look a slug up.
CREATE POLICY tenant_slug_lookup ON bastion.tenants FOR SELECT TO CURRENT_USER USING (true);
CREATE FUNCTION bastion.tenant_id_by_slug(slug text) RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT t.id FROM bastion.tenants t WHERE t.slug = tenant_id_by_slug.slug $$;

GRANT EXECUTE ON FUNCTION bastion.tenant_id_by_slug(text) TO bastion_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON bastion.credentials, bastion.password_history,
    bastion.mfa_totp, bastion.recovery_codes, bastion.login_throttle, bastion.oauth_clients,
    bastion.auth_codes, bastion.refresh_tokens TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.tenant_id_by_slug(text);
DROP TABLE bastion.refresh_tokens, bastion.auth_codes, bastion.oauth_clients,
    bastion.login_throttle, bastion.recovery_codes, bastion.mfa_totp,
    bastion.password_history, bastion.credentials;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
