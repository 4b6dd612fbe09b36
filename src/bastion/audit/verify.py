"""``bastion audit verify`` and ``export``: reading the trail back out of the database.

:func:`verify_trail` walks each tenant's events in ``seq`` order through a
:class:`~bastion.audit.chain.ChainVerifier`, against the signed checkpoints
read from the sink (:func:`~bastion.audit.checkpoints.read_history`), and
against the tenant's head row. :func:`export_events` writes the events as
JSON lines (one object per event, with its hashes) for a SIEM.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from uuid import UUID

import orjson
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads

from bastion.audit.chain import Anchor, ChainRow, ChainVerifier, Finding
from bastion.audit.checkpoints import PLATFORM, SignedHistory
from bastion.db.pool import Database

_PAGE = 20_000
_ROWS = (
    "SELECT seq, (extract(epoch FROM at) * 1000000)::bigint, actor, action, target, details, "
    "request_id, coalesce(prev_hash, ''::bytea), coalesce(hash, ''::bytea) "
    "FROM bastion.audit_events WHERE seq > %s ORDER BY seq LIMIT %s"
)


def _chain_rows(_cursor: object) -> Callable[[Sequence[Any]], ChainRow]:
    """A row factory (psycopg.rows): each fetched row becomes a ChainRow as is."""
    return ChainRow._make


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


def _loads(text: str | bytes) -> Any:
    """orjson's parser (several times faster than json's: most of reading a
    million events), else json's for what orjson refuses (integers past 64 bits)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


async def _pages(db: Database, tenant: UUID, after: int) -> AsyncIterator[list[ChainRow]]:
    """The tenant's events after ``after``, in ``seq`` order, a page at a time."""
    async with (
        db.tenant_tx(tenant, None, "system") as tx,
        tx.cursor(row_factory=_chain_rows, binary=True) as cur,
    ):
        set_json_loads(_loads, cur)
        while True:
            await cur.execute(_ROWS, (after, _PAGE))
            rows = await cur.fetchall()
            if not rows:
                return
            yield rows
            after = rows[-1].seq


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
        for row in page:
            verifier.feed(row)
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
        for row in page:
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
