"""What this host's kernel gives the sandbox, checked before any backend starts.

Each backend names the features its guarantees rest on
(:data:`REQUIRED`); a :class:`~bastion.safety.sandbox.Sandbox` on a host that
lacks one refuses to start (``SandboxUnavailable``) instead of running with
less isolation than it reports. :class:`HostProbe` reads the kernel's own
answers; tests pass a probe that reports a feature missing to show the refusal.
"""

from __future__ import annotations

import enum
import functools
from pathlib import Path

from bastion.safety.sandbox import landlock_abi, seccomp
from bastion.safety.sandbox.cgroups import ROOT, Layout


class Feature(enum.StrEnum):
    # seccomp-bpf with argument conditions and the actions the policy uses: the
    # socket-family allow-list (vsock, netlink, ...) and clone's namespace flags.
    SECCOMP_ARGS = "seccomp argument filtering"
    # A writable cgroup hierarchy with the memory and pids controllers (one group a run).
    CGROUPS = "cgroup memory and pids controllers"
    # The CPU time of every task a run ever had, from the cgroup's own account (v1:
    # the cpuacct controller; v2: cpu.stat): without it the CPU limit and the
    # reported figure miss unreaped children, so each run would end in sandbox_error.
    CPU_ACCOUNTING = "cgroup CPU accounting (cpuacct on cgroup v1)"
    # Unprivileged user namespaces (bubblewrap's pid, net, ipc, uts, mount namespaces).
    NAMESPACES = "user namespaces"
    LANDLOCK = "Landlock ABI 4+"


REQUIRED: dict[str, tuple[Feature, ...]] = {
    "bwrap": (Feature.SECCOMP_ARGS, Feature.CGROUPS, Feature.CPU_ACCOUNTING, Feature.NAMESPACES),
    "landlock": (Feature.SECCOMP_ARGS, Feature.CGROUPS, Feature.CPU_ACCOUNTING, Feature.LANDLOCK),
    # gVisor enforces the policy in its Sentry; the host's seccomp is runsc's own business.
    "gvisor": (Feature.CGROUPS, Feature.CPU_ACCOUNTING),
    "firecracker": (Feature.CGROUPS, Feature.CPU_ACCOUNTING),
}

_SECCOMP_ACTIONS = Path("/proc/sys/kernel/seccomp/actions_avail")
_MAX_USER_NAMESPACES = Path("/proc/sys/user/max_user_namespaces")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class HostProbe:
    """Whether each :class:`Feature` is present on this host (read from the kernel).
    ``cgroup_root``: where the cgroup hierarchies are mounted."""

    def __init__(self, cgroup_root: Path = ROOT) -> None:
        self.cgroup_root = cgroup_root

    def has(self, feature: Feature) -> bool:
        return _present(feature, self.cgroup_root)

    def missing(self, backend: str) -> list[Feature]:
        """The features ``backend`` needs that this host lacks."""
        return [f for f in REQUIRED.get(backend, ()) if not self.has(f)]


@functools.cache
def _seccomp_args() -> bool:
    actions = set(_read(_SECCOMP_ACTIONS).split())
    if not {"kill_process", "errno"} <= actions:
        return False
    try:
        seccomp.filter_bpf(shared_host=False)  # libseccomp compiles every condition
    except (OSError, ValueError):
        return False
    return True


def _present(feature: Feature, cgroup_root: Path) -> bool:
    # Read each time (a few stat calls): a controller can be mounted or gone later.
    if feature is Feature.SECCOMP_ARGS:
        return _seccomp_args()
    if feature is Feature.CGROUPS:
        return Layout(cgroup_root).available
    if feature is Feature.CPU_ACCOUNTING:
        return Layout(cgroup_root).cpu_accounting
    if feature is Feature.NAMESPACES:
        count = _read(_MAX_USER_NAMESPACES).strip()
        return count.isdigit() and int(count) > 0
    if feature is Feature.LANDLOCK:
        return landlock_abi.abi_version() >= 4
    raise ValueError(feature)
