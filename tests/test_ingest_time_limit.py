"""An ingest job past its time limit fails its document with ``timed-out``; it is
not retried (issue 23, A2: no job holds a worker slot for ever)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from uuid import uuid4

import procrastinate
import psycopg
import pytest
from procrastinate.testing import InMemoryConnector

from bastion.access.authorize import Authorizer
from bastion.db.pool import Database
from bastion.knowledge import tasks as knowledge_tasks
from bastion.knowledge.embedders import Embedder, FloatArray, HashingEmbedder
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from bastion.worker.jobs import JobRegistry
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio


class SlowEmbedder(HashingEmbedder):
    """The hashing embedder, 5 s a batch: a document that takes long to embed."""

    def embed(self, texts: Sequence[str]) -> FloatArray:
        time.sleep(5)
        return super().embed(texts)


async def test_an_ingest_job_past_its_time_limit_fails_its_document(
    database: DbHandles,
    keystore: LocalKeystore,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def embedders(name: str) -> Embedder:
        return SlowEmbedder()

    tenants = TenantService(db)
    tenant = (await tenants.create_tenant(f"tl-{uuid4().hex[:8]}", "time limit")).id
    owner = await tenants.add_member(tenant, "owner@tl.test", "owner")
    kb = KnowledgeService(
        db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing", embedders=embedders
    )
    actor = Actor(tenant, owner, "owner")
    await kb.create_namespace(actor, "docs")
    doc = (
        await kb.upload(
            actor, "docs", title="slow", body=b"a slow document", content_type="text/plain"
        )
    ).document.id

    monkeypatch.setattr(knowledge_tasks, "INGEST_SECONDS", 0.5)
    app = procrastinate.App(connector=InMemoryConnector())
    knowledge_tasks.register(app, JobRegistry(Authorizer()), db, kb)
    started = time.monotonic()
    # The task as the worker runs it; it returns (no exception: nothing to retry).
    await app.tasks[knowledge_tasks.INGEST](
        tenant_id=str(tenant), document_id=str(doc), user_id=str(owner)
    )
    assert time.monotonic() - started < 5  # the embedding was not waited for

    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT status, failure_reason, chunk_count FROM bastion.documents WHERE id = %s",
            (doc,),
        ).fetchone()
        audited = conn.execute(
            "SELECT details->>'reason' FROM bastion.audit_events "
            "WHERE tenant_id = %s AND action = 'document.failed' AND target = %s",
            (tenant, str(doc)),
        ).fetchall()
        chunks = conn.execute(
            "SELECT count(*) FROM bastion.chunks WHERE document_id = %s", (doc,)
        ).fetchone()
    assert row == ("failed", "timed-out", None)
    assert audited == [("timed-out",)]
    assert chunks == (0,)
