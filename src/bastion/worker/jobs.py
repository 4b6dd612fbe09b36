"""Worker jobs declare their Cedar action, like routes (CHECKLIST R1).

A job is registered with the action it performs and the resource type it acts
on; the registry refuses a job without one, and :meth:`JobRegistry.run` asks
the :class:`Authorizer` on behalf of the subject that enqueued the job before
running it — a job never does more than the person who asked for it could.
The queue itself (procrastinate, with the knowledge-base issue) calls
:meth:`JobRegistry.run`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bastion.access.authorize import Authorizer, Resource, Subject

JobFunction = Callable[..., Awaitable[Any]]


class JobRefused(Exception):
    """The subject may not have this job run (denied by policy, or unknown job)."""


class UndeclaredJob(RuntimeError):
    """A job was registered without an action; the worker must not start."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    action: str
    resource_type: str
    function: JobFunction


class JobRegistry:
    """The worker's jobs, each with its declared action."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer
        self.jobs: dict[str, JobSpec] = {}

    def job(
        self, name: str, *, action: str, resource_type: str
    ) -> Callable[[JobFunction], JobFunction]:
        """Register the decorated coroutine as job ``name`` needing ``action``.

        Raises :class:`UndeclaredJob` when the action is empty or unknown to the
        policies, so a misdeclared job stops the worker at start-up.
        """
        if not action or action not in self.authorizer.actions:
            raise UndeclaredJob(f"job {name!r} declares no known action ({action!r})")

        def register(function: JobFunction) -> JobFunction:
            self.jobs[name] = JobSpec(name, action, resource_type, function)
            return function

        return register

    async def run(self, name: str, subject: Subject, resource_id: str, **payload: Any) -> Any:
        """Run job ``name`` for ``subject`` on a resource of the subject's tenant.

        Returns what the job returns. Raises :class:`JobRefused` for an unknown
        job or when the policies deny the subject the job's action.
        """
        spec = self.jobs.get(name)
        if spec is None:
            raise JobRefused(f"unknown job {name!r}")
        resource = Resource(spec.resource_type, resource_id, subject.tenant_id)
        self.authorizer.reload_if_changed()
        if not self.authorizer.authorize(subject, spec.action, resource):
            raise JobRefused(f"{spec.action} denied for job {name!r}")
        return await spec.function(subject=subject, resource_id=resource_id, **payload)
