"""The platform's record of refused internal calls (``bastion.workload_refusals``).

Written in the platform context as the system role: a refusal belongs to no
tenant. Identifiers only — the presented SPIFFE ID, the route template, the
peer's address — never a certificate or a key.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from bastion.db.pool import Database

PLATFORM = UUID(int=0)


async def record(
    db: Database,
    *,
    listener: str,
    route: str,
    reason: str,
    presented_id: str | None,
    peer: str | None,
) -> None:
    """Append one refusal."""
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        await tx.execute(
            "INSERT INTO bastion.workload_refusals (listener, route, reason, presented_id, peer) "
            "VALUES (%s, %s, %s, %s, %s)",
            (listener[:64], route[:200], reason[:64], (presented_id or None), peer),
        )


async def recent(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` refusals, newest first."""
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        rows = await (
            await tx.execute(
                "SELECT at, listener, route, reason, presented_id, peer "
                "FROM bastion.workload_refusals ORDER BY id DESC LIMIT %s",
                (limit,),
            )
        ).fetchall()
    return [dict(row) for row in rows]
