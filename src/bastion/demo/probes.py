"""Raw statements the demo sends past every service, on purpose.

The demo shows that the database itself holds the line: row-level security
hides and refuses other tenants' rows, and the audit trail refuses deletes,
even for code that skips the services. These statements are the one exception
to "every table is read and written only by its owner" (the ownership map in
docs/architecture.md): a service would never send them, and the point is that
the database refuses them anyway. Everything else in the demo goes through the
owners' services. The seeded tickets are bare rows (a clear title, no body) so
the probes have something to be refused.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from bastion.db.pool import Database


async def seed_tickets(
    db: Database, tenant_id: UUID, contributor: UUID, titles: list[str]
) -> list[UUID]:
    """Insert bare ticket rows as ``contributor``; return their ids."""
    ids = []
    async with db.tenant_tx(tenant_id, contributor, "contributor") as tx:
        for title in titles:
            cur = await tx.execute(
                "INSERT INTO bastion.documents (title, created_by) VALUES (%s, %s) RETURNING id",
                (title, contributor),
            )
            row = await cur.fetchone()
            assert row is not None
            ids.append(row["id"])
    return ids


async def visible_documents(db: Database, tenant_id: UUID, user: UUID, role: str) -> set[UUID]:
    """Every document id a bare SELECT returns in this context."""
    async with db.tenant_tx(tenant_id, user, role) as tx:
        rows = await (await tx.execute("SELECT id FROM bastion.documents")).fetchall()
    return {r["id"] for r in rows}


async def document_by_id(
    db: Database, tenant_id: UUID, user: UUID, role: str, document_id: UUID
) -> list[dict[str, Any]]:
    """The rows a bare SELECT by id returns in this context."""
    async with db.tenant_tx(tenant_id, user, role) as tx:
        cur = await tx.execute("SELECT * FROM bastion.documents WHERE id = %s", (document_id,))
        return await cur.fetchall()


async def forge_tenant_then_read(
    db: Database, tenant_id: UUID, user: UUID, role: str, victim: UUID
) -> None:
    """Overwrite the tenant setting with ``set_config``, then read documents."""
    async with db.tenant_tx(tenant_id, user, role) as tx:
        await tx.execute("SELECT set_config('app.tenant_id', %s, true)", (str(victim),))
        await tx.execute("SELECT * FROM bastion.documents")


async def plant_document(
    db: Database, tenant_id: UUID, user: UUID, role: str, victim: UUID | None
) -> None:
    """Insert a document naming ``victim`` as its tenant (None: the column's default)."""
    async with db.tenant_tx(tenant_id, user, role) as tx:
        if victim is None:
            await tx.execute("INSERT INTO bastion.documents (title) VALUES ('by a viewer')")
        else:
            await tx.execute(
                "INSERT INTO bastion.documents (tenant_id, title) VALUES (%s, 'planted')",
                (victim,),
            )


async def documents_without_tenant(db: Database) -> dict[str, Any] | None:
    """Count documents on a pooled connection that entered no tenant context."""
    async with db.pool.connection() as conn:
        return await (await conn.execute("SELECT count(*) AS n FROM bastion.documents")).fetchone()


async def delete_audit_trail(db: Database, tenant_id: UUID, user: UUID, role: str) -> None:
    """Delete the tenant's audit events."""
    async with db.tenant_tx(tenant_id, user, role) as tx:
        await tx.execute("DELETE FROM bastion.audit_events")
