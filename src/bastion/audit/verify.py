"""``bastion audit verify`` and ``export``: reading the trail back out of the database.

:func:`verify_trail` walks each tenant's events in ``seq`` order through a
:class:`~bastion.audit.chain.ChainVerifier`, against the signed checkpoints
read from the sink (:func:`~bastion.audit.checkpoints.read_history`), and
against the tenant's head row. :func:`export_events` writes the events as
JSON lines (one object per event, with its hashes) for a SIEM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TextIO
from uuid import UUID

from psycopg.rows import tuple_row

from bastion.audit.chain import (
    Anchor,
    ChainRow,
    ChainVerifier,
    Finding,
    StoredRow,
    loads_details,
)
from bastion.audit.checkpoints import PLATFORM, SignedHistory
from bastion.db.pool import Database

_PAGE = 20_000
# ``details`` as the jsonb's text: the verifier parses it itself (orjson, one
# call per row), which is cheaper than a per-row loader in the driver.
_ROWS = (
    "SELECT seq, (extract(epoch FROM at) * 1000000)::bigint, actor, action, target, "
    "details::text, request_id, coalesce(prev_hash, ''::bytea), coalesce(hash, ''::bytea) "
    "FROM bastion.audit_events WHERE seq > %s ORDER BY seq LIMIT %s"
)


@dataclass
class Report:
    """What ``audit verify`` found: per tenant, the events checked and the findings."""

    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # in the sink itself
    events: int = 0
    tenants: int = 0

    @property
    def intact(self) -> bool:
        return not self.findings and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "tenants": self.tenants,
            "events": self.events,
            "findings": [f.as_dict() for f in self.findings],
            "sink_problems": self.problems,
        }


async def _heads(db: Database) -> dict[UUID, int]:
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        rows = await (
            await tx.execute("SELECT tenant_id, seq FROM bastion.audit_heads_all()")
        ).fetchall()
    return {row["tenant_id"]: int(row["seq"]) for row in rows}


async def _pages(db: Database, tenant: UUID, after: int) -> AsyncIterator[list[StoredRow]]:
    """The tenant's events after ``after``, in ``seq`` order, a page at a time.

    The next page is asked for before this one is handed out, so that it is
    read while this one is checked (see :func:`verify_tenant`).
    """
    async with (
        db.tenant_tx(tenant, None, "system") as tx,
        tx.cursor(row_factory=tuple_row, binary=True) as cur,
    ):

        async def fetch(after: int) -> list[StoredRow]:
            await cur.execute(_ROWS, (after, _PAGE))
            return await cur.fetchall()

        rows = await fetch(after)
        while rows:
            following = asyncio.ensure_future(fetch(rows[-1][0]))
            try:
                yield rows
            except BaseException:  # the reader stopped early: no read left behind
                following.cancel()
                with contextlib.suppress(BaseException):
                    await following
                raise
            rows = await following


def _parsed(stored: StoredRow) -> ChainRow:
    return ChainRow(*stored[:5], loads_details(stored[5]), *stored[6:])


async def _index(db: Database, tenant: UUID) -> dict[bytes, int]:
    async with (
        db.tenant_tx(tenant, None, "system") as tx,
        tx.cursor(row_factory=tuple_row) as cur,
    ):
        await cur.execute("SELECT hash, seq FROM bastion.audit_events WHERE hash IS NOT NULL")
        return {bytes(h): int(s) for h, s in await cur.fetchall()}


async def verify_tenant(
    db: Database, tenant: UUID, anchors: list[Anchor], head_seq: int | None, since: int | None
) -> tuple[list[Finding], int]:
    """Findings and the number of events checked for one tenant.

    ``since``: start at the tenant's last checkpoint at or before that global
    checkpoint number, trusting it (everything before it is not read).
    """
    start = None
    if since is not None:
        earlier = [a for a in anchors if a.number <= since]
        start = max(earlier, key=lambda a: a.number) if earlier else None
    verifier = ChainVerifier(str(tenant), anchors, start)
    async for page in _pages(db, tenant, 0 if start is None else start.seq - 1):
        # Checked in a thread, so that the loop reads the next page meanwhile
        # (the database formats it on the other core); one page at a time.
        await asyncio.to_thread(verifier.feed_page, page)
    index = await _index(db, tenant) if verifier.needs_index else None
    return verifier.finish(head_seq, index), verifier.checked


async def verify_trail(
    db: Database, history: SignedHistory, *, tenant: UUID | None = None, since: int | None = None
) -> Report:
    """Verify one tenant's trail, or every tenant's (those with a head row or a
    checkpoint), against the signed ``history``."""
    heads = await _heads(db)
    signed = {UUID(t) for t in history.anchors}
    tenants = [tenant] if tenant is not None else sorted(set(heads) | signed)
    report = Report(problems=list(history.problems))
    for each in tenants:
        findings, checked = await verify_tenant(
            db, each, history.anchors.get(str(each), []), heads.get(each), since
        )
        report.findings.extend(findings)
        report.events += checked
        report.tenants += 1
    return report


async def export_events(db: Database, tenant: UUID, out: TextIO, *, after: int = 0) -> int:
    """Write the tenant's events after ``after`` as JSON lines; return how many."""
    count = 0
    async for page in _pages(db, tenant, after):
        for row in map(_parsed, page):
            record = {
                "tenant_id": str(tenant),
                "seq": row.seq,
                "at_us": row.at_us,
                "actor": row.actor,
                "action": row.action,
                "target": row.target,
                "details": row.details,
                "request_id": row.request_id,
                "prev_hash": row.prev_hash.hex(),
                "hash": row.hash.hex(),
            }
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
    return count


async def all_tenants(db: Database) -> list[UUID]:
    """Every tenant with an audit trail (platform context)."""
    return sorted(await _heads(db))


__all__ = ["Report", "all_tenants", "export_events", "verify_tenant", "verify_trail"]
