"""Row-level security: each tenant sees only its own rows, whatever the SQL tries."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from bastion.db.pool import Database
from bastion.demo import probes
from bastion.demo.common import DemoTenant, Report, refused


async def check_isolation(report: Report, db: Database, tenants: list[DemoTenant]) -> None:
    for mine, other in ((tenants[0], tenants[1]), (tenants[1], tenants[0])):
        for role, user in mine.users.items():
            seen = await probes.visible_documents(db, mine.id, user, role)
            report.check(
                "isolation",
                f"{mine.slug} {role} sees only own tickets",
                seen == set(mine.tickets),
                f"{len(seen)} visible, {len(seen & set(other.tickets))} of {other.slug}",
            )
        owner = mine.users["owner"]

        async def by_id(
            tenant: DemoTenant = mine, who: UUID = owner, target: UUID = other.tickets[0]
        ) -> list[dict[str, Any]]:
            return await probes.document_by_id(db, tenant.id, who, "owner", target)

        report.check(
            "isolation",
            f"{mine.slug} owner asks for a {other.slug} ticket by id",
            await by_id() == [],
            "0 rows",
        )

        async def forge(
            tenant: DemoTenant = mine, who: UUID = owner, victim: DemoTenant = other
        ) -> None:
            await probes.forge_tenant_then_read(db, tenant.id, who, "owner", victim.id)

        refusal = await refused(forge)
        report.check(
            "isolation",
            f"{mine.slug}: injected set_config to {other.slug}",
            refusal is not None,
            f"refused ({refusal})",
        )

        async def plant(
            tenant: DemoTenant = mine, who: UUID = owner, victim: DemoTenant = other
        ) -> None:
            await probes.plant_document(db, tenant.id, who, "owner", victim.id)

        refusal = await refused(plant)
        report.check(
            "isolation",
            f"{mine.slug}: insert into {other.slug}",
            refusal is not None,
            f"refused by RLS ({refusal})",
        )

    viewer_tenant = tenants[0]

    async def viewer_write() -> None:
        await probes.plant_document(
            db, viewer_tenant.id, viewer_tenant.users["viewer"], "viewer", None
        )

    refusal = await refused(viewer_write)
    report.check(
        "isolation", "viewer writes a ticket", refusal is not None, f"refused by RLS ({refusal})"
    )
    row = await probes.documents_without_tenant(db)
    report.check("isolation", "query with no tenant set", row == {"n": 0}, "0 rows, no error")
