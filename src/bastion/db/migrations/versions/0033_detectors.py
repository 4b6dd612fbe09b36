"""Live detectors: their read position in the audit trail, and their firings (issue 19 items 4-5).

The detectors tail ``audit_events`` tenant by tenant. A tenant's ``seq`` is
assigned under its ``audit_heads`` row lock, held until commit, so a tenant's
committed events always form a gapless prefix ``1..n``: a cursor per tenant
(``detector_cursors.seq``, the last event processed) is an exact position. A
batch's firings and its cursor advance commit in one transaction, so a
detector that crashes resumes at the last committed position, with no event
missed and none processed twice. The cursors start at the heads of today's
trails (history before the detectors were installed is not judged); a tenant
created later starts at 0.

``detector_firings`` holds each rule that fired: why (``reason``,
``evidence``), the first event's time (detection latency), the response it
asked for and when that ran, the alert delivery, and an operator's undo. Both
tables are written in the platform context only; a tenant's owners and
auditors read their own firings.

The SECURITY DEFINER functions read across tenants for the platform context
only (as ``audit_heads_all`` does): the next batch past the cursors, the
events just before the cursors (to rebuild the rules' windows after a
restart), and the hourly spend of ``model.invoke`` events (the spend
baseline). ``audit_event_wakeup`` NOTIFYs ``bastion_audit`` on each commit
that added events (one announcement per statement, no payload: a wake-up, the
cursors are the truth).

Revision ID: 0033
Revises: 0032
"""

from alembic import op

revision = "0033"
down_revision = "0032"
branch_labels = None
depends_on = None

PLATFORM = "(SELECT bastion.app_is_platform())"

UPGRADE = f"""
CREATE TABLE bastion.detector_cursors (
    tenant_id  uuid PRIMARY KEY REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    seq        bigint NOT NULL CHECK (seq >= 0),
    malformed  bigint NOT NULL DEFAULT 0 CHECK (malformed >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bastion.detector_cursors (tenant_id, seq)
    SELECT tenant_id, seq FROM bastion.audit_heads;

CREATE TABLE bastion.detector_firings (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    rule         text NOT NULL CHECK (rule ~ '^[a-z][a-z_.]{{0,63}}$'),
    subject      text NOT NULL CHECK (length(subject) <= 500),
    reason       text NOT NULL CHECK (length(reason) <= 2000),
    evidence     jsonb NOT NULL DEFAULT '{{}}',
    first_seq    bigint NOT NULL,
    first_at     timestamptz NOT NULL,
    fired_at     timestamptz NOT NULL DEFAULT now(),
    actions      text[] NOT NULL,
    user_id      uuid,
    responded_at timestamptz,
    response     jsonb,
    alerted_at   timestamptz,
    alert_tries  integer NOT NULL DEFAULT 0,
    undone_at    timestamptz,
    undone_by    text CHECK (length(undone_by) <= 200)
);
CREATE INDEX detector_firings_pending ON bastion.detector_firings (id)
    WHERE responded_at IS NULL;
CREATE INDEX detector_firings_unalerted ON bastion.detector_firings (id)
    WHERE alerted_at IS NULL;
CREATE INDEX detector_firings_recent ON bastion.detector_firings (fired_at);
-- The spend baseline reads one tenant's model calls by time.
CREATE INDEX audit_events_action_at ON bastion.audit_events (action, at);

ALTER TABLE bastion.detector_cursors ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.detector_cursors FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.detector_firings ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.detector_firings FORCE ROW LEVEL SECURITY;
CREATE POLICY detector_cursor_platform ON bastion.detector_cursors FOR ALL
    USING ({PLATFORM}) WITH CHECK ({PLATFORM});
CREATE POLICY detector_firing_platform ON bastion.detector_firings FOR ALL
    USING ({PLATFORM}) WITH CHECK ({PLATFORM});
CREATE POLICY detector_firing_read ON bastion.detector_firings FOR SELECT
    USING (tenant_id = (SELECT bastion.app_tenant_id())
           AND (SELECT bastion.app_role()) IN ('owner', 'auditor'));
GRANT SELECT, INSERT, UPDATE ON bastion.detector_cursors, bastion.detector_firings
    TO bastion_app;

-- The definer functions below read every tenant's events (platform only).
CREATE POLICY audit_event_detector_lookup ON bastion.audit_events FOR SELECT
    TO CURRENT_USER USING (true);
CREATE POLICY detector_cursor_lookup ON bastion.detector_cursors FOR SELECT
    TO CURRENT_USER USING (true);

-- The next events past each tenant's cursor: at most p_per_tenant of each of
-- at most p_tenants tenants (a prefix of each tenant's trail), with the
-- cursor each batch was read against.
CREATE FUNCTION bastion.detector_batch(p_per_tenant integer, p_tenants integer)
RETURNS TABLE (tenant_id uuid, cursor_seq bigint, seq bigint, at timestamptz, actor text,
               action text, target text, details jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH behind AS (
        SELECT h.tenant_id, coalesce(c.seq, 0) AS cursor_seq
        FROM bastion.audit_heads h
        LEFT JOIN bastion.detector_cursors c ON c.tenant_id = h.tenant_id
        WHERE bastion.app_is_platform() AND h.seq > coalesce(c.seq, 0)
        ORDER BY coalesce(c.updated_at, '-infinity'::timestamptz), h.tenant_id
        LIMIT p_tenants
    )
    SELECT b.tenant_id, b.cursor_seq, e.seq, e.at, e.actor, e.action, e.target, e.details
    FROM behind b
    CROSS JOIN LATERAL (
        SELECT a.seq, a.at, a.actor, a.action, a.target, a.details
        FROM bastion.audit_events a
        WHERE a.tenant_id = b.tenant_id AND a.seq > b.cursor_seq
        ORDER BY a.seq LIMIT p_per_tenant
    ) e
    ORDER BY b.tenant_id, e.seq
$$;

-- Events already processed (at or before the cursors) since p_since, of the
-- given actions: what the rules' windows held before a restart.
CREATE FUNCTION bastion.detector_history(p_since timestamptz, p_actions text[])
RETURNS TABLE (tenant_id uuid, seq bigint, at timestamptz, actor text,
               action text, target text, details jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.tenant_id, a.seq, a.at, a.actor, a.action, a.target, a.details
    FROM bastion.audit_events a
    JOIN bastion.detector_cursors c ON c.tenant_id = a.tenant_id AND a.seq <= c.seq
    WHERE bastion.app_is_platform() AND a.at >= p_since AND a.action = ANY (p_actions)
    ORDER BY a.at, a.tenant_id, a.seq
$$;

-- Hourly model spend (integer micro-USD) per tenant, actor and model since
-- p_since, of the events already processed: the spend baseline after a restart.
CREATE FUNCTION bastion.detector_spend_hours(p_since timestamptz)
RETURNS TABLE (tenant_id uuid, actor text, model text, hour timestamptz, micro_usd bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.tenant_id, a.actor, a.target, date_trunc('hour', a.at),
           sum(CASE WHEN jsonb_typeof(a.details -> 'cost_micro_usd') = 'number'
                    THEN greatest(trunc((a.details ->> 'cost_micro_usd')::numeric), 0)
                    ELSE 0 END)::bigint
    FROM bastion.audit_events a
    JOIN bastion.detector_cursors c ON c.tenant_id = a.tenant_id AND a.seq <= c.seq
    WHERE bastion.app_is_platform() AND a.action = 'model.invoke' AND a.at >= p_since
    GROUP BY 1, 2, 3, 4
$$;

REVOKE ALL ON FUNCTION bastion.detector_batch(integer, integer),
    bastion.detector_history(timestamptz, text[]),
    bastion.detector_spend_hours(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.detector_batch(integer, integer),
    bastion.detector_history(timestamptz, text[]),
    bastion.detector_spend_hours(timestamptz) TO bastion_app;

-- A wake-up for the detectors each time events commit (the payload is empty:
-- the cursors, not the announcements, say what is new).
CREATE FUNCTION bastion_private.audit_event_wakeup() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('bastion_audit', '');
    RETURN NULL;
END $$;
CREATE TRIGGER audit_events_wakeup AFTER INSERT ON bastion.audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION bastion_private.audit_event_wakeup();
"""

DOWNGRADE = """
DROP TRIGGER audit_events_wakeup ON bastion.audit_events;
DROP FUNCTION bastion_private.audit_event_wakeup();
DROP FUNCTION bastion.detector_spend_hours(timestamptz);
DROP FUNCTION bastion.detector_history(timestamptz, text[]);
DROP FUNCTION bastion.detector_batch(integer, integer);
DROP POLICY audit_event_detector_lookup ON bastion.audit_events;
DROP INDEX bastion.audit_events_action_at;
DROP TABLE bastion.detector_firings, bastion.detector_cursors;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
