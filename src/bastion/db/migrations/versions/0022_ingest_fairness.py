"""Ingestion is fair across tenants (issue 23, A2).

``bastion.enqueue_ingest`` gave each job its document's id as procrastinate
``lock`` and priority 0, so one tenant's hundred uploads could fill every
ingest slot of the worker, first come first served, and every other tenant
waited behind all of them. Now:

- the lock is the tenant's (``ingest:<tenant>``): procrastinate runs the
  jobs of one lock one at a time and skips the others while one runs
  (``procrastinate_fetch_job_v2``), so a tenant holds at most one ingest slot;
- a job's priority is minus the number of its tenant's ingest jobs already
  waiting or running (capped): procrastinate takes the highest priority
  first, so each tenant's next job competes with every other tenant's next
  job, round robin, and a tenant with nothing queued goes first. A newcomer
  waits for at most one job of each busy tenant, however many they queued.

Two runs of one document stay apart, as before (same tenant, same lock).
Jobs already waiting take the new lock. A partial index finds a tenant's
pending ingest jobs without scanning the queue.

A worker that found only locked jobs sleeps until a job is inserted (a
NOTIFY) or its polling interval ends (5 s): the end of a tenant's job
released its lock, but told no one, and a tenant's next document waited
5 s. A trigger now sends procrastinate's "job inserted" notification on the
job's queue when a job holding a lock leaves ``doing`` (finished, failed,
retried or deleted), so the next job of that lock starts at once.

Revision ID: 0022
Revises: 0021
"""

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def _enqueue_ingest(lock: str, priority: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION bastion.enqueue_ingest(p_document uuid) RETURNS bigint
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
        VALUES ('ingest', 'knowledge.ingest', {priority}, {lock},
                jsonb_build_object('tenant_id', bastion.app_tenant_id(),
                                   'document_id', p_document,
                                   'user_id', bastion.app_user_id()))
        RETURNING id INTO job;
    RETURN job;
END;
$$;
"""


# Minus the tenant's pending ingest jobs, counted up to 1,000.
BACKLOG = """-(SELECT count(*) FROM (SELECT 1 FROM procrastinate_jobs
                   WHERE lock = 'ingest:' || bastion.app_tenant_id()::text
                     AND task_name = 'knowledge.ingest'
                     AND status IN ('todo', 'doing') LIMIT 1000) AS pending)"""

LOCK_RELEASED = """
CREATE FUNCTION procrastinate.bastion_notify_lock_released() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    payload text := json_build_object('type', 'job_inserted', 'job_id', OLD.id)::text;
BEGIN
    PERFORM pg_notify('procrastinate_queue_v1#' || OLD.queue_name, payload);
    PERFORM pg_notify('procrastinate_any_queue_v1', payload);
    RETURN NULL;
END;
$$;
CREATE TRIGGER bastion_notify_lock_released_on_update
    AFTER UPDATE OF status ON procrastinate.procrastinate_jobs
    FOR EACH ROW WHEN (OLD.status = 'doing' AND NEW.status <> 'doing' AND OLD.lock IS NOT NULL)
    EXECUTE FUNCTION procrastinate.bastion_notify_lock_released();
CREATE TRIGGER bastion_notify_lock_released_on_delete
    AFTER DELETE ON procrastinate.procrastinate_jobs
    FOR EACH ROW WHEN (OLD.status = 'doing' AND OLD.lock IS NOT NULL)
    EXECUTE FUNCTION procrastinate.bastion_notify_lock_released();
"""

UPGRADE = (
    LOCK_RELEASED
    + """
CREATE INDEX bastion_ingest_pending_lock_idx ON procrastinate.procrastinate_jobs (lock)
    WHERE task_name = 'knowledge.ingest' AND status IN ('todo', 'doing');
"""
    + _enqueue_ingest("'ingest:' || bastion.app_tenant_id()::text", BACKLOG)
    + """
UPDATE procrastinate.procrastinate_jobs SET lock = 'ingest:' || (args->>'tenant_id')
    WHERE task_name = 'knowledge.ingest' AND status = 'todo';
"""
)

DOWNGRADE = (
    _enqueue_ingest("p_document::text", "0")
    + """
DROP INDEX procrastinate.bastion_ingest_pending_lock_idx;
DROP TRIGGER bastion_notify_lock_released_on_update ON procrastinate.procrastinate_jobs;
DROP TRIGGER bastion_notify_lock_released_on_delete ON procrastinate.procrastinate_jobs;
DROP FUNCTION procrastinate.bastion_notify_lock_released();
UPDATE procrastinate.procrastinate_jobs SET lock = args->>'document_id'
    WHERE task_name = 'knowledge.ingest' AND status = 'todo';
"""
)


def _run(sql: str) -> None:
    # psycopg itself, as in 0004: the text goes verbatim (the RAISE format's '%').
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    conn.execute(sql)


def upgrade() -> None:
    _run(UPGRADE)


def downgrade() -> None:
    _run(DOWNGRADE)
