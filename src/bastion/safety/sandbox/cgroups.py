"""A cgroup per run: memory, pids and CPU caps, and the counters that say which
limit a run hit. Both layouts are supported: cgroup v1 (one hierarchy per
controller, ``memory.limit_in_bytes``, ``memory.oom_control``) and the unified
v2 hierarchy (``memory.max``, ``memory.events``, ``cgroup.kill``); see the
kernel's Documentation/admin-guide/cgroup-v1 and cgroup-v2.rst.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bastion.safety.sandbox.spec import Limits

ROOT = Path("/sys/fs/cgroup")
GROUP = "bastion-sandbox"
# v1: memory, pids, and cpuacct for the CPU time of every task the run ever had.
# Summing the members' /proc stat instead misses what a zombie burned (it is no
# longer listed in cgroup.procs, and its parent never reaps it): cpuacct.usage,
# like v2's cpu.stat usage_usec, is charged as the time is spent, and stays.
# The spawner thread joins each hierarchy through "tasks" (no RCU wait), so a
# third hierarchy costs a mkdir, a write and an rmdir (~0.1 ms), not an attach.
_V1_CONTROLLERS = ("memory", "pids", "cpuacct")


@dataclass(frozen=True)
class Counters:
    oom_kills: int = 0
    memory_failcnt: int = 0  # times the memory cap was hit (v1 failcnt, v2 events "max")
    pids_max_hits: int = 0
    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@dataclass(frozen=True)
class Counter:
    """Where a layout keeps one counter of a group: the controller's hierarchy
    (v1; "" on v2's single one), the file, and the key of its line in a flat-keyed
    file (None: the file is the bare number)."""

    controller: str
    file: str
    key: str | None = None

    def read(self, directory: Path) -> int | None:
        """The counter's value in the group at ``directory``; None if unreadable."""
        text = _read(directory / self.file)
        if self.key is None:
            value = text.strip()
            return int(value) if value.isdigit() else None
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == self.key and value.strip().isdigit():
                return int(value)
        return None


@dataclass(frozen=True)
class Accounting:
    """The counters of one layout; read by the same code on v1 and v2."""

    # CPU time of every task the group ever held, with its unit in seconds.
    cpu: Counter
    cpu_unit: float
    oom_kills: Counter
    memory_failcnt: Counter
    pids_max_hits: Counter
    memory_peak: Counter
    memory_current: Counter


V1_ACCOUNTING = Accounting(
    cpu=Counter("cpuacct", "cpuacct.usage"),  # nanoseconds (cgroup-v1/cpuacct.rst)
    cpu_unit=1e-9,
    oom_kills=Counter("memory", "memory.oom_control", "oom_kill"),
    memory_failcnt=Counter("memory", "memory.failcnt"),
    pids_max_hits=Counter("pids", "pids.events", "max"),
    memory_peak=Counter("memory", "memory.max_usage_in_bytes"),
    memory_current=Counter("memory", "memory.usage_in_bytes"),
)
V2_ACCOUNTING = Accounting(
    # cpu.stat exists whether or not the cpu controller is enabled (cgroup-v2.rst).
    cpu=Counter("", "cpu.stat", "usage_usec"),
    cpu_unit=1e-6,
    oom_kills=Counter("", "memory.events", "oom_kill"),
    memory_failcnt=Counter("", "memory.events", "max"),
    pids_max_hits=Counter("", "pids.events", "max"),
    memory_peak=Counter("", "memory.peak"),
    memory_current=Counter("", "memory.current"),
)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Layout:
    """Which cgroup layout this host has, and whether this process may use it."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.version: int | None = None
        if (root / "cgroup.controllers").exists():
            controllers = _read(root / "cgroup.controllers").split()
            if {"memory", "pids"} <= set(controllers) and os.access(root, os.W_OK):
                self.version = 2
        elif all((root / c).is_dir() for c in ("memory", "pids")) and os.access(
            root / "memory", os.W_OK
        ):
            self.version = 1

    @property
    def available(self) -> bool:
        return self.version is not None

    @property
    def cpu_accounting(self) -> bool:
        """Whether a run's group accounts the CPU time of every task it ever had:
        v2's cpu.stat is in every group; v1 needs the cpuacct hierarchy."""
        if self.version == 2:
            return True
        return self.version == 1 and (self.root / "cpuacct").is_dir()

    def create(self, limits: Limits) -> RunCgroup:
        """A new cgroup for one run, with ``limits`` set; raise OSError."""
        if self.version == 1:
            return _V1Group(self.root, limits)
        if self.version == 2:
            return _V2Group(self.root, limits)
        raise OSError("no writable cgroup hierarchy")


class CgroupError(OSError):
    """The run's cgroup could not be made (the run fails closed: sandbox_error)."""


class CgroupLease:
    """One run's cgroup, made on first :meth:`get` and removed by :meth:`remove`.

    Made lazily, when the backend needs it: bwrap on cgroup v2 makes it while
    bubblewrap starts (between the spawn and the moment its sandbox reports,
    ~4 ms later) rather than before, on the start-up's critical path.
    """

    def __init__(self, layout: Layout, limits: Limits) -> None:
        self._layout = layout
        self._limits = limits
        self.group: RunCgroup | None = None

    @property
    def thread_join(self) -> bool:
        """Whether a thread can join the group alone (v1): see RunCgroup.spawning_inside."""
        return self._layout.version == 1

    def get(self) -> RunCgroup:
        """The run's cgroup, made now if it is not yet; raise CgroupError."""
        if self.group is None:
            try:
                self.group = self._layout.create(self._limits)
            except OSError as exc:
                raise CgroupError(exc.errno, exc.strerror or str(exc)) from exc
        return self.group

    def remove(self) -> None:
        if self.group is not None:
            self.group.remove()


class RunCgroup:
    """One run's cgroup. A child joins it before exec by writing ``0`` to the
    descriptors of :attr:`join_fds` (opened here, so the child only writes)."""

    procs_fds: tuple[int, ...] = ()  # cgroup.procs: moves whole processes
    # Written "0" to join the calling thread (v1 "tasks") or process (v2 cgroup.procs).
    join_fds: tuple[int, ...] = ()
    # Whether the calling thread alone can join (cgroup v1), see :meth:`spawning_inside`.
    thread_join: bool = False
    root: Path  # the layout's root (/sys/fs/cgroup)
    # The directory whose cgroup.procs lists every process of the run.
    tasks_dir: Path

    def join_in_child(self) -> None:
        """Join from a forked child, before exec (single-threaded: the thread is the
        process). On v1 through "tasks": moving the calling thread needs no global
        lock, where writing a pid to cgroup.procs waits for an RCU grace period."""
        for fd in self.join_fds:
            os.write(fd, b"0")

    @contextlib.contextmanager
    def spawning_inside(self) -> Iterator[None]:
        """Within the block the calling thread is in this group (v1 only), so a
        child it spawns is born in it: no attach afterwards.

        Why: writing a pid to cgroup.procs takes the kernel's global threadgroup
        lock for writing, which waits for an RCU grace period when no other
        migration happened lately — 5-15 ms here, most of a run's overhead. A
        thread moving itself through "tasks" skips that lock (~0.04 ms). The
        thread must not be its process's first one (the memory cgroup charges a
        process's page faults to its first thread's group); it is back in its own
        groups at the end — or this process aborts rather than live in a run's group.
        """
        if not self.thread_join:
            raise OSError("only a cgroup v1 group can be joined by one thread")
        if threading.current_thread() is threading.main_thread():
            raise OSError("the main thread owns the process's memory charges")
        home = _thread_home(self.root, tuple(self.dirs_by_controller()))
        try:
            for fd in self.join_fds:
                os.write(fd, b"0")
            yield
        finally:
            try:
                for fd in home:
                    os.write(fd, b"0")
            except OSError:  # pragma: no cover - root moving its own thread home
                os.abort()
            finally:
                for fd in home:
                    os.close(fd)

    def dirs_by_controller(self) -> dict[str, Path]:
        return {}

    def attach(self, pids: tuple[int, ...]) -> None:
        """Move ``pids`` (processes, with their threads) into the group; raise OSError."""
        for fd in self.procs_fds:
            for pid in pids:
                os.write(fd, str(pid).encode())

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.tasks_dir / "cgroup.procs").split()]

    def holds(self, pid: int) -> bool:
        """Whether ``pid`` is in this group in every hierarchy it spans (/proc/PID/cgroup)."""
        raise NotImplementedError

    accounting: Accounting

    def counter_dir(self, controller: str) -> Path:
        """The group's directory in ``controller``'s hierarchy (v2: the one)."""
        raise NotImplementedError

    def _counter(self, counter: Counter) -> int | None:
        return counter.read(self.counter_dir(counter.controller))

    def counters(self) -> Counters:
        a = self.accounting
        cpu = self._counter(a.cpu)
        return Counters(
            oom_kills=self._counter(a.oom_kills) or 0,
            memory_failcnt=self._counter(a.memory_failcnt) or 0,
            pids_max_hits=self._counter(a.pids_max_hits) or 0,
            cpu_seconds=None if cpu is None else cpu * a.cpu_unit,
            memory_peak_bytes=self._counter(a.memory_peak),
        )

    def memory_bytes(self) -> int | None:
        """The memory charged to the group now (None if it cannot be read)."""
        return self._counter(self.accounting.memory_current)

    def cpu_seconds(self) -> float:
        """CPU time of every task the run has had so far, the exited and the
        unreaped included (the kernel charges it to the group as it is spent);
        raise OSError if the group's account cannot be read (the run is ended)."""
        usage = self._counter(self.accounting.cpu)
        if usage is None:
            raise OSError(f"cannot read the run's CPU time ({self.accounting.cpu.file})")
        return usage * self.accounting.cpu_unit

    def kill(self) -> set[int]:
        """SIGKILL every process in the group until it is empty (pids.max bounds
        forks); return the pids seen, for the caller to reap."""
        seen: set[int] = set()
        for _ in range(200):
            pids = self.pids()
            if not pids:
                break
            seen.update(pids)
            for pid in pids:
                if pid == os.getpid():  # pragma: no cover - never, see spawning_inside
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)
        return seen

    def _close_fds(self) -> None:
        for fd in {*self.procs_fds, *self.join_fds}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.procs_fds = self.join_fds = ()

    def remove(self) -> None:
        raise NotImplementedError


def _thread_home(root: Path, controllers: tuple[str, ...]) -> list[int]:
    """Descriptors of the "tasks" files of the calling thread's own v1 groups, one per
    controller of ``controllers`` (in that order); raise OSError."""
    where: dict[str, str] = {}
    for line in _read(Path("/proc/thread-self/cgroup")).splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            where[name] = path
    fds: list[int] = []
    try:
        for controller in controllers:
            if controller not in where:
                raise OSError(f"this thread is in no {controller} cgroup")
            tasks = root / controller / where[controller].lstrip("/") / "tasks"
            fds.append(os.open(tasks, os.O_WRONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _rmdir(path: Path) -> None:
    # A dying process leaves the group a moment after SIGKILL: retry briefly.
    for _ in range(500):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.002)


class _V1Group(RunCgroup):
    def __init__(self, root: Path, limits: Limits) -> None:
        name = f"run-{uuid.uuid4().hex}"
        self.root = root
        self.dirs: dict[str, Path] = {}
        try:
            for controller in _V1_CONTROLLERS:
                base = root / controller
                if not base.is_dir():
                    # No weaker run without it: the run fails closed (sandbox_error).
                    raise OSError(f"cgroup v1 controller {controller} is not mounted")
                parent = base / GROUP
                parent.mkdir(exist_ok=True)
                path = parent / name
                path.mkdir()
                self.dirs[controller] = path
            memory = self.dirs["memory"]
            _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            _write(self.dirs["pids"] / "pids.max", str(limits.pids + 4))  # + bwrap's own
            if "cpu" in self.dirs:
                _write(self.dirs["cpu"] / "cpu.cfs_period_us", "100000")
                _write(self.dirs["cpu"] / "cpu.cfs_quota_us", "100000")  # one core
            self.tasks_dir = self.dirs["pids"]
            self.procs_fds = tuple(
                os.open(p / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for p in self.dirs.values()
            )
            self.join_fds = tuple(
                os.open(p / "tasks", os.O_WRONLY | os.O_CLOEXEC) for p in self.dirs.values()
            )
            self.thread_join = True
        except BaseException:
            self.remove()
            raise

    def dirs_by_controller(self) -> dict[str, Path]:
        return self.dirs

    def holds(self, pid: int) -> bool:
        # v1 lines: "ID:controller[,controller]:/path below that hierarchy's root".
        where: dict[str, str] = {}
        for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                where[controller] = path
        return bool(self.dirs) and all(
            where.get(c) == "/" + str(d.relative_to(self.root / c)) for c, d in self.dirs.items()
        )

    accounting = V1_ACCOUNTING

    def counter_dir(self, controller: str) -> Path:
        return self.dirs[controller]

    def remove(self) -> None:
        self._close_fds()
        for path in self.dirs.values():
            _rmdir(path)


class _V2Group(RunCgroup):
    def __init__(self, root: Path, limits: Limits) -> None:
        self.root = root
        parent = root / GROUP
        self.path = root / GROUP / f"run-{uuid.uuid4().hex}"
        try:
            if not parent.exists():
                parent.mkdir(exist_ok=True)
            wanted = {"memory", "pids", "cpu"} & set(_read(root / "cgroup.controllers").split())
            enabled = set(_read(parent / "cgroup.subtree_control").split())
            for c in sorted(wanted - enabled):
                # The root must delegate the controller before the parent can.
                with contextlib.suppress(OSError):
                    _write(root / "cgroup.subtree_control", f"+{c}")
                _write(parent / "cgroup.subtree_control", f"+{c}")
            self.path.mkdir()
            _write(self.path / "memory.max", str(limits.memory_bytes))
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", "0")
            _write(self.path / "pids.max", str(limits.pids + 4))
            if (self.path / "cpu.max").exists():
                _write(self.path / "cpu.max", "100000 100000")
            self.tasks_dir = self.path
            self.procs_fds = (os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC),)
            self.join_fds = self.procs_fds
        except BaseException:
            self.remove()
            raise

    def holds(self, pid: int) -> bool:
        # The v2 line: "0::/path below the root".
        for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines():
            if line.startswith("0::"):
                return line[3:] == "/" + str(self.path.relative_to(self.root))
        return False

    accounting = V2_ACCOUNTING

    def counter_dir(self, controller: str) -> Path:
        return self.path

    def kill(self) -> set[int]:
        seen = set(self.pids())
        kill_file = self.path / "cgroup.kill"  # Linux 5.14: atomic, fork-proof
        if kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        return seen | super().kill()

    def remove(self) -> None:
        self._close_fds()
        _rmdir(self.path)
