"""The detectors' tables (migration 0033): cursors, firings, and the trail they read.

Everything here runs in the platform context (the platform tenant, role
``system``): the cursors and firings are platform rows, and the trail is
read across tenants through the migration's definer functions, which answer
the platform context only.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

from psycopg.types.json import Jsonb

from bastion import audit
from bastion.db.pool import Conn, Database
from bastion.detectors.rules import Event, Finding

PLATFORM = UUID(int=0)


class StaleCursor(RuntimeError):
    """Another runner moved a cursor since this batch was read: nothing was written."""


@dataclass(frozen=True, slots=True)
class Batch:
    """The next events past the cursors, and the cursors they were read against."""

    events: list[Event]
    cursors: dict[UUID, int]  # tenant -> cursor the batch starts after
    heads: dict[UUID, int]  # tenant -> last seq in the batch


@dataclass(frozen=True, slots=True)
class Firing:
    id: int
    tenant_id: UUID
    rule: str
    subject: str
    reason: str
    evidence: dict[str, Any]
    first_at: datetime
    fired_at: datetime
    actions: tuple[str, ...]
    user_id: UUID | None
    responded_at: datetime | None
    response: dict[str, Any] | None
    alerted_at: datetime | None
    alert_tries: int
    undone_at: datetime | None
    undone_by: str | None


_FIRING_COLUMNS = (
    "id, tenant_id, rule, subject, reason, evidence, first_at, fired_at, actions, user_id, "
    "responded_at, response, alerted_at, alert_tries, undone_at, undone_by"
)


def _firing(row: dict[str, Any]) -> Firing:
    return Firing(**{**row, "actions": tuple(row["actions"])})


def _event(row: dict[str, Any]) -> Event:
    return Event(
        row["tenant_id"],
        row["seq"],
        row["at"],
        row["actor"],
        row["action"],
        row["target"],
        cast(Any, row["details"]),  # any JSON: the rules check its shape
    )


class DetectorStore:
    """Reads the trail for the runner and writes its firings and cursors."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _tx(self) -> AbstractAsyncContextManager[Conn]:
        return self.db.tenant_tx(PLATFORM, None, "system")

    async def next_batch(self, *, per_tenant: int, tenants: int) -> Batch:
        """Up to ``per_tenant`` committed events of up to ``tenants`` tenants past
        their cursors: each tenant's events a gapless run starting at its cursor."""
        async with self._tx() as tx:
            rows = await (
                await tx.execute(
                    "SELECT * FROM bastion.detector_batch(%s, %s)", (per_tenant, tenants)
                )
            ).fetchall()
        cursors: dict[UUID, int] = {}
        heads: dict[UUID, int] = {}
        events = []
        for row in rows:
            cursors.setdefault(row["tenant_id"], row["cursor_seq"])
            heads[row["tenant_id"]] = row["seq"]
            events.append(_event(row))
        return Batch(events, cursors, heads)

    async def history(self, since: datetime, actions: Sequence[str]) -> list[Event]:
        """The events already processed since ``since`` of ``actions``, by time."""
        async with self._tx() as tx:
            rows = await (
                await tx.execute(
                    "SELECT * FROM bastion.detector_history(%s, %s)", (since, list(actions))
                )
            ).fetchall()
        return [_event(row) for row in rows]

    async def spend_hours(self, since: datetime) -> list[dict[str, Any]]:
        """Hourly model spend already processed since ``since`` (tenant, actor, model)."""
        async with self._tx() as tx:
            return await (
                await tx.execute("SELECT * FROM bastion.detector_spend_hours(%s)", (since,))
            ).fetchall()

    async def recent_firings(self, since: datetime) -> list[tuple[str, UUID, str, datetime]]:
        """(rule, tenant, subject, time of its last event) of firings since ``since``."""
        async with self._tx() as tx:
            rows = await (
                await tx.execute(
                    "SELECT rule, tenant_id, subject, max(fired_at) AS at "
                    "FROM bastion.detector_firings WHERE fired_at >= %s "
                    "GROUP BY rule, tenant_id, subject",
                    (since,),
                )
            ).fetchall()
        return [(r["rule"], r["tenant_id"], r["subject"], r["at"]) for r in rows]

    async def commit(
        self, batch: Batch, findings: Sequence[Finding], malformed: dict[UUID, int]
    ) -> list[int]:
        """Write ``findings`` and move every cursor of ``batch`` past it, in one
        transaction; return the firings' ids. Raises :class:`StaleCursor` (and
        writes nothing) when a cursor is no longer where the batch began."""
        tenants = list(batch.heads)
        async with self._tx() as tx:
            moved = await (
                await tx.execute(
                    "WITH input AS (SELECT * FROM unnest(%s::uuid[], %s::bigint[], "
                    "%s::bigint[], %s::bigint[]) AS i(tenant_id, expected, seq, malformed)) "
                    "INSERT INTO bastion.detector_cursors AS c (tenant_id, seq, malformed) "
                    "SELECT tenant_id, seq, malformed FROM input "
                    "ON CONFLICT (tenant_id) DO UPDATE SET seq = EXCLUDED.seq, "
                    "malformed = c.malformed + EXCLUDED.malformed, updated_at = now() "
                    "WHERE c.seq = (SELECT i.expected FROM input i "
                    "WHERE i.tenant_id = c.tenant_id) "
                    "RETURNING c.tenant_id",
                    (
                        tenants,
                        [batch.cursors[t] for t in tenants],
                        [batch.heads[t] for t in tenants],
                        [malformed.get(t, 0) for t in tenants],
                    ),
                )
            ).fetchall()
            if len(moved) != len(tenants):
                raise StaleCursor("another detector runner processed these events")
            ids = []
            for finding in findings:
                ids.append(await self._insert(tx, finding))
            return ids

    @staticmethod
    async def _insert(tx: Conn, finding: Finding) -> int:
        row = await (
            await tx.execute(
                "INSERT INTO bastion.detector_firings (tenant_id, rule, subject, reason, "
                "evidence, first_seq, first_at, actions, user_id) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (
                    finding.tenant_id,
                    finding.rule,
                    finding.subject[:500],
                    finding.reason[:2000],
                    Jsonb(finding.evidence),
                    finding.first_seq,
                    finding.first_at,
                    list(finding.actions),
                    finding.user_id,
                ),
            )
        ).fetchone()
        assert row is not None
        await audit.record(
            tx,
            actor=f"detector:{finding.rule}",
            action="detector.fired",
            target=f"firing:{row['id']}",
            details={"tenant": str(finding.tenant_id), "subject": finding.subject[:200]},
        )
        return int(row["id"])

    async def unresponded(self) -> list[Firing]:
        """Firings whose response has not run (and was not undone first), oldest first."""
        async with self._tx() as tx:
            rows = await (
                await tx.execute(
                    f"SELECT {_FIRING_COLUMNS} FROM bastion.detector_firings "
                    "WHERE responded_at IS NULL AND undone_at IS NULL ORDER BY id LIMIT 100"
                )
            ).fetchall()
        return [_firing(row) for row in rows]

    async def responded(self, firing_id: int, response: dict[str, Any]) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "UPDATE bastion.detector_firings SET responded_at = now(), response = %s "
                "WHERE id = %s AND responded_at IS NULL",
                (Jsonb(response), firing_id),
            )

    async def unalerted(self) -> list[Firing]:
        async with self._tx() as tx:
            rows = await (
                await tx.execute(
                    f"SELECT {_FIRING_COLUMNS} FROM bastion.detector_firings "
                    "WHERE alerted_at IS NULL ORDER BY id LIMIT 100"
                )
            ).fetchall()
        return [_firing(row) for row in rows]

    async def alert_tried(self, firing_id: int, *, delivered: bool) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "UPDATE bastion.detector_firings SET alert_tries = alert_tries + 1, "
                "alerted_at = CASE WHEN %s THEN now() END WHERE id = %s",
                (delivered, firing_id),
            )

    async def firings(self, *, limit: int = 100, tenant_id: UUID | None = None) -> list[Firing]:
        """The newest firings first (all tenants, or one)."""
        async with self._tx() as tx:
            rows = await (
                await tx.execute(
                    f"SELECT {_FIRING_COLUMNS} FROM bastion.detector_firings "
                    "WHERE %(t)s::uuid IS NULL OR tenant_id = %(t)s::uuid "
                    "ORDER BY id DESC LIMIT %(n)s",
                    {"t": tenant_id, "n": limit},
                )
            ).fetchall()
        return [_firing(row) for row in rows]

    async def firing(self, firing_id: int, *, tenant_id: UUID) -> Firing | None:
        """One firing of ``tenant_id``, or None."""
        async with self._tx() as tx:
            row = await (
                await tx.execute(
                    f"SELECT {_FIRING_COLUMNS} FROM bastion.detector_firings "
                    "WHERE id = %s AND tenant_id = %s",
                    (firing_id, tenant_id),
                )
            ).fetchone()
        return None if row is None else _firing(row)

    async def mark_undone(
        self, firing_id: int, *, actor: str, reason: str, tenant_id: UUID | None = None
    ) -> Firing | None:
        """Mark a firing (of ``tenant_id`` when given) undone, once, audited; return
        it, or None if unknown or undone already."""
        async with self._tx() as tx:
            row = await (
                await tx.execute(
                    "UPDATE bastion.detector_firings SET undone_at = now(), undone_by = %s "
                    "WHERE id = %s AND undone_at IS NULL "
                    "AND (%s::uuid IS NULL OR tenant_id = %s::uuid) "
                    f"RETURNING {_FIRING_COLUMNS}",
                    (actor[:200], firing_id, tenant_id, tenant_id),
                )
            ).fetchone()
            if row is None:
                return None
            await audit.record(
                tx,
                actor=actor,
                action="detector.undone",
                target=f"firing:{firing_id}",
                details={"tenant": str(row["tenant_id"]), "reason": reason[:500]},
            )
        return _firing(row)
