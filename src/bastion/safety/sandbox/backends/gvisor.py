"""gVisor: the program talks to gVisor's user-space kernel (the Sentry), not to
the host's; ``runsc`` runs an OCI bundle (runtime-spec config.json) with no
network (``--network=none``), the ptrace platform (no KVM needed), a
read-only root with the system directories bound read-only, a private tmpfs,
no capabilities, NoNewPrivs and the run's rlimits inside. The whole sandbox
(Sentry and Gofer included) runs in the run's cgroup, which bounds its
memory, processes and CPU and ends it at once.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from bastion.safety.sandbox import seccomp
from bastion.safety.sandbox.backends.base import Backend, RunContext
from bastion.safety.sandbox.backends.bwrap import WORKDIR, clean_env
from bastion.safety.sandbox.runner import Launch, Watched, rlimits, system_mounts
from bastion.safety.sandbox.spec import PYTHON, Isolation, Limits, Outcome, Result, RunSpec

_RLIMIT_NAMES = {
    0: "RLIMIT_CPU", 1: "RLIMIT_FSIZE", 4: "RLIMIT_CORE", 6: "RLIMIT_NPROC",
    7: "RLIMIT_NOFILE", 8: "RLIMIT_MEMLOCK", 9: "RLIMIT_AS", 12: "RLIMIT_MSGQUEUE",
}  # fmt: skip
# runsc's helper processes (the sandbox, the gofer) can outlive it a moment; run
# under this small sub-reaper they are reaped there, not left to the worker.
_REAPER = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
status = 0
while True:
    try:
        done, st = os.wait()
    except ChildProcessError:
        break
    if done == pid:
        status = st
code = os.waitstatus_to_exitcode(status)
sys.exit(128 - code if code < 0 else code)
"""
# Host threads of the Sentry and Gofer (Go programs) on top of the program's
# processes, which are the Sentry's tasks, bounded inside it by RLIMIT_NPROC.
SENTRY_THREADS = 1024


class GvisorBackend(Backend):
    name = "gvisor"
    isolation = Isolation.GVISOR
    needs_cgroup = True

    def __init__(self, state_dir: Path, binary: str = "runsc") -> None:
        self.state_dir = state_dir
        self.binary = binary

    def cgroup_limits(self, limits: Limits) -> Limits:
        # Memory: the configured cap holds the whole sandbox, the Sentry's own
        # (~25 MB here) included, so the program can never use more than the cap
        # (with room added for the Sentry it held ~400 MB against 256 MB).
        return replace(limits, pids=limits.pids + SENTRY_THREADS)

    def unavailable(self) -> str | None:
        if shutil.which(self.binary) is None:
            return "runsc not installed (apt-get install runsc)"
        return None

    def _rootfs(self) -> Path:
        """An empty read-only skeleton the mounts are placed on (made once)."""
        root = self.state_dir / "rootfs"
        if not (root / "tmp").is_dir():
            for name in ("usr", "tmp", "proc", "dev", "etc"):
                (root / name).mkdir(parents=True, exist_ok=True)
            for mount in system_mounts():
                if mount.is_symlink() and not (root / mount.name).is_symlink():
                    (root / mount.name).symlink_to(os.readlink(mount))
        return root

    def launch(self, spec: RunSpec, ctx: RunContext) -> Launch:
        binary = shutil.which(self.binary)
        if binary is None:
            raise OSError("runsc not installed")
        cgroup = ctx.cgroup  # made now: the child joins it before exec
        limits = spec.limits
        bundle = self.state_dir / "runs" / f"run-{uuid.uuid4().hex}"
        bundle.mkdir(parents=True, mode=0o700)
        mounts: list[dict[str, object]] = [
            {"destination": str(m), "type": "bind", "source": str(m), "options": ["rbind", "ro"]}
            for m in system_mounts()
            if not m.is_symlink()
        ]
        mounts += [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": WORKDIR,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", f"size={limits.tmpfs_bytes}"],
            },
        ]
        config = {
            "ociVersion": "1.0.2",
            "hostname": "sandbox",
            "root": {"path": str(self._rootfs()), "readonly": True},
            "mounts": mounts,
            "process": {
                "user": {"uid": ctx.uid, "gid": ctx.uid},
                "args": list(spec.argv),
                "env": [f"{k}={v}" for k, v in clean_env(spec, home=WORKDIR).items()],
                "cwd": WORKDIR,
                "noNewPrivileges": True,
                "capabilities": {
                    k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
                },
                "rlimits": [
                    {"type": _RLIMIT_NAMES[which], "soft": soft, "hard": hard}
                    for which, (soft, hard) in rlimits(limits, memory_cgroup=False)
                    if which in _RLIMIT_NAMES
                ],
            },
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                # The same policy as bwrap's, argument conditions included, which
                # the Sentry compiles and enforces on the program (--oci-seccomp).
                "seccomp": seccomp.oci_seccomp(shared_host=False),
            },
        }
        (bundle / "config.json").write_text(json.dumps(config))

        def join() -> None:
            if cgroup is not None:
                cgroup.join_in_child()

        def cleanup() -> None:
            shutil.rmtree(bundle, ignore_errors=True)

        return Launch(
            argv=[
                PYTHON,
                "-I",
                "-S",
                "-c",
                _REAPER,
                binary,
                "--root",
                str(bundle / "state"),
                "--platform=ptrace",
                "--network=none",
                "--ignore-cgroups",  # the run's cgroup already holds the whole sandbox
                "--oci-seccomp",
                "run",
                "--bundle",
                str(bundle),
                bundle.name,
            ],
            env={"PATH": "/usr/bin:/bin"},
            preexec=join,
            cwd="/",
            cleanups=[cleanup],
        )

    def finish(self, result: Result, watched: Watched) -> Result:
        if result.exit_code == 128 and watched.stderr.startswith(b"running container: "):
            # runsc itself failed to create or start the sandbox.
            first = watched.stderr.split(b"\n", 1)[0][-200:].decode("utf-8", "replace")
            return Result(Outcome.SANDBOX_ERROR, self.name, detail=f"runsc: {first}")
        return result
