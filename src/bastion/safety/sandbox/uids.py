"""A dedicated unprivileged uid per concurrent run.

RLIMIT_NPROC counts the processes of a uid and is ignored for root, and
``kill(-1)`` as a uid reaches exactly that uid's processes: with one uid per
run, both bound and end a run's whole process tree. Leases are ``flock``s on
one file per uid, so several worker processes on a host never share a uid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from collections.abc import Iterator
from pathlib import Path

from bastion.safety.sandbox.errors import SandboxUnavailable


class UidPool:
    def __init__(self, lock_dir: Path, base: int, count: int) -> None:
        if base < 1000 or count < 1 or base + count > 2**31:
            raise ValueError("sandbox uids must be an unprivileged range")
        self.lock_dir = lock_dir
        self.base = base
        self.count = count

    def __contains__(self, uid: int) -> bool:
        return self.base <= uid < self.base + self.count

    @contextlib.contextmanager
    def lease(self) -> Iterator[int]:
        """Hold a uid no other run uses until the block ends; raise SandboxUnavailable."""
        self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        start = random.randrange(self.count)  # noqa: S311 - spreads leases, not a secret
        for i in range(self.count):
            uid = self.base + (start + i) % self.count
            fd = os.open(self.lock_dir / f"uid-{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        raise SandboxUnavailable("every sandbox uid is in use")
