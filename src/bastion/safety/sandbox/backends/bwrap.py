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
from bastion.safety.sandbox.creds import ThreadCredentials
from bastion.safety.sandbox.runner import Launch, Watched, rlimits, system_mounts
from bastion.safety.sandbox.spec import Isolation, Outcome, Result, RunSpec

# The private tmpfs work dir, a path inside the sandbox's own mount namespace.
WORKDIR = "/tmp"  # noqa: S108
# Files of /etc a dynamically linked interpreter reads; nothing else of /etc.
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
# Files of the sandbox's own /proc that still show the host: its identity (boot id,
# kernel command line with the VM agent's flags) and host-wide activity counters
# (fork and context-switch counts, load, interrupts) — side channels on the host.
# Each is masked by binding /dev/null over it (reads as empty), as OCI runtimes do.
PROC_MASKS = (
    "/proc/sys/kernel/random/boot_id",
    "/proc/cmdline",
    "/proc/stat",
    "/proc/loadavg",
    "/proc/interrupts",
    "/proc/softirqs",
    "/proc/schedstat",
    "/proc/vmstat",
    "/proc/diskstats",
    "/proc/pressure",
)


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

    def __init__(self, binary: str = "bwrap", *, direct: bool | None = None) -> None:
        """``direct``: spawn bubblewrap straight as the run's uid and set the rlimits
        on its blocked sandbox from here (creds.py), rather than through prlimit(1)
        and setpriv(1) execs in front of it (~2.5 ms a run). None: where possible."""
        self.binary = binary
        credentials = ThreadCredentials()
        if direct is None:
            direct = credentials.available()
        elif direct and not credentials.available():
            raise ValueError("thread credentials unavailable: not root, or unknown syscalls")
        self.credentials = credentials if direct else None
        self._static: tuple[str, list[str]] | None = None

    def unavailable(self) -> str | None:
        if shutil.which(self.binary) is None:
            return "bwrap not installed (apt-get install bubblewrap)"
        if self.credentials is None and (
            shutil.which("prlimit") is None or shutil.which("setpriv") is None
        ):
            return "prlimit/setpriv not installed (apt-get install util-linux)"
        return None

    def _static_args(self) -> tuple[str, list[str]]:
        """(bwrap, the arguments every run shares): resolved once per backend, not
        per run (PATH lookups, the system dirs' symlinks)."""
        if self._static is None:
            binary = shutil.which(self.binary)
            if binary is None:
                raise OSError("bwrap not installed")
            args = [
                binary,
                "--unshare-all",  # pid, net, ipc, uts, mount, cgroup (user: -try)
                "--unshare-user",
                # No nested namespaces: the seccomp filter kills unshare, setns and
                # clone with namespace flags (bwrap's --disable-userns would cost
                # ~10% per start).
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
            args += ["--proc", "/proc", "--dev", "/dev"]
            for path in PROC_MASKS:  # the same kernel inside: what exists here does there
                if os.path.isdir(path):
                    args += ["--tmpfs", path, "--remount-ro", path]
                elif os.path.exists(path):
                    args += ["--ro-bind", "/dev/null", path]
            self._static = (binary, args)
        return self._static

    def launch(self, spec: RunSpec, ctx: RunContext) -> Launch:
        _, static = self._static_args()
        args = [
            *static,
            # The one writable area, size-capped (its pages count against the run's
            # memory cgroup too); then everything else read-only: bubblewrap's own
            # root tmpfs (/, /etc) and /dev's (/dev/shm) would take any size.
            "--size", str(spec.limits.tmpfs_bytes), "--tmpfs", WORKDIR,
            "--remount-ro", "/dev",
            "--remount-ro", "/",
            "--chdir", WORKDIR,
            "--clearenv",
        ]  # fmt: skip
        for key, value in clean_env(spec, home=WORKDIR).items():
            args += ["--setenv", key, value]
        # The filter is compiled once per process (filter_bpf is cached); each run
        # gets its own pipe holding it, which bubblewrap reads to the end.
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
        limits = rlimits(spec.limits, memory_cgroup=ctx.has_cgroup)
        if self.credentials is not None:
            # Spawned as the run's uid by this thread (vfork: no fork of this large
            # process, no exec in front); the rlimits are set on the sandbox's init
            # while it is blocked, before any code of the run exists — every process
            # of the run descends from it and inherits them.
            argv, init_limits = args, limits
        else:
            # prlimit(1) sets them on itself before it execs on (lowering one's own
            # limits needs no privilege), then setpriv(1) drops to the run's uid.
            prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
            if prlimit is None or setpriv is None:
                raise OSError("prlimit/setpriv not installed")
            options = [f"--{_PRLIMIT[which]}={soft}:{hard}" for which, (soft, hard) in limits]
            drop = [f"--reuid={ctx.uid}", f"--regid={ctx.uid}", "--clear-groups"]
            argv = [prlimit, *options, "--", setpriv, *drop, "--", *args]
            init_limits = []
        return Launch(
            argv=argv,
            env={"PATH": "/usr/bin:/bin"},
            preexec=None,
            pass_fds=(seccomp_fd, status_w, block_r),
            child_fds=(seccomp_fd, status_w, block_r),
            status_fd=status_r,
            block_fd=block_w,
            cwd="/",
            init_rlimits=init_limits,
            credentials=self.credentials,
        )

    def finish(self, result: Result, watched: Watched) -> Result:
        if "child-pid" not in watched.status and result.outcome in (Outcome.EXIT, Outcome.OK):
            # bwrap failed before starting the command (namespaces refused, ...).
            first = watched.stderr.split(b"\n", 1)[0][:200].decode("utf-8", "replace")
            return Result(Outcome.SANDBOX_ERROR, self.name, detail=f"bwrap: {first}")
        return result
