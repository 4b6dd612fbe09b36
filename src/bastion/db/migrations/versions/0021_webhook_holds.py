"""Webhook events are held only while webhooks are paused (issue 23, finding 8).

Pausing is store-and-ack: while ``webhook_control.paused`` is true, stored
events are ``held``; a resume queues every held event. That is exactly once
only if no event becomes ``held`` after the resume has collected them, so
every writer that decides ``held`` must read the flag under the lock the
resume waits for (``FOR KEY SHARE`` on the control row; a resume takes it
``FOR UPDATE``). The intake and the drain did; routing an unrouted event did
not (its ``UPDATE … FROM webhook_control`` read the flag from its snapshot,
unlocked), and an event it held while a resume ran stayed held for good.

The service now takes the lock there too (:mod:`bastion.billing.service`),
and this trigger makes it true of any writer, present or future, manual SQL
included: a row written as ``held`` reads the flag under that lock, and when
webhooks are not paused it is queued instead, its tenant's drain enqueued in
the same transaction (an event with no tenant is ``unrouted``). The worker's
sweep also queues any held event while webhooks run
(:meth:`BillingService.release_held`).

Revision ID: 0021
Revises: 0020
"""

from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION bastion.webhook_hold_only_while_paused() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_paused boolean;
BEGIN
    -- KEY SHARE, as the intake and the drain: a resume (FOR UPDATE) waits for
    -- this transaction, so it collects this row if the flag said "paused".
    SELECT c.paused INTO v_paused FROM bastion.webhook_control c WHERE c.id = 1 FOR KEY SHARE;
    IF v_paused IS DISTINCT FROM false THEN
        RETURN NEW;  -- paused (or no control row: fail closed, keep it held)
    END IF;
    IF NEW.tenant_id IS NULL THEN
        NEW.status := 'unrouted';
    ELSE
        NEW.status := 'queued';
        PERFORM bastion.enqueue_billing_drain(NEW.tenant_id);
    END IF;
    RETURN NEW;
END $$;
REVOKE EXECUTE ON FUNCTION bastion.webhook_hold_only_while_paused() FROM PUBLIC;

CREATE TRIGGER webhook_events_hold_only_while_paused
    BEFORE INSERT OR UPDATE OF status ON bastion.webhook_events
    FOR EACH ROW WHEN (NEW.status = 'held')
    EXECUTE FUNCTION bastion.webhook_hold_only_while_paused();
"""

DOWNGRADE = """
DROP TRIGGER webhook_events_hold_only_while_paused ON bastion.webhook_events;
DROP FUNCTION bastion.webhook_hold_only_while_paused();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
