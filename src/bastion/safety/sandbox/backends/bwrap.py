"""bubblewrap: every namespace (user, pid, net, ipc, uts, mount, cgroup), a
read-only view of the system directories, a private size-capped tmpfs as the
work dir, a clean environment, no capabilities, NoNewPrivs and the seccomp
filter — started as the run's own uid, inside the run's cgroup.

bwrap runs unprivileged here (as the run's uid), so the kernel's user-namespace
rules apply to it like to any user; its network namespace holds only a
loopback, so there is no route to the host or the internet.
"""

from __future__ import annotations

import os
import resource
import shutil

from bastion.safety.sandbox import seccomp
from bastion.safety.sandbox.backends.base import Backend, RunContext
from bastion.safety.sandbox.runner import Launch, Watched, rlimits, system_mounts
from bastion.safety.sandbox.spec import Isolation, Outcome, Result, RunSpec

# The private tmpfs work dir, a path inside the sandbox's own mount namespace.
WORKDIR = "/tmp"  # noqa: S108
# Files of /etc a dynamically linked interpreter reads; nothing else of /etc.
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")


_PRLIMIT = {
    resource.RLIMIT_CPU: "cpu", resource.RLIMIT_FSIZE: "fsize", resource.RLIMIT_NOFILE: "nofile",
    resource.RLIMIT_NPROC: "nproc", resource.RLIMIT_CORE: "core",
    resource.RLIMIT_MEMLOCK: "memlock", resource.RLIMIT_MSGQUEUE: "msgqueue",
    resource.RLIMIT_AS: "as",
}  # fmt: skip


def clean_env(spec: RunSpec, *, home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        **dict(spec.env),
    }


class BwrapBackend(Backend):
    name = "bwrap"
    isolation = Isolation.NAMESPACES

    def __init__(self, binary: str = "bwrap") -> None:
        self.binary = binary

    def unavailable(self) -> str | None:
        if shutil.which(self.binary) is None:
            return "bwrap not installed (apt-get install bubblewrap)"
        if shutil.which("prlimit") is None or shutil.which("setpriv") is None:
            return "prlimit/setpriv not installed (apt-get install util-linux)"
        return None

    def launch(self, spec: RunSpec, ctx: RunContext) -> Launch:
        binary = shutil.which(self.binary)
        if binary is None:
            raise OSError("bwrap not installed")
        args = [
            binary,
            "--unshare-all",  # pid, net, ipc, uts, mount, cgroup (user: -try)
            "--unshare-user",
            # No nested namespaces: the seccomp filter kills unshare, setns and clone
            # with namespace flags (bwrap's --disable-userns would cost ~10% per start).
            "--die-with-parent",
            "--new-session",  # no TIOCSTI into a terminal
            "--cap-drop", "ALL",
            "--hostname", "sandbox",
        ]  # fmt: skip
        for mount in system_mounts():
            if mount.is_symlink():
                args += ["--symlink", os.readlink(mount), str(mount)]
            else:
                args += ["--ro-bind", str(mount), str(mount)]
        for path in ETC_FILES:
            args += ["--ro-bind-try", path, path]
        args += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(spec.limits.tmpfs_bytes), "--tmpfs", WORKDIR,
            "--chdir", WORKDIR,
            "--clearenv",
        ]  # fmt: skip
        for key, value in clean_env(spec, home=WORKDIR).items():
            args += ["--setenv", key, value]
        seccomp_fd = seccomp.bpf_pipe(seccomp.filter_bpf(shared_host=False))
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        args += [
            "--seccomp", str(seccomp_fd),
            "--json-status-fd", str(status_w),
            # The sandbox waits here, namespaces made, until the supervisor has put
            # it in the run's cgroup and under its rlimits (Supervisor._confine).
            "--block-fd", str(block_r),
            "--", *spec.argv,
        ]  # fmt: skip
        # rlimits: set by prlimit(1) on itself before it execs on (lowering one's
        # own limits needs no privilege; setting another process's needs
        # CAP_SYS_RESOURCE, which a container's root may not hold).
        # Then setpriv(1) drops to the run's uid: with no pre-exec step and no
        # user= here, the child is started with vfork, not a fork of this process.
        prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
        if prlimit is None or setpriv is None:
            raise OSError("prlimit/setpriv not installed")
        limits = [
            f"--{_PRLIMIT[which]}={soft}:{hard}"
            for which, (soft, hard) in rlimits(spec.limits, memory_cgroup=ctx.cgroup is not None)
        ]
        drop = [f"--reuid={ctx.uid}", f"--regid={ctx.uid}", "--clear-groups"]
        return Launch(
            argv=[prlimit, *limits, "--", setpriv, *drop, "--", *args],
            env={"PATH": "/usr/bin:/bin"},
            preexec=None,
            pass_fds=(seccomp_fd, status_w, block_r),
            child_fds=(seccomp_fd, status_w, block_r),
            status_fd=status_r,
            block_fd=block_w,
            cwd="/",
        )

    def finish(self, result: Result, watched: Watched) -> Result:
        if "child-pid" not in watched.status and result.outcome in (Outcome.EXIT, Outcome.OK):
            # bwrap failed before starting the command (namespaces refused, ...).
            first = watched.stderr.split(b"\n", 1)[0][:200].decode("utf-8", "replace")
            return Result(Outcome.SANDBOX_ERROR, self.name, detail=f"bwrap: {first}")
        return result
