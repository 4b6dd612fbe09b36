"""Starting, watching and ending one sandboxed process tree.

Shared by the backends: the child is forked with a small pre-exec step
(join the run's cgroup, set rlimits, drop to the run's uid, then whatever the
backend adds), its output is read into bounded buffers, the wall clock and
the cgroup's CPU time are watched, and at the end every process of the run is
killed and reaped — nothing outlives a run, not even a zombie. The way it
ended is then normalised into an :class:`Outcome`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import resource
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path

from bastion.safety.sandbox.cgroups import CgroupLease, Counters, RunCgroup
from bastion.safety.sandbox.creds import ThreadCredentials
from bastion.safety.sandbox.spec import Limits, Outcome, Result

_PR_SET_CHILD_SUBREAPER = 36
_READ_CHUNK = 65536
_DRAIN_SECONDS = 0.05
_CPU_POLL_SECONDS = 0.1
# The run as a whole (every task it ever had, from the cgroup's own account) is
# killed past its CPU limit plus this: room for a runtime's own start-up (gVisor's
# Sentry), while a single process meets its RLIMIT_CPU first.
_CPU_GRACE_SECONDS = 0.5
# A run whose charged memory is this close to its cap when its CPU runs out
# stands at the cap (see cpu_kill_outcome).
_AT_CAP_SLACK_BYTES = 1 << 20


def become_subreaper() -> None:
    """Orphans of sandboxed processes are re-parented here, not to a host init that
    may never reap them (each zombie counts against the run uid's RLIMIT_NPROC)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def rlimits(limits: Limits, *, memory_cgroup: bool) -> list[tuple[int, tuple[int, int]]]:
    """The rlimits of a run. Without a memory cgroup, RLIMIT_AS stands in for it."""
    out = [
        # The hard limit one second later: a process ignoring SIGXCPU gets SIGKILL.
        (resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1)),
        (resource.RLIMIT_FSIZE, (limits.fsize_bytes, limits.fsize_bytes)),
        (resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile)),
        # The run's own uid: this counts only its processes (+ bubblewrap's two). A
        # backstop above the cgroup's pids.max, which hits first and is counted.
        (resource.RLIMIT_NPROC, (limits.pids + 8, limits.pids + 8)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
        (resource.RLIMIT_MSGQUEUE, (0, 0)),
    ]
    if not memory_cgroup:
        cap = limits.memory_bytes + (64 << 20)  # address space > resident; a backstop
        out.append((resource.RLIMIT_AS, (cap, cap)))
    return out


def make_preexec(
    *,
    uid: int,
    limits: Limits,
    cgroup: RunCgroup | None,
    extra: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """The function run in the forked child before exec (everything prepared here:
    no import, no allocation of note in the child)."""
    limits_list = rlimits(limits, memory_cgroup=cgroup is not None)
    setrlimit, setgroups, setresgid, setresuid = (
        resource.setrlimit,
        os.setgroups,
        os.setresgid,
        os.setresuid,
    )

    def preexec() -> None:
        if cgroup is not None:
            cgroup.join_in_child()
        for which, value in limits_list:
            setrlimit(which, value)
        setgroups([])
        setresgid(uid, uid, uid)
        setresuid(uid, uid, uid)  # drops every capability too (no keep-caps)
        if extra is not None:
            extra()

    return preexec


def kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: ``kill(-1)`` from a child running as that uid.
    The kernel walks the task list under its lock, so a forking run cannot escape."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _processes(uid: int, pids: set[int]) -> list[tuple[int, bytes, int]]:
    """(pid, state, ppid) of every process owned by ``uid`` or in ``pids``, from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid and int(entry.name) not in pids:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if len(fields) > 2:
            found.append((int(entry.name), fields[0], int(fields[1])))
    return found


def reap_run(uid: int, pids: set[int], *, timeout: float = 2.0) -> tuple[bool, float]:
    """Wait until no process of ``uid`` (nor of ``pids``, the run's cgroup members:
    a runtime such as runsc runs as root) is left, reaping those re-parented here.

    Every process of the run has been sent SIGKILL; as this process is a child
    sub-reaper, the orphans among them (bubblewrap's pid 1 when bubblewrap died
    first, a daemonised child) become its children and must be waited for, or
    they stay zombies counting against the uid's RLIMIT_NPROC. Returns whether
    nothing of the run is left after ``timeout``, and the CPU time of what was
    reaped here (with what those processes had reaped themselves).
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout
    cpu = 0.0
    while True:
        left = _processes(uid, pids)
        if not left:
            return True, cpu
        for pid, state, ppid in left:
            if state == b"Z" and ppid == me:
                with contextlib.suppress(ChildProcessError):
                    done, _, usage = os.wait4(pid, os.WNOHANG)
                    if done:
                        cpu += usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            return False, cpu
        time.sleep(0.001)


@dataclass
class _Capture:
    cap: int
    data: bytearray = field(default_factory=bytearray)
    overflow: bool = False

    def feed(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.overflow = True
        self.data += chunk[: max(room, 0)]


@dataclass
class Watched:
    """What the supervisor saw; :func:`classify` turns it into a :class:`Result`."""

    returncode: int
    killed_for: Outcome | None
    stdout: bytes
    stderr: bytes
    truncated: bool
    wall_seconds: float
    counters: Counters
    status: dict[str, int]  # bubblewrap's --json-status-fd (child-pid, exit-code)


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    # Run in the forked child before exec; None for a launch confined while blocked.
    preexec: Callable[[], None] | None
    pass_fds: tuple[int, ...] = ()
    # Descriptors the child inherits and this process must close after the fork.
    child_fds: tuple[int, ...] = ()
    status_fd: int | None = None  # read end of bubblewrap's --json-status-fd
    cwd: str | None = None
    # Run after the process tree is gone (work dirs, bundles, rulesets).
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    # Confined while blocked (bubblewrap's --block-fd): no pre-exec step (so the
    # child is started with vfork); the sandbox's init waits on ``block_fd``
    # until it and bubblewrap are in the run's cgroup — before any code of the run.
    block_fd: int | None = None
    # Set on the blocked init with prlimit(2) before it is unblocked (the run's
    # processes all descend from it); empty when the launch sets them itself.
    init_rlimits: list[tuple[int, tuple[int, int]]] = field(default_factory=list)
    # Spawn as the run's uid (this thread's credentials, see creds.py), and set
    # ``init_rlimits`` with its real uid; None: the launch drops privileges itself.
    credentials: ThreadCredentials | None = None


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _on_spawner_thread(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Run ``start`` on this process's spawner thread: never its main thread,
    whose cgroup the memory controller charges every page fault of the process to
    (see RunCgroup.spawning_inside)."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawn")
    future = _spawner.submit(start)
    try:
        return future.result()
    except BaseException:
        if not future.done():  # interrupted meanwhile: end what it starts
            wait_futures([future])
            if future.exception() is None:
                proc = future.result()
                proc.kill()
                proc.wait()
        raise


class Supervisor:
    """Runs one :class:`Launch` to completion within its limits."""

    def __init__(
        self,
        *,
        uid: int,
        limits: Limits,
        cgroups: CgroupLease | None,
    ) -> None:
        self.uid = uid
        self.limits = limits
        self.cgroups = cgroups
        # Made already when the launch needed it (a pre-exec join); else in _confine.
        self.cgroup: RunCgroup | None = cgroups.group if cgroups is not None else None
        self.status: dict[str, int] = {}
        self._status_buffer = b""
        self._members: set[int] = set()
        self._cpu: float | None = None
        self._cpu_seen = 0.0  # the last sample of the cgroup's CPU account
        self._init_pidfd: int | None = None

    def run(self, launch: Launch, stdin: bytes) -> Watched:
        """Run and watch; raise OSError/SubprocessError if the process cannot start."""
        started = time.monotonic()
        try:
            if (
                launch.block_fd is not None
                and self.cgroups is not None
                and self.cgroup is None
                and self.cgroups.thread_join
            ):
                # cgroup v1: spawned from inside the run's group, so bubblewrap and
                # everything it starts are born in it (no attach: see spawning_inside).
                self.cgroup = self.cgroups.get()
                proc = _on_spawner_thread(lambda: self._spawn(launch, inside=True))
            else:
                proc = self._spawn(launch, inside=False)
        except BaseException:
            for fd in (launch.status_fd, launch.block_fd):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in launch.child_fds:
                os.close(fd)
        try:
            if launch.block_fd is not None:
                self._confine(proc, launch, started)
            killed_for = self._watch(proc, launch, stdin, started)
        finally:
            self._end(proc)
            if launch.block_fd is not None:
                os.close(launch.block_fd)  # only now: EOF would unblock it too
            if launch.status_fd is not None:
                self._read_status(launch.status_fd, final=True)
                os.close(launch.status_fd)
            gone, reaped_cpu = self._reap_init()
            if not gone:
                gone, reaped_cpu = reap_run(self.uid, self._members)
            if not gone:
                kill_uid(self.uid)  # something survived the cgroup's kill
                reaped_cpu += reap_run(self.uid, self._members)[1]
            self._cpu = max((self._cpu or 0.0) + reaped_cpu, self._cpu_seen)
        counters = self.cgroup.counters() if self.cgroup is not None else Counters()
        if counters.cpu_seconds is None:
            counters = dataclasses.replace(counters, cpu_seconds=self._cpu)
        return Watched(
            returncode=proc.returncode if proc.returncode is not None else -signal.SIGKILL,
            killed_for=killed_for,
            stdout=bytes(self._out.data),
            stderr=bytes(self._err.data),
            truncated=self._out.overflow or self._err.overflow,
            wall_seconds=time.monotonic() - started,
            counters=counters,
            status=self.status,
        )

    def _spawn(self, launch: Launch, *, inside: bool) -> subprocess.Popen[bytes]:
        with contextlib.ExitStack() as stack:
            if inside:
                assert self.cgroup is not None
                stack.enter_context(self.cgroup.spawning_inside())
            if launch.credentials is not None:
                # After joining (which needs root), undone before leaving.
                stack.enter_context(launch.credentials.acting_as(self.uid, effective=True))
            return subprocess.Popen(
                launch.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=launch.env,
                cwd=launch.cwd,
                preexec_fn=launch.preexec,  # prepared in the parent, import-free
                pass_fds=launch.pass_fds,
                start_new_session=True,
                close_fds=True,
            )

    def _watch(
        self, proc: subprocess.Popen[bytes], launch: Launch, stdin: bytes, started: float
    ) -> Outcome | None:
        assert proc.stdin and proc.stdout and proc.stderr
        self._out = _Capture(self.limits.output_bytes)
        self._err = _Capture(self.limits.output_bytes)
        sel = selectors.DefaultSelector()
        pidfd = os.pidfd_open(proc.pid)
        streams = {proc.stdout.fileno(): self._out, proc.stderr.fileno(): self._err}
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        if launch.status_fd is not None:
            os.set_blocking(launch.status_fd, False)
            sel.register(launch.status_fd, selectors.EVENT_READ)
        pending = memoryview(stdin)
        stdin_fd = proc.stdin.fileno()
        if pending:
            os.set_blocking(stdin_fd, False)
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        deadline = started + self.limits.wall_seconds
        exited_at: float | None = None
        next_cpu_check = started + _CPU_POLL_SECONDS
        try:
            while True:
                now = time.monotonic()
                if exited_at is not None and (not streams or now - exited_at > _DRAIN_SECONDS):
                    return None
                if now >= deadline:
                    return Outcome.WALL_TIMEOUT
                if self.cgroup is not None and now >= next_cpu_check:
                    next_cpu_check = now + _CPU_POLL_SECONDS
                    # Every process's own RLIMIT_CPU aside, the run as a whole: zombies
                    # and reaped children included (cpuacct.usage / cpu.stat).
                    self._cpu_seen = self.cgroup.cpu_seconds()
                    if self._cpu_seen > self.limits.cpu_seconds + _CPU_GRACE_SECONDS:
                        return cpu_kill_outcome(self.cgroup.memory_bytes(), self.limits)
                timeout = min(deadline, next_cpu_check) - now
                if exited_at is not None:
                    timeout = min(timeout, _DRAIN_SECONDS)
                for key, _ in sel.select(max(timeout, 0.0)):
                    fd = int(key.fd)
                    if fd == pidfd:
                        sel.unregister(pidfd)
                        exited_at = time.monotonic()
                    elif fd == launch.status_fd:
                        if not self._read_status(fd, final=False):
                            sel.unregister(fd)
                    elif fd == stdin_fd:
                        try:
                            pending = pending[os.write(fd, pending[:_READ_CHUNK]) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            pending = pending[:0]  # the program stopped reading
                        if not pending:
                            sel.unregister(fd)
                            proc.stdin.close()
                    else:
                        try:
                            chunk = os.read(fd, _READ_CHUNK)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            sel.unregister(fd)
                            del streams[fd]
                            continue
                        capture = streams[fd]
                        capture.feed(chunk)
                        if capture.overflow:
                            return Outcome.OUTPUT_LIMIT
        finally:
            sel.close()
            os.close(pidfd)

    def _confine(self, proc: subprocess.Popen[bytes], launch: Launch, started: float) -> None:
        """Make sure bubblewrap and the sandbox's init (blocked before it starts
        the command) are in the run's cgroup, put the init under the run's
        rlimits, then unblock it.

        On cgroup v1 both were born in the group (spawned from inside it); else
        they are moved in from here. Doing this from here rather than in a
        pre-exec step spares a fork of this (large) process running Python in
        the child. Raises OSError, and then leaves it blocked: the caller kills it.
        """
        assert launch.status_fd is not None and launch.block_fd is not None
        deadline = started + min(self.limits.wall_seconds, 10.0)
        if self.cgroups is not None and self.cgroup is None:
            # cgroup v2: made and joined while bubblewrap is still being exec'd (it
            # reports its sandbox ~4 ms later), off the start-up's critical path.
            # A sandbox cloned after this attach is born in the group.
            self.cgroup = self.cgroups.get()
            self.cgroup.attach((proc.pid,))
        os.set_blocking(launch.status_fd, False)
        while "child-pid" not in self.status:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return  # never unblocked: the watch ends it at the wall clock
            ready, _, _ = select.select([launch.status_fd], [], [], remaining)
            if ready and not self._read_status(launch.status_fd, final=False):
                return  # bubblewrap exited before starting the sandbox
        init = self.status["child-pid"]
        # A handle on the sandbox's init that its pid's reuse cannot fool.
        self._init_pidfd = os.pidfd_open(init)
        if self.cgroup is not None and not self.cgroup.holds(init):
            # bubblewrap cloned it before the attach above: move it too (each such
            # move may wait for an RCU grace period, so the usual case skips it).
            self.cgroup.attach((proc.pid, init))
        if launch.init_rlimits:
            assert launch.credentials is not None
            # prlimit(2) on another process: allowed with the target's real uid and
            # gid (capabilities kept). A refusal raises: the run never starts.
            with launch.credentials.acting_as(self.uid, effective=False):
                for which, value in launch.init_rlimits:
                    resource.prlimit(init, which, value)
        os.write(launch.block_fd, b"1")
        os.close(launch.block_fd)
        launch.block_fd = None

    def _reap_init(self) -> tuple[bool, float]:
        """With a pid namespace, the run is over once its init has exited (the
        kernel takes the namespace's other processes first); reap the init if it
        was left to this process. Returns (whether that is known, its CPU time)."""
        fd, self._init_pidfd = self._init_pidfd, None
        if fd is None:
            return False, 0.0
        try:
            if not select.select([fd], [], [], 2.0)[0]:
                return False, 0.0  # still running after SIGKILL: let the scan decide
            try:
                # WNOWAIT first: only a child of ours is reaped, by its pid, which
                # stays ours (a zombie) until then.
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                return True, 0.0  # bubblewrap reaped it
            _, _, usage = os.wait4(self.status["child-pid"], 0)
            return True, usage.ru_utime + usage.ru_stime
        finally:
            os.close(fd)

    def _read_status(self, fd: int, *, final: bool) -> bool:
        """Parse bubblewrap's JSON status lines; False at EOF."""
        alive = True
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                break
            except OSError:
                alive = False
                break
            if not chunk:
                alive = False
                break
            self._status_buffer += chunk[:65536]
        *lines, self._status_buffer = self._status_buffer.split(b"\n")
        if final:
            lines.append(self._status_buffer)
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError):
                for key, value in json.loads(line).items():
                    if key in ("child-pid", "exit-code") and isinstance(value, int):
                        self.status[key] = value
        return alive

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill whatever of the run is left, then reap the main process."""
        # Not proc.kill(): it would reap the process first and lose its rusage. Until
        # wait4 below the pid stays ours (at worst a zombie), so it cannot be reused.
        os.kill(proc.pid, signal.SIGKILL)
        if self._init_pidfd is not None:
            # bubblewrap reports the exit status before its sandbox's init is gone.
            # Once the init has exited, so has every process of its pid namespace
            # (the kernel kills and reaps them first): waiting on its pidfd beats
            # polling the cgroup's list with 1 ms sleeps (~1 ms a run).
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
            select.select([self._init_pidfd], [], [], 1.0)
        if self.cgroup is not None:
            self._members = self.cgroup.kill()
        else:
            kill_uid(self.uid)
        # wait4: the exit status and the CPU time of the run's tree (each process's
        # rusage includes the children it waited for).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        self._cpu = usage.ru_utime + usage.ru_stime
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def cpu_kill_outcome(charged_bytes: int | None, limits: Limits) -> Outcome:
    """Why a run killed at its CPU limit stopped: a run standing at its memory
    cap spends its CPU on that cap (the kernel reclaiming, or a runtime's own
    allocator retrying: gVisor's Sentry was seen spinning there for seconds
    under load instead of being OOM-killed), so the cap is its limit."""
    if charged_bytes is not None and charged_bytes >= limits.memory_bytes - _AT_CAP_SLACK_BYTES:
        return Outcome.MEMORY_LIMIT
    return Outcome.CPU_LIMIT


def classify(watched: Watched, limits: Limits, *, backend: str, wrapped: bool) -> Result:
    """Normalise how the run ended. ``wrapped``: the exit status passed through a
    runtime (bubblewrap, runsc) that reports a signal N as status 128+N."""
    code = watched.status.get("exit-code", watched.returncode)
    exit_code: int | None
    sig: int | None
    if code < 0:
        exit_code, sig = None, -code
    elif wrapped and code > 128:
        exit_code, sig = None, code - 128
    else:
        exit_code, sig = code, None
    c = watched.counters
    tail = watched.stderr[-2048:]
    cpu_used = c.cpu_seconds
    outcome: Outcome
    if watched.killed_for is not None:
        outcome = watched.killed_for
    elif c.oom_kills or (c.memory_failcnt and code != 0):
        outcome = Outcome.MEMORY_LIMIT
    elif sig == signal.SIGSYS:
        outcome = Outcome.SECCOMP_VIOLATION
    elif sig == signal.SIGXCPU or (
        sig == signal.SIGKILL and cpu_used is not None and cpu_used >= limits.cpu_seconds * 0.9
    ):
        outcome = Outcome.CPU_LIMIT
    elif sig == signal.SIGXFSZ or (code != 0 and b"[Errno 27] File too large" in tail):
        outcome = Outcome.FSIZE_LIMIT
    elif c.pids_max_hits:
        outcome = Outcome.PIDS_LIMIT
    # Without a counter to read (no cgroup, or a runtime whose own kernel enforces
    # the rlimit), the interpreter's report of the refused request says which.
    # The program could print these itself, but only to describe its own failure.
    elif code != 0 and b"MemoryError" in tail:
        outcome = Outcome.MEMORY_LIMIT  # RLIMIT_AS
    elif code != 0 and b"[Errno 11] Resource temporarily unavailable" in tail:
        outcome = Outcome.PIDS_LIMIT  # RLIMIT_NPROC
    elif code == 0:
        outcome = Outcome.OK
    else:
        outcome = Outcome.EXIT
    detail = ""
    if sig is not None:
        try:
            detail = f"signal {signal.Signals(sig).name}"
        except ValueError:
            detail = f"signal {sig}"
    return Result(
        outcome=outcome,
        backend=backend,
        exit_code=exit_code,
        signal=sig,
        stdout=watched.stdout,
        stderr=watched.stderr,
        truncated=watched.truncated,
        wall_seconds=watched.wall_seconds,
        cpu_seconds=c.cpu_seconds,
        memory_peak_bytes=c.memory_peak_bytes,
        detail=detail,
    )


def system_mounts() -> list[Path]:
    """The read-only system directories a sandboxed interpreter needs."""
    return [Path(p) for p in ("/usr", "/bin", "/lib", "/lib64", "/sbin") if os.path.lexists(p)]
