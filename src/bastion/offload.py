"""CPU-heavy steps off the event loop, in worker processes shared fairly by tenants.

One event loop serves every tenant of a process, so a synchronous step that
takes a second (parsing a megabyte of HTML, extracting a PDF) freezes them
all. :class:`FairProcessPool` runs such steps in worker processes, not
threads: pure-Python parsing holds the GIL, and long C calls (a regular
expression over a megabyte) do not even let it go, so a thread still takes
the loop's time. Measured on a 2-core box, two 1 MiB HTML extractions at
once delay a loop's 5 ms timer by up to 40-65 ms from threads and by under
10 ms from processes; 1 MiB of plain text blocks it 100 ms from a thread.

The pool's bounds keep one tenant from taking what the others need:

- at most ``workers`` jobs run at once, one per process;
- at most ``per_tenant`` of them are one tenant's, and a free worker goes to
  the waiting tenant served least recently (round robin): a newcomer waits
  behind at most one job of each tenant already busy, however many each has
  queued;
- at most ``queue_per_tenant`` more of a tenant's jobs wait; past that
  :class:`PoolBusy` is raised at once (the caller answers 429), so a flood
  queues neither unbounded memory nor unbounded delay;
- workers run at a lower CPU priority (nice 10) than the serving process, so
  the event loop gets a core first when all of them are busy parsing;
- a job running past its time limit has its process killed
  (:class:`JobTimedOut`) and a fresh process takes its place; each process's
  address space is capped, so a memory bomb fails its own job only.

Workers are started on first use with the ``spawn`` method (no fork of a
threaded server), and exit when this process does. Jobs are module-level
functions, their arguments and results picklable; an exception a job raises
is raised again here, if it pickles. This pool is for work on a request's
path, where sharing and waiting matter; one job in a process of its own
under a CPU-time limit (the worker's extractions) is
:func:`bastion.limited_process.run_limited`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import pickle
import resource
import signal
import threading
from collections import Counter, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar, cast

__all__ = [
    "FairProcessPool",
    "JobFailed",
    "JobTimedOut",
    "PoolBusy",
    "default_workers",
    "shared_pool",
]

T = TypeVar("T")

_SPAWN = multiprocessing.get_context("spawn")
_NICENESS = 10
_START_SECONDS = 30.0


class PoolBusy(Exception):
    """The tenant already has as many jobs running and waiting as it may."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many jobs of this tenant running and waiting")
        self.retry_after = retry_after


class JobTimedOut(Exception):
    """The job ran past its time limit; its process was killed."""


class JobFailed(Exception):
    """The job's process died (a memory cap, a crash) or its outcome did not pickle."""


# -- the worker process ---------------------------------------------------------------


def _serve(conn: Connection, memory_limit: int | None) -> None:
    """A worker's life: run each job received on ``conn`` and send back its outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    # Below the serving process's priority: when cores are short, requests come first.
    os.nice(_NICENESS)
    if memory_limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    conn.send("ready")
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return  # the parent closed its end, or exited
        except Exception as exc:  # the job's function could not be unpickled
            conn.send(("failed", f"job not loaded: {type(exc).__name__}"))
            continue
        try:
            outcome: tuple[str, Any] = ("ok", fn(*args))
        except Exception as exc:
            outcome = ("raised", exc)
        try:
            conn.send(outcome)
        except Exception as exc:  # the result or the exception does not pickle
            conn.send(("failed", f"outcome not sent: {type(exc).__name__}"))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection

    def stop(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


# -- the pool -------------------------------------------------------------------------


@dataclass(eq=False)
class _Waiter:
    tenant: Hashable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = field(default=False)


class FairProcessPool:
    """Runs picklable functions in worker processes with per-tenant bounds (see module).

    ``time_limit`` (seconds) is the default for :meth:`run`; ``memory_limit``
    (bytes, None for none) caps each worker's address space. Usable from any
    number of threads and event loops; raises :class:`ValueError` for bounds
    below one.
    """

    def __init__(
        self,
        *,
        workers: int,
        per_tenant: int = 1,
        queue_per_tenant: int = 4,
        time_limit: float = 30.0,
        memory_limit: int | None = 1 << 30,
    ) -> None:
        if workers < 1 or per_tenant < 1 or queue_per_tenant < 0 or time_limit <= 0:
            raise ValueError("workers and per_tenant >= 1, queue_per_tenant >= 0, time_limit > 0")
        self.workers = workers
        self.per_tenant = min(per_tenant, workers)
        self.queue_per_tenant = queue_per_tenant
        self.time_limit = time_limit
        self.memory_limit = memory_limit
        # One thread per running job waits for its process, so the loop never
        # blocks on a pipe, a pickle or a process start.
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="bastion-offload")
        self._lock = threading.Lock()  # held for bookkeeping only, never while waiting
        self._idle: list[_Worker] = []
        self._busy = 0
        self._running: Counter[Hashable] = Counter()
        self._admitted: Counter[Hashable] = Counter()  # running and waiting
        # Each tenant's waiting jobs (tenants in order of arrival), and when
        # each tenant was last granted a slot: the least recently served goes first.
        self._queues: dict[Hashable, deque[_Waiter]] = {}
        self._served: dict[Hashable, int] = {}
        self._grants = 0
        self._closed = False

    async def run(
        self,
        tenant: Hashable,
        fn: Callable[..., T],
        /,
        *args: Any,
        time_limit: float | None = None,
    ) -> T:
        """Return ``fn(*args)`` computed in a worker process, for ``tenant``.

        Raises :class:`PoolBusy` at once when the tenant has its share running
        and its queue full; :class:`JobTimedOut` past ``time_limit`` (default:
        the pool's); :class:`JobFailed` if the process died; whatever ``fn``
        raised. Cancelling the caller does not stop a running job: its slot is
        freed when the job ends, so the bounds hold for work actually running.
        """
        loop = asyncio.get_running_loop()
        limit = self.time_limit if time_limit is None else time_limit
        waiter = _Waiter(tenant, loop, loop.create_future())
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if self._admitted[tenant] >= self.per_tenant + self.queue_per_tenant:
                raise PoolBusy(retry_after=max(1, math.ceil(limit / 10)))
            self._admitted[tenant] += 1
            self._queues.setdefault(tenant, deque()).append(waiter)
            self._dispatch()
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                if waiter.granted:
                    self._release(tenant)
                else:
                    self._withdraw(waiter)
            raise
        try:
            job = loop.run_in_executor(self._threads, self._call, tenant, fn, args, limit)
        except BaseException:  # closed meanwhile: the job never started
            with self._lock:
                self._release(tenant)
            raise
        # From here the job's thread owns the slot, and frees it when the job ends.
        return await job

    def load(self, tenant: Hashable) -> tuple[int, int]:
        """Return (running, waiting) jobs of ``tenant`` (for tests and metrics)."""
        with self._lock:
            running = self._running[tenant]
            return running, self._admitted[tenant] - running

    def close(self) -> None:
        """Stop the idle workers; running jobs finish, then their workers stop."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()
        self._threads.shutdown(wait=False)

    # -- scheduling (called with self._lock held) ---------------------------------------

    def _dispatch(self) -> None:
        """Grant free slots to waiting jobs, taking tenants in turn."""
        while self._busy < self.workers:
            eligible = [t for t in self._queues if self._running[t] < self.per_tenant]
            if not eligible:
                return
            # Never served (or idle since) first, then the longest ago; ties by arrival.
            chosen = min(eligible, key=lambda t: self._served.get(t, -1))
            waiters = self._queues[chosen]
            waiter = waiters.popleft()
            if not waiters:
                del self._queues[chosen]
            self._grants += 1
            self._served[chosen] = self._grants
            self._busy += 1
            self._running[chosen] += 1
            waiter.granted = True
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its event loop is closed: nobody waits any more
                waiter.granted = False
                self._busy -= 1
                self._running[chosen] -= 1
                self._admitted[chosen] -= 1

    def _withdraw(self, waiter: _Waiter) -> None:
        waiters = self._queues.get(waiter.tenant)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._queues[waiter.tenant]
        self._admitted[waiter.tenant] -= 1
        self._forget(waiter.tenant)

    def _release(self, tenant: Hashable) -> None:
        self._busy -= 1
        self._running[tenant] -= 1
        self._admitted[tenant] -= 1
        self._forget(tenant)
        self._dispatch()

    def _forget(self, tenant: Hashable) -> None:
        # Counters of idle tenants are dropped: memory stays bounded by the active ones.
        if self._admitted[tenant] <= 0:
            del self._admitted[tenant]
            self._running.pop(tenant, None)
            self._served.pop(tenant, None)

    # -- a job, in its thread -------------------------------------------------------------

    def _call(
        self, tenant: Hashable, fn: Callable[..., T], args: tuple[Any, ...], limit: float
    ) -> T:
        worker: _Worker | None = None
        outcome: tuple[str, Any] | None = None
        try:
            worker = self._worker()
            outcome = _exchange(worker, (fn, args), limit)
        finally:
            with self._lock:
                if worker is not None and outcome is not None and not self._closed:
                    self._idle.append(worker)  # it answered: ready for the next job
                    worker = None
                self._release(tenant)
            if worker is not None:
                worker.stop()
        assert outcome is not None  # _exchange returned, or raised past this point
        kind, value = outcome
        if kind == "ok":
            return cast(T, value)
        if kind == "raised" and isinstance(value, Exception):
            raise value
        raise JobFailed(str(value))

    def _worker(self) -> _Worker:
        """An idle worker that is still alive, else a new one (started here, off the loop)."""
        while True:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                break
            if worker.process.is_alive():
                return worker
            worker.stop()  # outside the lock: it waits for the process
        ours, theirs = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=_serve,
            args=(theirs, self.memory_limit),
            name="bastion-offload-worker",
            daemon=True,  # ends with this process
        )
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        # Started within the limit, or not at all: a job is never sent to (and
        # a thread never blocked on) a process that is not reading.
        try:
            ready = ours.poll(_START_SECONDS) and ours.recv() == "ready"
        except (OSError, EOFError):
            ready = False
        if not ready:
            worker.stop()
            raise JobFailed("a worker process did not start")
        return worker


def _exchange(worker: _Worker, job: tuple[Any, ...], limit: float) -> tuple[str, Any]:
    """Send ``job`` to ``worker``; return its outcome within ``limit`` seconds."""
    try:
        worker.conn.send(job)
        if not worker.conn.poll(limit):
            raise JobTimedOut(f"the job ran longer than {limit:g} s")
        kind, value = worker.conn.recv()
    except (OSError, EOFError):
        raise JobFailed("the worker process died") from None
    except (pickle.PickleError, AttributeError, TypeError, ImportError):
        raise JobFailed("the job's outcome could not be read") from None
    return str(kind), value


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def default_workers() -> int:
    """Worker processes for this machine: its cores, between 2 and 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, min(8, cores or 1))


# This process's pools, by job: uploads take up to seconds, so a tenant's queue
# is short; prompt screens take milliseconds to a second, so it is longer.
_POOL_QUEUES = {"parsers": 4, "screens": 32}
_shared: dict[str, FairProcessPool] = {}
_shared_lock = threading.Lock()


def shared_pool(name: str = "parsers") -> FairProcessPool:
    """Return this process's pool ``name`` ("parsers" or "screens"), made on first use.

    One of each per process: the bound is about this process's cores,
    whichever service asks. Each tenant may use half the workers.
    """
    with _shared_lock:
        pool = _shared.get(name)
        if pool is None:
            workers = default_workers()
            pool = _shared[name] = FairProcessPool(
                workers=workers,
                per_tenant=max(1, workers // 2),
                queue_per_tenant=_POOL_QUEUES[name],
            )
        return pool


def _forget_pools() -> None:
    """In a forked child: no pools (their threads and workers stay with the parent)."""
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()


with contextlib.suppress(AttributeError):  # no fork hooks on this platform
    os.register_at_fork(after_in_child=_forget_pools)
