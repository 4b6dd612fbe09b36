"""Knowledge-base routes: namespaces, documents and search, under the caller's tenant.

The tenant is always the token's (a path naming another is 404); a tenant or
namespace named anywhere else in a request is either refused (unknown body
members are 422) or looked up under row-level security, where another
tenant's identifiers do not exist. Uploads are the raw body with its
``Content-Type``; ``Idempotency-Key`` makes a retried upload the same document.

Readers see personal data only as vault tokens (titles, search hits, answers,
``/text``). The original upload (``/content``) is raw personal data: it needs
``pii:reveal`` (an owner with MFA), a ``reason``, and leaves a ``pii.reveal``
audit event, exactly like ``POST /pii/reveal``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bastion.access.guard import Guard
from bastion.identity.auth import Principal
from bastion.knowledge.answers import AskService
from bastion.knowledge.extract import SUPPORTED_TYPES
from bastion.knowledge.service import Actor, DocumentInfo, KnowledgeService, Namespace

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class NamespaceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    embedder: str | None = Field(default=None, pattern=r"^(minilm|hashing)$")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str | None = Field(default=None, min_length=1, max_length=4000)
    embedding: list[float] | None = Field(default=None, min_length=1, max_length=4096)
    k: int = Field(default=5, ge=1, le=100)
    document_ids: list[UUID] | None = Field(default=None, max_length=100)
    title: str | None = Field(default=None, min_length=1, max_length=500)

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.query is None) == (self.embedding is None):
            raise ValueError("give exactly one of query and embedding")
        return self


def _actor(principal: Principal) -> Actor:
    return Actor(principal.tenant_id, principal.user_id, principal.db_role)


def _namespace_json(ns: Namespace) -> dict[str, Any]:
    out = {**asdict(ns), "id": str(ns.id), "created_at": ns.created_at.isoformat()}
    del out["vector_transform"]  # how vectors are stored: the operator's concern
    return out


def _document_json(doc: DocumentInfo) -> dict[str, Any]:
    out = asdict(doc)
    out.update(id=str(doc.id), namespace_id=str(doc.namespace_id))
    out["created_at"] = doc.created_at.isoformat()
    out["indexed_at"] = doc.indexed_at.isoformat() if doc.indexed_at else None
    return out


class QuestionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=4000)
    model: str = Field(default="bastion-local", min_length=1, max_length=200)
    k: int = Field(default=4, ge=1, le=20)


# The raw upload (the route reads the body itself, so FastAPI cannot see it).
_UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The document's bytes, as they are; the Content-Type header says how "
        "they are read. At most the api's max_upload_bytes (BASTION_MAX_UPLOAD_BYTES, "
        "default 1 MiB): more is 413.",
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in sorted(SUPPORTED_TYPES)
        },
    }
}


def build_router(
    service: KnowledgeService, guard: Guard, answers: AskService | None = None
) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant_id}/knowledge")

    @router.post("/namespaces", status_code=201)
    async def create_namespace(
        body: NamespaceCreate,
        principal: Principal = Depends(guard("namespace:manage", "Namespace")),
    ) -> dict[str, Any]:
        """Create a knowledge base (its own vector partition) for the tenant."""
        ns = await service.create_namespace(_actor(principal), body.name, body.embedder)
        return _namespace_json(ns)

    @router.get("/namespaces")
    async def list_namespaces(
        principal: Principal = Depends(guard("document:read", "Document")),
    ) -> dict[str, Any]:
        return {
            "namespaces": [_namespace_json(n) for n in await service.namespaces(_actor(principal))]
        }

    @router.post("/namespaces/{namespace}/documents", openapi_extra=_UPLOAD_OPENAPI)
    async def upload(
        namespace: str,
        request: Request,
        title: Annotated[str, Query(min_length=1, max_length=500)],
        content_type: Annotated[str, Header(max_length=200)] = "text/plain",
        idempotency_key: Annotated[
            str | None, Header(min_length=8, max_length=200, pattern=r"^[\x21-\x7e]+$")
        ] = None,
        principal: Principal = Depends(guard("document:write", "Document")),
    ) -> JSONResponse:
        """Upload a document (raw body); 202 while it waits for the worker."""
        result = await service.upload(
            _actor(principal),
            namespace,
            title=title,
            body=await request.body(),
            content_type=content_type,
            idempotency_key=idempotency_key,
        )
        return JSONResponse(
            _document_json(result.document), status_code=202 if result.created else 200
        )

    @router.get("/namespaces/{namespace}/documents")
    async def list_documents(
        namespace: str, principal: Principal = Depends(guard("document:read", "Document"))
    ) -> dict[str, Any]:
        docs = await service.documents(_actor(principal), namespace)
        return {"documents": [_document_json(d) for d in docs]}

    @router.get("/documents/{document_id}")
    async def get_document(
        document_id: UUID, principal: Principal = Depends(guard("document:read", "Document"))
    ) -> dict[str, Any]:
        return _document_json(await service.document(_actor(principal), document_id))

    @router.get("/documents/{document_id}/text")
    async def get_text(
        document_id: UUID, principal: Principal = Depends(guard("document:read", "Document"))
    ) -> PlainTextResponse:
        """The document's text with personal data as vault tokens (what was indexed)."""
        text = await service.text(_actor(principal), document_id)
        return PlainTextResponse(
            text, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
        )

    @router.get("/documents/{document_id}/content")
    async def get_content(
        document_id: UUID,
        # Why the original is needed: goes to the audit event (as for /pii/reveal).
        reason: Annotated[str, Query(min_length=8, max_length=500)],
        principal: Principal = Depends(guard("pii:reveal", "PiiVault")),
    ) -> Response:
        """The original upload, as sent (personal data included): pii:reveal, audited."""
        body, content_type = await service.original(_actor(principal), document_id, reason=reason)
        return Response(
            body,
            media_type=content_type,
            headers={
                "X-Content-Type-Options": "nosniff",
                "Content-Disposition": "attachment",
                "Cache-Control": "no-store",
            },
        )

    @router.delete("/documents/{document_id}", status_code=204)
    async def delete_document(
        document_id: UUID, principal: Principal = Depends(guard("document:delete", "Document"))
    ) -> None:
        """Delete a document, its chunks and cached embeddings."""
        await service.delete(_actor(principal), document_id)

    @router.post("/namespaces/{namespace}/search")
    async def search(
        namespace: str,
        body: SearchRequest,
        principal: Principal = Depends(guard("document:read", "Document")),
    ) -> dict[str, Any]:
        """Nearest chunks of the namespace to a text query or an embedding."""
        hits = await service.search(
            _actor(principal),
            namespace,
            query=body.query,
            embedding=body.embedding,
            k=body.k,
            document_ids=body.document_ids,
            title=body.title,
        )
        return {
            "hits": [
                {
                    "chunk_id": str(h.chunk_id),
                    "document_id": str(h.document_id),
                    "title": h.title,
                    "ordinal": h.ordinal,
                    "score": round(h.score, 6),
                    "text": h.text,
                }
                for h in hits
            ]
        }

    if answers is not None:

        @router.post("/namespaces/{namespace}/questions")
        async def ask(
            namespace: str,
            body: QuestionRequest,
            principal: Principal = Depends(guard("question:ask", "Question")),
        ) -> JSONResponse:
            """Answer from the namespace's documents through the model gateway."""
            answer = await answers.ask(
                _actor(principal), namespace, body.question, model=body.model, k=body.k
            )
            headers = {"Bastion-Cache": answer.cache} if answer.cache else {}
            return JSONResponse(
                {
                    "answer": answer.text,
                    "sources": [
                        {"document_id": str(h.document_id), "title": h.title, "score": h.score}
                        for h in answer.sources
                    ],
                    # What the injection screen removed from the context, and why.
                    "screening": answer.screening.caught() if answer.screening else [],
                },
                headers=headers,
            )

    return router
