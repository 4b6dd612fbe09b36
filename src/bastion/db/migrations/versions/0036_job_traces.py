"""Jobs enqueued in SQL join their request's trace (issue 19 item 2).

``bastion.enqueue_ingest`` and ``bastion.enqueue_billing_drain`` insert the
procrastinate job in the caller's transaction, so the job's arguments were
theirs alone and the worker's span started a new trace. Each takes an
optional ``p_traceparent`` now (one signature: the old one is dropped, the
grants are given again): a well-formed W3C ``traceparent`` (version 00,
https://www.w3.org/TR/trace-context/ section 3.2) goes into the job's
arguments under ``traceparent``, where the worker takes it out before the task
runs (``bastion.worker.queue.traced_job``); anything else is left out (a
trace is a hint: never an error, never arbitrary text in the queue). Callers
inside the database (the webhook intake's ``PERFORM
bastion.enqueue_billing_drain(v_tenant)``) keep calling with one argument.

A drain already waiting for the tenant (its queueing lock) keeps the trace
of the request that queued it.

Revision ID: 0036
Revises: 0035
"""

from alembic import op

revision = "0036"
down_revision = "0035"
branch_labels = None
depends_on = None

# The job arguments' trace member: only a well-formed version-00 traceparent
# (lowercase hex, no all-zero trace or parent id; the worker checks it again).
TRACE = """CASE WHEN p_traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
                  AND substr(p_traceparent, 4, 32) <> repeat('0', 32)
                  AND substr(p_traceparent, 37, 16) <> repeat('0', 16)
             THEN jsonb_build_object('traceparent', p_traceparent)
             ELSE '{}'::jsonb END"""

BACKLOG = """-(SELECT count(*) FROM (SELECT 1 FROM procrastinate_jobs
                   WHERE lock = 'ingest:' || bastion.app_tenant_id()::text
                     AND task_name = 'knowledge.ingest'
                     AND status IN ('todo', 'doing') LIMIT 1000) AS pending)"""


def _functions(params_ingest: str, params_drain: str, trace: str) -> str:
    return f"""
CREATE FUNCTION bastion.enqueue_ingest({params_ingest}) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = procrastinate, pg_catalog, pg_temp AS $$
DECLARE
    job bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM bastion.documents d
                   WHERE d.id = p_document AND d.tenant_id = bastion.app_tenant_id()
                     AND d.status = 'pending'
                     AND bastion.app_role() IN ('owner', 'contributor', 'system')) THEN
        RAISE EXCEPTION 'no pending document % in this tenant', p_document
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, args)
        VALUES ('ingest', 'knowledge.ingest', {BACKLOG},
                'ingest:' || bastion.app_tenant_id()::text,
                jsonb_build_object('tenant_id', bastion.app_tenant_id(),
                                   'document_id', p_document,
                                   'user_id', bastion.app_user_id()) || {trace})
        RETURNING id INTO job;
    RETURN job;
END;
$$;

CREATE FUNCTION bastion.enqueue_billing_drain({params_drain}) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = procrastinate, pg_catalog, pg_temp AS $$
BEGIN
    IF NOT (bastion.app_is_platform()
            OR (bastion.app_tenant_id() = p_tenant AND bastion.app_role() = 'system')) THEN
        RAISE EXCEPTION 'enqueuing billing work needs the system role'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, queueing_lock, args)
        VALUES ('billing', 'billing.drain', 0, 'billing:' || p_tenant::text,
                'billing:' || p_tenant::text,
                jsonb_build_object('tenant_id', p_tenant) || {trace})
        ON CONFLICT (queueing_lock) WHERE status = 'todo' DO NOTHING;
END;
$$;
"""


def _grants(signatures: str) -> str:
    return f"""
REVOKE ALL ON FUNCTION {signatures} FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {signatures} TO bastion_app;
"""


UPGRADE = (
    "DROP FUNCTION bastion.enqueue_ingest(uuid);\n"
    "DROP FUNCTION bastion.enqueue_billing_drain(uuid);\n"
    + _functions(
        "p_document uuid, p_traceparent text DEFAULT NULL",
        "p_tenant uuid, p_traceparent text DEFAULT NULL",
        TRACE,
    )
    + _grants("bastion.enqueue_ingest(uuid, text), bastion.enqueue_billing_drain(uuid, text)")
)

DOWNGRADE = (
    "DROP FUNCTION bastion.enqueue_ingest(uuid, text);\n"
    "DROP FUNCTION bastion.enqueue_billing_drain(uuid, text);\n"
    + _functions("p_document uuid", "p_tenant uuid", "'{}'::jsonb")
    + _grants("bastion.enqueue_ingest(uuid), bastion.enqueue_billing_drain(uuid)")
)


def _run(sql: str) -> None:
    # psycopg itself, as in 0022: the text goes verbatim (the RAISE format's '%').
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    conn.execute(sql)


def upgrade() -> None:
    _run(UPGRADE)


def downgrade() -> None:
    _run(DOWNGRADE)
