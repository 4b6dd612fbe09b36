"""Budgets exact across gateway processes: the database refuses an overshoot (CHECKLIST P3).

The budget row's invariants, enforced by the database itself for every
writer (not only by the conditional UPDATEs of ``billing/budgets.py``):

* A reservation — ``calls_reserved`` or ``tokens_reserved`` grows — must fit:
  ``used + reserved <= limit`` after it.
* Calls are used only out of what was reserved: ``calls_used`` grows by no
  more than ``calls_reserved`` shrinks in the same update, so no call is
  counted that no reservation held (tokens may exceed their estimate: a call
  settles what it really used).
* What is used never goes down.

A plain ``CHECK (calls_used + calls_reserved <= call_limit)`` would say the
same but also refuse a plan downgrade that lowers the limit below what is
already used (0005); comparing with the old row needs a trigger.

A reservation row closes once: a settled or released reservation never
changes again (no release counted twice, no settle after a release), and
while it is held only its expiry moves (a living gateway renews its leases).

Revision ID: 0018
Revises: 0017
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION bastion.budget_within_limits() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.calls_reserved <> 0 OR NEW.tokens_reserved <> 0
           OR NEW.calls_used > NEW.call_limit THEN
            RAISE EXCEPTION 'a budget starts with nothing reserved and within its limit'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'budget_within_limits';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.calls_used < OLD.calls_used OR NEW.tokens_used < OLD.tokens_used THEN
        RAISE EXCEPTION 'budget usage never goes down'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budget_within_limits';
    END IF;
    IF NEW.calls_used > OLD.calls_used
       AND NEW.calls_used - OLD.calls_used > OLD.calls_reserved - NEW.calls_reserved THEN
        RAISE EXCEPTION 'calls are used only out of what was reserved'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budget_within_limits';
    END IF;
    IF (NEW.calls_reserved > OLD.calls_reserved
        AND NEW.calls_used + NEW.calls_reserved > NEW.call_limit)
       OR (NEW.tokens_reserved > OLD.tokens_reserved
           AND NEW.tokens_used + NEW.tokens_reserved > NEW.token_limit) THEN
        RAISE EXCEPTION 'a reservation must fit within the budget'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budget_within_limits';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER budget_within_limits BEFORE INSERT OR UPDATE ON bastion.budgets
    FOR EACH ROW EXECUTE FUNCTION bastion.budget_within_limits();

CREATE FUNCTION bastion.budget_reservation_closes_once() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF OLD.status <> 'held' THEN
        RAISE EXCEPTION 'a closed reservation does not change'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budget_reservation_closes_once';
    END IF;
    IF NEW.id <> OLD.id OR NEW.tenant_id <> OLD.tenant_id
       OR NEW.period_start <> OLD.period_start OR NEW.calls <> OLD.calls
       OR NEW.tokens <> OLD.tokens OR NEW.created_at <> OLD.created_at
       OR (NEW.status = 'held' AND (NEW.calls_used IS NOT NULL
                                    OR NEW.tokens_used IS NOT NULL)) THEN
        RAISE EXCEPTION 'a held reservation only renews or closes'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budget_reservation_closes_once';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER budget_reservation_closes_once BEFORE UPDATE ON bastion.budget_reservations
    FOR EACH ROW EXECUTE FUNCTION bastion.budget_reservation_closes_once();
"""

DOWNGRADE = """
DROP TRIGGER budget_reservation_closes_once ON bastion.budget_reservations;
DROP FUNCTION bastion.budget_reservation_closes_once();
DROP TRIGGER budget_within_limits ON bastion.budgets;
DROP FUNCTION bastion.budget_within_limits();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
