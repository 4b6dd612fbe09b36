"""The audit trail: gapless per tenant, and not even an owner can delete it."""

from __future__ import annotations

from bastion import audit
from bastion.db.pool import Database
from bastion.demo import probes
from bastion.demo.common import DemoTenant, Report, refused


async def check_audit(report: Report, db: Database, tenants: list[DemoTenant]) -> None:
    for tenant in tenants:
        async with db.tenant_tx(tenant.id, tenant.users["auditor"], "auditor") as tx:
            rows = await audit.events(tx)
        seqs = [r["seq"] for r in rows]
        report.check(
            "audit",
            f"{tenant.slug} audit trail, gapless",
            seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 0,
            f"{len(rows)} events: " + ", ".join(sorted({r["action"] for r in rows})),
        )

    async def tamper(tenant: DemoTenant = tenants[0]) -> None:
        await probes.delete_audit_trail(db, tenant.id, tenant.users["owner"], "owner")

    refusal = await refused(tamper)
    report.check("audit", "owner deletes audit events", refusal is not None, f"refused ({refusal})")
