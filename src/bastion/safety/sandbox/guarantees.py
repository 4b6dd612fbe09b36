"""Which guarantees a backend gives on this host, measured by running attacks.

``bastion sandbox status`` and ``docs/sandbox-guarantees.md`` come from here:
for each guarantee class a few probes run for real in the backend (the same
attacks the escape matrix in ``tests/test_sandbox_escapes.py`` makes), and the
class *holds* only when every probe was contained. Nothing here is a
hand-written claim except :data:`NOT_ISOLATED`, the limits a backend states
about itself — and those are checked too, by the probes that show them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import platform
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bastion.safety.sandbox.service import Sandbox
from bastion.safety.sandbox.spec import PYTHON, Limits, Outcome, Result, RunSpec

MiB = 1 << 20
# Small limits keep the probes quick (a few seconds per backend in all).
PROBE_LIMITS = Limits(
    memory_bytes=96 * MiB, cpu_seconds=1, wall_seconds=6.0, pids=16, tmpfs_bytes=8 * MiB
)

# What a backend does not isolate by design (shown with the measured table).
NOT_ISOLATED: dict[str, tuple[str, ...]] = {
    "landlock": (
        "no PID namespace: host processes are visible to kill(pid, 0) and signals "
        "are stopped only by uid and Landlock scopes",
        "no UTS namespace: the run sees the host's hostname",
        "no network or IPC namespace: socket(2) and System V / POSIX IPC are killed "
        "by seccomp instead (AF_UNIX socketpair only)",
        "no mount namespace: no /proc at all (Landlock grants none)",
    ),
    "gvisor": (
        "file descriptors in flight over SCM_RIGHTS are not bounded by RLIMIT_NOFILE "
        "(the Sentry does not implement the kernel's unix_inflight limit): they are "
        "Sentry memory, bounded by the run's memory cap",
        "a refused socket family fails with EPERM (runsc ignores errnoRet; clone3's "
        "ENOSYS, which libc needs to fall back to clone, is kept through SCMP_ACT_TRACE) "
        "and a killed syscall ends the calling thread, not its process (runsc knows no "
        "SCMP_ACT_KILL_PROCESS): the syscall never runs, and a process waiting on "
        "that thread ends at the wall clock",
        "the memory cap holds the Sentry's own memory (~25 MB) too",
    ),
}


@dataclass(frozen=True)
class Guarantee:
    """One guarantee class on one backend, as measured."""

    key: str
    title: str
    holds: bool
    evidence: str  # short, what the probes saw


@dataclass
class _Probe:
    """A probe's context: the sandbox, plus host-side fixtures."""

    sandbox: Sandbox
    tag: str = dataclasses.field(default_factory=lambda: f"bastion-guarantee-{uuid.uuid4().hex}")

    def run(self, code: str, limits: Limits = PROBE_LIMITS) -> Result:
        return self.sandbox.run(RunSpec((PYTHON, "-I", "-S", "-c", code), limits=limits))


def _lines(result: Result) -> list[str]:
    return result.text().splitlines()


def _describe(result: Result) -> str:
    return f"{result.outcome}" + (f" ({result.detail})" if result.detail else "")


@contextlib.contextmanager
def _tcp_listener() -> Iterator[tuple[int, list[bytes]]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            got.append(b"connected")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], got
    finally:
        stop.set()
        thread.join()
        server.close()


def network(p: _Probe) -> Guarantee:
    with _tcp_listener() as (port, got):
        result = p.run(
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1); print('connected')\n"
            "except OSError as e:\n"
            "    print('refused', e.errno)\n"
        )
    contained = not got and "connected" not in result.text()
    seen = "socket(2) killed" if result.outcome is Outcome.SECCOMP_VIOLATION else result.text()
    return Guarantee(
        "network", "network egress", contained, f"TCP to a host listener: {seen.strip()}"
    )


def host_fs(p: _Probe) -> Guarantee:
    secret = Path("/var/tmp") / f"{p.tag}.txt"  # noqa: S108 - a host path the run must not see
    written = Path("/var/tmp") / f"{p.tag}.written"  # noqa: S108
    secret.write_text(p.tag)
    secret.chmod(0o644)  # world-readable: only the sandbox stands in the way
    try:
        result = p.run(
            f"for p in ({str(secret)!r}, '/etc/shadow', '/root/.bashrc'):\n"
            "    try: print('READ', open(p).read()[:80])\n"
            "    except OSError as e: print('denied', e.errno)\n"
            f"try: open({str(written)!r}, 'w').write('x'); print('WROTE')\n"
            "except OSError as e: print('denied', e.errno)\n"
        )
    finally:
        secret.unlink(missing_ok=True)
    leaked = written.exists()
    written.unlink(missing_ok=True)
    contained = result.outcome is Outcome.OK and "READ" not in result.text() and not leaked
    return Guarantee(
        "host_fs",
        "host filesystem",
        contained,
        "host file read/write: " + ", ".join(_lines(result)) if result.ok else _describe(result),
    )


# (family, type, name): families a run has no use for (include/linux/socket.h).
REFUSED_FAMILIES = ((40, 1, "vsock"), (16, 3, "netlink"), (17, 3, "packet"), (38, 5, "alg"))
SOCKET_FAMILIES = """
import _socket
for family, kind, name in {families!r}:
    try:
        _socket.socket(family, kind); print('CREATED', name, flush=True)
    except OSError as e:
        print('refused', name, e.errno, flush=True)
"""


def socket_families(p: _Probe) -> Guarantee:
    result = p.run(SOCKET_FAMILIES.format(families=REFUSED_FAMILIES))
    created = [line.split()[1] for line in _lines(result) if line.startswith("CREATED")]
    refused = [line for line in _lines(result) if line.startswith("refused")]
    ok_errnos = all(int(line.split()[2]) in (errno.EAFNOSUPPORT, errno.EPERM) for line in refused)
    title = "socket families (only unix, inet, inet6)"
    if result.outcome is Outcome.SECCOMP_VIOLATION and not created:
        return Guarantee("sockets", title, True, "socket(2) killed for every family")
    holds = result.ok and not created and ok_errnos and len(refused) == len(REFUSED_FAMILIES)
    evidence = (
        f"created: {', '.join(created)}"
        if created
        else "vsock, netlink, packet, alg refused: "
        + ", ".join(line.split()[2] for line in refused)
    )
    return Guarantee("sockets", title, holds, evidence)


SYSCALL_PROBES = {
    # clone(CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD): the argument rule, not the name.
    "clone+NEWUSER": "libc.syscall(56, 0x10000000 | 0x40000000 | 17, 0, 0, 0, 0)",
    "ptrace": "libc.ptrace(0, 0, 0, 0)",
    "io_uring_setup": "libc.syscall(425, 8, 0)",
}


def syscalls(p: _Probe) -> Guarantee:
    seen = {}
    for name, call in SYSCALL_PROBES.items():
        result = p.run(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"r = {call}\nif r == 0: os._exit(0)\nprint('returned', r, ctypes.get_errno())\n"
        )
        seen[name] = result.outcome is Outcome.SECCOMP_VIOLATION
    holds = all(seen.values())
    evidence = ", ".join(f"{n} {'killed' if k else 'NOT killed'}" for n, k in seen.items())
    return Guarantee("syscalls", "syscalls and their arguments", holds, evidence)


# Children spin, then exit unreaped (zombies): CPU a per-process watch misses.
CPU_ZOMBIES = """
import os, time
for _ in range(6):  # one after the other: a watch of the living sees one at a time
    pid = os.fork()
    if pid == 0:
        while time.process_time() < 0.6: pass  # its own CPU time, whatever the cores
        os._exit(0)
    # Until it has exited, left unreaped (not a fixed sleep: on a busy host it spins longer).
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
print('finished')
"""


def cpu(p: _Probe) -> Guarantee:
    # A plain loop is the matrix's; this one also beats a watch of the living only.
    zombies = p.run(CPU_ZOMBIES)
    limit = PROBE_LIMITS.cpu_seconds
    holds = (
        zombies.outcome is Outcome.CPU_LIMIT
        and zombies.cpu_seconds is not None
        and zombies.cpu_seconds >= limit * 0.9
    )
    reported = "?" if zombies.cpu_seconds is None else f"{zombies.cpu_seconds:.1f} s"
    return Guarantee(
        "cpu",
        f"CPU time ({limit} s)",
        holds,
        f"6 unreaped children in turn, 0.6 s of CPU each: {zombies.outcome}, reported {reported}",
    )


MEMORY_CHILDREN = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        held = [b'x' * (8 << 20) for _ in range(6)]
        time.sleep(1); os._exit(0)
time.sleep(1.5)
print('held', 3 * 48)
"""


def memory(p: _Probe) -> Guarantee:
    result = p.run(MEMORY_CHILDREN)
    cap = PROBE_LIMITS.memory_bytes
    peak = result.memory_peak_bytes
    holds = result.outcome is Outcome.MEMORY_LIMIT and (peak is None or peak <= cap)
    peak_text = "?" if peak is None else f"{peak // MiB} MiB"
    return Guarantee(
        "memory",
        f"memory ({cap // MiB} MiB for the whole run)",
        holds,
        f"3 processes x 48 MiB: {result.outcome}, peak {peak_text}",
    )


FORK_BOMB = """
import os, time
for i in range(1000):
    try:
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
    except OSError:
        print('refused after', i, flush=True); raise
"""


def pids(p: _Probe) -> Guarantee:
    # Room in memory for the processes, so the pids limit is what stops them.
    result = p.run(FORK_BOMB, dataclasses.replace(PROBE_LIMITS, memory_bytes=256 * MiB))
    lines = _lines(result)
    count = int(lines[-1].split()[-1]) if lines and lines[-1].startswith("refused") else None
    holds = result.outcome is Outcome.PIDS_LIMIT and count is not None
    holds = holds and count is not None and count <= PROBE_LIMITS.pids + 8
    return Guarantee(
        "pids",
        f"processes ({PROBE_LIMITS.pids})",
        holds,
        f"fork bomb: {result.outcome}, refused after {count}",
    )


FDS_IN_FLIGHT = """
import array, os, socket
carrier, _keep = socket.socketpair()
fd, parked, stop = os.open('/dev/null', os.O_RDONLY), 0, None
while stop is None and parked < 4000:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        while parked < 4000:
            a.sendmsg([b'x'], [(1, 1, array.array('i', [fd] * 200))])  # SCM_RIGHTS
            parked += 200
            if parked % 2000 == 0: print('parked', parked, 'so far', flush=True)
    except BlockingIOError:
        pass
    except OSError as e:
        stop = e.errno
    try:
        carrier.sendmsg([b'x'], [(1, 1, array.array('i', [a.fileno(), b.fileno()]))])
        parked += 2
    except OSError as e:
        stop = stop or e.errno
    a.close(); b.close()
    print('parked', parked, 'stopped', stop, flush=True)
"""


def fds_in_flight(p: _Probe) -> Guarantee:
    result = p.run(FDS_IN_FLIGHT)
    lines = _lines(result)
    # The last count printed: a run killed meanwhile (CPU, memory) had parked that many.
    parked = int(lines[-1].split()[1]) if lines else None
    # The kernel's bound: RLIMIT_NOFILE, overshot by at most one message (SCM_MAX_FD).
    bound = PROBE_LIMITS.nofile + 253
    holds = parked is not None and parked <= bound
    evidence = f"parked {parked} (bound {bound}), then {_describe(result)}"
    return Guarantee("fds", "descriptors in flight (SCM_RIGHTS)", holds, evidence)


WRITABLE = """
import os
for d in ('.', '/tmp', '/dev/shm', '/', '/etc', '/dev', '/var/tmp'):
    total = 0
    try:
        for i in range(6):
            with open(os.path.join(d, 'fill-%d' % i), 'wb') as f:
                f.write(b'x' * (4 << 20))
            total += 4 << 20
    except OSError:
        pass
    print('work-dir' if d == '.' else d, total >> 20, flush=True)
"""


def writable_areas(p: _Probe) -> Guarantee:
    result = p.run(WRITABLE)
    cap = PROBE_LIMITS.tmpfs_bytes // MiB
    seen = [line.rsplit(" ", 1) for line in _lines(result)]
    over = [f"{d} {mb} MiB" for d, mb in seen if int(mb) > cap]
    holds = result.ok and len(seen) == 7 and not over
    evidence = (
        f"over the {cap} MiB cap: {', '.join(over)}"
        if over
        else f"24 MiB into each area: at most {cap} MiB landed"
        if holds
        else _describe(result)
    )
    return Guarantee("writable", "writable areas size-capped", holds, evidence)


def _forks_since_boot() -> int:
    """The host's ``processes`` line of /proc/stat (proc(5))."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return -1


def host_info(p: _Probe) -> Guarantee:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    forks_before = _forks_since_boot()
    result = p.run(
        "import os, socket\n"
        "print('hostname', socket.gethostname())\n"
        "try:\n"
        f"    os.kill({os.getpid()}, 0); print('hostpid visible')\n"
        "except OSError as e:\n"
        "    print('hostpid', 'visible' if e.errno == 1 else 'hidden')\n"
        "for path in ('/proc/sys/kernel/random/boot_id', '/proc/cmdline', '/proc/stat'):\n"
        "    try: print(path, repr(open(path).read()[:4096]))\n"
        "    except OSError as e: print(path, 'denied')\n"
    )
    text = result.text()
    leaks = []
    if f"hostname {platform.node()}\n" in text:
        leaks.append("host hostname")
    if "hostpid visible" in text:
        leaks.append("host pids (kill(pid, 0))")
    if boot_id in text:
        leaks.append("host boot_id")
    cmdline = Path("/proc/cmdline").read_text().strip()
    if cmdline and cmdline in text:
        leaks.append("host /proc/cmdline")
    forks_after = _forks_since_boot()
    for line in text.splitlines():
        if line.startswith("/proc/stat '") and "processes " in line:
            seen = line.split("processes ", 1)[1].split("\\n", 1)[0]
            if seen.isdigit() and forks_before <= int(seen) <= forks_after:
                leaks.append("host /proc/stat (fork count)")
    holds = result.ok and not leaks
    evidence = ("visible: " + ", ".join(leaks)) if leaks else "own hostname, pids, masked /proc"
    if not result.ok:
        evidence = _describe(result)
    return Guarantee("host_info", "host information (own pid + uts namespace)", holds, evidence)


CLEANUP = """
import os, sys
open({marker!r}, 'w').close()
print(os.getuid(), flush=True)
for i in range(2500):
    os.mkdir('d'); os.chdir('d')
open('f', 'wb').write(b'x' * (1 << 20))
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.closerange(0, 64)
        import time; time.sleep(60)
    os._exit(0)
print('left behind')
"""


def _left_processes(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += 1
    return count


def _work_entries(sandbox: Sandbox) -> set[str]:
    root = getattr(sandbox.backend, "work_root", None)
    if root is None or not Path(root).is_dir():
        return set()
    return {e.name for e in os.scandir(root)}


def _remove_own_leftovers(p: _Probe, before: set[str]) -> list[str]:
    """The work dirs this probe left (they hold its marker; other runs' dirs are
    not counted), removed: the measurement must not leave what it found left
    behind (rm(1) walks any depth and stays on one filesystem)."""
    root = getattr(p.sandbox.backend, "work_root", None)
    left = []
    for name in _work_entries(p.sandbox) - before:
        path = Path(root or "") / name
        if (path / p.tag).exists():
            left.append(name)
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)
    return left


def cleanup(p: _Probe) -> Guarantee:
    before = _work_entries(p.sandbox)
    try:
        result = p.run(CLEANUP.format(marker=p.tag))
    except Exception as exc:  # the guarantee is that this never happens
        _remove_own_leftovers(p, before)
        return Guarantee(
            "cleanup",
            "cleanup (nothing outlives a run)",
            False,
            f"the run raised {type(exc).__name__}",
        )
    time.sleep(0.05)
    first = _lines(result)[:1]
    uid = int(first[0]) if first and first[0].isdigit() else None
    left = _left_processes(uid) if uid is not None else -1
    files = _remove_own_leftovers(p, before)
    # What the program managed to make does not matter; that none of it outlives the run does.
    holds = uid is not None and left == 0 and not files
    evidence = (
        "2,500-deep tree and a daemon: nothing left"
        if holds
        else f"{_describe(result)}; processes of its uid left {left}; work dirs left {len(files)}"
    )
    return Guarantee("cleanup", "cleanup (nothing outlives a run)", holds, evidence)


CLASSES: tuple[Callable[[_Probe], Guarantee], ...] = (
    network,
    host_fs,
    socket_families,
    syscalls,
    cpu,
    memory,
    pids,
    fds_in_flight,
    writable_areas,
    host_info,
    cleanup,
)


def measure(sandbox: Sandbox) -> list[Guarantee]:
    """Run every class's probes in ``sandbox`` (a few seconds) and say which hold."""
    probe = _Probe(sandbox)
    return [check(probe) for check in CLASSES]


def to_markdown(host: str, measured: dict[str, list[Guarantee]]) -> str:
    """The measured table per backend, as a markdown page."""
    names = list(measured)
    out = [
        "# Sandbox guarantees (measured)",
        "",
        "Generated by `bastion sandbox status --markdown` on "
        f"{host}: each row ran its probes in each backend; *holds* means every "
        "probe was contained. Regenerate it on the host you deploy to.",
        "",
        "| guarantee | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    rows = {g.key: g.title for checks in measured.values() for g in checks}
    for key, title in rows.items():
        cells = []
        for name in names:
            g = next((c for c in measured[name] if c.key == key), None)
            cells.append("n/a" if g is None else ("holds" if g.holds else "**does not hold**"))
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    for name in names:
        out += ["", f"## {name}", ""]
        out += [
            f"- {'holds' if g.holds else '**does not hold**'} — {g.title}: {g.evidence}"
            for g in measured[name]
        ]
        if NOT_ISOLATED.get(name):
            out += ["", "Not isolated by design:", ""]
            out += [f"- {line}" for line in NOT_ISOLATED[name]]
    return "\n".join(out) + "\n"
