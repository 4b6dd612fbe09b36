"""The sandbox: pick the strongest backend that works here, then run specs in it.

``Sandbox.probe(config)`` tries the configured backends strongest first — each
must actually start a trivial program, not merely be installed — and returns a
sandbox on the first that works, refusing (:class:`SandboxUnavailable`) when
none reaches the configured minimum isolation. Every run leases its own uid and
cgroup, so concurrent runs never share a process budget or a kill scope.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.safety.sandbox.backends.base import Backend, RunContext
from bastion.safety.sandbox.backends.bwrap import BwrapBackend
from bastion.safety.sandbox.backends.firecracker import FirecrackerBackend, FirecrackerConfig
from bastion.safety.sandbox.backends.gvisor import GvisorBackend
from bastion.safety.sandbox.backends.landlock import LandlockBackend
from bastion.safety.sandbox.cgroups import CgroupLease, Layout
from bastion.safety.sandbox.errors import SandboxUnavailable
from bastion.safety.sandbox.host import HostProbe
from bastion.safety.sandbox.runner import become_subreaper
from bastion.safety.sandbox.spec import PYTHON, Isolation, Limits, Outcome, Result, RunSpec
from bastion.safety.sandbox.uids import UidPool

if TYPE_CHECKING:
    from bastion.settings import Settings

BACKENDS = ("firecracker", "gvisor", "bwrap", "landlock")
# The self-test: the program starts, and the socket-family policy is in force in
# it (unfiltered, the kernel answers EOPNOTSUPP; the policy EAFNOSUPPORT or EPERM).
_SELF_TEST = """
import _socket
try:
    _socket.socketpair(16, 2)  # AF_NETLINK, SOCK_DGRAM
    print('unfiltered')
except OSError as e:
    print(6 * 7 if e.errno in (1, 97) else 'unfiltered')
"""


def _default_work_root() -> Path:
    # A tmpfs where there is one (run files count against the run's memory cgroup);
    # each run gets a 0700 directory of its own beneath, owned by its uid.
    shm = Path("/dev/shm")  # noqa: S108
    return (shm if shm.is_dir() else Path(tempfile.gettempdir())) / "bastion-sandbox"


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox is chosen and run (built from Settings by :meth:`from_settings`)."""

    # "auto": the strongest of ``candidates`` that works here; or one backend by name.
    backend: str = "auto"
    # gVisor and Firecracker are opt-in: they cost ~10x bwrap's start-up per run.
    candidates: tuple[str, ...] = ("bwrap", "landlock")
    min_isolation: Isolation = Isolation.LANDLOCK
    uid_base: int = 61000
    uid_count: int = 256
    state_dir: Path = Path("/run/bastion-sandbox")
    work_root: Path = field(default_factory=_default_work_root)
    limits: Limits = field(default_factory=Limits)
    firecracker: FirecrackerConfig = field(default_factory=FirecrackerConfig)
    # Reads which isolation features the kernel gives (a backend lacking one refuses).
    host: HostProbe = field(default_factory=HostProbe)

    @classmethod
    def from_settings(cls, settings: Settings) -> SandboxConfig:
        """The sandbox part of :class:`bastion.settings.Settings`."""
        return cls(
            backend=settings.sandbox_backend,
            candidates=tuple(settings.sandbox_candidates),
            min_isolation=Isolation[settings.sandbox_min_isolation.upper()],
            uid_base=settings.sandbox_uid_base,
            uid_count=settings.sandbox_uid_count,
            state_dir=settings.sandbox_state_dir,
            limits=Limits(
                memory_bytes=settings.sandbox_memory_mb << 20,
                cpu_seconds=settings.sandbox_cpu_seconds,
                wall_seconds=settings.sandbox_wall_seconds,
                pids=settings.sandbox_pids,
            ),
            firecracker=FirecrackerConfig(
                kernel_image=settings.sandbox_firecracker_kernel,
                rootfs=settings.sandbox_firecracker_rootfs,
            ),
        )


@dataclass(frozen=True)
class BackendStatus:
    name: str
    isolation: Isolation
    available: bool
    reason: str = ""


def build_backend(name: str, config: SandboxConfig) -> Backend:
    if name == "bwrap":
        return BwrapBackend(state_dir=config.state_dir / "bwrap")
    if name == "landlock":
        return LandlockBackend(config.work_root)
    if name == "gvisor":
        return GvisorBackend(config.state_dir / "gvisor")
    if name == "firecracker":
        return FirecrackerBackend(config.firecracker)
    raise ValueError(f"unknown sandbox backend {name!r}")


class Sandbox:
    """Runs untrusted programs in one backend. Build it with :meth:`probe`."""

    def __init__(self, backend: Backend, config: SandboxConfig) -> None:
        if os.geteuid() != 0:
            # A dedicated uid per run, cgroups and the uid-wide kill need root.
            raise SandboxUnavailable("the sandbox needs root to drop each run to its own uid")
        if backend.isolation < config.min_isolation:
            raise SandboxUnavailable(
                f"{backend.name} gives {backend.isolation.name} isolation, "
                f"below the configured minimum {config.min_isolation.name}"
            )
        if missing := config.host.missing(backend.name):
            # Fail closed: never run with less isolation than the backend reports.
            needs = ", ".join(f.value for f in missing)
            raise SandboxUnavailable(f"{backend.name} refuses to start: this host lacks {needs}")
        self.backend = backend
        self.config = config
        self.cgroups = Layout()
        if not self.cgroups.available:
            raise SandboxUnavailable(f"{backend.name} needs a writable cgroup hierarchy")
        self.uids = UidPool(config.state_dir / "uids", config.uid_base, config.uid_count)
        become_subreaper()

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def isolation(self) -> Isolation:
        return self.backend.isolation

    @classmethod
    def probe(cls, config: SandboxConfig | None = None) -> Sandbox:
        """The sandbox on the strongest working backend; raise SandboxUnavailable."""
        config = config or SandboxConfig()
        statuses = cls.survey(config)
        for status in statuses:
            if status.available:
                return cls(build_backend(status.name, config), config)
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in statuses)
        raise SandboxUnavailable(f"no sandbox backend works here ({reasons})")

    @classmethod
    def survey(cls, config: SandboxConfig | None = None) -> list[BackendStatus]:
        """Each candidate backend, strongest first, and whether it works here."""
        config = config or SandboxConfig()
        names: Sequence[str] = (
            [config.backend]
            if config.backend != "auto"
            else sorted(config.candidates, key=lambda n: -build_backend(n, config).isolation)
        )
        statuses = []
        for name in names:
            backend = build_backend(name, config)
            reason = backend.unavailable()
            if reason is None and backend.isolation < config.min_isolation:
                reason = f"below the minimum isolation {config.min_isolation.name}"
            if reason is None:
                reason = cls._self_test(backend, config)
            statuses.append(BackendStatus(name, backend.isolation, reason is None, reason or ""))
        return statuses

    @classmethod
    def _self_test(cls, backend: Backend, config: SandboxConfig) -> str | None:
        """Start a trivial program: a backend that is installed may still not run
        (user namespaces refused, Landlock disabled, no KVM)."""
        try:
            sandbox = cls(backend, config)
        except SandboxUnavailable as exc:
            return str(exc)
        limits = replace(config.limits, wall_seconds=10.0)
        result = sandbox.run(RunSpec((PYTHON, "-I", "-S", "-c", _SELF_TEST), limits=limits))
        if result.outcome is Outcome.OK and result.stdout.strip() == b"42":
            return None
        if result.outcome is Outcome.OK and result.stdout.strip() == b"unfiltered":
            return "self-test failed: its seccomp policy did not refuse a netlink socket"
        return f"self-test failed: {result.outcome} {result.detail}".strip()

    def run(self, spec: RunSpec) -> Result:
        """Run ``spec`` to completion (blocking); never raises for what the program does.

        Raises :class:`SandboxUnavailable` only when no uid is free.
        """
        # Made when the backend first needs it (bwrap: while bubblewrap starts).
        cgroups = (
            CgroupLease(self.cgroups, self.backend.cgroup_limits(spec.limits))
            if self.cgroups.available
            else None
        )
        try:
            with self.uids.lease() as uid:
                return self.backend.run(spec, RunContext(uid, cgroups))
        finally:
            if cgroups is not None:
                cgroups.remove()

    async def run_async(self, spec: RunSpec) -> Result:
        """:meth:`run` in a thread, so the event loop keeps serving meanwhile."""
        return await asyncio.to_thread(self.run, spec)

    def python(self, code: str, *, stdin: bytes = b"", limits: Limits | None = None) -> RunSpec:
        """A spec running ``code`` with the sandbox's isolated interpreter (``-I -S``)."""
        return RunSpec(
            (PYTHON, "-I", "-S", "-c", code), stdin=stdin, limits=limits or self.config.limits
        )
