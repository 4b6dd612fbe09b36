"""Landlock (Documentation/userspace-api/landlock.rst), through its three syscalls.

A ruleset is built in the parent — read/execute beneath the system
directories, read/write beneath the run's work directory, no TCP bind or
connect (ABI 4), no signals or abstract unix sockets outside the sandbox
(ABI 6 scopes) — and the child only calls ``landlock_restrict_self`` on it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
MAKE_SYM, REFER, TRUNCATE, IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = EXECUTE | READ_FILE | READ_DIR
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is unavailable."""
    version = _libc.syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    return max(int(version), 0)


class Ruleset:
    """A Landlock ruleset as an open descriptor (inherited by the forked child)."""

    def __init__(self, *, read: list[Path], write: list[Path], devices: list[Path]) -> None:
        abi = abi_version()
        if abi < 1:
            raise OSError("Landlock is not available")
        fs = next(
            mask for version, mask in sorted(_FS_BY_ABI.items(), reverse=True) if abi >= version
        )
        attr = _RulesetAttr(
            handled_access_fs=fs,
            handled_access_net=(NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
            scoped=(SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0,
        )
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        fd = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
        self.fd = int(fd)
        self.abi = abi
        try:
            for path in read:
                self._allow(path, READ & fs)
            for path in write:
                self._allow(path, fs & ~(MAKE_CHAR | MAKE_BLOCK | MAKE_SOCK | MAKE_FIFO))
            for path in devices:
                self._allow(path, (READ_FILE | WRITE_FILE) & fs)
        except BaseException:
            self.close()
            raise

    def _allow(self, path: Path, access: int) -> None:
        try:
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            if not os.path.isdir(path):
                access &= FILE_ONLY  # directory rights on a file are refused (EINVAL)
            rule = _PathBeneath(allowed_access=access, parent_fd=target)
            if _libc.syscall(_SYS_ADD_RULE, self.fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0):
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        finally:
            os.close(target)

    def restrict_in_child(self) -> None:
        """Enforce the ruleset on the calling process (NoNewPrivs must be set); raise OSError."""
        if _libc.syscall(_SYS_RESTRICT_SELF, self.fd, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
