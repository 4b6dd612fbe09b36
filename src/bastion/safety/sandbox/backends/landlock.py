"""The fallback where user namespaces are unavailable (a container that forbids
them, a hardened host): no namespaces, so every boundary comes from the
process's own credentials and kernel-enforced self-restriction —

- Landlock: read/execute only beneath the system directories, read/write only
  beneath the run's private work dir, no TCP bind/connect, no signals or
  abstract unix sockets outside the sandbox (ABI 6 scopes);
- seccomp: the common deny list plus ``socket(2)`` for every family, AF_UNIX
  included, and System V / POSIX message-queue IPC (no network or IPC
  namespace to stand behind);
- rlimits, the run's cgroup, its own uid, NoNewPrivs, a new session.
"""

from __future__ import annotations

from pathlib import Path

from bastion.safety.sandbox import landlock_abi, seccomp
from bastion.safety.sandbox.backends.base import Backend, RunContext
from bastion.safety.sandbox.backends.bwrap import ETC_FILES, clean_env
from bastion.safety.sandbox.runner import Launch, make_preexec, system_mounts
from bastion.safety.sandbox.spec import Isolation, RunSpec
from bastion.safety.sandbox.workdir import WorkDir

DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


class LandlockBackend(Backend):
    name = "landlock"
    isolation = Isolation.LANDLOCK
    wrapped = False

    def __init__(self, work_root: Path) -> None:
        # Where each run's work dir (a tmpfs of its own, see workdir.py) is mounted.
        self.work_root = work_root
        self._filter = seccomp.PreparedFilter(seccomp.filter_bpf(shared_host=True))

    def unavailable(self) -> str | None:
        abi = landlock_abi.abi_version()
        if abi < 4:
            return f"Landlock ABI {abi} < 4 (needs Linux 6.7+ for TCP rules)"
        return None

    def launch(self, spec: RunSpec, ctx: RunContext) -> Launch:
        cgroup = ctx.cgroup  # made now: the child joins it before exec
        # The one writable area: a tmpfs of the run's own, size-capped (else a
        # directory its memory cgroup caps; with neither, the run is refused).
        work = WorkDir(
            self.work_root,
            uid=ctx.uid,
            size_bytes=spec.limits.tmpfs_bytes,
            needs_cap=cgroup is None,
        )
        workdir = work.path
        try:
            ruleset = landlock_abi.Ruleset(
                read=[*system_mounts(), *(Path(p) for p in ETC_FILES)],
                write=[workdir],
                devices=[Path(d) for d in DEVICES],
            )
        except BaseException:
            work.remove()
            raise
        sandbox_filter = self._filter

        def restrict() -> None:
            sandbox_filter.no_new_privs_in_child()
            ruleset.restrict_in_child()
            sandbox_filter.load_in_child()  # last: it may deny what came before

        def cleanup() -> None:
            ruleset.close()
            work.remove()  # raises if anything is left: the run is reported as failed

        return Launch(
            argv=list(spec.argv),
            env=clean_env(spec, home=str(workdir)),
            preexec=make_preexec(uid=ctx.uid, limits=spec.limits, cgroup=cgroup, extra=restrict),
            cwd=str(workdir),
            cleanups=[cleanup],
        )
