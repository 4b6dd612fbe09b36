"""The seccomp-bpf policy every sandboxed process runs under (seccomp(2)).

A deny list on top of the other layers: the syscalls that reach kernel attack
surface a calculation never needs (ptrace, mount, new namespaces, keyrings,
bpf, perf, io_uring, module loading...) kill the whole process with SIGSYS,
which the sandbox reports as ``seccomp_violation``. Any other architecture's
syscalls (``int 0x80`` i386 entry, so i386 ``socketcall`` too, and x32) are
killed as a bad architecture.

Sockets are an allow-list of address families (argument 0 of socket(2) and
socketpair(2)): only ``AF_UNIX``, ``AF_INET`` and ``AF_INET6`` can be created.
Every other family (vsock, netlink, packet, alg, key, bluetooth, ...) fails
with ``EAFNOSUPPORT``, the kernel's own answer for a family it lacks, so a
library that probes one (glibc's netlink query in getaddrinfo) falls back. A
network namespace does not cover vsock: this filter is what keeps a run off
the hypervisor's vsock services. io_uring (socket ops without socket(2)) is
killed outright.

The policy is one list of :class:`Rule` rendered two ways: compiled with
libseccomp (``pyseccomp``) to classic BPF, which bubblewrap loads from a file
descriptor (``--seccomp FD``) and the Landlock backend loads in the child with
``prctl(PR_SET_SECCOMP)``; and as the OCI runtime-spec ``linux.seccomp``
object, which gVisor's Sentry compiles and enforces on the program inside it
(``runsc --oci-seccomp``), argument conditions included.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Any

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

# The socket families a run may create (include/linux/socket.h); all others are refused.
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

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


@dataclass(frozen=True)
class Arg:
    """A condition on one syscall argument: ``op`` is ``eq``, ``gt`` or ``masked_eq``
    (``arg & mask == value``), compared on the full 64-bit register."""

    index: int
    op: str
    value: int
    mask: int = 0


@dataclass(frozen=True)
class Rule:
    """``syscall`` (when every ``args`` condition holds) is killed, or fails with ``errno``."""

    syscall: str
    args: tuple[Arg, ...] = ()
    errno: int | None = None  # None: kill the process (SIGSYS)


def _refused_families(syscall: str) -> list[Rule]:
    """``syscall``'s family argument outside :data:`ALLOWED_FAMILIES`, as
    equality and range conditions (one condition per rule: libseccomp and the
    OCI format both AND a rule's conditions, and the refused set is a union)."""
    low, high = min(ALLOWED_FAMILIES), max(ALLOWED_FAMILIES)
    below = [Arg(0, "eq", f) for f in range(low) if f not in ALLOWED_FAMILIES]
    gaps = [Arg(0, "eq", f) for f in range(low, high) if f not in ALLOWED_FAMILIES]
    # gt compares 64 bits: a family with high bits set (the kernel reads an int) is refused too.
    conditions = [*below, *gaps, Arg(0, "gt", high)]
    return [Rule(syscall, (c,), errno=errno.EAFNOSUPPORT) for c in conditions]


def rules(*, shared_host: bool) -> list[Rule]:
    """The policy. ``shared_host``: the process shares the host's network and IPC
    namespaces (the Landlock backend), so ``socket(2)`` for every family, AF_UNIX
    included, and System V / POSIX message-queue IPC are killed as well."""
    out = [Rule(name) for name in DENIED]
    out += [Rule("clone", (Arg(0, "masked_eq", flag, flag),)) for flag in _NAMESPACE_FLAGS]
    # clone3 passes its flags in memory seccomp cannot read: make libc fall back to clone.
    out.append(Rule("clone3", errno=errno.ENOSYS))
    out += [
        Rule("ioctl", (Arg(1, "masked_eq", request, 0xFFFFFFFF),))
        for request in (_TIOCSTI, _TIOCLINUX)
    ]
    if shared_host:
        out += [Rule(name) for name in ("socket", *HOST_IPC)]
    else:
        out += _refused_families("socket")
    out += _refused_families("socketpair")
    return out


_SC_OPS = {"eq": sc.EQ, "gt": sc.GT, "masked_eq": sc.MASKED_EQ}


def _sc_arg(arg: Arg) -> Any:
    if arg.op == "masked_eq":
        return sc.Arg(arg.index, sc.MASKED_EQ, arg.mask, arg.value)
    return sc.Arg(arg.index, _SC_OPS[arg.op], arg.value)


@functools.cache
def filter_bpf(*, shared_host: bool) -> bytes:
    """The policy as a classic-BPF program (an array of ``struct sock_filter``)."""
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for rule in rules(shared_host=shared_host):
        action = sc.KILL_PROCESS if rule.errno is None else sc.ERRNO(rule.errno)
        try:
            f.add_rule(action, rule.syscall, *(_sc_arg(a) for a in rule.args))
        except (OSError, ValueError):
            if rule.args:
                raise  # a condition the library refused: never load a weaker filter
            continue  # a syscall unknown on this architecture
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


_OCI_OPS = {"eq": "SCMP_CMP_EQ", "gt": "SCMP_CMP_GT", "masked_eq": "SCMP_CMP_MASKED_EQ"}


def oci_seccomp(*, shared_host: bool) -> dict[str, Any]:
    """The same policy as the OCI runtime-spec ``linux.seccomp`` object
    (config-linux.md#seccomp), for runtimes that enforce it themselves (gVisor)."""
    syscalls: list[dict[str, Any]] = []
    for rule in rules(shared_host=shared_host):
        entry: dict[str, Any] = {"names": [rule.syscall]}
        if rule.errno is None:
            entry["action"] = "SCMP_ACT_KILL"  # runsc 2022 knows no KILL_PROCESS
        elif rule.errno == errno.ENOSYS:
            # runsc releases that ignore errnoRet (20221219, the one here) answer
            # EPERM to every SCMP_ACT_ERRNO, and glibc falls back from clone3 to clone
            # on ENOSYS only, so no thread could start. SECCOMP_RET_TRACE with no
            # tracer attached fails the call with ENOSYS on every version
            # (seccomp(2)); ptrace is killed, so no tracer can ever attach.
            entry["action"] = "SCMP_ACT_TRACE"
            entry["errnoRet"] = rule.errno
        else:
            entry["action"] = "SCMP_ACT_ERRNO"  # EPERM where runsc ignores errnoRet: refused
            entry["errnoRet"] = rule.errno
        if rule.args:
            entry["args"] = [
                # OCI's masked_eq: "value" is the mask, "valueTwo" what the masked arg equals.
                {"index": a.index, "value": a.mask, "valueTwo": a.value, "op": _OCI_OPS[a.op]}
                if a.op == "masked_eq"
                else {"index": a.index, "value": a.value, "op": _OCI_OPS[a.op]}
                for a in rule.args
            ]
        syscalls.append(entry)
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": syscalls,
    }


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
