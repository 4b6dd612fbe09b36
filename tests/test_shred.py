"""Crypto-shredding leaves nothing derived from the tenant's text (issue 23, B9).

On the real database, with the real service and key ring: after
``shred_tenant`` no table holds a row of the tenant derived from its text,
its chunk partitions are dropped, a "backup" taken before the shred holds no
digest anyone can recompute from a candidate file, and a gateway's answer
cache forgets the tenant when the shred commits.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.db.pool import Database
from bastion.gateway.cache import AnswerCache, CacheKey
from bastion.gateway.providers import Completion, Usage
from bastion.gateway.shreds import ShredListener
from bastion.knowledge.chunks import chunk_text
from bastion.knowledge.ingest import ingest_files
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

TICKET = (
    "# Refund for a double charge\n\n"
    "Customer jane.doe@example.com (phone +44 20 7946 0958) was charged twice for the "
    "Pro plan in November. She asks for a refund of the duplicate.\n"
)
# A long body: more chunks than one embedding batch, so the cache is used.
MANUAL = " ".join(f"Step {i}: reset the router model X{i} and wait." for i in range(120))

# Rows of a shredded tenant that may remain: who it is, who its members are,
# what it paid, and the append-only audit trail (which records ids, sizes and
# counts, never text). A new table with a tenant_id must be added here only
# after checking that it holds nothing derived from the tenant's text.
KEPT_AFTER_SHRED = frozenset(
    {
        *("memberships", "role_requests", "auth_codes", "refresh_families", "refresh_tokens"),
        *("audit_events", "audit_heads", "prompt_sampling", "prompt_sampling_consents"),
        *("budgets", "budget_reservations", "meter_reports", "receipts", "subscriptions"),
        *("plan_changes", "plan_requests", "checkout_sessions", "adyen_payments"),
        *("webhook_events", "tool_call_runs"),
        # the audit chain's signed heads: a seq and a hash, never text
        "audit_tenant_checkpoints",
    }
)
DERIVED_FROM_TEXT = ("documents", "chunks", "embedding_cache", "namespaces", "pii_vault")


@pytest.fixture
async def kb(db: Database, keystore: LocalKeystore) -> AsyncIterator[KnowledgeService]:
    yield KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")


async def _tenant(db: Database, kb: KnowledgeService, name: str) -> Actor:
    tenant = await TenantService(db).create_tenant(f"{name}-{uuid4().hex[:8]}", name)
    owner = await TenantService(db).add_member(tenant.id, f"o-{uuid4().hex[:6]}@x.test", "owner")
    actor = Actor(tenant.id, owner, "owner")
    await kb.create_namespace(actor, "support")
    return actor


async def _indexed(kb: KnowledgeService, who: Actor, body: str) -> UUID:
    up = await kb.upload(
        who, "support", title="Refund for jane", body=body.encode(), content_type="text/markdown"
    )
    assert (await kb.ingest(who.tenant_id, up.document.id)).status == "indexed"
    return up.document.id


async def _cached_embeddings(kb: KnowledgeService, who: Actor, body: str) -> list[str]:
    """A pending document whose first batches of embeddings are in the cache (as
    after a worker killed mid-document); returns the chunks' texts."""
    up = await kb.upload(
        who, "support", title="manual", body=body.encode(), content_type="text/plain", enqueue=False
    )
    embedder = kb.embedders("hashing")
    chunks = chunk_text(body, embedder.token_offsets, max_tokens=8, overlap=0)
    assert len(chunks) > 64
    await kb._embed(Actor(who.tenant_id, None, "system"), up.document.id, embedder, chunks, None)
    return [c.text for c in chunks]


def _tenant_tables(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """Every table of the bastion schema with a tenant_id column (partitions included)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'bastion' "
        "AND c.relkind IN ('r', 'p') AND a.attname = 'tenant_id' AND NOT a.attisdropped"
    ).fetchall()
    return sorted(str(r[0]) for r in rows)


def _rows_of(conn: psycopg.Connection[tuple[object, ...]], tenant_id: UUID) -> dict[str, int]:
    counts = {}
    for table in _tenant_tables(conn):
        row = conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM bastion.{} WHERE tenant_id = %s").format(
                psycopg.sql.Identifier(table)
            ),
            (tenant_id,),
        ).fetchone()
        assert row is not None
        counts[table] = int(str(row[0]))
    return counts


async def test_shred_leaves_no_row_derived_from_the_tenant_s_text(
    db: Database, kb: KnowledgeService, database: DbHandles
) -> None:
    a, b = await _tenant(db, kb, "acme"), await _tenant(db, kb, "globex")
    await _indexed(kb, a, TICKET)
    await _cached_embeddings(kb, a, MANUAL)
    await _indexed(kb, b, TICKET)
    ns_a, ns_b = await kb.namespace(a, "support"), await kb.namespace(b, "support")
    with psycopg.connect(database.superuser) as conn:
        before = _rows_of(conn, a.tenant_id)
    # The setup holds what the shred must remove.
    for table in DERIVED_FROM_TEXT:
        assert before[table] > 0, table

    assert await kb.shred_tenant(a.tenant_id) == 2

    with psycopg.connect(database.superuser) as conn:
        after = _rows_of(conn, a.tenant_id)
        left = {table for table, n in after.items() if n}
        assert left <= KEPT_AFTER_SHRED, left - KEPT_AFTER_SHRED
        assert not any(after.get(t) for t in (*DERIVED_FROM_TEXT, "pii_token_keys", "data_keys"))
        # The partition is dropped (no dead tuples, no HNSW graph left to vacuum).
        partitions = {
            str(r[0])
            for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relname LIKE 'chunks\\_%%'"
            ).fetchall()
        }
        assert f"chunks_{ns_a.id.hex}" not in partitions
        assert f"chunks_{ns_b.id.hex}" in partitions
        shred = conn.execute(
            "SELECT details FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = 'tenant.shred'",
            (a.tenant_id,),
        ).fetchone()
        assert shred is not None and shred[0] == {"documents": 2, "namespaces": 1}
    # The other tenant is untouched.
    assert await kb.search(Actor(b.tenant_id, None, "owner"), "support", query="refund", k=3)


async def test_only_the_system_role_may_shred_the_index(
    db: Database, kb: KnowledgeService, database: DbHandles
) -> None:
    a = await _tenant(db, kb, "acme")
    await _indexed(kb, a, TICKET)
    async with db.tenant_tx(a.tenant_id, a.user_id, "owner") as tx:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await tx.execute("SELECT bastion.shred_tenant_index()")
    with psycopg.connect(database.superuser) as conn:
        assert _rows_of(conn, a.tenant_id)["chunks"] > 0


async def test_a_backup_holds_no_digest_of_the_tenant_s_text(
    db: Database, kb: KnowledgeService, database: DbHandles, tmp_path: Path
) -> None:
    """Recognition oracle: with a candidate file and a backup made before the
    shred, a plain hash would say "this tenant had it"; a keyed one says nothing."""
    a = await _tenant(db, kb, "acme")
    ticket = tmp_path / "ticket.md"
    ticket.write_text(TICKET)
    assert (await ingest_files(kb, a.tenant_id, "support", [ticket])).indexed == 1
    chunk_texts = await _cached_embeddings(kb, a, MANUAL)
    with psycopg.connect(database.superuser) as conn:  # the backup
        rows = conn.execute(
            "SELECT sha256, idempotency_key FROM bastion.documents WHERE tenant_id = %s",
            (a.tenant_id,),
        ).fetchall()
        cached = conn.execute(
            "SELECT chunk_hash FROM bastion.embedding_cache WHERE tenant_id = %s", (a.tenant_id,)
        ).fetchall()
    digests = {bytes(r[0]) for r in (*rows, *cached)}
    assert len(digests) > 64
    candidates = {hashlib.sha256(text.encode()).digest() for text in (TICKET, MANUAL, *chunk_texts)}
    assert not digests & candidates
    # ``bastion ingest``'s idempotency key is a hash of the path and the body.
    ingest_key = hashlib.sha256(str(ticket.resolve()).encode() + b"\0" + TICKET.encode())
    stored_keys = {str(r[1]) for r in rows if r[1] is not None}
    assert stored_keys and not any(ingest_key.hexdigest() in k for k in stored_keys)
    # Keyed, idempotency still holds: the same file again is skipped.
    assert (await ingest_files(kb, a.tenant_id, "support", [ticket])).skipped == 1
    await kb.shred_tenant(a.tenant_id)


def _completion() -> Completion:
    return Completion("The refund was sent on 5 March.", "stop", Usage(5, 7))


async def test_the_gateway_forgets_a_shredded_tenant_s_answers(
    db: Database, kb: KnowledgeService
) -> None:
    a, b = await _tenant(db, kb, "acme"), await _tenant(db, kb, "globex")
    cache = AnswerCache()
    keys: dict[UUID, CacheKey] = {}
    for who in (a, b):
        assert who.user_id is not None
        keys[who.tenant_id] = cache.key(who.tenant_id, who.user_id, sent={"q": "refund?"})
    listener = ShredListener(db, cache)
    listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        for key in keys.values():
            cache.put(key, _completion())
        await kb.shred_tenant(a.tenant_id)
        async with asyncio.timeout(5):
            while cache.stale_fallback(keys[a.tenant_id]) is not None:
                await asyncio.sleep(0.01)
        assert cache.stale_fallback(keys[b.tenant_id]) is not None
    finally:
        await listener.aclose()


def test_an_unexpected_announcement_drops_every_answer() -> None:
    cache = AnswerCache()
    tenant = uuid4()
    key = cache.key(tenant, uuid4(), sent={"q": "x"})
    cache.put(key, _completion())
    cache.forget_announced(hashlib.sha256(str(uuid4()).encode()).hexdigest())
    assert cache.stale_fallback(key) is not None  # another tenant's shred
    cache.forget_announced("*")
    assert cache.stale_fallback(key) is None and len(cache) == 0
