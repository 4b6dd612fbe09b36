"""Run one function in a child process under CPU, memory and wall-clock limits.

For work whose cost an attacker chooses (extracting an uploaded PDF): the
child gets ``RLIMIT_CPU`` (the kernel sends ``SIGXCPU`` at the soft limit and
``SIGKILL`` one second later, see setrlimit(2)), ``RLIMIT_AS``, a lower CPU
priority, and dies with its parent (``PR_SET_PDEATHSIG``). The parent waits
at most ``wall_seconds`` (CPU time cannot run out while the child waits on
nothing, or while the machine is starved), then kills it. Whatever happens —
a result, an exception, a limit, the caller cancelled — the child is killed
and reaped before :func:`run_limited` returns: no process is left behind.

Children are forked by a ``forkserver`` (a single-threaded process started
on first use), never from the calling process, which runs threads and an
event loop; the function's module is preloaded there, so a child starts in
milliseconds. The function and its arguments must pickle.

Each child imports the program's main module again when the program was run
by path (multiprocessing's preparation, Python 3.11), before any limit
applies: the ``bastion`` console script therefore imports only the small
``bastion.__main__``; the CLI behind it is imported when a command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import resource
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal, TypeVar, cast

__all__ = ["ChildFailed", "LimitExceeded", "ProcessLimits", "run_limited"]

T = TypeVar("T")

_CONTEXT = multiprocessing.get_context("forkserver")
_NICENESS = 10
_PR_SET_PDEATHSIG = 1

Resource = Literal["cpu", "memory", "wall"]


@dataclass(frozen=True)
class ProcessLimits:
    """CPU seconds, address-space bytes (None: no cap) and wall-clock seconds."""

    cpu_seconds: int = 20
    memory_bytes: int | None = 1 << 30
    wall_seconds: float = 70.0

    def __post_init__(self) -> None:
        if self.cpu_seconds < 1 or self.wall_seconds <= 0:
            raise ValueError("cpu_seconds >= 1 and wall_seconds > 0")


class LimitExceeded(Exception):
    """The child ran out of ``resource`` (cpu, memory or wall) and was killed."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(f"the child process exceeded its {resource} limit")
        self.resource = resource


class ChildFailed(Exception):
    """The child died without a result (a crash), or its outcome did not pickle."""


def _die_with_parent() -> None:
    # Linux: the kernel kills this child when its parent (the forkserver,
    # which exits with the process that started it) dies.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(
    conn: Connection,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cpu_seconds: int,
    memory_bytes: int | None,
) -> None:
    _die_with_parent()
    os.nice(_NICENESS)  # the parent's event loop and the database come first
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    if memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    outcome: tuple[str, Any]
    try:
        outcome = ("ok", fn(*args, **kwargs))
    except MemoryError:
        outcome = ("memory", None)
    except Exception as exc:
        outcome = ("raised", exc)
    try:
        conn.send(outcome)
    except Exception as exc:  # the result or the exception does not pickle
        conn.send(("failed", type(exc).__name__))
    conn.close()


_preloaded: set[str] = set()
_preload_lock = threading.Lock()


def _ensure_preloaded(module: str) -> None:
    """Preload ``module`` in the forkserver, if it has not started yet."""
    with _preload_lock:
        if module not in _preloaded:
            _preloaded.add(module)
            # Takes effect when the forkserver starts (on first use); a module
            # added later is imported by each child instead, which is only slower.
            _CONTEXT.set_forkserver_preload(sorted(_preloaded | {__name__}))


def _outcome(receiver: Connection, wall_seconds: float) -> tuple[str, Any]:
    """The child's outcome, or ("wall", None) when none came in time (in a thread)."""
    if not receiver.poll(wall_seconds):
        return "wall", None
    try:
        kind, value = receiver.recv()
    except (EOFError, OSError):
        return "died", None
    except Exception:  # the outcome could not be unpickled here
        return "failed", "unreadable outcome"
    return str(kind), value


async def run_limited(
    fn: Callable[..., T], /, *args: Any, limits: ProcessLimits, **kwargs: Any
) -> T:
    """Return ``fn(*args, **kwargs)`` computed in a child process under ``limits``.

    Raises :class:`LimitExceeded` when the child ran out of CPU time, memory
    or wall-clock time; :class:`ChildFailed` when it died otherwise; and
    whatever ``fn`` raised (if it pickles). The child is gone when this returns
    or raises, also when the caller is cancelled.
    """
    _ensure_preloaded(fn.__module__)
    receiver, sender = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(
        target=_child,
        args=(sender, fn, args, kwargs, limits.cpu_seconds, limits.memory_bytes),
        name="bastion-limited",
        daemon=True,
    )
    starting: asyncio.Future[None] | None = None
    waiting: asyncio.Future[tuple[str, Any]] | None = None
    try:
        # Starting may start the forkserver (a fresh interpreter): off the loop,
        # and shielded, so a cancelled caller still learns the pid it must kill.
        starting = asyncio.ensure_future(asyncio.to_thread(process.start))
        await asyncio.shield(starting)
        sender.close()  # the child holds its own end: EOF when it dies
        waiting = asyncio.ensure_future(asyncio.to_thread(_outcome, receiver, limits.wall_seconds))
        kind, value = await asyncio.shield(waiting)
    finally:
        if starting is not None:
            with contextlib.suppress(BaseException):
                await starting
        if process.pid is not None and process.is_alive():
            process.kill()
        if waiting is not None:
            # The waiting thread sees EOF once the child is dead; the pipe is
            # closed only after it let go of it.
            with contextlib.suppress(BaseException):
                await waiting
        if process.pid is not None:
            await asyncio.to_thread(process.join, 5)
        receiver.close()
        sender.close()
    if kind == "ok":
        return cast(T, value)
    if kind == "raised" and isinstance(value, Exception):
        raise value
    if kind in ("memory", "wall"):
        raise LimitExceeded(cast(Resource, kind))
    if process.exitcode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise LimitExceeded("cpu")  # killed by the kernel at the soft or hard limit
    raise ChildFailed(f"the child ended without a result (exit code {process.exitcode})")
