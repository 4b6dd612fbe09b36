"""Jobs for tests of bastion.offload: module-level, so worker processes can import
them (a small module: a worker imports only what its job needs)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def wait_for_file(path: str, timeout: float) -> bool:
    """Block until ``path`` exists (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def pid() -> int:
    """The worker process's id."""
    return os.getpid()


def allocate(megabytes: int) -> int:
    """Allocate and touch ``megabytes`` MiB; return its length."""
    return len(bytearray(megabytes << 20))


def die() -> None:
    """End the worker process without a word."""
    os._exit(3)


class Unpicklable(Exception):
    """An exception whose constructor a pickle cannot call back."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_unpicklable() -> None:
    raise Unpicklable(1, 2)
