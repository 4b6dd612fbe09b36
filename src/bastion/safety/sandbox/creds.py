"""Acting as a run's uid on the calling thread only, for a spawn or a few syscalls.

Linux keeps credentials per thread (credentials(7)); glibc's setresuid()
changes every thread of the process at once (its "setxid" broadcast), while
the raw system calls change only the calling thread. This lets the sandbox

- spawn bubblewrap directly as the run's uid with vfork — no setpriv(1) exec
  in front (~1.5 ms a run here) and no fork of this large process: the vfork
  child inherits the thread's credentials, and execve(2) then sets the saved
  uid/gid to the effective ones and clears every capability (a non-root
  exec), so the sandbox ends up exactly as with setpriv: uid, gid, saved ids
  all the run's, no supplementary group, no capability;
- lower the rlimits of the run's blocked init with prlimit(2), which needs
  either CAP_SYS_RESOURCE (a container's root may lack it, as here) or a
  real uid/gid equal to the target's — no prlimit(1) exec (~1 ms a run).

The saved uid/gid stay 0 throughout, which is what lets the thread return to
root afterwards; nothing else runs on the thread meanwhile. While the thread
has the run's real uid, a process of that uid could signal this process (if
the thread is its main one): none can exist then but the run's own
bubblewrap, not yet running any of the run's code — the uid is leased to this
run alone, and the previous run of it left nothing alive (runner.reap_run).
Where the raw system call numbers are unknown, or the process is not plainly
root, the bwrap backend falls back to the setpriv/prlimit execs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator

# (setresuid, setresgid, setgroups) by architecture (arch/x86/entry/syscalls,
# include/uapi/asm-generic/unistd.h).
_NUMBERS = {"x86_64": (117, 119, 116), "aarch64": (147, 149, 159)}
_KEEP = -1  # setresuid(2): leave this id unchanged


class ThreadCredentials:
    """Switches the calling thread's credentials with raw system calls."""

    def __init__(self) -> None:
        self._numbers = _NUMBERS.get(platform.machine())
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long

    def available(self) -> bool:
        """Known system calls, and a plainly root process (real, effective and saved
        ids 0: the saved 0 is what brings the thread back)."""
        return (
            self._numbers is not None
            and os.getresuid() == (0, 0, 0)
            and os.getresgid() == (0, 0, 0)
        )

    def _call(self, number: int, *args: object) -> None:
        values = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        if self._syscall(ctypes.c_long(number), *values) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    @contextlib.contextmanager
    def acting_as(self, uid: int, *, effective: bool) -> Iterator[None]:
        """Within the block, this thread's real uid and gid are ``uid`` (and its
        effective ones too with ``effective``), with no supplementary group.

        ``effective=False`` keeps every capability (the effective uid stays 0):
        enough for the "same real uid" permission checks (prlimit(2)). The
        saved ids stay 0 in either case. Raise OSError if the switch fails
        (the thread is then back as it was).
        """
        assert self._numbers is not None
        setresuid, setresgid, setgroups = self._numbers
        groups = os.getgroups()
        euid = uid if effective else _KEEP
        try:
            self._call(setgroups, 0, None)
            self._call(setresgid, uid, euid, _KEEP)
            self._call(setresuid, uid, euid, _KEEP)
        except BaseException:
            self._restore(groups)
            raise
        try:
            yield
        finally:
            self._restore(groups)

    def _restore(self, groups: list[int]) -> None:
        setresuid, setresgid, setgroups = self._numbers or (0, 0, 0)
        try:
            # uid first: an effective uid of 0 again brings the capabilities back.
            self._call(setresuid, 0, 0, _KEEP)
            self._call(setresgid, 0, 0, _KEEP)
            array = (ctypes.c_uint * len(groups))(*groups)
            self._call(setgroups, len(groups), array)
        except OSError:  # pragma: no cover - the saved uid 0 makes this impossible
            # A root process's thread left with a run's uid would be signalable by
            # that run and would charge its children to it: never go on like that.
            os.abort()
