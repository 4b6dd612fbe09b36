"""Row-level security: each tenant sees only its own rows, whatever the SQL tries."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from bastion.db.pool import Database
from bastion.demo.common import DemoTenant, Report, refused


async def check_isolation(report: Report, db: Database, tenants: list[DemoTenant]) -> None:
    for mine, other in ((tenants[0], tenants[1]), (tenants[1], tenants[0])):
        for role, user in mine.users.items():
            async with db.tenant_tx(mine.id, user, role) as tx:
                rows = await (await tx.execute("SELECT id FROM bastion.documents")).fetchall()
            seen = {r["id"] for r in rows}
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
            async with db.tenant_tx(tenant.id, who, "owner") as tx:
                cur = await tx.execute("SELECT * FROM bastion.documents WHERE id = %s", (target,))
                return await cur.fetchall()

        report.check(
            "isolation",
            f"{mine.slug} owner asks for a {other.slug} ticket by id",
            await by_id() == [],
            "0 rows",
        )

        async def forge(
            tenant: DemoTenant = mine, who: UUID = owner, victim: DemoTenant = other
        ) -> None:
            async with db.tenant_tx(tenant.id, who, "owner") as tx:
                await tx.execute("SELECT set_config('app.tenant_id', %s, true)", (str(victim.id),))
                await tx.execute("SELECT * FROM bastion.documents")

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
            async with db.tenant_tx(tenant.id, who, "owner") as tx:
                await tx.execute(
                    "INSERT INTO bastion.documents (tenant_id, title) VALUES (%s, 'planted')",
                    (victim.id,),
                )

        refusal = await refused(plant)
        report.check(
            "isolation",
            f"{mine.slug}: insert into {other.slug}",
            refusal is not None,
            f"refused by RLS ({refusal})",
        )

    viewer_tenant = tenants[0]

    async def viewer_write() -> None:
        async with db.tenant_tx(viewer_tenant.id, viewer_tenant.users["viewer"], "viewer") as tx:
            await tx.execute("INSERT INTO bastion.documents (title) VALUES ('by a viewer')")

    refusal = await refused(viewer_write)
    report.check(
        "isolation", "viewer writes a ticket", refusal is not None, f"refused by RLS ({refusal})"
    )
    async with db.pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) AS n FROM bastion.documents")).fetchone()
    report.check("isolation", "query with no tenant set", row == {"n": 0}, "0 rows, no error")
