"""Worker jobs declare their action and run only for subjects the policies allow."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import uuid4

import procrastinate
import pytest
from procrastinate.testing import InMemoryConnector

from bastion.access.authorize import Authorizer, Subject
from bastion.worker.jobs import JobRefused, JobRegistry, UndeclaredJob
from bastion.worker.queue import time_limit

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


async def test_a_job_past_its_time_limit_is_cancelled_and_fails() -> None:
    # Issue 23, A2: no job holds a worker slot for ever (procrastinate's
    # in-memory connector; the limit is the worker middleware of every queue).
    app = procrastinate.App(connector=InMemoryConnector())
    finished: list[str] = []

    @app.task(name="hangs", queue="billing")
    async def hangs() -> None:
        await asyncio.sleep(30)
        finished.append("hangs")

    @app.task(name="quick", queue="billing")
    async def quick() -> None:
        finished.append("quick")

    async with app.open_async():
        slow = await hangs.defer_async()
        fast = await quick.defer_async()
        started = time.monotonic()
        await app.run_worker_async(
            queues=["billing"],
            wait=False,
            install_signal_handlers=False,
            worker_middleware=[time_limit(0.3)],
        )
        elapsed = time.monotonic() - started
        statuses = {
            job["id"]: job["status"]
            for job in app.connector.jobs.values()  # type: ignore[attr-defined]
        }
    assert finished == ["quick"]
    assert statuses == {slow: "failed", fast: "succeeded"}
    assert elapsed < 5
