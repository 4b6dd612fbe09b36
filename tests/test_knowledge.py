"""The knowledge base on the real database: ingestion, encryption at rest,
exactly-once, deletion, crypto-shredding, bad input and recall."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID, uuid4

import numpy as np
import psycopg
import pytest

from bastion.api.problems import status_of
from bastion.audit.notes import open_note
from bastion.db.pool import Database
from bastion.knowledge.embedders import HashingEmbedder
from bastion.knowledge.errors import (
    DocumentNotFound,
    DocumentTextUnavailable,
    EmbeddingMismatch,
    IdempotencyKeyReused,
    NamespaceNotFound,
    RevealReasonRequired,
    UploadRefused,
)
from bastion.knowledge.service import Actor, KnowledgeService, vector_literal
from bastion.safety.vault import RevealForbidden, tokens_in
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import (
    DecryptionFailed,
    KeyUnavailable,
    TenantKeys,
    open_sealed,
    seal,
)
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

TICKET = (
    "# Refund for a double charge\n\n"
    "Customer jane.doe@example.com (phone +44 20 7946 0958) was charged twice for the "
    "Pro plan in November. Card 4242 4242 4242 4242 shows two identical payments. "
    "She asks for a refund of the duplicate and confirmation by email.\n\n"
    "Steps taken: checked the invoice history, found two invoices with the same period. "
)


@dataclass
class Tenant:
    id: UUID
    owner: Actor
    contributor: Actor
    viewer: Actor


@pytest.fixture
async def kb(db: Database, keystore: LocalKeystore) -> AsyncIterator[KnowledgeService]:
    yield KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")


async def _tenant(db: Database, name: str) -> Tenant:
    service = TenantService(db)
    tenant = await service.create_tenant(f"{name}-{uuid4().hex[:8]}", name)
    actors = {}
    for role in ("owner", "contributor", "viewer"):
        user = await service.add_member(tenant.id, f"{role}-{uuid4().hex[:6]}@{name}.test", role)
        actors[role] = Actor(tenant.id, user, role)
    return Tenant(tenant.id, actors["owner"], actors["contributor"], actors["viewer"])


@pytest.fixture
async def pair(db: Database, kb: KnowledgeService) -> tuple[Tenant, Tenant]:
    a, b = await _tenant(db, "acme"), await _tenant(db, "globex")
    for t in (a, b):
        await kb.create_namespace(t.owner, "support")
    return a, b


async def _indexed(kb: KnowledgeService, who: Actor, body: str, title: str = "ticket") -> UUID:
    up = await kb.upload(
        who, "support", title=title, body=body.encode(), content_type="text/markdown"
    )
    outcome = await kb.ingest(who.tenant_id, up.document.id)
    assert outcome.status == "indexed", outcome
    return up.document.id


def _scalar(conninfo: str, query: str, *args: object) -> object:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(query, args).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]


async def test_namespace_gets_its_own_partition_and_hnsw_index(
    pair: tuple[Tenant, Tenant], database: DbHandles, kb: KnowledgeService
) -> None:
    a, b = pair
    ns_a = await kb.namespace(a.viewer, "support")
    ns_b = await kb.namespace(b.viewer, "support")
    assert ns_a.id != ns_b.id and ns_a.embedder == "hashing" and ns_a.dim == 384
    for ns in (ns_a, ns_b):
        part = f"chunks_{ns.id.hex}"
        index = _scalar(
            database.superuser,
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%hnsw%%'",
            part,
        )
        assert "vector(384)" in str(index)
        forced = _scalar(
            database.superuser,
            "SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE relname = %s",
            part,
        )
        assert forced is True
    # The app role cannot reach a partition directly, only through the parent.
    with (
        psycopg.connect(database.app) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(f"SELECT * FROM bastion.chunks_{ns_b.id.hex}")


async def test_only_owners_create_namespaces_and_names_are_per_tenant(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService
) -> None:
    a, b = pair
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await kb.create_namespace(a.contributor, "mine")
    assert [n.name for n in await kb.namespaces(a.viewer)] == ["support"]
    with pytest.raises(NamespaceNotFound):
        await kb.namespace(a.viewer, str((await kb.namespace(b.viewer, "support")).id))


async def test_upload_enqueues_a_job_in_the_same_transaction(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles
) -> None:
    a, _ = pair
    up = await kb.upload(
        a.contributor, "support", title="t", body=TICKET.encode(), content_type="text/markdown"
    )
    assert up.created and up.document.status == "pending"
    jobs = _scalar(
        database.queue,
        "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE args->>'document_id' = %s "
        "AND task_name = 'knowledge.ingest' AND status = 'todo'",
        str(up.document.id),
    )
    assert jobs == 1


async def test_ingest_redacts_encrypts_and_finds(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles
) -> None:
    a, _ = pair
    doc = await _indexed(kb, a.contributor, TICKET)
    info = await kb.document(a.viewer, doc)
    assert info.status == "indexed" and info.chunk_count and info.chunk_count >= 1
    assert info.redactions and info.redactions.get("email") == 1
    hits = await kb.search(a.viewer, "support", query="refund double charge", k=3)
    assert hits and hits[0].document_id == doc
    text = " ".join(h.text for h in hits)
    assert "jane.doe@example.com" not in text and "4242 4242" not in text
    assert "⟦EMAIL_" in text and "⟦CARD_" in text  # vault tokens
    # At rest there is only ciphertext: no plaintext fragment anywhere in the rows.
    with psycopg.connect(database.superuser) as conn:
        for table, column in (("chunks", "ciphertext"), ("documents", "body_ciphertext")):
            rows = conn.execute(f"SELECT {column} FROM bastion.{table}").fetchall()
            blobs = b"".join(bytes(r[0]) for r in rows if r[0] is not None)
            assert blobs and b"refund" not in blobs and b"double charge" not in blobs
    body, content_type = await kb.original(a.owner, doc, reason="checking the upload")
    assert body == TICKET.encode() and content_type == "text/markdown"
    # Every reader gets the text with the same tokens as the index, never the original.
    text = await kb.text(a.viewer, doc)
    assert "jane.doe@example.com" not in text and "4242 4242" not in text
    assert {t for t in tokens_in(text) if t.startswith("⟦EMAIL")} == {
        t for h in hits for t in tokens_in(h.text) if t.startswith("⟦EMAIL")
    }


def _reveal_events(conninfo: str, tenant: UUID) -> int:
    return int(
        str(
            _scalar(
                conninfo,
                "SELECT count(*) FROM bastion.audit_events "
                "WHERE tenant_id = %s AND action = 'pii.reveal'",
                tenant,
            )
        )
    )


async def test_only_owners_read_originals_by_the_database_and_each_read_is_audited(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles
) -> None:
    """No Cedar here: the service alone, as a route that forgot its check would call it."""
    a, b = pair
    doc = await _indexed(kb, a.contributor, TICKET)
    before = _reveal_events(database.superuser, a.id)
    for reader in (a.viewer, a.contributor):
        with pytest.raises(RevealForbidden):
            await kb.original(reader, doc, reason="just looking around")
    with pytest.raises(RevealReasonRequired):
        await kb.original(a.owner, doc, reason="   ")
    with pytest.raises(DocumentNotFound):  # another tenant's owner
        await kb.original(b.owner, doc, reason="reading the neighbours")
    assert _reveal_events(database.superuser, a.id) == before  # nothing written
    body, _ = await kb.original(a.owner, doc, reason="customer asked for a copy")
    assert b"jane.doe@example.com" in body
    assert _reveal_events(database.superuser, a.id) == before + 1
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT actor, target, details FROM bastion.audit_events "
            "WHERE tenant_id = %s AND action = 'pii.reveal' ORDER BY seq DESC LIMIT 1",
            (a.id,),
        ).fetchone()
    assert row is not None
    assert row[0] == f"user:{a.owner.user_id}" and row[1] == f"document:{doc}"
    # The reason is sealed under the tenant's data key (the trail outlives a shred).
    assert "customer asked" not in str(row[2])
    async with kb.db.tenant_tx(a.id, a.owner.user_id, "owner") as tx:
        opened = await open_note(tx, kb.keys, a.id, row[2]["reason"])
    assert opened == "customer asked for a copy"


async def test_titles_are_stored_tokenized_and_found_by_their_raw_form(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles
) -> None:
    a, _ = pair
    title = "Refund for jane.doe@example.com"
    doc = await _indexed(kb, a.contributor, TICKET, title=title)
    shown = (await kb.document(a.viewer, doc)).title
    assert "jane.doe@example.com" not in shown and shown.startswith("Refund for ⟦EMAIL_")
    # Stored only sealed (migration 0025), and what is sealed is the tokenized form.
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT title, title_ciphertext, key_version FROM bastion.documents WHERE id = %s",
            (doc,),
        ).fetchone()
    assert row is not None and row[0] is None
    async with kb.db.tenant_tx(a.id, None, "system") as tx:
        key = await kb.keys.get(tx, a.id, row[2])
    assert open_sealed(key, "documents.title", a.id, doc, row[1]).decode() == shown
    hits = await kb.search(a.viewer, "support", query="refund", k=5, title=title)
    assert {h.document_id for h in hits} == {doc} and all(h.title == shown for h in hits)
    assert [h.document_id for h in await kb.search(a.viewer, "support", query="x", title=shown)]
    # Another address is another token: the filter stays exact.
    other = "Refund for john.roe@example.com"
    assert await kb.search(a.viewer, "support", query="refund", title=other) == []


async def test_ingest_twice_writes_once(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles
) -> None:
    a, _ = pair
    doc = await _indexed(kb, a.contributor, TICKET * 8)
    count = _scalar(
        database.superuser, "SELECT count(*) FROM bastion.chunks WHERE document_id = %s", doc
    )
    again = await kb.ingest(a.id, doc)
    assert again.status == "skipped"
    assert (
        _scalar(
            database.superuser, "SELECT count(*) FROM bastion.chunks WHERE document_id = %s", doc
        )
        == count
    )
    assert count == (await kb.document(a.viewer, doc)).chunk_count


async def test_same_upload_twice_with_an_idempotency_key_is_one_document(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles
) -> None:
    a, _ = pair
    key = f"upload-{uuid4()}"
    first = await kb.upload(
        a.contributor,
        "support",
        title="t",
        body=b"hello",
        content_type="text/plain",
        idempotency_key=key,
    )
    second = await kb.upload(
        a.contributor,
        "support",
        title="t",
        body=b"hello",
        content_type="text/plain",
        idempotency_key=key,
    )
    assert first.created and not second.created and first.document.id == second.document.id
    with pytest.raises(IdempotencyKeyReused):
        await kb.upload(
            a.contributor,
            "support",
            title="t",
            body=b"other",
            content_type="text/plain",
            idempotency_key=key,
        )
    assert [d.title for d in await kb.documents(a.contributor, "support")].count("t") == 1
    assert (
        _scalar(
            database.queue,
            "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE args->>'document_id' = %s",
            str(first.document.id),
        )
        == 1
    )


async def test_delete_removes_chunks_and_cached_embeddings(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles
) -> None:
    a, _ = pair
    doc = await _indexed(kb, a.contributor, TICKET)
    # A half-done ingestion of another document leaves cached embeddings.
    pending = await kb.upload(
        a.contributor, "support", title="p", body=TICKET.encode(), content_type="text/plain"
    )
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "INSERT INTO bastion.embedding_cache (tenant_id, document_id, chunk_hash, embedding) "
            "VALUES (%s, %s, %s, %s)",
            (a.id, pending.document.id, b"h" * 32, "[" + ",".join(["0.1"] * 384) + "]"),
        )
    with pytest.raises(DocumentNotFound):
        await kb.delete(a.viewer, doc)  # viewers may not delete (RLS): looks absent
    await kb.delete(a.contributor, doc)
    await kb.delete(a.contributor, pending.document.id)
    for table in ("chunks", "embedding_cache", "documents"):
        column = "id" if table == "documents" else "document_id"
        left = _scalar(
            database.superuser,
            f"SELECT count(*) FROM bastion.{table} WHERE {column} = ANY(%s)",
            [doc, pending.document.id],
        )
        assert left == 0, table
    assert await kb.search(a.viewer, "support", query="refund", k=5) == []
    # A queued job for a deleted document does nothing.
    assert (await kb.ingest(a.id, pending.document.id)).status == "skipped"


async def test_a_row_moved_to_another_tenant_does_not_decrypt(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, database: DbHandles, db: Database
) -> None:
    a, b = pair
    await _indexed(kb, a.contributor, TICKET)
    b_doc = await _indexed(kb, b.contributor, "Globex printer jams on tray two.")
    ns_b = await kb.namespace(b.viewer, "support")
    with psycopg.connect(database.superuser) as conn:
        stolen = conn.execute(
            "SELECT ciphertext, embedding::text, key_version FROM bastion.chunks "
            "WHERE tenant_id = %s LIMIT 1",
            (a.id,),
        ).fetchone()
        assert stolen is not None
        # Planted in B's namespace under a fresh id, as a compromised writer could.
        conn.execute(
            "INSERT INTO bastion.chunks (tenant_id, namespace_id, id, document_id, ordinal, "
            "token_count, embedding, ciphertext, key_version) "
            "VALUES (%s, %s, %s, %s, 99, 1, %s::vector, %s, %s)",
            (b.id, ns_b.id, uuid4(), b_doc, stolen[1], stolen[0], stolen[2]),
        )
    embedding = [float(x) for x in stolen[1].strip("[]").split(",")]
    hits = await kb.search(b.viewer, "support", embedding=embedding, k=10)
    assert all("refund" not in h.text for h in hits)
    assert all(h.ordinal != 99 for h in hits)
    # And directly: B's key, B's id, A's ciphertext → refused.
    async with db.tenant_tx(b.id, None, "system") as tx:
        key_b = await kb.keys.get(tx, b.id, 1)
    with pytest.raises(DecryptionFailed):
        open_sealed(key_b, "chunk", b.id, uuid4(), stolen[0])


async def test_shredded_tenant_ciphertext_cannot_be_read(
    pair: tuple[Tenant, Tenant],
    kb: KnowledgeService,
    database: DbHandles,
    db: Database,
    keystore: LocalKeystore,
) -> None:
    a, b = pair
    await _indexed(kb, a.contributor, TICKET)
    await _indexed(kb, b.contributor, TICKET)
    with psycopg.connect(database.superuser) as conn:  # a "backup" of A's rows
        backup = conn.execute(
            "SELECT c.id, c.ciphertext, k.wrapped FROM bastion.chunks c "
            "JOIN bastion.data_keys k ON k.tenant_id = c.tenant_id AND k.version = c.key_version "
            "WHERE c.tenant_id = %s",
            (a.id,),
        ).fetchall()
    assert backup
    assert await kb.shred_tenant(a.id) == 1
    assert f"kms/tenants/{a.id}" not in keystore.list()
    # Even with the wrapped key from the backup, nothing unwraps it any more.
    fresh = TenantKeys(LocalKMS(keystore))
    with pytest.raises(KeyUnavailable):
        fresh._unwrap(a.id, 1, bytes(backup[0][2]))
    async with db.tenant_tx(a.id, None, "system") as tx:
        with pytest.raises(KeyUnavailable):
            await fresh.get(tx, a.id, 1)
    # The namespace went with its partition (tests/test_shred.py).
    with pytest.raises(NamespaceNotFound):
        await kb.search(a.viewer, "support", query="refund", k=5)
    # B is untouched.
    assert await kb.search(b.viewer, "support", query="refund", k=5)


@pytest.mark.parametrize(
    ("body", "content_type", "reason", "status"),
    [
        (b"", "text/plain", "empty", 422),
        (b"   \n\t  ", "text/plain", "empty", 422),
        (b"\x00\x01\x02binary\x00junk\x00" * 50, "text/plain", "binary", 422),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "text/plain", "binary", 422),
        (b"caf\xe9 au lait", "text/plain; charset=utf-8", "encoding", 422),
        (b"hello", "text/plain; charset=no-such-charset", "encoding", 422),
        (b"hello", "application/x-msdownload", "unsupported-type", 415),
        (b"x" * (2 << 20), "text/plain", "too-large", 413),
    ],
    ids=["empty", "blank", "nul-junk", "png", "bad-utf8", "unknown-charset", "exe", "too-large"],
)
async def test_bad_uploads_are_refused_and_write_nothing(
    pair: tuple[Tenant, Tenant],
    kb: KnowledgeService,
    database: DbHandles,
    body: bytes,
    content_type: str,
    reason: str,
    status: int,
) -> None:
    a, _ = pair
    before = _scalar(database.superuser, "SELECT count(*) FROM bastion.documents")
    with pytest.raises(UploadRefused) as refused:
        await kb.upload(a.contributor, "support", title="bad", body=body, content_type=content_type)
    assert refused.value.extensions["reason"] == reason and status_of(refused.value) == status
    assert _scalar(database.superuser, "SELECT count(*) FROM bastion.documents") == before


async def test_latin1_with_its_charset_is_accepted(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService
) -> None:
    a, _ = pair
    up = await kb.upload(
        a.contributor,
        "support",
        title="fr",
        body="café crème".encode("latin-1"),
        content_type="text/plain; charset=latin-1",
    )
    assert (await kb.ingest(a.id, up.document.id)).status == "indexed"
    hits = await kb.search(a.viewer, "support", query="café crème", k=1)
    assert hits and "café crème" in hits[0].text


def _pdf_bomb() -> bytes:
    """A tiny PDF whose one content stream inflates to 200 MB."""
    deflate = zlib.compressobj(9)
    stream = b"".join(deflate.compress(b" " * 10_000_000) for _ in range(20)) + deflate.flush()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 << /Type /Font /Subtype /Type1 "
        b"/BaseFont /Helvetica >> >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"%PDF-1.4 this is not a pdf at all", "pdf-invalid"), (_pdf_bomb(), None)],
    ids=["garbage-pdf", "pdf-bomb"],
)
async def test_bad_pdfs_fail_the_job_with_a_reason_and_index_nothing(
    pair: tuple[Tenant, Tenant],
    kb: KnowledgeService,
    database: DbHandles,
    body: bytes,
    reason: str | None,
) -> None:
    a, _ = pair
    up = await kb.upload(
        a.contributor, "support", title="pdf", body=body, content_type="application/pdf"
    )
    outcome = await kb.ingest(a.id, up.document.id)
    assert outcome.status == "failed"
    if reason is None:
        assert outcome.reason in ("pdf-too-large", "too-large")
    else:
        assert outcome.reason == reason
    info = await kb.document(a.viewer, up.document.id)
    assert info.status == "failed" and info.failure_reason == outcome.reason
    left = _scalar(
        database.superuser,
        "SELECT count(*) FROM bastion.chunks WHERE document_id = %s",
        up.document.id,
    )
    assert left == 0


async def test_mixing_embedders_is_refused(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, db: Database, keystore: LocalKeystore
) -> None:
    a, _ = pair
    up = await kb.upload(
        a.contributor, "support", title="t", body=TICKET.encode(), content_type="text/plain"
    )
    # The namespace was made for the hashing embedder; a service that would
    # embed it with another model (another dimension) fails the document instead.
    other = KnowledgeService(
        db, TenantKeys(LocalKMS(keystore)), embedders=lambda _name: HashingEmbedder(dim=256)
    )
    outcome = await other.ingest(a.id, up.document.id)
    assert outcome.status == "failed" and outcome.reason == "embedder-mismatch"
    # And the partition itself refuses a vector of another dimension.
    ns = await kb.namespace(a.viewer, "support")
    async with db.tenant_tx(a.id, None, "system") as tx:
        with pytest.raises(psycopg.errors.CheckViolation):
            await tx.execute(
                "INSERT INTO bastion.chunks (tenant_id, namespace_id, document_id, ordinal, "
                "token_count, embedding, ciphertext, key_version) "
                "VALUES (%s, %s, %s, 0, 1, %s::vector, 'x', 1)",
                (a.id, ns.id, up.document.id, vector_literal(np.ones(256, dtype=np.float32))),
            )


async def test_search_refuses_an_embedding_of_the_wrong_shape(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService
) -> None:
    a, _ = pair
    for embedding in ([0.1] * 383, [float("nan")] * 384):
        with pytest.raises(EmbeddingMismatch):
            await kb.search(a.viewer, "support", embedding=embedding, k=3)


async def test_filters_with_iterative_scan_still_return_k(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService
) -> None:
    a, _ = pair
    docs = [
        await _indexed(kb, a.contributor, f"Ticket {i}: printer {i} is broken.", f"t{i}")
        for i in range(30)
    ]
    hits = await kb.search(a.viewer, "support", query="printer broken", k=1, document_ids=docs[7:8])
    assert [h.document_id for h in hits] == [docs[7]]
    hits = await kb.search(a.viewer, "support", query="printer", k=5, title="t12")
    assert [h.document_id for h in hits] == [docs[12]]
    injected = await kb.search(a.viewer, "support", query="printer", k=5, title="t1' OR '1'='1")
    assert injected == []


# -- recall of the per-namespace HNSW index against exact search ------------------


async def _plant(
    db: Database, kb: KnowledgeService, tenant: Tenant, vectors: np.ndarray
) -> dict[UUID, int]:
    """Store ``vectors`` as chunks of one document, as ingestion would (rotated by
    the tenant's vector transform); return chunk id → row index."""
    up = await kb.upload(
        tenant.contributor, "support", title="v", body=b"vectors", content_type="text/plain"
    )
    ns = await kb.namespace(tenant.viewer, "support")
    ids = {}
    async with db.tenant_tx(tenant.id, None, "system") as tx:
        version, key = await kb.keys.current(tx, tenant.id)
        stored = (await kb.keys.vector_transform(tx, tenant.id, ns.dim)).apply(vectors)
        for i, vector in enumerate(stored):
            chunk_id = uuid4()
            ids[chunk_id] = i
            await tx.execute(
                "INSERT INTO bastion.chunks (tenant_id, namespace_id, id, document_id, ordinal, "
                "token_count, embedding, ciphertext, key_version) "
                "VALUES (%s, %s, %s, %s, %s, 1, %s::vector, %s, %s)",
                (
                    tenant.id,
                    ns.id,
                    chunk_id,
                    up.document.id,
                    i,
                    vector_literal(vector),
                    seal(key, "chunk", tenant.id, chunk_id, f"row {i}".encode()),
                    version,
                ),
            )
        await tx.execute(
            "UPDATE bastion.documents SET status = 'indexed' WHERE id = %s", (up.document.id,)
        )
    return ids


async def test_recall_at_10_of_hnsw_against_exact_search(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService, db: Database
) -> None:
    rng = np.random.default_rng(7)
    a, b = pair

    def clustered(n: int) -> np.ndarray:
        centres = rng.normal(size=(8, 384))
        rows = centres[rng.integers(0, 8, n)] + 0.6 * rng.normal(size=(n, 384))
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    mine, theirs = clustered(3000), clustered(1500)
    ids = await _plant(db, kb, a, mine)
    await _plant(db, kb, b, theirs)
    ns = await kb.namespace(a.viewer, "support")
    async with db.tenant_tx(a.id, None, "viewer") as tx:
        plan = await (
            await tx.execute(
                "EXPLAIN SELECT id FROM bastion.chunks WHERE tenant_id = %s AND namespace_id = %s "
                "ORDER BY embedding::vector(384) <=> %s::vector(384) LIMIT 10",
                (a.id, ns.id, vector_literal(mine[0])),
            )
        ).fetchall()
    # The recall measured below is the HNSW index's, not an exact scan's.
    assert any("Index Scan" in row["QUERY PLAN"] for row in plan), plan
    recalls = []
    for _ in range(40):
        query = mine[rng.integers(0, len(mine))] + 0.1 * rng.normal(size=384)
        query /= np.linalg.norm(query)
        exact = set(np.argsort(-(mine @ query))[:10].tolist())
        hits = await kb.search(a.viewer, "support", embedding=query.tolist(), k=10)
        assert len(hits) == 10
        found = {ids.get(h.chunk_id, -1) for h in hits}
        assert -1 not in found  # nothing of B's
        recalls.append(len(found & exact) / 10)
    assert float(np.mean(recalls)) >= 0.95, np.mean(recalls)


async def test_text_of_an_unreadable_pdf_is_a_problem_never_the_original(
    pair: tuple[Tenant, Tenant], kb: KnowledgeService
) -> None:
    a, _ = pair
    broken = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\nmail jane.doe@example.com\n%%EOF"
    up = await kb.upload(
        a.contributor, "support", title="scan", body=broken, content_type="application/pdf"
    )
    with pytest.raises(DocumentTextUnavailable) as refused:
        await kb.text(a.viewer, up.document.id)
    assert refused.value.extensions["reason"].startswith("pdf-")
    assert "jane.doe" not in str(refused.value)
