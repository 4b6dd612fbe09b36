"""The audit hash chain and its signed checkpoints, attacked as the database superuser.

Each tampering test rewrites ``bastion.audit_events`` as the superuser with
triggers off (``session_replication_role = replica``), the way an insider
with the database's keys would, then runs the verifier against the
checkpoints exported to a directory outside the database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion import audit
from bastion.audit.chain import Finding
from bastion.audit.checkpoints import AuditKeys, Checkpointer, DirectorySink, read_history
from bastion.audit.verify import Report, verify_trail
from bastion.db.pool import Database
from bastion.jcs import canonicalize
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

DETAILS: list[dict[str, Any]] = [
    {"plan": "pro", "amount": 1200},
    {"ratio": 0.1, "big": 1e21, "tiny": 1e-7, "neg": -2.5, "exact": 5.0},
    {"name": 'Zoë \u2028 "q" \\ \t\u0001', "\ue000": 1, "\U0001f600": 2, "a": [True, None]},
    {"nested": {"b": [1, {"z": 0, "y": 2**60}], "a": ""}},
    {},
]


@pytest.fixture
def sink(tmp_path: Path) -> DirectorySink:
    return DirectorySink(tmp_path / "audit-sink")


@pytest.fixture
def checkpointer(db: Database, keystore: LocalKeystore, sink: DirectorySink) -> Checkpointer:
    keys = AuditKeys(keystore)
    return Checkpointer(db, keys, sink, every_events=1000, every_seconds=3600)


@pytest.fixture
async def tenant(db: Database) -> UUID:
    """A tenant with seven events (seq 1..7), checkpointed at 5."""
    t = await TenantService(db).create_tenant(f"chain-{uuid4().hex[:8]}", "Chained")
    async with db.tenant_tx(t.id, None, "system") as tx:
        for i, details in enumerate(DETAILS):
            await audit.record(
                tx, actor="user:1", action=f"doc.{i}", target="doc:1", details=details
            )
    return t.id


@pytest.fixture
def superuser(database: DbHandles) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off
        yield conn


async def _checkpointed(db: Database, tenant: UUID, checkpointer: Checkpointer) -> None:
    assert await checkpointer.run_once(force=True) is not None
    async with db.tenant_tx(tenant, None, "system") as tx:
        await audit.record(tx, actor="user:1", action="after.checkpoint", target="doc:2")
        await audit.record(tx, actor="user:1", action="after.checkpoint", target="doc:3")


async def _verify(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    tenant: UUID,
    since: int | None = None,
) -> Report:
    history = read_history(sink, AuditKeys(keystore).public_key)
    return await verify_trail(db, history, tenant=tenant, since=since)


def _kinds(findings: list[Finding]) -> list[tuple[str, int]]:
    return [(f.kind, f.seq) for f in findings]


def _rehash_from(conn: psycopg.Connection[tuple[object, ...]], tenant: UUID, seq: int) -> None:
    """What an attacker who knows the algorithm does: recompute every link from ``seq``."""
    rows = conn.execute(
        "SELECT seq FROM bastion.audit_events WHERE tenant_id = %s AND seq >= %s ORDER BY seq",
        (tenant, seq),
    ).fetchall()
    for (s,) in rows:
        conn.execute(
            "UPDATE bastion.audit_events e SET prev_hash = p.hash, "
            "hash = sha256(p.hash || convert_to(bastion_private.audit_canonical(e.tenant_id, e.at, "
            "e.actor, e.action, e.target, e.details, e.request_id), 'UTF8')) "
            "FROM bastion.audit_events p WHERE e.tenant_id = %s AND e.seq = %s "
            "AND p.tenant_id = e.tenant_id AND p.seq = e.seq - 1",
            (tenant, s),
        )
    conn.execute(
        "UPDATE bastion.audit_heads h SET hash = (SELECT hash FROM bastion.audit_events "
        "WHERE tenant_id = %s ORDER BY seq DESC LIMIT 1) WHERE tenant_id = %s",
        (tenant, tenant),
    )


@pytest.mark.parametrize("details", [*DETAILS, [1.5, 100, 1e-6, 123456789.125, -0.0, 2**53 + 1]])
def test_the_databases_encoding_is_jcs(
    superuser: psycopg.Connection[tuple[object, ...]], details: object
) -> None:
    row = superuser.execute(
        "SELECT bastion_private.jcs(%s::jsonb)", (json.dumps(details),)
    ).fetchone()
    assert row is not None
    assert row[0] == canonicalize(json.loads(json.dumps(details))).decode()


async def test_a_clean_chain_verifies(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    report = await _verify(db, keystore, sink, tenant)
    assert report.findings == [] and report.problems == []
    assert report.events == 8  # tenant.create, five documents' events, two after
    # and the whole database: every tenant, the global chain of checkpoints
    assert (await verify_trail(db, read_history(sink, AuditKeys(keystore).public_key))).intact


async def test_the_app_role_cannot_choose_the_link(
    db: Database, keystore: LocalKeystore, sink: DirectorySink, tenant: UUID
) -> None:
    async with db.tenant_tx(tenant, None, "system") as tx:
        await tx.execute(
            "INSERT INTO bastion.audit_events (actor, action, prev_hash, hash) "
            "VALUES ('x', 'forged', %s, %s)",
            (b"\1" * 32, b"\2" * 32),
        )
    assert (await _verify(db, keystore, sink, tenant)).intact


async def test_the_app_role_cannot_have_other_details_hashed(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    """The writer's serialisation is used only when it is the value stored;
    another value's, or text that is not JSON, is ignored, and never stored."""
    async with db.tenant_tx(tenant, None, "system") as tx:
        for offered in ('{"plan":"free"}', "not json", '{"plan":"team","x":1}'):
            await tx.execute(
                "INSERT INTO bastion.audit_events (actor, action, details, details_jcs) "
                "VALUES ('x', 'offered', '{\"plan\": \"team\"}', %s)",
                (offered,),
            )
    assert (await _verify(db, keystore, sink, tenant)).intact
    stored = superuser.execute(
        "SELECT count(*) FROM bastion.audit_events WHERE details_jcs IS NOT NULL"
    ).fetchone()
    assert stored == (0,)


async def test_another_spelling_of_the_details_fails_verification(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    """The database checks the writer's text by value, not by spelling: an
    app-role writer could have its own event hashed over another spelling of
    it. Verification recomputes JCS, so that event is found."""
    async with db.tenant_tx(tenant, None, "system") as tx:
        await tx.execute(
            "INSERT INTO bastion.audit_events (actor, action, details, details_jcs) "
            "VALUES ('x', 'respelled', '{\"b\": 1, \"a\": 2}', '{\"b\":1,\"a\":2}')"
        )
    row = superuser.execute(
        "SELECT seq FROM bastion.audit_events WHERE tenant_id = %s AND action = 'respelled'",
        (tenant,),
    ).fetchone()
    assert row is not None
    assert _kinds((await _verify(db, keystore, sink, tenant)).findings) == [("altered", row[0])]


async def test_an_altered_event_is_found(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    superuser.execute(
        'UPDATE bastion.audit_events SET details = \'{"plan": "free", "amount": 0}\' '
        "WHERE tenant_id = %s AND seq = 2",
        (tenant,),
    )
    assert _kinds((await _verify(db, keystore, sink, tenant)).findings) == [("altered", 2)]


async def test_an_altered_and_rehashed_chain_fails_its_checkpoint(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    superuser.execute(
        "UPDATE bastion.audit_events SET actor = 'user:2' WHERE tenant_id = %s AND seq = 2",
        (tenant,),
    )
    _rehash_from(superuser, tenant, 2)
    # Every link holds again; only the signed checkpoint (seq 6) tells.
    assert _kinds((await _verify(db, keystore, sink, tenant)).findings) == [("rewritten", 6)]


async def test_a_removed_event_is_found(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    superuser.execute(
        "DELETE FROM bastion.audit_events WHERE tenant_id = %s AND seq = 3", (tenant,)
    )
    assert _kinds((await _verify(db, keystore, sink, tenant)).findings) == [("removed", 3)]


async def test_an_inserted_event_is_found(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    # Make room at seq 3, then slide in a well-formed event linked to seq 2.
    superuser.execute(
        "UPDATE bastion.audit_events SET seq = -seq - 1 WHERE tenant_id = %s AND seq >= 3",
        (tenant,),
    )
    superuser.execute(
        "UPDATE bastion.audit_events SET seq = -seq WHERE tenant_id = %s AND seq < 0", (tenant,)
    )
    superuser.execute(
        "INSERT INTO bastion.audit_events (tenant_id, seq, at, actor, action, target, details, "
        "prev_hash, hash) SELECT %(t)s, 3, p.at, 'user:1', 'role.grant', 'user:evil', '{}', "
        "p.hash, "
        "sha256(p.hash || convert_to(bastion_private.audit_canonical(%(t)s, p.at, 'user:1', "
        "'role.grant', 'user:evil', '{}', NULL), 'UTF8')) "
        "FROM bastion.audit_events p WHERE p.tenant_id = %(t)s AND p.seq = 2",
        {"t": tenant},
    )
    kinds = _kinds((await _verify(db, keystore, sink, tenant)).findings)
    assert ("inserted", 3) in kinds
    assert {kind for kind, _seq in kinds} <= {"inserted", "rewritten"}


async def test_reordered_events_are_found(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    for a, b in ((3, -1), (4, 3), (-1, 4)):  # swap 3 and 4
        superuser.execute(
            "UPDATE bastion.audit_events SET seq = %s WHERE tenant_id = %s AND seq = %s",
            (b, tenant, a),
        )
    kinds = _kinds((await _verify(db, keystore, sink, tenant)).findings)
    assert ("reordered", 3) in kinds and ("reordered", 4) in kinds


async def test_truncation_after_the_last_checkpoint_is_found(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    await _checkpointed(db, tenant, checkpointer)  # checkpoint at 6; events 7, 8 after
    superuser.execute(
        "DELETE FROM bastion.audit_events WHERE tenant_id = %s AND seq >= 5", (tenant,)
    )
    # The attacker sets the head back too: only the exported checkpoint remembers 6.
    superuser.execute(
        "UPDATE bastion.audit_heads SET seq = 4, hash = (SELECT hash FROM bastion.audit_events "
        "WHERE tenant_id = %(t)s AND seq = 4) WHERE tenant_id = %(t)s",
        {"t": tenant},
    )
    assert _kinds((await _verify(db, keystore, sink, tenant)).findings) == [("truncated", 5)]


async def test_a_tampered_export_is_found(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    path = max(sink.directory.glob("checkpoint-*.json"))  # the one that signs this tenant
    content = json.loads(path.read_text())
    content["tenants"] = content["tenants"][:-1]  # hide a tenant's signed head
    path.write_text(json.dumps(content))
    report = await _verify(db, keystore, sink, tenant)
    assert not report.intact and "does not verify" in report.problems[0]


async def test_since_a_checkpoint_reads_only_what_follows_it(
    db: Database,
    keystore: LocalKeystore,
    sink: DirectorySink,
    checkpointer: Checkpointer,
    tenant: UUID,
    superuser: psycopg.Connection[tuple[object, ...]],
) -> None:
    await _checkpointed(db, tenant, checkpointer)
    number = sink.last_number()
    superuser.execute(
        "UPDATE bastion.audit_events SET target = 'doc:9' WHERE tenant_id = %s AND seq = 8",
        (tenant,),
    )
    report = await _verify(db, keystore, sink, tenant, since=number)
    assert report.events == 3  # the checkpointed head (6), then 7 and 8
    assert _kinds(report.findings) == [("altered", 8)]
