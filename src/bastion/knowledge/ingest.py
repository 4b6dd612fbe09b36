"""Ingesting files from disk (``bastion ingest``), resumable.

Each file is uploaded with an idempotency key derived from its path and
content, then indexed in this process. Running the command again skips what
is indexed; a document left pending by an interrupted run is picked up where
its embeddings stopped (the embedding cache), so an interruption costs at
most one batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from bastion.knowledge.errors import UploadRefused
from bastion.knowledge.service import Actor, KnowledgeService, Progress

CONTENT_TYPES = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".txt": "text/plain",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}


@dataclass
class IngestReport:
    indexed: int = 0
    skipped: int = 0  # indexed by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # path → reason
    chunks: int = 0
    embedded: int = 0


def discover(paths: Iterable[Path]) -> list[Path]:
    """The files under ``paths`` with a supported suffix, sorted."""
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.suffix.lower() in CONTENT_TYPES)
        elif path.suffix.lower() in CONTENT_TYPES:
            found.add(path)
    return sorted(p for p in found if p.is_file())


def _title(path: Path, body: bytes) -> str:
    """The first Markdown heading, else the file name."""
    if path.suffix.lower() in (".md", ".markdown"):
        first = body.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        if first.startswith("#"):
            return first.lstrip("#").strip()[:500] or path.name
    return path.name[:500]


async def ingest_files(
    kb: KnowledgeService,
    tenant_id: UUID,
    namespace: str,
    files: list[Path],
    *,
    on_file: Callable[[Path], None] | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Upload and index ``files`` into ``namespace`` of the tenant, as the operator."""
    operator = Actor(tenant_id, None, "system")
    await kb.ensure_namespace(operator, namespace)
    report = IngestReport()
    for path in files:
        body = path.read_bytes()
        key = "file:" + hashlib.sha256(str(path.resolve()).encode() + b"\0" + body).hexdigest()
        try:
            upload = await kb.upload(
                operator,
                namespace,
                title=_title(path, body),
                body=body,
                content_type=CONTENT_TYPES[path.suffix.lower()],
                idempotency_key=key,
                enqueue=False,  # indexed right here
            )
        except UploadRefused as exc:
            report.failed[str(path)] = str(exc.extensions.get("reason", "refused"))
        else:
            doc = upload.document
            if doc.status == "indexed":
                report.skipped += 1
            else:
                outcome = await kb.ingest(tenant_id, doc.id, progress=progress)
                doc = await kb.document(operator, doc.id)
                report.embedded += outcome.embedded
                if doc.status == "indexed":
                    report.indexed += 1
                    report.chunks += doc.chunk_count or 0
                else:
                    report.failed[str(path)] = doc.failure_reason or doc.status
        if on_file:
            on_file(path)
    return report
