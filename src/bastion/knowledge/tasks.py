"""The knowledge base's worker jobs.

``knowledge.ingest`` runs for the user who uploaded the document, through the
:class:`JobRegistry`: if that user may no longer write documents when the job
runs (role revoked meanwhile), the document fails with ``not-authorized``.

A job of one tenant runs at a time (its procrastinate ``lock`` is the
tenant's, see ``bastion.enqueue_ingest``), extraction runs in a child process
under a CPU limit (:meth:`KnowledgeService.ingest`), and the whole job has a
time limit: past it the document fails with ``timed-out`` instead of being
retried — its cost is its content's, and would be the same next time.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import procrastinate

from bastion.access.authorize import Subject
from bastion.db.pool import Database
from bastion.knowledge.service import KnowledgeService
from bastion.worker.jobs import JobRefused, JobRegistry

INGEST = "knowledge.ingest"
# Extraction is bounded on its own (settings.extract_*); this bounds the
# rest (PII scan, embedding), below the ingest queue's own job limit.
INGEST_SECONDS = 600.0


def register(
    queue: procrastinate.App, registry: JobRegistry, db: Database, service: KnowledgeService
) -> None:
    """Register the knowledge jobs on the queue and in the registry."""

    @registry.job(INGEST, action="document:write", resource_type="Document")
    async def ingest(subject: Subject, resource_id: str, **_: Any) -> None:
        await service.ingest(subject.tenant_id, UUID(resource_id))

    # Retries cover infrastructure failures (the database restarting, ...);
    # a bad document is not an error: it is marked failed with its reason.
    @queue.task(
        name=INGEST,
        queue="ingest",
        retry=procrastinate.RetryStrategy(max_attempts=5, exponential_wait=2),
    )
    async def ingest_task(tenant_id: str, document_id: str, user_id: str | None = None) -> None:
        tenant, document = UUID(tenant_id), UUID(document_id)
        try:
            async with asyncio.timeout(INGEST_SECONDS) as limit:
                await _ingest(tenant, document, user_id)
        except TimeoutError:
            if not limit.expired():
                raise  # a timeout of something else: the retry strategy decides
            await service.fail(tenant, document, "timed-out")

    async def _ingest(tenant: UUID, document: UUID, user_id: str | None) -> None:
        document_id = str(document)
        if not user_id:
            # Uploaded by the operator (``bastion ingest``): only the system
            # role, which the app signs, creates documents without a user.
            await service.ingest(tenant, document)
            return
        user = UUID(user_id)
        roles = await db.member_roles(tenant, user)
        subject = Subject(user, tenant, roles, mfa=False)
        try:
            await registry.run(INGEST, subject, document_id)
        except JobRefused:
            await service.fail(tenant, document, "not-authorized")
