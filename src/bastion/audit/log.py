"""Writing audit events in the same transaction as the change they record.

The table is append-only: a trigger refuses UPDATE, DELETE and TRUNCATE for
every role, and another assigns a gapless per-tenant ``seq`` under a row lock
and links the event into the tenant's hash chain, which hashes ``details`` as
RFC 8785 (JCS). The writer sends that text too (``details_jcs``); the database
uses it only when it parses to the value stored (migration 0038).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from bastion.db.pool import Conn
from bastion.jcs import canonicalize

_MAX_FIELD = 500
_INSERT = (
    "INSERT INTO bastion.audit_events (actor, action, target, details, request_id, details_jcs) "
    "VALUES (%s, %s, %s, %s::jsonb, %s, %s)"
)
# actor, action, target, details, request id
Event = tuple[str, str, str, Mapping[str, Any], str | None]


def _row(event: Event) -> tuple[str, str, str, str, str | None, str]:
    actor, action, target, details, request_id = event
    # JCS text is JSON: the value sent is the one spelling the chain hashes.
    text = canonicalize(dict(details)).decode()
    return (
        actor[:_MAX_FIELD],
        action[:_MAX_FIELD],
        target[:_MAX_FIELD],
        text,
        request_id,
        text,
    )


async def record(
    tx: Conn,
    *,
    actor: str,
    action: str,
    target: str = "",
    details: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> None:
    """Append one event to the current tenant's audit trail inside ``tx``.

    ``tx`` must be a connection inside :meth:`Database.tenant_tx`: the event
    belongs to that transaction's tenant and commits or rolls back with the
    change it records. ``details`` must hold identifiers, never secret values.
    The request id defaults to the one bound to the current request's logs.
    """
    if request_id is None:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
    await tx.execute(_INSERT, _row((actor, action, target, details or {}, request_id)))


async def recent(tx: Conn, limit: int = 100) -> list[dict[str, Any]]:
    """Return the newest ``limit`` events RLS lets ``tx`` see, newest first."""
    rows = await (
        await tx.execute(
            "SELECT seq, at, actor, action, target FROM bastion.audit_events "
            "ORDER BY seq DESC LIMIT %s",
            (limit,),
        )
    ).fetchall()
    return [dict(row) for row in rows]


async def events(
    tx: Conn, *, actions: Sequence[str] | None = None, target: str | None = None
) -> list[dict[str, Any]]:
    """Return the events RLS lets ``tx`` see, oldest first (``seq``, ``action``,
    ``target``, ``details``): only ``actions`` and ``target`` when given."""
    rows = await (
        await tx.execute(
            "SELECT seq, action, target, details FROM bastion.audit_events "
            "WHERE (%(actions)s::text[] IS NULL OR action = ANY(%(actions)s::text[])) "
            "AND (%(target)s::text IS NULL OR target = %(target)s::text) ORDER BY seq",
            {"actions": None if actions is None else list(actions), "target": target},
        )
    ).fetchall()
    return [dict(row) for row in rows]


async def record_many(tx: Conn, events: Sequence[Event]) -> None:
    """Append several events, in order, inside ``tx`` (one pipelined batch)."""
    if events:
        async with tx.cursor() as cur:
            await cur.executemany(_INSERT, [_row(event) for event in events])
