"""bubblewrap: every namespace (user, pid, net, ipc, uts, mount, cgroup), a
read-only view of the system directories, a private size-capped tmpfs as the
work dir, a clean environment, no capabilities, NoNewPrivs and the seccomp
filter — started as the run's own uid, inside the run's cgroup.

bwrap runs unprivileged here (as the run's uid), so the kernel's user-namespace
rules apply to it like to any user; its network namespace holds only a
loopback, so there is no route to the host or the internet.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import shutil
import stat
from pathlib import Path

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


# The sandbox's /dev: these devices (name, major, minor), the /proc/self/fd links and
# an empty /dev/shm, nothing else (no pseudo-terminals, no /dev/tty). Made once
# on the host in a root-owned tree mounted read-only and bound at /dev in one
# mount, where bubblewrap's --dev plus the remount that makes it read-only are
# about ten mount operations a run (a tmpfs, six device binds, a devpts, a remount).
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
_MS_RDONLY, _MS_NOSUID, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND = 1, 2, 8, 32, 4096


def _dev_tree_valid(tree: Path) -> bool:
    """Whether ``tree`` is exactly the prepared /dev: on a read-only mount that
    allows devices, root's and unwritable, reachable by a run's uid."""
    try:
        flags = os.statvfs(tree).f_flag
        if not flags & os.ST_RDONLY or flags & os.ST_NODEV:
            return False
        for directory in (tree, *tree.parents):  # a run's uid must reach it
            info = os.stat(directory)
            if info.st_uid != 0 or info.st_mode & 0o022 or not info.st_mode & 0o001:
                return False
        expected = {name for name, _, _ in DEVICES} | {name for name, _ in DEV_LINKS} | {"shm"}
        if set(os.listdir(tree)) != expected:
            return False
        for name, major, minor in DEVICES:
            info = os.lstat(tree / name)
            if not stat.S_ISCHR(info.st_mode) or info.st_rdev != os.makedev(major, minor):
                return False
        shm = os.lstat(tree / "shm")
        return (
            all(os.readlink(tree / name) == target for name, target in DEV_LINKS)
            and stat.S_ISDIR(shm.st_mode)
            and shm.st_uid == 0
            and not os.listdir(tree / "shm")
        )
    except OSError:
        return False


def prepare_dev_tree(tree: Path) -> bool:
    """Make ``tree`` the sandbox's /dev (see :data:`DEVICES`) once per host, as root:
    the nodes, then a read-only bind mount of the tree on itself. Returns whether
    it is ready; False (a host where it cannot be made: not root, a nodev file
    system) leaves bubblewrap's own --dev in use."""
    try:
        tree.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(tree.parent / "dev.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making it
            if _dev_tree_valid(tree):
                return True
            if tree.exists():
                return False  # something else is there: never remove what is not ours
            if os.statvfs(tree.parent).f_flag & os.ST_NODEV:
                return False  # device nodes would not open there
            tree.mkdir(mode=0o755)
            for name, major, minor in DEVICES:
                os.mknod(tree / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
                os.chmod(tree / name, 0o666)  # noqa: S103 - what /dev/null is, past the umask
            for name, target in DEV_LINKS:
                os.symlink(target, tree / name)
            (tree / "shm").mkdir(mode=0o755)
            os.chmod(tree, 0o755)  # noqa: S103 - read-only, reachable by a run's uid
            # A bind of the tree on itself, then read-only: its own mount, which a
            # sandbox's bind inherits read-only (locked: made in the host's namespace).
            libc = ctypes.CDLL(None, use_errno=True)
            path = str(tree).encode()
            read_only = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC
            if libc.mount(path, path, None, _MS_BIND, None) != 0:
                return False
            if libc.mount(None, path, None, read_only, None) != 0:
                libc.umount2(path, 0)
                return False
            return _dev_tree_valid(tree)
    except OSError:
        return False


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

    def __init__(
        self, binary: str = "bwrap", *, direct: bool | None = None, state_dir: Path | None = None
    ) -> None:
        """``direct``: spawn bubblewrap straight as the run's uid and set the rlimits
        on its blocked sandbox from here (creds.py), rather than through prlimit(1)
        and setpriv(1) execs in front of it (~2.5 ms a run). None: where possible.
        ``state_dir``: where the prepared /dev is made (None: bubblewrap's --dev)."""
        self.binary = binary
        self.state_dir = state_dir
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
                target = os.path.realpath(path)
                if path == "/etc/localtime" and target.startswith("/usr/share/zoneinfo/"):
                    # The zone file is in the read-only /usr already: a symlink to it
                    # is no mount operation (a bind is one, each run).
                    args += ["--symlink", target, path]
                else:
                    args += ["--ro-bind-try", path, path]
            args += ["--proc", "/proc"]
            tree = self.state_dir / "dev" if self.state_dir is not None else None
            if tree is not None and prepare_dev_tree(tree):
                # Read-only already (the host's mount): no remount, which would add nodev.
                args += ["--dev-bind", str(tree), "/dev"]
            else:
                args += ["--dev", "/dev", "--remount-ro", "/dev"]
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
            # root tmpfs (/, /etc) would take any size (/dev: see _static_args).
            "--size", str(spec.limits.tmpfs_bytes), "--tmpfs", WORKDIR,
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
