"""Plan changes that need two operators (issue 13, finding 3).

The pattern of :mod:`bastion.access.approvals` (two-person approval of
admin-grade roles), for money: an operator may move a tenant *down* at once
(:meth:`BillingService.change_plan`), but a move up — a plan that costs or
gives more (:func:`bastion.billing.plans.is_upgrade`) granted without the
payment provider — is a pending request that a *different* operator approves
before it expires. So is a catalogue edit that gives a plan's subscribers
more for their money (:func:`bastion.billing.plans.edit_gives_more`).

Every step of a tenant's request writes an audit event in the tenant's
trail, in the transaction that makes it: the request, the approval (with
the plan change, its record and its budget) and a refused self-approval.
The database refuses a decision by the requester too (migration 0015).
Catalogue requests live in the platform context, which has no audit trail
of its own: the request row (who asked, who approved, when, what) is their
record.

Operators are named as the CLI names them (``operator:<login>``): the
control is as strong as the separation of the operators' accounts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb

from bastion.audit.log import record
from bastion.billing.errors import PlanApprovalRefused, PlanInactive
from bastion.billing.models import PLATFORM
from bastion.billing.plans import Plan, plan_by_code, write_plan
from bastion.billing.service import BillingService
from bastion.db.pool import Conn, Database

REQUEST_LIFETIME = timedelta(hours=24)

_COLUMNS = (
    "id, kind, tenant_id, plan_code, from_plan, reason, requested_by, created_at, "
    "expires_at, status, decided_by, decided_at"
)


@dataclass(frozen=True)
class PlanRequest:
    """A plan change waiting for (or decided by) a second operator."""

    id: UUID
    kind: str  # tenant-plan | catalogue
    tenant_id: UUID | None
    plan_code: str
    from_plan: str | None
    reason: str
    requested_by: str
    created_at: datetime
    expires_at: datetime
    status: str
    decided_by: str | None
    decided_at: datetime | None


def _refused(reason: str, message: str) -> PlanApprovalRefused:
    return PlanApprovalRefused(message, reason=reason)


class PlanApprovals:
    """Requests and approvals of plan changes that need two operators."""

    def __init__(
        self, db: Database, billing: BillingService, *, lifetime: timedelta = REQUEST_LIFETIME
    ) -> None:
        self.db = db
        self.billing = billing
        self.lifetime = lifetime

    async def request_tenant_plan(
        self, tenant_id: UUID, plan_code: str, *, operator: str, reason: str
    ) -> PlanRequest:
        """Ask for ``tenant_id`` to be put on ``plan_code`` once a second operator
        approves. Raises :class:`UnknownPlan` or :class:`PlanInactive` (nothing
        written)."""
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            plan = await plan_by_code(tx, plan_code)
            if not plan.active:
                raise PlanInactive("this plan is no longer offered")
            sub = await self.billing.read_subscription(tx, tenant_id)
            current = await self.billing.current_plan(tx, sub)
            cur = await tx.execute(
                "INSERT INTO bastion.plan_requests (kind, tenant_id, plan_code, from_plan, "
                "reason, requested_by, expires_at) VALUES ('tenant-plan', %s, %s, %s, %s, %s, %s) "
                f"RETURNING {_COLUMNS}",
                (
                    tenant_id,
                    plan.code,
                    current.code,
                    reason[:1000],
                    operator,
                    datetime.now(UTC) + self.lifetime,
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            await record(
                tx,
                actor=operator,
                action="billing.plan.requested",
                target=f"tenant:{tenant_id}",
                details={"from": current.code, "to": plan.code, "request": str(row["id"])},
            )
        return PlanRequest(**row)

    async def request_catalogue_edit(
        self, plan: Plan, *, operator: str, reason: str
    ) -> PlanRequest:
        """Ask for the catalogue's ``plan`` to be replaced by ``plan`` once a second
        operator approves."""
        proposed = {**dataclasses.asdict(plan), "models_allowed": list(plan.models_allowed)}
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "INSERT INTO bastion.plan_requests (kind, plan_code, proposed, reason, "
                "requested_by, expires_at) VALUES ('catalogue', %s, %s, %s, %s, %s) "
                f"RETURNING {_COLUMNS}",
                (
                    plan.code,
                    Jsonb(proposed),
                    reason[:1000],
                    operator,
                    datetime.now(UTC) + self.lifetime,
                ),
            )
            row = await cur.fetchone()
        assert row is not None
        return PlanRequest(**row)

    async def pending(self) -> list[PlanRequest]:
        """Every request still waiting for a second operator, oldest first."""
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                f"SELECT {_COLUMNS} FROM bastion.plan_requests WHERE status = 'pending' "
                "AND expires_at > now() ORDER BY created_at"
            )
            return [PlanRequest(**row) for row in await cur.fetchall()]

    async def approve(self, request_id: UUID, *, operator: str) -> PlanRequest:
        """Approve a pending request as a second operator and apply it.

        Raises :class:`PlanApprovalRefused` with ``reason``: ``not-found``,
        ``self-approval`` (audited in the tenant's trail), ``decided``,
        ``expired``, ``plan-inactive`` (the plan was withdrawn meanwhile) or
        ``plan-changed`` (the tenant's plan moved since the request: ask again).
        """
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            cur = await tx.execute(
                "SELECT kind, tenant_id FROM bastion.plan_requests WHERE id = %s", (request_id,)
            )
            found = await cur.fetchone()
        if found is None:
            raise _refused("not-found", "no such plan request")
        if found["kind"] == "catalogue":
            return await self._approve_catalogue(request_id, operator)
        return await self._approve_tenant_plan(found["tenant_id"], request_id, operator)

    @staticmethod
    async def _lock(tx: Conn, request_id: UUID) -> dict[str, Any]:
        cur = await tx.execute(
            f"SELECT {_COLUMNS}, proposed FROM bastion.plan_requests WHERE id = %s FOR UPDATE",
            (request_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise _refused("not-found", "no such plan request")
        return row

    @staticmethod
    def _check(row: dict[str, Any], operator: str) -> PlanApprovalRefused | None:
        if row["requested_by"] == operator:
            return _refused("self-approval", "a second operator must approve this request")
        if row["status"] != "pending":
            return _refused("decided", f"the request is already {row['status']}")
        if row["expires_at"] <= datetime.now(UTC):
            return _refused("expired", "the request has expired; ask again")
        return None

    @staticmethod
    async def _decide(tx: Conn, request_id: UUID, operator: str) -> PlanRequest:
        cur = await tx.execute(
            "UPDATE bastion.plan_requests SET status = 'approved', decided_by = %s, "
            f"decided_at = now() WHERE id = %s RETURNING {_COLUMNS}",
            (operator, request_id),
        )
        row = await cur.fetchone()
        assert row is not None
        return PlanRequest(**row)

    async def _approve_tenant_plan(
        self, tenant_id: UUID, request_id: UUID, operator: str
    ) -> PlanRequest:
        decided: PlanRequest | None = None
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            row = await self._lock(tx, request_id)
            refusal = self._check(row, operator)
            if refusal is not None:
                if refusal.extensions.get("reason") == "self-approval":
                    await record(
                        tx,
                        actor=operator,
                        action="billing.plan.approval_refused",
                        target=f"tenant:{tenant_id}",
                        details={"request": str(request_id), "reason": "self-approval"},
                    )
            else:
                plan = await plan_by_code(tx, row["plan_code"])
                sub = await self.billing.read_subscription(tx, tenant_id, lock=True)
                current = await self.billing.current_plan(tx, sub)
                if not plan.active:
                    raise _refused("plan-inactive", "the plan is no longer offered")
                if current.code != row["from_plan"]:
                    raise _refused("plan-changed", "the tenant's plan changed since; ask again")
                await self.billing.assign(
                    tx,
                    tenant_id,
                    sub,
                    plan,
                    actor=operator,
                    reason=f"{row['reason']} (requested by {row['requested_by']})",
                    source="operator",
                )
                decided = await self._decide(tx, request_id, operator)
                await record(
                    tx,
                    actor=operator,
                    action="billing.plan.approved",
                    target=f"tenant:{tenant_id}",
                    details={
                        "request": str(request_id),
                        "to": plan.code,
                        "requested_by": row["requested_by"],
                    },
                )
        if refusal is not None:
            raise refusal
        assert decided is not None
        return decided

    async def _approve_catalogue(self, request_id: UUID, operator: str) -> PlanRequest:
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            row = await self._lock(tx, request_id)
            refusal = self._check(row, operator)
            if refusal is not None:
                raise refusal
            proposed = dict(row["proposed"])
            plan = Plan.from_row(proposed)
            await write_plan(tx, plan, actor=f"{row['requested_by']}+{operator}")
            return await self._decide(tx, request_id, operator)
