"""The worker process (``bastion serve worker``, procrastinate on the same
PostgreSQL) ingests uploads exactly once, even when killed with SIGKILL in the
middle of a batch and started again."""

from __future__ import annotations

import signal
import time
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.db.pool import Database
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir
from tests.served import serving_process

pytestmark = pytest.mark.anyio

DOCUMENTS = 30
# ~200 chunks each: long enough that a kill lands inside a job.
PARAGRAPH = (
    "Ticket {n}.{p}: the customer reports that the export of invoices to CSV stops "
    "halfway, retries do not help, and the webhook for invoice.paid fired twice. "
)


def _status(database: DbHandles, documents: list[UUID]) -> dict[str, int]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM bastion.documents WHERE id = ANY(%s) GROUP BY status",
            (documents,),
        ).fetchall()
    return {status: count for status, count in rows}


def _cached(database: DbHandles) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute("SELECT count(*) FROM bastion.embedding_cache").fetchone()
    return int(row[0]) if row else 0


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def test_killed_worker_leaves_every_document_indexed_exactly_once(
    database: DbHandles, keystore: LocalKeystore, db: Database
) -> None:
    tenants = TenantService(db)
    tenant = (await tenants.create_tenant(f"w-{uuid4().hex[:8]}", "worker")).id
    owner = await tenants.add_member(tenant, "owner@worker.test", "owner")
    writer = await tenants.add_member(tenant, "writer@worker.test", "contributor")
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    await kb.create_namespace(Actor(tenant, owner, "owner"), "support")
    documents = []
    for n in range(DOCUMENTS):
        body = "\n\n".join(PARAGRAPH.format(n=n, p=p) for p in range(450))
        up = await kb.upload(
            Actor(tenant, writer, "contributor"),
            "support",
            title=f"doc {n}",
            body=body.encode(),
            content_type="text/plain",
        )
        documents.append(up.document.id)
    broken = await kb.upload(
        Actor(tenant, writer, "contributor"),
        "support",
        title="broken.pdf",
        body=b"%PDF-1.7 not really a PDF",
        content_type="application/pdf",
    )

    home = short_tempdir("bastion-worker-")
    with serving_process("worker", database, keystore, home, wait_ready=False) as (first, _):
        # Kill once a few documents are done and the next one is half embedded
        # (its first batches are in the embedding cache).
        _wait(
            lambda: _status(database, documents).get("indexed", 0) >= 2 and _cached(database) > 0,
            120,
            "a document half-way through",
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    progress = _status(database, documents)
    with psycopg.connect(database.queue) as conn:
        row = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE status = 'doing'"
        ).fetchone()
    orphaned = row[0] if row else 0
    assert progress.get("indexed", 0) < DOCUMENTS, "the kill came too late to prove anything"
    assert orphaned == 1, "the kill should land inside a job"
    assert _cached(database) > 0

    with serving_process("worker", database, keystore, home, wait_ready=False):
        _wait(
            lambda: (
                _status(database, [*documents, broken.document.id])
                == {"indexed": DOCUMENTS, "failed": 1}
            ),
            120,
            "every document after the restart",
        )

    with psycopg.connect(database.superuser) as conn:
        per_document = conn.execute(
            "SELECT d.id, d.chunk_count, count(c.id), count(DISTINCT c.ordinal) "
            "FROM bastion.documents d LEFT JOIN bastion.chunks c ON c.document_id = d.id "
            "WHERE d.id = ANY(%s) GROUP BY d.id, d.chunk_count",
            (documents,),
        ).fetchall()
        indexed_events = conn.execute(
            "SELECT target, count(*) FROM bastion.audit_events "
            "WHERE tenant_id = %s AND action = 'document.indexed' GROUP BY target",
            (tenant,),
        ).fetchall()
        cache = conn.execute(
            "SELECT count(*) FROM bastion.embedding_cache WHERE document_id = ANY(%s)",
            (documents,),
        ).fetchone()
    assert len(per_document) == DOCUMENTS
    for _id, expected, chunks, ordinals in per_document:
        assert expected and chunks == expected == ordinals
    assert sorted(count for _, count in indexed_events) == [1] * DOCUMENTS
    assert cache == (0,)
    # A document that cannot be read fails with its reason; the worker went on.
    assert _status(database, [broken.document.id]) == {"failed": 1}
    with psycopg.connect(database.queue) as conn:
        row = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs "
            "WHERE status IN ('todo', 'doing')"
        ).fetchone()
    assert row == (0,)
