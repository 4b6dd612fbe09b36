"""The knowledge base: namespaces, documents, ingestion and retrieval (CHECKLIST R3).

Isolation holds in three places at once: the query names the tenant and the
namespace, row-level security filters on the signed tenant context, and the
chunks of a namespace live in its own partition with its own HNSW graph.
Chunk text and document bodies are stored only encrypted under the tenant's
data key (:mod:`bastion.secrets.tenant_keys`) and decrypted after the row-level
checks, for a caller whose transaction could read them.

Ingestion is exactly-once by construction: the chunks of a document are
written in the one transaction that flips it from ``pending`` to ``indexed``,
under the document's row lock, so a second run of the same job (a retry after
a killed worker, a duplicate delivery) finds it indexed and does nothing.
Embeddings computed before a crash are kept in ``embedding_cache`` so the
retry does not pay for them again.

Parsing an upload is CPU work an attacker chooses (a megabyte of HTML costs
a second): beyond a few kilobytes it runs in :mod:`bastion.offload`'s worker
processes, a few jobs per tenant at a time, never on the event loop.

What is stored outside the ciphertext is keyed too, so that a backup made
before a shred recognises nothing once the keys are gone: titles are sealed
like bodies (with a keyed digest for the exact-title filter), and embedding
vectors are stored rotated by the tenant's secret orthogonal matrix
(:mod:`bastion.secrets.vector_transform`), queries rotated alike, which keeps every
cosine and so every ranking. Namespaces made before migration 0025 keep plain
vectors and titles until :meth:`KnowledgeService.reencode`.

Personal data leaves only as the tenant's vault tokens: titles are tokenized
when stored, chunks when indexed, and a document's text is shown tokenized
(:meth:`KnowledgeService.text`). The original upload is raw personal data, so
:meth:`KnowledgeService.original` holds it to the vault's own line: owner or
system in the database, a reason, and a ``pii.reveal`` audit event.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import numpy as np
import psycopg
from psycopg import sql

from bastion.audit import log as audit
from bastion.audit.notes import sealed_note
from bastion.db.pool import Conn, Database
from bastion.errors import Kind
from bastion.knowledge.chunks import chunk_text
from bastion.knowledge.embedders import Embedder, get_embedder
from bastion.knowledge.errors import (
    DocumentNotFound,
    DocumentTextUnavailable,
    EmbeddingMismatch,
    IdempotencyKeyReused,
    NamespaceExists,
    NamespaceNotFound,
    ParsingBusy,
    RevealReasonRequired,
    UploadRefused,
)
from bastion.knowledge.extract import (
    SUPPORTED_TYPES,
    ExtractionError,
    extract_text,
    extracted_length,
    media_type,
)
from bastion.knowledge.redact import Redactor
from bastion.limited_process import ChildFailed, LimitExceeded, ProcessLimits, run_limited
from bastion.logs import get_logger
from bastion.offload import FairProcessPool, JobFailed, JobTimedOut, PoolBusy, shared_pool
from bastion.safety.pii import PiiInputNotText, PiiInputTooLarge
from bastion.safety.tenant_policies import SafetyPolicies
from bastion.safety.vault import (
    PiiAllowLists,
    PiiVault,
    require_reveal,
)
from bastion.secrets.protocols import KMS
from bastion.secrets.tenant_keys import (
    DecryptionFailed,
    KeyUnavailable,
    TenantKeys,
    keyed_digest,
    open_sealed,
    seal,
)
from bastion.secrets.vector_transform import NAME as VECTOR_TRANSFORM
from bastion.secrets.vector_transform import VectorTransform
from bastion.settings import Settings
from bastion.telemetry.tracing import current_traceparent

_log = get_logger("bastion.knowledge")

MAX_K = 100
EMBED_BATCH = 64
INSERT_BATCH = 500
# Bodies up to this size are parsed on the event loop: a few milliseconds at
# worst (HTML: about 1 ms per KiB of dense markup; text: 0.07 ms per KiB).
# Anything larger goes to the parser processes.
INLINE_PARSE_BYTES = 4 << 10
INLINE_PARSE_BYTES_TEXT = 32 << 10
# HNSW candidate list; with iterative scans pgvector widens it until k rows
# pass the filters (pgvector >= 0.8, "iterative index scans").
EF_SEARCH = 100


@dataclass(frozen=True)
class Actor:
    """Who acts, in which tenant, with which database role."""

    tenant_id: UUID
    user_id: UUID | None
    role: str

    @property
    def name(self) -> str:
        return f"user:{self.user_id}" if self.user_id else self.role


@dataclass(frozen=True)
class Namespace:
    id: UUID
    name: str
    embedder: str
    model_id: str
    dim: int
    created_at: datetime
    # "orthogonal-v1": vectors stored keyed; None: plain (made before 0025, not re-encoded).
    vector_transform: str | None = None


@dataclass(frozen=True)
class DocumentInfo:
    id: UUID
    namespace_id: UUID
    title: str
    content_type: str
    byte_size: int
    status: str
    failure_reason: str | None
    chunk_count: int | None
    redactions: dict[str, int] | None
    created_at: datetime
    indexed_at: datetime | None


@dataclass(frozen=True)
class Upload:
    document: DocumentInfo
    created: bool  # False: the idempotency key named an earlier identical upload


@dataclass(frozen=True)
class SearchHit:
    chunk_id: UUID
    document_id: UUID
    title: str
    ordinal: int
    score: float
    text: str


@dataclass(frozen=True)
class ReencodeReport:
    namespaces: int = 0  # namespaces whose vectors were rotated now
    chunks: int = 0
    titles: int = 0  # titles sealed now
    partitions: tuple[str, ...] = ()  # to VACUUM: their dead tuples hold the plain vectors


@dataclass(frozen=True)
class IngestOutcome:
    status: str  # indexed, failed, skipped
    chunks: int = 0
    embedded: int = 0  # chunks embedded in this run (not taken from the cache)
    reason: str | None = None


Progress = Callable[[str, int], None]
"""Called with ("chunks", total) once, then ("embedded", n) after each batch."""


def _inline_parse_limit(media: str) -> int:
    """The largest body of ``media`` parsed on the event loop (-1: none, a PDF:
    a few compressed kilobytes can unpack to minutes of work)."""
    if media == "application/pdf":
        return -1
    return INLINE_PARSE_BYTES if media == "text/html" else INLINE_PARSE_BYTES_TEXT


@functools.cache
def _vector_format(dim: int) -> str:
    return "[" + ",".join(["%.7g"] * dim) + "]"


def vector_literal(vector: np.ndarray[Any, Any]) -> str:
    """pgvector's text form ``[x,y,...]`` of a 1-d float vector (float32 precision)."""
    values = vector.tolist()
    return _vector_format(len(values)) % tuple(values)


def _embedded(
    embedder: Embedder, transform: VectorTransform | None, texts: list[str]
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The texts' vectors as the namespace stores them: rotated when keyed."""
    matrix = embedder.embed(texts)
    return matrix if transform is None else transform.apply(matrix)


def _parse_vector(text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.asarray(json.loads(text), dtype=np.float32)


_DOCUMENT_COLUMNS = (
    "id, namespace_id, title, content_type, byte_size, status, failure_reason, "
    "chunk_count, redactions, created_at, indexed_at, title_ciphertext, key_version"
)
_NAMESPACE_COLUMNS = "id, name, embedder, model_id, dim, created_at, vector_transform"
TITLE = "documents.title"
"""Purpose of a sealed title and of its digest: table and column, in the AAD."""


def _document(row: dict[str, Any], title: str) -> DocumentInfo:
    fields = {k: row[k] for k in DocumentInfo.__dataclass_fields__ if k != "title"}
    return DocumentInfo(title=title, **fields)


class KnowledgeService:
    """Namespaces, documents, ingestion and search over the app role's pool."""

    def __init__(
        self,
        db: Database,
        keys: TenantKeys,
        *,
        default_embedder: str = "minilm",
        embedders: Callable[[str], Embedder] = get_embedder,
        redactor: Redactor | None = None,
        max_upload_bytes: int = 1 << 20,
        chunk_tokens: int = 200,
        chunk_overlap: int = 40,
        parsers: FairProcessPool | None = None,
        extract_limits: ProcessLimits | None = None,
        allow_lists: PiiAllowLists | None = None,
    ) -> None:
        """``parsers`` runs large parses (default: this process's shared pool);
        ``extract_limits`` bound each extraction for indexing (its own process);
        ``allow_lists`` are the values tenants keep in clear (none by default)."""
        self.db = db
        self.keys = keys
        self.default_embedder = default_embedder
        self.embedders = embedders
        # Irreversible masking if a redactor is given; else the tenant's PII vault.
        self.redactor = redactor
        self.vault = PiiVault(keys, allow_lists=allow_lists)
        self.max_upload_bytes = max_upload_bytes
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap
        self._parsers = parsers
        self.extract_limits = extract_limits or ProcessLimits()

    @property
    def parsers(self) -> FairProcessPool:
        """The pool large parses run in (this process's shared one unless given)."""
        if self._parsers is None:
            self._parsers = shared_pool()
        return self._parsers

    async def _parse(
        self, tenant_id: UUID, fn: Callable[[bytes, str], Any], body: bytes, media: str
    ) -> Any:
        """``fn(body, media)``: on the loop for a small text body, else in the
        parser pool under the tenant's share of it.

        Raises what ``fn`` raises, :class:`ExtractionError` ``too-complex``
        when the parse ran out of time or memory, and :class:`ParsingBusy`
        when the tenant already has its share of parses running and waiting.
        """
        try:
            if len(body) <= _inline_parse_limit(media):
                return fn(body, media)
            return await self.parsers.run(tenant_id, fn, body, media)
        except PoolBusy as exc:
            raise ParsingBusy(
                "this tenant's documents already fill its share of the parsers; retry shortly",
                retry_after=exc.retry_after,
            ) from None
        except (JobTimedOut, JobFailed, MemoryError):
            raise ExtractionError("too-complex", "the document costs too much to parse") from None

    def _tx(self, actor: Actor) -> Any:
        return self.db.tenant_tx(actor.tenant_id, actor.user_id, actor.role)

    # -- namespaces ---------------------------------------------------------

    async def create_namespace(
        self, actor: Actor, name: str, embedder: str | None = None
    ) -> Namespace:
        """Create a namespace (and its partition and HNSW index) for ``embedder``.

        Raises :class:`NamespaceExists`, or :class:`UploadRefused`-style
        ValueError for an unknown embedder.
        """
        model = self.embedders(embedder or self.default_embedder)
        try:
            async with self._tx(actor) as tx:
                cur = await tx.execute(
                    "SELECT bastion.create_namespace(%s, %s, %s, %s) AS id",
                    (name, model.name, model.model_id, model.dim),
                )
                row = await cur.fetchone()
                assert row is not None
                await audit.record(
                    tx,
                    actor=actor.name,
                    action="namespace.create",
                    target=str(row["id"]),
                    # By id: the name is the tenant's words, and the trail outlives a shred.
                    details={"embedder": model.name, "dim": model.dim},
                )
                return await self._namespace(tx, str(row["id"]))
        except psycopg.errors.UniqueViolation:
            raise NamespaceExists("a namespace with that name exists in this tenant") from None

    async def ensure_namespace(
        self, actor: Actor, name: str, embedder: str | None = None
    ) -> Namespace:
        """Return the namespace called ``name``, creating it if missing."""
        try:
            return await self.namespace(actor, name)
        except NamespaceNotFound:
            try:
                return await self.create_namespace(actor, name, embedder)
            except NamespaceExists:  # created concurrently
                return await self.namespace(actor, name)

    async def namespaces(self, actor: Actor) -> list[Namespace]:
        async with self._tx(actor) as tx:
            cur = await tx.execute(
                f"SELECT {_NAMESPACE_COLUMNS} FROM bastion.namespaces "
                "WHERE tenant_id = %s ORDER BY name",
                (actor.tenant_id,),
            )
            return [Namespace(**row) for row in await cur.fetchall()]

    async def namespace(self, actor: Actor, ref: str) -> Namespace:
        async with self._tx(actor) as tx:
            return await self._namespace(tx, ref)

    async def _namespace(self, tx: Conn, ref: str) -> Namespace:
        """The namespace named (or with the id) ``ref`` visible in this transaction."""
        try:
            by_id: UUID | None = UUID(ref)
        except ValueError:
            by_id = None
        cur = await tx.execute(
            f"SELECT {_NAMESPACE_COLUMNS} FROM bastion.namespaces "
            "WHERE tenant_id = bastion.app_tenant_id() AND (name = %s OR id = %s)",
            (ref, by_id),
        )
        row = await cur.fetchone()
        if row is None:
            # Not echoed: the path segment is the caller's input, and may be anything.
            raise NamespaceNotFound("no such namespace in this tenant")
        return Namespace(**row)

    # -- documents ----------------------------------------------------------

    async def upload(
        self,
        actor: Actor,
        namespace: str,
        *,
        title: str,
        body: bytes,
        content_type: str,
        idempotency_key: str | None = None,
        enqueue: bool = True,
    ) -> Upload:
        """Store ``body`` encrypted and enqueue its ingestion, in one transaction.

        ``enqueue=False`` is for a caller that ingests the document itself
        (``bastion ingest``), so the worker does not embed it a second time.

        Text bodies are checked now (so a client learns at once that its file
        is empty, binary or mis-encoded), off the event loop unless small;
        PDFs are parsed by the worker, whose failures are stored on the
        document. Raises :class:`UploadRefused`, :class:`NamespaceNotFound`,
        :class:`ParsingBusy` (429) or :class:`IdempotencyKeyReused`.
        """
        try:
            media, charset = media_type(content_type)
        except ExtractionError as exc:
            raise UploadRefused(str(exc), reason=exc.reason) from None
        if len(body) > self.max_upload_bytes:
            raise UploadRefused(
                f"uploads are limited to {self.max_upload_bytes} bytes",
                kind=Kind.TOO_LARGE,
                reason="too-large",
            )
        if media not in SUPPORTED_TYPES:
            raise UploadRefused(
                f"supported types are {', '.join(sorted(SUPPORTED_TYPES))}",
                kind=Kind.UNSUPPORTED_MEDIA,
                reason="unsupported-type",
            )
        if media != "application/pdf":
            if len(body) > _inline_parse_limit(media):
                # An upload that will be refused anyway costs no parser's time.
                await self.namespace(actor, namespace)
            try:
                check = functools.partial(extracted_length, charset=charset)
                await self._parse(actor.tenant_id, check, body, media)
            except ExtractionError as exc:
                raise UploadRefused(str(exc), reason=exc.reason) from None
        async with self._tx(actor) as tx:
            ns = await self._namespace(tx, namespace)
            document_id = uuid4()
            version, key = await self.keys.current(tx, actor.tenant_id)
            # Keyed: a plain hash would let anyone with a dump recognise a file.
            digest = keyed_digest(key, "document", body)
            # The client's key may be derived from the content (``bastion ingest``
            # hashes path and body): stored keyed too, under the tenant's first
            # data key, so that a retry after a rotation still finds it.
            first = key if version == 1 else await self.keys.get(tx, actor.tenant_id, 1)
            stored_key = None
            if idempotency_key is not None:
                stored_key = keyed_digest(first, "idempotency-key", idempotency_key.encode()).hex()
            # A title is shown to every reader of the tenant: tokenized; and
            # kept only sealed, with a keyed digest for the exact-title filter.
            title = await self._redacted(tx, actor, title)
            ciphertext = seal(key, "document", actor.tenant_id, document_id, body)
            cur = await tx.execute(
                "INSERT INTO bastion.documents (id, namespace_id, title_ciphertext, "
                "title_digest, content_type, byte_size, sha256, body_ciphertext, key_version, "
                "idempotency_key, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING id",
                (
                    document_id,
                    ns.id,
                    seal(key, TITLE, actor.tenant_id, document_id, title.encode()),
                    keyed_digest(first, TITLE, title.encode()),
                    content_type,
                    len(body),
                    digest,
                    ciphertext,
                    version,
                    stored_key,
                    actor.user_id,
                ),
            )
            if await cur.fetchone() is None:
                # The key was used before (or by a concurrent request, which
                # ON CONFLICT waited for): the same upload again is the same
                # document; another body under that key is a client bug.
                cur = await tx.execute(
                    f"SELECT {_DOCUMENT_COLUMNS}, sha256 FROM bastion.documents "
                    "WHERE idempotency_key = %s",
                    (stored_key,),
                )
                earlier = await cur.fetchone()
                assert earlier is not None
                if earlier["key_version"] != version:  # digested under an older key
                    earlier_key = await self.keys.get(tx, actor.tenant_id, earlier["key_version"])
                    digest = keyed_digest(earlier_key, "document", body)
                if earlier["sha256"] != digest or earlier["namespace_id"] != ns.id:
                    raise IdempotencyKeyReused(
                        "that Idempotency-Key was used for a different upload"
                    )
                return Upload(await self._info(tx, actor.tenant_id, earlier), created=False)
            if enqueue:
                # The job's span joins this request's trace (migration 0036).
                await tx.execute(
                    "SELECT bastion.enqueue_ingest(%s, %s)", (document_id, current_traceparent())
                )
            await audit.record(
                tx,
                actor=actor.name,
                action="document.upload",
                target=str(document_id),
                details={"namespace": str(ns.id), "bytes": len(body), "type": media},
            )
            return Upload(await self._document(tx, document_id), created=True)

    async def documents(self, actor: Actor, namespace: str) -> list[DocumentInfo]:
        async with self._tx(actor) as tx:
            ns = await self._namespace(tx, namespace)
            cur = await tx.execute(
                f"SELECT {_DOCUMENT_COLUMNS} FROM bastion.documents "
                "WHERE tenant_id = %s AND namespace_id = %s ORDER BY created_at, id",
                (actor.tenant_id, ns.id),
            )
            rows = await cur.fetchall()
            infos = [await self._opened(tx, actor.tenant_id, row) for row in rows]
            return [info for info in infos if info is not None]

    async def document(self, actor: Actor, document_id: UUID) -> DocumentInfo:
        async with self._tx(actor) as tx:
            return await self._document(tx, document_id)

    async def _document(self, tx: Conn, document_id: UUID) -> DocumentInfo:
        cur = await tx.execute(
            f"SELECT {_DOCUMENT_COLUMNS}, tenant_id FROM bastion.documents "
            "WHERE tenant_id = bastion.app_tenant_id() AND id = %s AND namespace_id IS NOT NULL",
            (document_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise DocumentNotFound("no such document in this tenant")
        return await self._info(tx, row["tenant_id"], row)

    async def _title(self, tx: Conn, tenant_id: UUID, row: dict[str, Any]) -> str:
        """The document's (tokenized) title: opened, or as stored before 0025.

        Raises :class:`KeyUnavailable` or :class:`DecryptionFailed`."""
        if row["title_ciphertext"] is None:
            return str(row["title"])
        key = await self.keys.get(tx, tenant_id, row["key_version"])
        return open_sealed(key, TITLE, tenant_id, row["id"], row["title_ciphertext"]).decode()

    async def _opened(self, tx: Conn, tenant_id: UUID, row: dict[str, Any]) -> DocumentInfo | None:
        """The document of ``row`` with its title opened; None (and an alarm) for
        a row the tenant's key cannot open: it was not written for this tenant."""
        try:
            return _document(row, await self._title(tx, tenant_id, row))
        except (KeyUnavailable, DecryptionFailed):
            _log.warning("document_undecryptable", document_id=str(row["id"]))
            return None

    async def _info(self, tx: Conn, tenant_id: UUID, row: dict[str, Any]) -> DocumentInfo:
        info = await self._opened(tx, tenant_id, row)
        if info is None:
            raise DocumentNotFound("no such document in this tenant")
        return info

    async def _redacted(self, db: Database | Conn, actor: Actor, text: str) -> str:
        """``text`` with its personal data replaced as indexed text is: by the
        tenant's vault tokens (stored as ``actor``, or in ``db`` if it is a
        transaction), or by the masking redactor's placeholders if one is set."""
        if self.redactor is not None:
            return self.redactor.redact(text).text
        redaction = await self.vault.tokenize(
            db, actor.tenant_id, text, user_id=actor.user_id, role=actor.role
        )
        return redaction.text

    async def _sealed_body(self, tx: Conn, actor: Actor, document_id: UUID) -> tuple[bytes, str]:
        """The decrypted upload of a document visible in ``tx``, and its content type."""
        info = await self._document(tx, document_id)
        cur = await tx.execute(
            "SELECT body_ciphertext, key_version FROM bastion.documents WHERE id = %s",
            (document_id,),
        )
        row = await cur.fetchone()
        assert row is not None
        key = await self.keys.get(tx, actor.tenant_id, row["key_version"])
        body = open_sealed(key, "document", actor.tenant_id, document_id, row["body_ciphertext"])
        return body, info.content_type

    async def text(self, actor: Actor, document_id: UUID) -> str:
        """The document's text with its personal data replaced by vault tokens.

        The text that was (or will be) indexed, whole: the same tokens as its
        chunks. Values not yet in the vault (a pending document) are added, as
        ingestion would. Raises :class:`DocumentNotFound`,
        :class:`ParsingBusy`, or :class:`DocumentTextUnavailable` when no text
        can be extracted or scanned (never the raw body instead).
        """
        async with self._tx(actor) as tx:
            body, content_type = await self._sealed_body(tx, actor, document_id)
        media, charset = media_type(content_type)
        try:
            # A PDF bomb uploaded for the worker is parsed here too: in the pool,
            # killed past its time limit, never in this process.
            text: str = await self._parse(
                actor.tenant_id, functools.partial(extract_text, charset=charset), body, media
            )
        except ExtractionError as exc:
            raise DocumentTextUnavailable(
                "the document's text cannot be extracted", reason=exc.reason
            ) from None
        try:
            return await self._redacted(self.db, actor, text)
        except (PiiInputTooLarge, PiiInputNotText):
            raise DocumentTextUnavailable(
                "the document's text cannot be scanned for personal data",
                reason="pii-scan-refused",
            ) from None

    async def original(self, actor: Actor, document_id: UUID, *, reason: str) -> tuple[bytes, str]:
        """Return the original upload, personal data and all, and its content type.

        The vault's line (:meth:`PiiVault.detokenize`): the caller has checked
        ``pii:reveal``; the database refuses every role but ``owner`` and
        ``system`` (:class:`RevealForbidden`); ``reason`` is required
        (:class:`RevealReasonRequired`); one ``pii.reveal`` audit event — who,
        which document, why — commits in the same transaction, or nothing is
        returned. Raises :class:`DocumentNotFound` (another tenant's included).
        """
        if not reason.strip():
            raise RevealReasonRequired("say why the original is needed")
        async with self._tx(actor) as tx:
            await require_reveal(tx, "only owners may read original documents")
            body, content_type = await self._sealed_body(tx, actor, document_id)
            await audit.record(
                tx,
                actor=actor.name,
                action="pii.reveal",
                target=f"document:{document_id}",
                details={
                    "document": str(document_id),
                    "original": media_type(content_type)[0],
                    "bytes": len(body),
                    # The member's words: sealed, as the trail outlives a shred.
                    "reason": await sealed_note(tx, self.keys, actor.tenant_id, reason[:500]),
                },
            )
        return body, content_type

    async def delete(self, actor: Actor, document_id: UUID) -> None:
        """Delete a document with its chunks and cached embeddings (one transaction)."""
        async with self._tx(actor) as tx:
            cur = await tx.execute(
                "DELETE FROM bastion.documents WHERE tenant_id = %s AND id = %s "
                "AND namespace_id IS NOT NULL RETURNING id",
                (actor.tenant_id, document_id),
            )
            if await cur.fetchone() is None:
                raise DocumentNotFound("no such document in this tenant")
            await audit.record(
                tx, actor=actor.name, action="document.delete", target=str(document_id)
            )

    # -- ingestion ----------------------------------------------------------

    async def ingest(
        self, tenant_id: UUID, document_id: UUID, *, progress: Progress | None = None
    ) -> IngestOutcome:
        """Index a pending document: extract → redact → chunk → embed → store.

        Idempotent: a document that is not pending (indexed, failed, deleted)
        is skipped. A document that cannot be indexed is marked failed with a
        reason; infrastructure errors propagate so the queue retries.
        """
        system = Actor(tenant_id, None, "system")
        async with self._tx(system) as tx:
            cur = await tx.execute(
                "SELECT d.status, d.content_type, d.body_ciphertext, d.key_version, "
                "n.embedder, n.model_id, n.dim, n.vector_transform FROM bastion.documents d "
                "JOIN bastion.namespaces n ON n.id = d.namespace_id WHERE d.id = %s",
                (document_id,),
            )
            doc = await cur.fetchone()
            if doc is None or doc["status"] != "pending":
                return IngestOutcome("skipped")
            key = await self.keys.get(tx, tenant_id, doc["key_version"])
            body = open_sealed(key, "document", tenant_id, document_id, doc["body_ciphertext"])
        media, charset = media_type(doc["content_type"])
        try:
            embedder = self.embedders(doc["embedder"])
        except ValueError:
            return await self._fail(system, document_id, "embedder-unavailable")
        if embedder.model_id != doc["model_id"] or embedder.dim != doc["dim"]:
            return await self._fail(system, document_id, "embedder-mismatch")
        try:
            # An upload's cost is its uploader's choice (a PDF of path operators
            # takes minutes): a child process under CPU, memory and time limits.
            text = await run_limited(
                extract_text, body, media, charset=charset, limits=self.extract_limits
            )
        except (LimitExceeded, ChildFailed):
            return await self._fail(system, document_id, "too-complex")
        except ExtractionError as exc:
            return await self._fail(system, document_id, exc.reason)
        try:
            # Reversible tokens (⟦EMAIL_...⟧), deterministic per tenant; the
            # originals go to the vault, revealed only with pii:reveal.
            redaction = (
                self.redactor.redact(text)
                if self.redactor is not None
                else await self.vault.tokenize(self.db, tenant_id, text)
            )
        except (PiiInputTooLarge, PiiInputNotText):
            return await self._fail(system, document_id, "pii-scan-refused")
        chunks = chunk_text(
            redaction.text,
            embedder.token_offsets,
            max_tokens=self.chunk_tokens,
            overlap=self.chunk_overlap,
        )
        if not chunks:
            return await self._fail(system, document_id, "empty")
        if progress:
            progress("chunks", len(chunks))
        keyed = doc["vector_transform"] is not None
        vectors, embedded = await self._embed(
            system, document_id, embedder, chunks, progress, keyed=keyed
        )
        async with self._tx(system) as tx:
            # The namespace row shared: a re-encode (which locks it first)
            # cannot flip its vectors' frame between this check and the commit.
            cur = await tx.execute(
                "SELECT d.status, d.namespace_id, n.vector_transform FROM bastion.documents d "
                "JOIN bastion.namespaces n ON n.id = d.namespace_id WHERE d.id = %s "
                "FOR UPDATE OF d FOR SHARE OF n",
                (document_id,),
            )
            row = await cur.fetchone()
            if row is None or row["status"] != "pending":
                return IngestOutcome("skipped")  # done (or deleted) meanwhile
            reencoded = (row["vector_transform"] is not None) != keyed
            if not reencoded:
                await self._store_chunks(tx, tenant_id, document_id, row, chunks, vectors)
                await self._indexed(tx, document_id, chunks, redaction.counts)
        if reencoded:  # re-encoded meanwhile (its cache was dropped): once more, keyed
            return await self.ingest(tenant_id, document_id, progress=progress)
        return IngestOutcome("indexed", chunks=len(chunks), embedded=embedded)

    async def _store_chunks(
        self,
        tx: Conn,
        tenant_id: UUID,
        document_id: UUID,
        row: dict[str, Any],
        chunks: Sequence[Any],
        vectors: list[str],
    ) -> None:
        """Insert the document's chunks, sealed, with their vector literals."""
        version, key = await self.keys.current(tx, tenant_id)
        for start in range(0, len(chunks), INSERT_BATCH):
            batch = chunks[start : start + INSERT_BATCH]
            ids = [uuid4() for _ in batch]
            await tx.execute(
                "INSERT INTO bastion.chunks (tenant_id, namespace_id, id, document_id, "
                "ordinal, token_count, embedding, ciphertext, key_version) "
                "SELECT %s, %s, u.id, %s, u.ordinal, u.tokens, u.embedding::vector, "
                "u.ciphertext, %s FROM unnest(%s::uuid[], %s::int[], %s::int[], "
                "%s::text[], %s::bytea[]) AS u(id, ordinal, tokens, embedding, ciphertext)",
                (
                    tenant_id,
                    row["namespace_id"],
                    document_id,
                    version,
                    ids,
                    [c.ordinal for c in batch],
                    [c.tokens for c in batch],
                    [vectors[c.ordinal] for c in batch],
                    [
                        seal(key, "chunk", tenant_id, chunk_id, c.text.encode())
                        for chunk_id, c in zip(ids, batch, strict=True)
                    ],
                ),
            )

    async def _indexed(
        self, tx: Conn, document_id: UUID, chunks: Sequence[Any], counts: dict[str, int]
    ) -> None:
        """Mark the document indexed and drop its cached embeddings, audited."""
        await tx.execute(
            "DELETE FROM bastion.embedding_cache WHERE document_id = %s", (document_id,)
        )
        await tx.execute(
            "UPDATE bastion.documents SET status = 'indexed', chunk_count = %s, "
            "redactions = %s, indexed_at = now(), failure_reason = NULL WHERE id = %s",
            (len(chunks), json.dumps(counts), document_id),
        )
        await audit.record(
            tx,
            actor="worker",
            action="document.indexed",
            target=str(document_id),
            details={"chunks": len(chunks), "redactions": counts},
        )

    async def _embed(
        self,
        system: Actor,
        document_id: UUID,
        embedder: Embedder,
        chunks: Sequence[Any],
        progress: Progress | None,
        *,
        keyed: bool = True,
    ) -> tuple[list[str], int]:
        """Return each chunk's vector literal, embedding only what the cache lacks.

        ``keyed``: rotated by the tenant's vector transform, as the namespace
        stores them (cache included); else plain (a namespace not re-encoded).
        Each batch is committed to the cache at once: a worker killed halfway
        leaves the finished batches for the retry.
        """
        async with self._tx(system) as tx:
            # Keyed digests: the cache's keys reveal nothing once the key is shredded.
            _version, key = await self.keys.current(tx, system.tenant_id)
            hashes = [keyed_digest(key, "chunk", c.text.encode()) for c in chunks]
            transform = (
                await self.keys.vector_transform(tx, system.tenant_id, embedder.dim)
                if keyed
                else None
            )
            cur = await tx.execute(
                "SELECT chunk_hash, embedding::text AS embedding FROM bastion.embedding_cache "
                "WHERE document_id = %s",
                (document_id,),
            )
            cached = {bytes(r["chunk_hash"]): r["embedding"] for r in await cur.fetchall()}
        todo = [i for i, h in enumerate(hashes) if h not in cached]
        if progress and len(todo) < len(chunks):
            progress("embedded", len(chunks) - len(todo))
        for start in range(0, len(todo), EMBED_BATCH):
            batch = todo[start : start + EMBED_BATCH]
            matrix = await asyncio.to_thread(
                _embedded, embedder, transform, [chunks[i].text for i in batch]
            )
            literals = [vector_literal(v) for v in matrix]
            # The last batch goes straight into the final transaction: caching
            # it would save nothing (and a one-batch document needs no cache).
            if start + EMBED_BATCH < len(todo):
                async with self._tx(system) as tx:
                    await tx.execute(
                        "INSERT INTO bastion.embedding_cache (tenant_id, document_id, "
                        "chunk_hash, embedding) SELECT %s, %s, u.h, u.e::vector "
                        "FROM unnest(%s::bytea[], %s::text[]) AS u(h, e) ON CONFLICT DO NOTHING",
                        (system.tenant_id, document_id, [hashes[i] for i in batch], literals),
                    )
            cached.update((hashes[i], lit) for i, lit in zip(batch, literals, strict=True))
            if progress:
                progress("embedded", len(batch))
        return [cached[h] for h in hashes], len(todo)

    async def _fail(self, system: Actor, document_id: UUID, reason: str) -> IngestOutcome:
        async with self._tx(system) as tx:
            await tx.execute(
                "UPDATE bastion.documents SET status = 'failed', failure_reason = %s "
                "WHERE id = %s AND status = 'pending'",
                (reason, document_id),
            )
            await tx.execute(
                "DELETE FROM bastion.embedding_cache WHERE document_id = %s", (document_id,)
            )
            await audit.record(
                tx,
                actor="worker",
                action="document.failed",
                target=str(document_id),
                details={"reason": reason},
            )
        _log.info("ingest_failed", document_id=str(document_id), reason=reason)
        return IngestOutcome("failed", reason=reason)

    async def fail(self, tenant_id: UUID, document_id: UUID, reason: str) -> IngestOutcome:
        """Mark a pending document failed with ``reason`` (e.g. the uploader lost the right)."""
        return await self._fail(Actor(tenant_id, None, "system"), document_id, reason)

    # -- retrieval ----------------------------------------------------------

    async def search(
        self,
        actor: Actor,
        namespace: str,
        *,
        query: str | None = None,
        embedding: Sequence[float] | None = None,
        k: int = 5,
        document_ids: Sequence[UUID] | None = None,
        title: str | None = None,
    ) -> list[SearchHit]:
        """The ``k`` chunks of the caller's namespace nearest to the query.

        Give the query as text (embedded with the namespace's model) or as an
        ``embedding`` of the namespace's dimension. Optional filters narrow to
        some documents or an exact title (as listed, or as uploaded: a title
        is compared in its stored, tokenized form); iterative scans keep ``k``
        results coming when filters reject most neighbours.
        """
        if (query is None) == (embedding is None):
            raise ValueError("give exactly one of query and embedding")
        k = max(1, min(k, MAX_K))
        async with self._tx(actor) as tx:
            ns = await self._namespace(tx, namespace)
            if embedding is not None:
                vector = np.asarray(embedding, dtype=np.float32)
                if vector.shape != (ns.dim,) or not np.all(np.isfinite(vector)):
                    raise EmbeddingMismatch(
                        f"this namespace's embeddings have {ns.dim} finite dimensions"
                    )
            else:
                embedder = self.embedders(ns.embedder)
                if embedder.model_id != ns.model_id:
                    raise EmbeddingMismatch("the namespace's model is not available here")
                vector = (await asyncio.to_thread(embedder.embed, [query or ""]))[0]
            if ns.vector_transform is not None:
                try:
                    transform = await self.keys.vector_transform(tx, actor.tenant_id, ns.dim)
                except KeyUnavailable:
                    return []  # no data key yet: nothing was ever indexed here
                vector = transform.apply(vector)
            filters = [sql.SQL("c.tenant_id = %(tenant)s AND c.namespace_id = %(ns)s")]
            if document_ids is not None:
                filters.append(sql.SQL("c.document_id = ANY(%(docs)s)"))
            titles: list[str] = []
            digests: list[bytes] = []
            if title is not None:
                stored = (
                    self.redactor.redact(title).text
                    if self.redactor is not None
                    else await self.vault.tokenized_form(tx, actor.tenant_id, title)
                )
                titles = [stored] if stored is not None else []  # None: nothing can match
                if titles:
                    try:
                        first = await self.keys.get(tx, actor.tenant_id, 1)
                        digests = [keyed_digest(first, TITLE, stored.encode()) for stored in titles]
                    except KeyUnavailable:
                        digests = []
                # Sealed titles by their keyed digest; clear ones (before 0025) as stored.
                filters.append(
                    sql.SQL(
                        "c.document_id IN (SELECT id FROM bastion.documents "
                        "WHERE namespace_id = %(ns)s AND (title_digest = ANY(%(digests)s) "
                        "OR title = ANY(%(titles)s::text[])))"
                    )
                )
            # The cast names the dimension the partition's expression index was
            # built with; custom plans let the planner prune to that partition.
            distance = sql.SQL("c.embedding::vector({dim}) <=> %(q)s::vector({dim})").format(
                dim=sql.Literal(ns.dim)
            )
            await tx.execute(
                f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH, k)}; "
                "SET LOCAL hnsw.iterative_scan = relaxed_order; "
                "SET LOCAL plan_cache_mode = force_custom_plan"
            )
            cur = await tx.execute(
                # The nearest neighbours first, on their own (one index scan of
                # one partition), then their titles.
                sql.SQL(
                    "WITH nearest AS MATERIALIZED (SELECT c.id, c.document_id, c.ordinal, "
                    "c.ciphertext, c.key_version, {distance} AS distance FROM bastion.chunks c "
                    "WHERE {filters} ORDER BY {distance} LIMIT %(k)s) "
                    "SELECT nearest.*, d.title, d.title_ciphertext, "
                    "d.key_version AS document_key_version FROM nearest "
                    "JOIN bastion.documents d ON d.id = nearest.document_id"
                ).format(distance=distance, filters=sql.SQL(" AND ").join(filters)),
                {
                    "tenant": actor.tenant_id,
                    "ns": ns.id,
                    "q": vector_literal(vector),
                    "docs": list(document_ids or []),
                    "titles": titles,
                    "digests": digests,
                    "k": k,
                },
            )
            rows = await cur.fetchall()
            hits = []
            for row in rows:
                try:
                    key = await self.keys.get(tx, actor.tenant_id, row["key_version"])
                    text = open_sealed(key, "chunk", actor.tenant_id, row["id"], row["ciphertext"])
                    document = {**row, "id": row["document_id"]}
                    document["key_version"] = row["document_key_version"]
                    title_text = await self._title(tx, actor.tenant_id, document)
                except (KeyUnavailable, DecryptionFailed):
                    # A row this tenant's key cannot open was not written for
                    # it: never returned, and worth an alarm.
                    _log.warning("chunk_undecryptable", chunk_id=str(row["id"]))
                    continue
                hits.append(
                    SearchHit(
                        chunk_id=row["id"],
                        document_id=row["document_id"],
                        title=title_text,
                        ordinal=row["ordinal"],
                        score=1.0 - float(row["distance"]),
                        text=text.decode(),
                    )
                )
        # relaxed_order may return neighbours slightly out of order.
        return sorted(hits, key=lambda hit: -hit.score)

    # -- re-encoding what was stored before migration 0025 ------------------

    async def reencode(self, tenant_id: UUID) -> ReencodeReport:
        """Rotate the plain vectors of the tenant's namespaces made before
        migration 0025 and seal their documents' clear titles. Idempotent.

        One transaction per namespace, its row locked first (an ingestion
        holds it shared while it commits its chunks): the chunks' vectors are
        rotated in place, the cached embeddings of its pending documents
        dropped (a resumed ingestion embeds again, keyed), the flag flipped,
        the clear titles sealed, and one ``knowledge.reencode`` audit event
        written. The plain vectors remain in the partition's dead tuples and
        index pages until it is vacuumed: the report names the partitions.
        """
        system = Actor(tenant_id, None, "system")
        async with self._tx(system) as tx:
            cur = await tx.execute(
                "SELECT id FROM bastion.namespaces WHERE tenant_id = %s ORDER BY name",
                (tenant_id,),
            )
            namespace_ids = [row["id"] for row in await cur.fetchall()]
        namespaces = chunks = titles = 0
        partitions: list[str] = []
        for ns_id in namespace_ids:
            async with self._tx(system) as tx:
                cur = await tx.execute(
                    "SELECT dim, vector_transform FROM bastion.namespaces WHERE id = %s FOR UPDATE",
                    (ns_id,),
                )
                ns = await cur.fetchone()
                if ns is None:
                    continue  # deleted meanwhile
                rotated = 0
                if ns["vector_transform"] is None:
                    rotated = await self._rotate_namespace(tx, tenant_id, ns_id, ns["dim"])
                sealed = await self._seal_titles(tx, tenant_id, ns_id)
                if ns["vector_transform"] is None or sealed:
                    await audit.record(
                        tx,
                        actor="operator",
                        action="knowledge.reencode",
                        target=str(ns_id),
                        details={"chunks": rotated, "titles": sealed},
                    )
            if ns["vector_transform"] is None:
                namespaces += 1
                chunks += rotated
                if rotated:
                    partitions.append(f"bastion.chunks_{ns_id.hex}")
            titles += sealed
        return ReencodeReport(namespaces, chunks, titles, tuple(partitions))

    async def _rotate_namespace(self, tx: Conn, tenant_id: UUID, ns_id: UUID, dim: int) -> int:
        """Rotate the namespace's stored vectors by the tenant's transform, drop
        its cached plain embeddings and mark it keyed; return the chunks rotated."""
        cur = await tx.execute(
            "SELECT id, embedding::text AS embedding FROM bastion.chunks "
            "WHERE tenant_id = %s AND namespace_id = %s",
            (tenant_id, ns_id),
        )
        rows = await cur.fetchall()
        if rows:
            transform = await self.keys.vector_transform(tx, tenant_id, dim)
            plain = np.stack([_parse_vector(row["embedding"]) for row in rows])
            keyed = await asyncio.to_thread(transform.apply, plain)
            await tx.execute(
                "UPDATE bastion.chunks c SET embedding = u.e::vector "
                "FROM unnest(%s::uuid[], %s::text[]) AS u(id, e) "
                "WHERE c.namespace_id = %s AND c.id = u.id",
                ([row["id"] for row in rows], [vector_literal(v) for v in keyed], ns_id),
            )
        await tx.execute(
            "DELETE FROM bastion.embedding_cache e USING bastion.documents d "
            "WHERE d.id = e.document_id AND d.namespace_id = %s",
            (ns_id,),
        )
        await tx.execute(
            "UPDATE bastion.namespaces SET vector_transform = %s WHERE id = %s",
            (VECTOR_TRANSFORM, ns_id),
        )
        return len(rows)

    async def _seal_titles(self, tx: Conn, tenant_id: UUID, ns_id: UUID) -> int:
        """Seal the namespace's clear titles (stored before 0025); return how many."""
        cur = await tx.execute(
            "SELECT id, title, key_version FROM bastion.documents "
            "WHERE namespace_id = %s AND title_ciphertext IS NULL FOR UPDATE",
            (ns_id,),
        )
        rows = await cur.fetchall()
        for row in rows:
            key = await self.keys.get(tx, tenant_id, row["key_version"])
            first = await self.keys.get(tx, tenant_id, 1)
            title = str(row["title"]).encode()
            await tx.execute(
                "UPDATE bastion.documents SET title = NULL, title_ciphertext = %s, "
                "title_digest = %s WHERE id = %s",
                (
                    seal(key, TITLE, tenant_id, row["id"], title),
                    keyed_digest(first, TITLE, title),
                    row["id"],
                ),
            )
        return len(rows)

    # -- deletion of a tenant ----------------------------------------------

    async def shred_tenant(self, tenant_id: UUID, *, actor: str = "operator") -> int:
        """Delete everything derived from the tenant's text and destroy its keys.

        In one transaction: the documents (chunks and cached embeddings by
        cascade), the namespaces with their chunk partitions dropped (no dead
        tuples left for a vacuum), the vault's entries and token key
        (``bastion.shred_tenant_index``, migration 0023), the data keys; then
        the KEK in the key ring. The commit announces the shred on
        ``bastion_tenant_shred`` so gateways forget the tenant's answers.
        Returns the number of documents deleted. Any copy of the tenant's
        ciphertext or keyed digests (a backup, a replica) is worthless after.
        """
        async with self._tx(Actor(tenant_id, None, "system")) as tx:
            cur = await tx.execute(
                "SELECT count(*) AS n FROM bastion.documents WHERE tenant_id = %s", (tenant_id,)
            )
            row = await cur.fetchone()
            deleted = int(row["n"]) if row else 0
            cur = await tx.execute("SELECT bastion.shred_tenant_index() AS namespaces")
            row = await cur.fetchone()
            namespaces = int(row["namespaces"]) if row else 0
            await self.keys.shred(tx, tenant_id)
            self.vault.forget_tenant(tenant_id)
            await audit.record(
                tx,
                actor=actor,
                action="tenant.shred",
                details={"documents": deleted, "namespaces": namespaces},
            )
        return deleted


def build_knowledge(
    settings: Settings, db: Database, kms: KMS, *, safety: SafetyPolicies | None = None
) -> KnowledgeService:
    """Return the knowledge base on ``db``, the tenants' keys wrapped by ``kms``;
    ingestion keeps in clear the values on each tenant's PII allow-list (read
    through ``safety``, default: one of its own on ``db``)."""
    safety = safety if safety is not None else SafetyPolicies(db)
    return KnowledgeService(
        db,
        TenantKeys(kms),
        default_embedder=settings.embedder,
        max_upload_bytes=settings.max_upload_bytes,
        extract_limits=ProcessLimits(
            cpu_seconds=settings.extract_cpu_seconds, wall_seconds=settings.extract_wall_seconds
        ),
        allow_lists=safety.pii_allow_lists,
    )
