"""The seccomp-bpf filter every sandboxed process runs under (seccomp(2)).

A deny list on top of the other layers: the syscalls that reach kernel attack
surface a calculation never needs (ptrace, mount, new namespaces, keyrings,
bpf, perf, io_uring, module loading...) kill the whole process with SIGSYS,
which the sandbox reports as ``seccomp_violation``. Any other architecture's
syscalls (``int 0x80`` i386 entry, x32) are killed as a bad architecture.

The filter is compiled once with libseccomp (``pyseccomp``) and exported as
classic BPF: bubblewrap loads it from a file descriptor (``--seccomp FD``), and
the Landlock backend loads it in the child with ``prctl(PR_SET_SECCOMP)``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import tempfile

import pyseccomp as sc  # type: ignore[import-untyped]

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "personality",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "vhangup", "uselib", "fanotify_init", "nfsservctl",
)  # fmt: skip

# clone(2) flags that create namespaces (include/uapi/linux/sched.h).
_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
_TIOCSTI = 0x5412  # ioctl pushing bytes into a terminal's input
_TIOCLINUX = 0x541C

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


# With the host's IPC namespace shared (no namespaces at all), System V IPC and
# POSIX message queues would reach other processes' objects.
HOST_IPC = (
    "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr",
)  # fmt: skip


@functools.cache
def filter_bpf(*, shared_host: bool) -> bytes:
    """The filter as a classic-BPF program (an array of ``struct sock_filter``).

    ``shared_host``: the process shares the host's network and IPC namespaces
    (the Landlock backend), so ``socket(2)`` for every family, AF_UNIX included,
    and System V / POSIX message-queue IPC are killed as well.
    """
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in DENIED:
        try:
            f.add_rule(sc.KILL_PROCESS, name)
        except (OSError, ValueError):
            continue  # unknown on this architecture
    for flag in _NAMESPACE_FLAGS:
        f.add_rule(sc.KILL_PROCESS, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory seccomp cannot read: make libc fall back to clone.
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for request in (_TIOCSTI, _TIOCLINUX):
        f.add_rule(sc.KILL_PROCESS, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    if shared_host:
        for name in ("socket", *HOST_IPC):
            f.add_rule(sc.KILL_PROCESS, name)
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


class PreparedFilter:
    """A filter ready to load in a forked child with no allocation or import:
    :meth:`load_in_child` is two ``prctl`` calls on memory prepared here."""

    def __init__(self, bpf: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buffer))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._prctl.argtypes = (
            ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
        )  # fmt: skip

    def no_new_privs_in_child(self) -> None:
        """Set NoNewPrivs (needed by Landlock and seccomp); raise OSError."""
        if self._prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")

    def load_in_child(self) -> None:
        """Install the filter on the calling process (after NoNewPrivs); raise OSError."""
        if self._prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(self._prog), 0, 0):
            raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def bpf_pipe(bpf: bytes) -> int:
    """A readable descriptor holding ``bpf`` (for ``bwrap --seccomp FD``)."""
    read, write = os.pipe()
    try:
        os.write(write, bpf)  # a few KB: fits in the pipe buffer
    finally:
        os.close(write)
    return read
