"""The audit hash chain and its signed checkpoints (issue 19, item 1).

Every event's ``hash`` is SHA-256 over the previous event's hash (32 zero
bytes for a tenant's first event) followed by the event's canonical encoding:
the RFC 8785 (JCS) serialisation of ``{"action", "actor", "at" (epoch
microseconds), "details", "request_id", "target", "tenant_id"}``. The insert
trigger computes it under the row lock of the tenant's ``audit_heads`` row, in
the same ``INSERT ... ON CONFLICT DO UPDATE`` that assigns ``seq``: no caller
can insert an event without a correct link, and no tenant waits on another
(there is one head per tenant, no global one). ``seq`` is not hashed: the
chain itself is the order, and each checkpoint binds a ``seq`` to a hash.

:func:`bastion_private.jcs` serialises a ``jsonb`` value exactly as
:func:`bastion.jcs.canonicalize` does (tests/test_audit_chain.py checks them
against each other): strings escaped as ``to_json`` does, numbers as
ECMAScript's ``Number.prototype.toString`` of the double, members sorted by
UTF-16 code units (section 3.2.3).

Checkpoints: ``bastion.audit_checkpoints`` is the global chain (one signed
statement per run, linked to the previous one); ``audit_tenant_checkpoints``
holds each tenant's signed head at that run, readable by the tenant's owners
and auditors. Both are append-only and written in the platform context only.

Revision ID: 0031
Revises: 0030
"""

from alembic import op

revision = "0031"
down_revision = "0030"
branch_labels = None
depends_on = None

GENESIS = "'\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea"
PLATFORM = "(SELECT bastion.app_is_platform())"

UPGRADE = f"""
-- ECMAScript Number::toString of the double nearest to n (RFC 8785 section 3.2.2.3).
CREATE FUNCTION bastion_private.jcs_number(n numeric) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp SET extra_float_digits = 1 AS $$
DECLARE
    d      float8;
    m      text[];
    digits text;
    k      int;
    e      int;
    sign   text := '';
BEGIN
    IF n = trunc(n) AND abs(n) <= 9007199254740992 THEN
        RETURN trunc(n)::text;  -- exact as a double: its integer digits
    END IF;
    d := n::float8;  -- correctly rounded
    IF d = 0 THEN
        RETURN '0';
    END IF;
    IF d < 0 THEN
        sign := '-';
        d := -d;
    END IF;
    -- float8 output with extra_float_digits >= 1: the shortest digits that
    -- round-trip; the value is 0.digits * 10^e once leading zeros are gone.
    m := regexp_match(d::text, '^([0-9]+)(\\.([0-9]+))?(e([-+][0-9]+))?$');
    digits := m[1] || coalesce(m[3], '');
    e := length(m[1]) + coalesce(m[5]::int, 0) - (length(digits) - length(ltrim(digits, '0')));
    digits := rtrim(ltrim(digits, '0'), '0');
    k := length(digits);
    IF k <= e AND e <= 21 THEN
        RETURN sign || digits || repeat('0', e - k);
    ELSIF 0 < e AND e <= 21 THEN
        RETURN sign || substr(digits, 1, e) || '.' || substr(digits, e + 1);
    ELSIF -6 < e AND e <= 0 THEN
        RETURN sign || '0.' || repeat('0', -e) || digits;
    END IF;
    RETURN sign || CASE WHEN k = 1 THEN digits
                        ELSE substr(digits, 1, 1) || '.' || substr(digits, 2) END
        || 'e' || CASE WHEN e - 1 >= 0 THEN '+' ELSE '-' END || abs(e - 1)::text;
END $$;

-- A member name as hex UTF-16 code units: ordering these (C collation) is
-- JCS's member order. Only used for objects with a name past U+DFFF, where
-- UTF-16 order and code point order differ.
CREATE FUNCTION bastion_private.jcs_utf16(k text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(string_agg(CASE WHEN c < 65536 THEN lpad(to_hex(c), 4, '0')
        ELSE to_hex(55296 + ((c - 65536) >> 10)) || to_hex(56320 + ((c - 65536) & 1023)) END,
        '' ORDER BY i), '')
    FROM (SELECT ascii(ch) AS c, i
          FROM unnest(string_to_array(k, NULL)) WITH ORDINALITY AS t(ch, i)) AS s
$$;

-- RFC 8785: the canonical serialisation of a jsonb value.
CREATE FUNCTION bastion_private.jcs(v jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kind text := jsonb_typeof(v);
    out  text;
BEGIN
    IF kind = 'object' THEN
        IF EXISTS (SELECT 1 FROM jsonb_object_keys(v) AS n(k)
                   WHERE k ~ '[\\uE000-\\U0010FFFF]') THEN
            SELECT string_agg(to_json(k)::text || ':' || bastion_private.jcs(x), ','
                              ORDER BY bastion_private.jcs_utf16(k) COLLATE "C")
            INTO out FROM jsonb_each(v) AS e(k, x);
        ELSE
            SELECT string_agg(to_json(k)::text || ':' || bastion_private.jcs(x), ','
                              ORDER BY k COLLATE "C")
            INTO out FROM jsonb_each(v) AS e(k, x);
        END IF;
        RETURN '{{' || coalesce(out, '') || '}}';
    ELSIF kind = 'array' THEN
        SELECT string_agg(bastion_private.jcs(x), ',' ORDER BY i)
        INTO out FROM jsonb_array_elements(v) WITH ORDINALITY AS a(x, i);
        RETURN '[' || coalesce(out, '') || ']';
    ELSIF kind = 'number' THEN
        RETURN bastion_private.jcs_number(v::numeric);
    END IF;
    RETURN v::text;  -- a string (escaped as to_json does), true, false or null
END $$;

-- The canonical encoding of one event (the chain's input after the previous hash).
CREATE FUNCTION bastion_private.audit_canonical(
    p_tenant uuid, p_at timestamptz, p_actor text, p_action text, p_target text,
    p_details jsonb, p_request_id text
) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT '{{"action":' || to_json(p_action)::text
        || ',"actor":' || to_json(p_actor)::text
        || ',"at":' || (extract(epoch FROM p_at) * 1000000)::bigint::text
        || ',"details":' || bastion_private.jcs(p_details)
        || ',"request_id":' || coalesce(to_json(p_request_id)::text, 'null')
        || ',"target":' || to_json(p_target)::text
        || ',"tenant_id":"' || p_tenant::text || '"}}'
$$;

-- seq and the link, in one statement under the head's row lock.
CREATE OR REPLACE FUNCTION bastion_private.audit_assign_seq() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    body bytea;
BEGIN
    NEW.at := now();
    body := convert_to(bastion_private.audit_canonical(NEW.tenant_id, NEW.at, NEW.actor,
        NEW.action, NEW.target, NEW.details, NEW.request_id), 'UTF8');
    INSERT INTO bastion.audit_heads AS h (tenant_id, seq, hash)
    VALUES (NEW.tenant_id, 1, sha256({GENESIS} || body))
    ON CONFLICT (tenant_id) DO UPDATE
        SET seq = h.seq + 1, hash = sha256(coalesce(h.hash, {GENESIS}) || body)
    RETURNING WITH (OLD AS o, NEW AS n) n.seq, coalesce(o.hash, {GENESIS}), n.hash
    INTO NEW.seq, NEW.prev_hash, NEW.hash;
    RETURN NEW;
END $$;

-- Events written before this migration join the chain, oldest first (RLS and
-- the append-only trigger held off for this one pass, inside the migration).
ALTER TABLE bastion.audit_events DISABLE TRIGGER audit_events_append_only;
ALTER TABLE bastion.audit_events NO FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_heads NO FORCE ROW LEVEL SECURITY;
DO $$
DECLARE
    r    record;
    prev bytea;
    cur  uuid;
BEGIN
    FOR r IN SELECT e.ctid AS id, e.* FROM bastion.audit_events e
             WHERE e.hash IS NULL ORDER BY e.tenant_id, e.seq LOOP
        IF cur IS DISTINCT FROM r.tenant_id THEN
            cur := r.tenant_id;
            prev := {GENESIS};
        END IF;
        UPDATE bastion.audit_events SET prev_hash = prev,
            hash = sha256(prev || convert_to(bastion_private.audit_canonical(r.tenant_id, r.at,
                r.actor, r.action, r.target, r.details, r.request_id), 'UTF8'))
        WHERE ctid = r.id RETURNING hash INTO prev;
        UPDATE bastion.audit_heads SET hash = prev WHERE tenant_id = cur;
    END LOOP;
END $$;
ALTER TABLE bastion.audit_events ENABLE TRIGGER audit_events_append_only;
ALTER TABLE bastion.audit_events FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_heads FORCE ROW LEVEL SECURITY;

-- The global chain of checkpoints: one signed statement (a compact JWS) per run.
CREATE TABLE bastion.audit_checkpoints (
    number bigint PRIMARY KEY CHECK (number > 0),
    at     timestamptz NOT NULL DEFAULT now(),
    jws    text NOT NULL CHECK (length(jws) <= 1000000)
);
-- Each tenant's signed head at that run.
CREATE TABLE bastion.audit_tenant_checkpoints (
    tenant_id uuid NOT NULL REFERENCES bastion.tenants (id),
    number    bigint NOT NULL REFERENCES bastion.audit_checkpoints (number),
    seq       bigint NOT NULL CHECK (seq > 0),
    hash      bytea NOT NULL CHECK (length(hash) = 32),
    jws       text NOT NULL CHECK (length(jws) <= 4096),
    PRIMARY KEY (tenant_id, number)
);
CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON bastion.audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION bastion_private.audit_append_only();
CREATE TRIGGER audit_tenant_checkpoints_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON bastion.audit_tenant_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION bastion_private.audit_append_only();

ALTER TABLE bastion.audit_checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_checkpoints FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_tenant_checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.audit_tenant_checkpoints FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_checkpoint_platform ON bastion.audit_checkpoints FOR ALL
    USING ({PLATFORM}) WITH CHECK ({PLATFORM});
CREATE POLICY audit_tenant_checkpoint_read ON bastion.audit_tenant_checkpoints FOR SELECT
    USING ({PLATFORM} OR (tenant_id = (SELECT bastion.app_tenant_id())
           AND (SELECT bastion.app_role()) IN ('owner', 'auditor', 'system')));
CREATE POLICY audit_tenant_checkpoint_write ON bastion.audit_tenant_checkpoints FOR INSERT
    WITH CHECK ({PLATFORM});
GRANT SELECT, INSERT ON bastion.audit_checkpoints, bastion.audit_tenant_checkpoints
    TO bastion_app;

-- Every tenant's head and the seq of its last checkpoint, for the platform
-- context only (the checkpointer and ``bastion audit verify``); it runs as
-- the schema owner, which alone may look across tenants.
CREATE POLICY audit_head_lookup ON bastion.audit_heads FOR SELECT TO CURRENT_USER USING (true);
CREATE POLICY audit_tenant_checkpoint_lookup ON bastion.audit_tenant_checkpoints
    FOR SELECT TO CURRENT_USER USING (true);
CREATE FUNCTION bastion.audit_heads_all()
RETURNS TABLE (tenant_id uuid, seq bigint, hash bytea, checkpoint_seq bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT h.tenant_id, h.seq, h.hash,
           (SELECT max(c.seq) FROM bastion.audit_tenant_checkpoints c
            WHERE c.tenant_id = h.tenant_id)
    FROM bastion.audit_heads h
    WHERE bastion.app_is_platform()
    ORDER BY h.tenant_id
$$;
REVOKE ALL ON FUNCTION bastion.audit_heads_all() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.audit_heads_all() TO bastion_app;
"""

DOWNGRADE = """
DROP FUNCTION bastion.audit_heads_all();
DROP POLICY audit_head_lookup ON bastion.audit_heads;
DROP TABLE bastion.audit_tenant_checkpoints, bastion.audit_checkpoints;
CREATE OR REPLACE FUNCTION bastion_private.audit_assign_seq() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO bastion.audit_heads AS h (tenant_id, seq) VALUES (NEW.tenant_id, 1)
    ON CONFLICT (tenant_id) DO UPDATE SET seq = h.seq + 1
    RETURNING h.seq INTO NEW.seq;
    NEW.at := now();
    RETURN NEW;
END $$;
DROP FUNCTION bastion_private.audit_canonical(uuid, timestamptz, text, text, text, jsonb, text);
DROP FUNCTION bastion_private.jcs(jsonb);
DROP FUNCTION bastion_private.jcs_utf16(text);
DROP FUNCTION bastion_private.jcs_number(numeric);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
