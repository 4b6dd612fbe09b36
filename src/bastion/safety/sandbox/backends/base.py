"""One interface for every backend: say whether it can run here, then run a spec."""

from __future__ import annotations

import abc
import subprocess
from dataclasses import dataclass, replace

from bastion.safety.sandbox.cgroups import CgroupError, CgroupLease, RunCgroup
from bastion.safety.sandbox.runner import Launch, Supervisor, Watched, classify
from bastion.safety.sandbox.spec import Isolation, Limits, Outcome, Result, RunSpec


@dataclass(frozen=True)
class RunContext:
    """What the :class:`~bastion.safety.sandbox.Sandbox` leases for one run."""

    uid: int
    # The run's cgroup, made on first use (None: no cgroup hierarchy here).
    cgroups: CgroupLease | None

    @property
    def has_cgroup(self) -> bool:
        return self.cgroups is not None

    @property
    def cgroup(self) -> RunCgroup | None:
        """The run's cgroup, made now if it is not yet; raise CgroupError."""
        return self.cgroups.get() if self.cgroups is not None else None


class Backend(abc.ABC):
    name: str
    isolation: Isolation
    # The exit status passes through a runtime that reports signal N as 128+N.
    wrapped: bool = True
    needs_cgroup: bool = False

    def cgroup_limits(self, limits: Limits) -> Limits:
        """The caps of the run's cgroup (a runtime may need room of its own)."""
        return limits

    @abc.abstractmethod
    def unavailable(self) -> str | None:
        """Why this backend cannot run here (missing binary, kernel feature); None if it can."""

    @abc.abstractmethod
    def launch(self, spec: RunSpec, ctx: RunContext) -> Launch:
        """The process to start for ``spec``; raise OSError if it cannot be prepared."""

    def finish(self, result: Result, watched: Watched) -> Result:
        """Backend-specific corrections of the normalised result."""
        return result

    def run(self, spec: RunSpec, ctx: RunContext) -> Result:
        """Run ``spec``; failures of the sandbox itself come back as ``sandbox_error``."""
        try:
            launch = self.launch(spec, ctx)
        except CgroupError as exc:
            return Result(Outcome.SANDBOX_ERROR, self.name, detail=f"cgroup: {exc.strerror}")
        except OSError as exc:
            return Result(
                Outcome.SANDBOX_ERROR, self.name, detail=f"prepare: {exc.strerror or exc}"
            )
        try:
            supervisor = Supervisor(uid=ctx.uid, limits=spec.limits, cgroups=ctx.cgroups)
            watched = supervisor.run(launch, spec.stdin)
            result = self.finish(
                classify(watched, spec.limits, backend=self.name, wrapped=self.wrapped), watched
            )
        except CgroupError as exc:
            result = Result(Outcome.SANDBOX_ERROR, self.name, detail=f"cgroup: {exc.strerror}")
        except (OSError, subprocess.SubprocessError) as exc:
            result = Result(Outcome.SANDBOX_ERROR, self.name, detail=f"start: {type(exc).__name__}")
        except Exception as exc:  # a run always ends in a result, never in a raise
            result = Result(
                Outcome.SANDBOX_ERROR, self.name, detail=f"internal: {type(exc).__name__}"
            )
        return self._cleaned_up(launch, result)

    def _cleaned_up(self, launch: Launch, result: Result) -> Result:
        """Run every cleanup, each whatever the others did; one that fails turns the
        result into ``sandbox_error`` (something of the run may be left behind:
        the operator must hear of it through the audit), never into a raise."""
        failed = []
        for cleanup in launch.cleanups:
            try:
                cleanup()
            except Exception as exc:
                failed.append(type(exc).__name__)
        if not failed:
            return result
        return replace(
            result, outcome=Outcome.SANDBOX_ERROR, detail=f"cleanup: {', '.join(failed)}"
        )
