"""Worker jobs declare their action and run only for subjects the policies allow."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest

from bastion.access.authorize import Authorizer, Subject
from bastion.worker.jobs import JobRefused, JobRegistry, UndeclaredJob

pytestmark = pytest.mark.anyio


def _subject(role: str, tenant: Any = None) -> Subject:
    return Subject(uuid4(), tenant or uuid4(), frozenset({role}), False)


async def test_jobs_run_only_when_the_policies_allow() -> None:
    registry = JobRegistry(Authorizer())
    ran: list[str] = []

    @registry.job("ingest", action="document:write", resource_type="Document")
    async def ingest(*, subject: Subject, resource_id: str) -> str:
        ran.append(resource_id)
        return "indexed"

    contributor = _subject("contributor")
    assert await registry.run("ingest", contributor, "doc-1") == "indexed"
    with pytest.raises(JobRefused, match="document:write denied"):
        await registry.run("ingest", _subject("viewer"), "doc-2")
    with pytest.raises(JobRefused, match="unknown job"):
        await registry.run("reindex-everything", contributor, "doc-3")
    assert ran == ["doc-1"]


@pytest.mark.parametrize("action", ["", "document:obliterate"])
def test_a_job_without_a_known_action_stops_the_worker(action: str) -> None:
    registry = JobRegistry(Authorizer())
    with pytest.raises(UndeclaredJob):
        registry.job("mystery", action=action, resource_type="Document")
