"""The signed tenant context is bound to one backend and one transaction.

Before this revision the application sent ``SET LOCAL app.tenant_id … ;
app.context_sig = '…'`` as query text, and the signature covered only the
tenant, user and role. Any session of ``bastion_app`` (an SQL injection, say)
could read that text from ``pg_stat_activity``, replay the four values with
``set_config`` and act in another tenant, as ``system`` if it liked.

Now (HMAC as in RFC 2104; the key stays in the owner-only
``bastion_private.context_key``):

* Each pooled connection first calls :func:`bastion.context_open`. It creates
  three *temporary* sequences in that backend, owned by this migration's role
  (the function's definer), so ``bastion_app`` can neither read, set nor
  drop-and-forge them: a counter starting at a random 56-bit value, a random
  secret salt, and the tag of the current context. It refuses to run when
  ``bastion_app`` may create temporary objects itself.
* Each transaction calls :func:`bastion.context_enter` with the tenant, user,
  role and the application's MAC over ``enter|tenant|user|role|pid|n``, where
  ``n`` is the counter's next value. The function takes that value itself
  (``nextval`` is never rolled back), so a MAC is accepted once, in one
  backend, and never again. Values travel as bind parameters, so
  ``pg_stat_activity`` shows ``$1 … $4``, never a context.
* Once verified, it stores the context in the ``app.*`` settings and sets the
  tag sequence to 64 bits of SHA-256 over the salt, those settings and the
  transaction's start (microseconds). The policies' accessors recompute that
  tag, so settings changed within the transaction, or copied into any later
  transaction or any other backend, do not verify and raise
  ``insufficient_privilege``. An accessor reads no table and computes one
  hash: cheaper than the HMAC it replaces, which pays for the extra call.

Membership announcements (migration 0011) carry SHA-256 of ``tenant:user``
instead of the ids: any app session may LISTEN, and another tenant's ids are
none of its business.

Temporary objects need a session-pooled connection (not a transaction-mode
pooler, and not a read-only standby).

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

ROLES = "('owner', 'billing-admin', 'auditor', 'contributor', 'viewer', 'system')"

# The tag: 64 bits of SHA-256 over the salt, the settings and the start of the
# transaction, in microseconds (epoch, so no time zone or DateStyle can give
# two instants one spelling). Temporary sequences are named through
# to_regclass() at run time: a regclass constant would be resolved when the
# function is planned, and fail in sessions that never open a context.
TAG = """('x' || left(encode(sha256(convert_to(
        pg_sequence_last_value(to_regclass('pg_temp.bastion_context_salt'))
        || '|' || {tenant} || '|' || {user} || '|' || {role} || '|'
        || (extract(epoch FROM transaction_timestamp()) * 1000000)::bigint,
        'UTF8')), 'hex'), 16))::bit(64)::bigint"""

UPGRADE = f"""
CREATE FUNCTION bastion_private.context_refused(reason text DEFAULT
    'tenant context is not signed by the application') RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', reason USING ERRCODE = 'insufficient_privilege';
END $$;

-- (Re)creates this backend's counter, salt and tag, and returns the counter's
-- first value. Called again, it only breaks the caller's own connection.
CREATE FUNCTION bastion.context_open() RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Bytes 10..16 of a version-4 UUID are random: 56 bits from the server's
    -- strong random source.
    first bigint := ('x' || encode(substring(uuid_send(gen_random_uuid()) FROM 10 FOR 7), 'hex'))
                    ::bit(56)::bigint + 1;
    salt  bigint := ('x' || encode(substring(uuid_send(gen_random_uuid()) FROM 10 FOR 7), 'hex'))
                    ::bit(56)::bigint;
BEGIN
    -- Were the login role allowed temporary objects, it could drop these
    -- sequences (DISCARD TEMP) and make its own: refuse to work at all.
    IF has_database_privilege(session_user, current_database(), 'TEMPORARY') THEN
        RAISE EXCEPTION 'role % may create temporary objects; revoke TEMPORARY on this '
                        'database from it and from PUBLIC', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DROP SEQUENCE IF EXISTS pg_temp.bastion_context, pg_temp.bastion_context_salt,
        pg_temp.bastion_context_tag;
    EXECUTE format('CREATE TEMPORARY SEQUENCE pg_temp.bastion_context AS bigint '
                   'MINVALUE 1 START %s NO CYCLE CACHE 1', first);
    CREATE TEMPORARY SEQUENCE pg_temp.bastion_context_salt AS bigint;
    CREATE TEMPORARY SEQUENCE pg_temp.bastion_context_tag AS bigint
        MINVALUE -9223372036854775808;
    PERFORM setval('pg_temp.bastion_context_salt', salt);
    RETURN first;
END $$;

-- Verifies the application's MAC for this backend's next counter value and
-- sets the transaction's context; raises insufficient_privilege otherwise.
-- One SQL statement: every extra plpgsql expression would be set up again in
-- each transaction, and this runs in every one.
CREATE FUNCTION bastion.context_enter(p_tenant uuid, p_user uuid, p_role text, p_mac text)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
SELECT CASE
    WHEN p_tenant IS NOT NULL AND p_role IN {ROLES}
         AND encode(sha256(k.outer_pad || sha256(k.inner_pad || convert_to(
                 'enter|' || p_tenant || '|' || coalesce(p_user::text, '') || '|' || p_role
                 || '|' || pg_backend_pid() || '|' || c.n, 'UTF8'))), 'hex') = p_mac
    THEN set_config('app.tenant_id', p_tenant::text, true) IS NOT NULL
         AND set_config('app.user_id', coalesce(p_user::text, ''), true) IS NOT NULL
         AND set_config('app.role', p_role, true) IS NOT NULL
         AND set_config('app.context_sig', '', true) IS NOT NULL
         AND setval(to_regclass('pg_temp.bastion_context_tag'), {
    TAG.format(tenant="p_tenant::text", user="coalesce(p_user::text, '')", role="p_role")
}) IS NOT NULL
    ELSE bastion_private.context_refused() IS NULL
END
FROM (SELECT nextval(to_regclass('pg_temp.bastion_context')) AS n OFFSET 0) c
LEFT JOIN bastion_private.context_key k ON k.id = 1
$$;

-- Returns the setting ``name`` once the tenant context verifies for this
-- backend and this transaction: NULL when no tenant is set (matches no row);
-- raises when the settings were not set by context_enter in this transaction.
-- The sequences are read with pg_sequence_last_value(), which needs the
-- owner's privilege and, unlike currval(), no nextval() in this session. One
-- expression, for the reason given at context_enter.
CREATE OR REPLACE FUNCTION bastion.verified_setting(name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN CASE
        WHEN name NOT IN ('app.tenant_id', 'app.user_id', 'app.role')
        THEN bastion_private.context_refused('not a tenant context setting')
        WHEN coalesce(current_setting('app.tenant_id', true), '') = '' THEN NULL
        WHEN pg_sequence_last_value(to_regclass('pg_temp.bastion_context_tag')) = {
    TAG.format(
        tenant="current_setting('app.tenant_id', true)",
        user="coalesce(current_setting('app.user_id', true), '')",
        role="coalesce(current_setting('app.role', true), '')",
    )
}
        THEN nullif(current_setting(name, true), '')
        ELSE bastion_private.context_refused()
    END;
END $$;

CREATE OR REPLACE FUNCTION bastion_private.announce_membership_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('bastion_memberships', '*');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('bastion_memberships', encode(sha256(convert_to(
            OLD.tenant_id || ':' || OLD.user_id, 'UTF8')), 'hex'));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('bastion_memberships', encode(sha256(convert_to(
            NEW.tenant_id || ':' || NEW.user_id, 'UTF8')), 'hex'));
    END IF;
    RETURN NULL;
END $$;

REVOKE EXECUTE ON FUNCTION bastion.context_open(), bastion.context_enter(uuid, uuid, text, text),
    bastion_private.context_refused(text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.context_open(), bastion.context_enter(uuid, uuid, text, text)
    TO bastion_app;
"""

DOWNGRADE = """
CREATE OR REPLACE FUNCTION bastion_private.announce_membership_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('bastion_memberships', '*');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('bastion_memberships', OLD.tenant_id || ':' || OLD.user_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('bastion_memberships', NEW.tenant_id || ':' || NEW.user_id);
    END IF;
    RETURN NULL;
END $$;
DROP FUNCTION bastion.context_enter(uuid, uuid, text, text);
DROP FUNCTION bastion.context_open();
DROP FUNCTION bastion_private.context_refused(text);
CREATE OR REPLACE FUNCTION bastion.verified_setting(name text) RETURNS text
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
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
