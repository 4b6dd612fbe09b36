"""The sandbox's escape matrix (CHECKLIST M2): each attack runs for real in every
backend and must be contained, with the right outcome.

Backends: ``bwrap`` (the default), ``gvisor`` (runsc, installed from apt), and
``landlock`` *as the probe chooses it* where user namespaces are unavailable:
that case runs in a helper process whose seccomp filter refuses new user
namespaces (as Docker's default profile does), so bwrap genuinely fails there
and the fallback is what the probe picks, not what the test asks for.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from bastion.safety.sandbox import Limits, Outcome, Result, RunSpec, Sandbox, SandboxConfig
from bastion.safety.sandbox.service import PYTHON, build_backend

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("bwrap", "landlock", "gvisor")
# Short limits keep the matrix fast; the defaults are tested in test_sandbox.py.
FAST = Limits(cpu_seconds=1, wall_seconds=8.0, pids=16, fsize_bytes=1 << 20)

Run = Callable[..., Result]


# -- the "namespaces unavailable" host, simulated for real --------------------------------


def _result_to_json(result: Result) -> dict[str, Any]:
    data = asdict(result)
    data["stdout"] = base64.b64encode(result.stdout).decode()
    data["stderr"] = base64.b64encode(result.stderr).decode()
    return data


def _result_from_json(data: dict[str, Any]) -> Result:
    data["outcome"] = Outcome(data["outcome"])
    data["stdout"] = base64.b64decode(data["stdout"])
    data["stderr"] = base64.b64decode(data["stderr"])
    return Result(**data)


def serve_without_userns() -> None:  # pragma: no cover - runs in the helper process
    """Refuse user namespaces to this process and its children, probe, then run
    the specs read from stdin (one JSON line each) in whatever was chosen."""
    import pyseccomp as sc  # type: ignore[import-untyped]

    newuser = 0x10000000
    f = sc.SyscallFilter(sc.ALLOW)
    f.add_rule(sc.ERRNO(errno.EPERM), "unshare", sc.Arg(0, sc.MASKED_EQ, newuser, newuser))
    f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, newuser, newuser))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.load()
    config = SandboxConfig()
    survey = [asdict(s) for s in Sandbox.survey(config)]
    sandbox = Sandbox.probe(config)
    print(json.dumps({"backend": sandbox.name, "survey": survey}, default=str), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        spec = RunSpec(
            tuple(request["argv"]),
            stdin=base64.b64decode(request["stdin"]),
            limits=Limits(**request["limits"]),
        )
        print(json.dumps(_result_to_json(sandbox.run(spec))), flush=True)


class NoUsernsHost:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import tests.test_sandbox_escapes as m; m.serve_without_userns()",
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.hello = json.loads(self.proc.stdout.readline())
        self.lock = threading.Lock()

    def run(self, spec: RunSpec) -> Result:
        assert self.proc.stdin and self.proc.stdout
        request = {
            "argv": list(spec.argv),
            "stdin": base64.b64encode(spec.stdin).decode(),
            "limits": asdict(spec.limits),
        }
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return _result_from_json(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def no_userns_host() -> Iterator[NoUsernsHost]:
    host = NoUsernsHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def sandboxes() -> dict[str, Sandbox]:
    config = SandboxConfig()
    return {name: Sandbox(build_backend(name, config), config) for name in ("bwrap", "gvisor")}


@pytest.fixture(params=BACKENDS)
def run(
    request: pytest.FixtureRequest, sandboxes: dict[str, Sandbox], no_userns_host: NoUsernsHost
) -> Run:
    backend = request.param
    if backend == "gvisor" and (reason := sandboxes["gvisor"].backend.unavailable()):
        pytest.fail(f"gVisor is part of the matrix: {reason}")  # never skipped

    def run_code(code: str, limits: Limits = FAST, stdin: bytes = b"") -> Result:
        spec = RunSpec((PYTHON, "-I", "-S", "-c", code), stdin=stdin, limits=limits)
        if backend == "landlock":
            return no_userns_host.run(spec)
        return sandboxes[backend].run(spec)

    run_code.backend = backend  # type: ignore[attr-defined]
    return run_code


def backend_of(run: Run) -> str:
    return str(run.backend)  # type: ignore[attr-defined]


def test_without_user_namespaces_the_probe_falls_back_to_landlock(
    no_userns_host: NoUsernsHost,
) -> None:
    hello = no_userns_host.hello
    assert hello["backend"] == "landlock"
    bwrap = next(s for s in hello["survey"] if s["name"] == "bwrap")
    assert bwrap["available"] is False and "bwrap" in bwrap["reason"]


# -- resource exhaustion ------------------------------------------------------------------


def test_memory_bomb(run: Run) -> None:
    result = run("b = []\nwhile True: b.append(b'x' * (8 << 20))", Limits(memory_bytes=64 << 20))
    assert result.outcome is Outcome.MEMORY_LIMIT


def test_cpu_loop(run: Run) -> None:
    result = run("while True: pass")
    assert result.outcome is Outcome.CPU_LIMIT


def test_cpu_loop_ignoring_sigxcpu(run: Run) -> None:
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    result = run(code)
    assert result.outcome is Outcome.CPU_LIMIT
    assert result.wall_seconds < FAST.wall_seconds


def test_sleep_past_the_wall_clock(run: Run) -> None:
    started = time.monotonic()
    result = run("import time\ntime.sleep(60)", Limits(wall_seconds=1.0))
    assert result.outcome is Outcome.WALL_TIMEOUT
    assert time.monotonic() - started < 5


def test_fork_bomb(run: Run) -> None:
    code = (
        "import os, sys, time\n"
        "for i in range(1000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "    except OSError:\n"
        "        print('refused after', i, flush=True); raise\n"
    )
    result = run(code)
    assert result.outcome is Outcome.PIDS_LIMIT, result
    assert b"refused after" in result.stdout
    assert int(result.stdout.split()[-1]) <= FAST.pids + 8


def test_huge_file_write(run: Run) -> None:
    result = run("f = open('big', 'wb')\nwhile True: f.write(b'x' * 65536)")
    assert result.outcome is Outcome.FSIZE_LIMIT


def test_fd_exhaustion(run: Run) -> None:
    code = (
        "fds = []\n"
        "try:\n"
        "    while True: fds.append(open('/dev/null'))\n"
        "except OSError as e:\n"
        "    print(len(fds), e.errno)\n"
    )
    result = run(code)
    assert result.outcome is Outcome.OK
    opened, err = result.stdout.split()
    assert int(opened) < FAST.nofile and int(err) == errno.EMFILE


# -- network ------------------------------------------------------------------------------


@contextlib.contextmanager
def _listener(family: int, kind: int, address: Any) -> Iterator[tuple[Any, list[bytes]]]:
    server = socket.socket(family, kind)
    server.bind(address)
    if kind == socket.SOCK_STREAM:
        server.listen()
    server.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                if kind == socket.SOCK_STREAM:
                    conn, _ = server.accept()
                    got.append(b"connected:" + conn.recv(100))
                    conn.close()
                else:
                    got.append(server.recv(100))
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname(), got
    finally:
        stop.set()
        thread.join()
        server.close()


def _network_contained(run: Run, result: Result, got: list[bytes]) -> None:
    assert got == []  # nothing reached the host
    if backend_of(run) == "landlock":
        assert result.outcome is Outcome.SECCOMP_VIOLATION  # socket(2) itself is refused
    else:
        assert result.outcome is Outcome.EXIT  # no route: the program's own error
        assert b"Error" in result.stderr


def test_tcp_to_a_host_listener(run: Run) -> None:
    with _listener(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0)) as (addr, got):
        code = f"import socket\nsocket.create_connection({addr!r}, timeout=2).sendall(b'x')"
        result = run(code)
    _network_contained(run, result, got)


def test_udp_to_a_host_listener(run: Run) -> None:
    with _listener(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0)) as (addr, got):
        code = (
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(5): s.sendto(b'escape', {addr!r})\n"
            "import time; time.sleep(0.3)\n"
        )
        result = run(code)
        time.sleep(0.3)
    # In a network namespace of its own the datagrams go to its own loopback.
    assert got == []
    if backend_of(run) == "landlock":
        assert result.outcome is Outcome.SECCOMP_VIOLATION
    else:
        assert result.outcome in (Outcome.OK, Outcome.EXIT)


UNIX_CONNECT = (
    "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\ns.sendall(b'x')"
)


def test_pathname_unix_socket(run: Run, tmp_path: Path) -> None:
    path = Path("/tmp") / f"bastion-escape-{os.getpid()}.sock"
    try:
        with _listener(socket.AF_UNIX, socket.SOCK_STREAM, str(path)) as (_, got):
            os.chmod(path, 0o777)  # noqa: S103 - only the sandbox may stop it, not permissions
            code = UNIX_CONNECT.format(address=str(path))
            result = run(code)
    finally:
        path.unlink(missing_ok=True)
    _network_contained(run, result, got)


def test_abstract_unix_socket(run: Run) -> None:
    name = f"\0bastion-escape-{os.getpid()}"
    with _listener(socket.AF_UNIX, socket.SOCK_STREAM, name) as (_, got):
        code = UNIX_CONNECT.format(address=name)
        result = run(code)
    _network_contained(run, result, got)


# -- the host's files and processes ---------------------------------------------------------


def test_reading_a_host_file_and_etc_shadow(run: Run) -> None:
    secret = Path("/var/tmp") / f"bastion-escape-{os.getpid()}.txt"
    secret.write_text("host secret 7f3a")
    secret.chmod(0o644)  # world-readable: only the sandbox stands in the way
    try:
        code = (
            f"for p in ({str(secret)!r}, '/etc/shadow', '/etc/passwd', '/root/.bashrc'):\n"
            "    try:\n"
            "        print(p, 'READ', open(p).read()[:40])\n"
            "    except OSError as e:\n"
            "        print(p, 'denied', e.errno)\n"
        )
        result = run(code)
    finally:
        secret.unlink()
    assert result.outcome is Outcome.OK
    assert b"READ" not in result.stdout and b"7f3a" not in result.stdout
    assert result.stdout.count(b"denied") == 4


def test_writing_outside_the_work_dir(run: Run) -> None:
    tag = f"bastion-escape-{os.getpid()}"
    targets = [f"/var/tmp/{tag}", f"/dev/shm/{tag}", f"/usr/{tag}", f"/{tag}", f"/etc/{tag}"]
    code = (
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('x')\n"
        "    except OSError as e:\n"
        "        print(p, 'denied', e.errno)\n"
        "open('inside', 'w').write('the work dir is writable')\n"
        "print(open('inside').read())\n"
    )
    result = run(code)
    assert result.outcome is Outcome.OK
    assert b"the work dir is writable" in result.stdout
    for target in targets:
        assert not Path(target).exists(), target  # nothing landed on the host


def test_listing_and_signalling_host_processes(run: Run) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = (
            "import os, signal\n"
            "try:\n"
            "    pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
            f"    print('visible', {victim.pid} in pids)\n"
            "except OSError as e:\n"
            "    print('listing denied', e.errno)\n"
            f"for pid in ({victim.pid}, 1, -1):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL); print('killed', pid)\n"
            "    except OSError as e:\n"
            "        print('kill denied', pid, e.errno)\n"
        )
        result = run(code)
        time.sleep(0.1)
        assert victim.poll() is None  # still alive
    finally:
        victim.kill()
        victim.wait()
    assert b"visible True" not in result.stdout
    assert f"killed {victim.pid}".encode() not in result.stdout


def test_host_sysv_shared_memory(run: Run) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x0BA5_0000 + os.getpid() % 0xFFFF
    shmid = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT, world-accessible
    assert shmid >= 0
    try:
        code = (
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"print('shmid', libc.shmget({key}, 0, 0), ctypes.get_errno())\n"
        )
        result = run(code)
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    if backend_of(run) == "landlock":
        assert result.outcome is Outcome.SECCOMP_VIOLATION  # shares the host's IPC namespace
    else:
        # Its own IPC namespace: the host's segment does not exist there (ENOENT).
        assert result.outcome is Outcome.OK and result.stdout.split()[1:] == [b"-1", b"2"]


# -- kernel attack surface ------------------------------------------------------------------

SYSCALLS = {
    "ptrace": "libc.ptrace(0, 0, 0, 0)",  # PTRACE_TRACEME
    "mount": "libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)",
    "unshare": "libc.unshare(0x10000000)",  # CLONE_NEWUSER
    "keyctl": "libc.syscall(250, 0, 0, 0, 0, 0)",  # KEYCTL_GET_KEYRING_ID
    "bpf": "libc.syscall(321, 0, 0, 0)",  # BPF_MAP_CREATE
}


@pytest.mark.parametrize("name", SYSCALLS)
def test_dangerous_syscalls(run: Run, name: str) -> None:
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"r = {SYSCALLS[name]}\nprint('returned', r)"
    )
    result = run(code)
    # In gVisor the Sentry enforces the same list (the host kernel never sees the call).
    assert result.outcome is Outcome.SECCOMP_VIOLATION, result
    assert result.signal == signal.SIGSYS


def test_int_0x80(run: Run) -> None:
    # mov eax, 20 (i386 getpid); int 0x80; ret — the 32-bit entry point from a 64-bit process.
    code = (
        "import ctypes, mmap\n"
        "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n"
        "addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
        "print('returned', ctypes.CFUNCTYPE(ctypes.c_int)(addr)())\n"
    )
    result = run(code)
    if backend_of(run) == "gvisor":
        # gVisor implements no 32-bit entry point: the call fails inside the Sentry.
        assert result.outcome is Outcome.OK and int(result.stdout.split()[-1]) < 0
    else:
        assert result.outcome is Outcome.SECCOMP_VIOLATION, result


# -- CPU time of every task a run ever had (issue 22, item 2) --------------------------------
# Each process stays under its own RLIMIT_CPU (1 s) and exits without being reaped, one
# after the other, so a watch that sums the live members of the cgroup never sees more
# than one of them. The cgroup's own account (cpuacct.usage, cpu.stat) sees them all.

SPIN = (
    "import os, time\n"
    "def spin(seconds):\n"
    "    t = time.process_time()\n"
    "    while time.process_time() - t < seconds: pass\n"
)


# A generous wall clock: on a loaded host the CPU limit must still be what ends the run.
CPU_PROBE = Limits(cpu_seconds=1, wall_seconds=30.0, pids=16, fsize_bytes=1 << 20)


def _cpu_contained(result: Result, limits: Limits = CPU_PROBE) -> None:
    assert result.outcome is Outcome.CPU_LIMIT, result
    assert b"escaped" not in result.stdout  # ended while running, not at its end
    # The reported figure is the run's: every task counted, and the run stopped soon after.
    assert result.cpu_seconds is not None
    assert limits.cpu_seconds <= result.cpu_seconds <= limits.cpu_seconds + 1.5, result


def test_cpu_of_unreaped_children_counts(run: Run) -> None:
    code = SPIN + (
        "for i in range(6):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        spin(0.8); os._exit(0)\n"
        "    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, left a zombie\n"
        "print('escaped', flush=True)\n"
    )
    _cpu_contained(run(code, CPU_PROBE))


def test_cpu_of_double_forked_daemons_counts(run: Run) -> None:
    # The grandchild is orphaned at once: re-parented (landlock: to the worker, which
    # reaps only at the end), it spins and exits; the pipe says when.
    code = SPIN + (
        "for i in range(6):\n"
        "    r, w = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid(); os.close(r); spin(0.8); os._exit(0)\n"
        "        os._exit(0)\n"
        "    os.close(w); os.wait(); os.read(r, 1); os.close(r)\n"
        "print('escaped', flush=True)\n"
    )
    _cpu_contained(run(code, CPU_PROBE))


def test_cpu_of_threads_in_unreaped_children_counts(run: Run) -> None:
    # Two threads hashing (the GIL released) per child: 0.8 s of CPU in ~0.4 s of wall.
    code = SPIN + (
        "import hashlib, threading\n"
        "def hash_until(seconds):\n"
        "    data = bytes(1 << 20)\n"
        "    while time.process_time() < seconds: hashlib.sha256(data).digest()\n"
        "for i in range(8):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        ts = [threading.Thread(target=hash_until, args=(0.8,)) for _ in range(2)]\n"
        "        [t.start() for t in ts]; [t.join() for t in ts]; os._exit(0)\n"
        "    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)\n"
        "print('escaped', flush=True)\n"
    )
    _cpu_contained(run(code, CPU_PROBE))


# -- cleanup that nothing a run makes can defeat (issue 22, item 3) -----------------------

MESS = r"""
import ctypes, fcntl, os, struct, time
print('cwd', os.getcwd(), flush=True)
d = os.open('.', os.O_RDONLY)
for i in range(2500):  # deeper than any recursive walk
    os.mkdir('d', dir_fd=d)
    n = os.open('d', os.O_RDONLY, dir_fd=d); os.close(d); d = n
fd = os.open('deep-file', os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=d)
os.write(fd, b'x' * (1 << 20)); os.close(fd)
odd = b'\n\xff\xfe ' + b'n' * 250  # not UTF-8, a newline, a maximal name
os.mkdir(odd); open(os.path.join(odd, b'\x01*'), 'w').write('odd')
os.makedirs('locked/inner'); open('locked/inner/f', 'w').write('locked')
os.chmod('locked/inner', 0); os.chmod('locked', 0)
os.symlink('/usr', 'link-out')
f = os.open('flags', os.O_RDONLY | os.O_CREAT, 0o600)
try:  # FS_IOC_SETFLAGS immutable|append: needs CAP_LINUX_IMMUTABLE
    fcntl.ioctl(f, 0x40086602, struct.pack('i', 0x30)); print('flags set')
except OSError as e:
    print('flags refused', e.errno)
if os.fork() == 0:  # a daemon keeping a handle open in the work dir
    os.setsid()
    if os.fork() == 0:
        h = open('held', 'wb'); h.write(b'h' * (1 << 20)); h.flush()
        time.sleep(60)
    os._exit(0)
os.wait()
time.sleep(0.2)
print('made', flush=True)
"""


def _mounts_below(path: str) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if f" {path}" in line]


def test_a_run_that_leaves_a_mess_still_ends_cleanly_and_nothing_stays(run: Run) -> None:
    result = run(MESS, Limits(cpu_seconds=5, wall_seconds=20.0, pids=16))
    assert result.outcome is Outcome.OK, result
    lines = result.text().splitlines()
    assert "made" in lines
    assert "flags set" not in lines  # no capability for immutable/append-only flags
    workdir = lines[0].split(" ", 1)[1]
    if backend_of(run) == "landlock":  # on the host: it must be gone, mount and all
        assert workdir.startswith(str(SandboxConfig().work_root))
        assert not Path(workdir).exists()
        assert _mounts_below(workdir) == []
    else:  # inside the sandbox's own mount namespace or Sentry, gone with it
        assert workdir == "/tmp"


# -- writable areas: each size-capped, and only where a run needs to write (item 4) ---------

FILL = r"""
import os
for area in ('/', '/etc', '/dev', '/dev/shm', '/tmp', '/var/tmp', os.getcwd()):
    written, made = 0, []
    try:
        while written < (96 << 20):  # more than the 64 MiB work dir
            made.append(os.path.join(area, 'fill-%d' % written))
            with open(made[-1], 'wb') as f:
                f.write(b'x' * (4 << 20))
            written += 4 << 20
    except OSError:
        pass
    for path in made:
        try:
            os.unlink(path)
        except OSError:
            pass
    print(area, written, flush=True)
"""


def test_every_writable_area_is_size_capped(run: Run) -> None:
    limits = Limits(cpu_seconds=5, wall_seconds=20.0, pids=16)  # 256 MiB, 64 MiB tmpfs
    result = run(FILL, limits)
    assert result.outcome is Outcome.OK, result
    written = [(a, int(n)) for a, n in (line.rsplit(" ", 1) for line in result.text().splitlines())]
    assert len(written) == 7, written
    for area, size in written:
        assert size <= limits.tmpfs_bytes, (area, size)
    # Nothing is writable but the work dir (/tmp; landlock: its own tmpfs, the cwd).
    workdir = written[-1][0]
    assert {area for area, size in written if size > 0} == {workdir}, written
    assert (workdir == "/tmp") is (backend_of(run) != "landlock")


# -- host information (item 5) --------------------------------------------------------------

HOST_INFO = r"""
import os, socket
for path in ('/proc/sys/kernel/random/boot_id', '/proc/cmdline', '/proc/stat',
             '/proc/loadavg', '/proc/interrupts'):
    try:
        print(path, repr(open(path).read()))
    except OSError as e:
        print(path, 'denied', e.errno)
print('hostname', socket.gethostname())
try:
    print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
except OSError as e:
    print('pids denied', e.errno)
"""


def test_no_host_identifier_or_host_wide_counter_is_visible(run: Run) -> None:
    result = run(HOST_INFO)
    assert result.outcome is Outcome.OK, result
    out = result.text()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    cmdline = Path("/proc/cmdline").read_text().strip()
    assert boot_id not in out
    assert cmdline not in out and cmdline.split()[0] not in out
    # /proc/stat's host-wide counters (gVisor's own /proc shows only the sandbox's).
    host_stat = dict(line.split(" ", 1) for line in Path("/proc/stat").read_text().splitlines())
    assert f"btime {host_stat['btime']}" not in out
    forks = re.findall(r"processes (\d+)", out)
    assert all(int(n) < 1000 < int(host_stat["processes"]) for n in forks), forks
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    if backend_of(run) == "landlock":
        # No /proc at all (Landlock grants none). Documented limitation: no UTS or PID
        # namespace without user namespaces, so uname() and kill(pid, 0) see the host.
        assert lines["pids"].startswith("denied")
        assert lines["hostname"] == socket.gethostname()
    else:
        assert lines["hostname"] == "sandbox"
        pids = json.loads(lines["pids"])
        assert os.getpid() not in pids and len(pids) <= 3  # its own tree only


# -- socket families, the seccomp policy on every backend, and gVisor's memory (issue 22) --

# (family, type, name): socket families no run needs. Every one must be refused.
FOREIGN_FAMILIES = (
    (40, 1, "vsock"),  # AF_VSOCK: the hypervisor's services; no network namespace covers it
    (16, 3, "netlink"),  # AF_NETLINK, SOCK_RAW
    (17, 3, "packet"),  # AF_PACKET
    (38, 5, "alg"),  # AF_ALG, SOCK_SEQPACKET
    (15, 3, "key"),  # AF_KEY
    (31, 3, "bluetooth"),  # AF_BLUETOOTH
    (0, 1, "unspec"),  # AF_UNSPEC
)
FOREIGN_SOCKETS = """
import _socket
for family in (40, 16):  # socketpair(2) takes the same family argument
    try:
        _socket.socketpair(family, 1); print('PAIRED', family, flush=True)
    except OSError as e:
        print('pair refused', family, e.errno, flush=True)
for family, kind, name in {families!r}:
    try:
        s = _socket.socket(family, kind)
    except OSError as e:
        print('refused', name, e.errno, flush=True)
        continue
    print('CREATED', name, flush=True)
    if name == 'vsock':
        try:
            s.bind((0xFFFFFFFF, 0x5A5A))  # VMADDR_CID_ANY
            print('BOUND', flush=True)
            s.listen(1)
            print('LISTENING', flush=True)
        except OSError as e:
            print('vsock bind refused', e.errno, flush=True)
"""


def test_socket_families_other_than_unix_and_inet_are_refused(run: Run) -> None:
    result = run(FOREIGN_SOCKETS.format(families=FOREIGN_FAMILIES))
    out = result.stdout
    for escaped in (b"CREATED", b"BOUND", b"LISTENING", b"PAIRED"):
        assert escaped not in out, (escaped, out)
    refusals = [line.split() for line in result.text().splitlines() if "refused" in line]
    # The filter's EAFNOSUPPORT (gVisor's Sentry answers EPERM): not the kernel's EOPNOTSUPP
    # for a socketpair of a real family, which would mean the filter never saw the call.
    assert all(int(words[-1]) in (errno.EAFNOSUPPORT, errno.EPERM) for words in refusals), out
    if backend_of(run) == "landlock":
        # No network namespace to stand behind: socket(2) itself is killed.
        assert result.outcome is Outcome.SECCOMP_VIOLATION, result
        assert len(refusals) == 2  # the two socketpairs, refused before that
    else:
        assert result.outcome is Outcome.OK, result
        assert len(refusals) == 2 + len(FOREIGN_FAMILIES)


def test_unix_and_inet_sockets_still_work_inside(run: Run) -> None:
    code = (
        "import socket\na, b = socket.socketpair()\na.sendall(b'ping')\n"
        "print(b.recv(4), flush=True)\n"
        "s = socket.socket(socket.AF_INET6)\ns.close()\nprint('inet6 ok')\n"
    )
    result = run(code)
    if backend_of(run) == "landlock":
        assert result.outcome is Outcome.SECCOMP_VIOLATION  # socket(2) killed; pairs work
        assert result.stdout == b"b'ping'\n"
    else:
        assert result.outcome is Outcome.OK and result.stdout == b"b'ping'\ninet6 ok\n"


def test_x32_socket_entry_point_is_killed(run: Run) -> None:
    # socket(AF_VSOCK) through the x32 ABI (syscall number | 0x40000000): another
    # architecture as far as the filter goes, so killed before the kernel sees it.
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.syscall(0x40000000 | 41, 40, 1, 0)\nprint('returned', r, ctypes.get_errno())\n"
    )
    result = run(code)
    if backend_of(run) == "gvisor":
        # gVisor implements no x32 entry point: the Sentry refuses the call itself.
        assert result.outcome is Outcome.OK and result.stdout.split()[1] == b"-1", result
    else:
        assert result.outcome is Outcome.SECCOMP_VIOLATION, result


def test_clone_with_namespace_flags_is_killed(run: Run) -> None:
    # clone(CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD): the rule is on clone's argument,
    # which gVisor used to drop (it got the syscall names only).
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.syscall(56, 0x10000000 | 0x40000000 | 17, 0, 0, 0, 0)\n"
        "if r == 0: os._exit(0)\nprint('returned', r, ctypes.get_errno(), flush=True)\n"
    )
    result = run(code)
    assert result.outcome is Outcome.SECCOMP_VIOLATION, result
    assert result.signal == signal.SIGSYS and b"returned" not in result.stdout


def test_every_backend_enforces_the_same_syscall_policy() -> None:
    from bastion.safety.sandbox import seccomp

    # gVisor's OCI seccomp is rendered from the very rules bwrap's BPF is compiled from.
    rules = seccomp.rules(shared_host=False)
    oci = seccomp.oci_seccomp(shared_host=False)["syscalls"]
    assert len(oci) == len(rules)
    for rule, entry in zip(rules, oci, strict=True):
        assert entry["names"] == [rule.syscall]
        assert len(entry.get("args", [])) == len(rule.args)
        assert entry.get("errnoRet") == rule.errno
    with_args = {r.syscall for r in rules if r.args}
    assert {"clone", "ioctl", "socket", "socketpair"} <= with_args
    # ENOSYS ("not implemented": libc falls back) is never left to errnoRet, which
    # the runsc here ignores (it answered EPERM, and no thread could start).
    clone3 = next(e for e in oci if e["names"] == ["clone3"])
    assert clone3["action"] == "SCMP_ACT_TRACE" and clone3["errnoRet"] == errno.ENOSYS


THREADS = """
import ctypes, threading
libc = ctypes.CDLL(None, use_errno=True)
args = (ctypes.c_uint64 * 11)()  # struct clone_args
args[0] = 0x10000000 | 0x40000000  # CLONE_NEWUSER | CLONE_NEWNET, where seccomp cannot look
args[4] = 17  # exit_signal SIGCHLD
r = libc.syscall(435, ctypes.byref(args), 88)
if r == 0:
    libc._exit(0)
print('clone3', r, ctypes.get_errno(), flush=True)
started = []
threads = [threading.Thread(target=started.append, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print('threads', len(started))
"""


def test_a_payload_starts_threads_under_the_default_limits(run: Run) -> None:
    # gVisor used to answer clone3 with EPERM (runsc ignored the rule's ENOSYS), so
    # glibc never fell back to clone: "can't start new thread" under any limits.
    result = run(THREADS, Limits())
    assert result.outcome is Outcome.OK, result
    # clone3 stays unavailable (its flags are out of seccomp's sight); threads use clone.
    assert result.stdout == f"clone3 -1 {errno.ENOSYS}\nthreads 4\n".encode(), result


KILLED_IN_A_THREAD = """
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
def trace():
    print('ptrace returned', libc.syscall(101, 16, 1, 0, 0), flush=True)  # PTRACE_ATTACH
t = threading.Thread(target=trace, daemon=True)
t.start()
t.join(timeout=1.0)
print('thread alive' if t.is_alive() else 'thread ended', flush=True)
os._exit(0)  # not waiting on a thread that will never end
"""


def test_a_killed_syscall_in_a_thread_never_runs(run: Run) -> None:
    # Now that threads start everywhere: the policy holds in a thread as in the main one.
    result = run(KILLED_IN_A_THREAD)
    assert b"ptrace returned" not in result.stdout, result
    if backend_of(run) == "gvisor":
        # Stated difference (guarantees.NOT_ISOLATED): the Sentry ends the thread only.
        assert result.outcome is Outcome.OK and result.stdout == b"thread alive\n", result
    else:
        assert result.outcome is Outcome.SECCOMP_VIOLATION, result


# Each child holds 48 MiB until the run ends and says so on a pipe; the parent
# reports the most children it saw holding theirs at once (reported, not dead).
# Not the children's own "held" lines: one killed after printing its line let the
# next allocate (on a busy host the three allocate in turn, each printing first).
MEMORY_ACROSS_PROCESSES = """
import os, select, time
r, w = os.pipe()
kids = set()
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        held = [b'x' * (8 << 20) for _ in range(6)]
        os.write(w, os.getpid().to_bytes(4, 'little')); print('held 48', flush=True)
        time.sleep(60); os._exit(0)
    kids.add(pid)
held, dead, most, deadline = set(), set(), 0, time.monotonic() + 5
while held | dead != kids and time.monotonic() < deadline:
    if select.select([r], [], [], 0.05)[0]:
        got = os.read(r, 64)
        held |= {int.from_bytes(got[i:i + 4], 'little') for i in range(0, len(got), 4)}
    dead |= {pid for pid in kids - dead if os.waitpid(pid, os.WNOHANG)[0]}
    most = max(most, len(held - dead))
print('held at once:', most, flush=True)
"""


def test_memory_across_processes_is_the_configured_cap(run: Run) -> None:
    # 3 x 48 MiB against a 96 MiB cap: under gVisor the Sentry's allowance used to
    # come on top of the cap (it held ~400 MB against 256 MB).
    cap = 96 << 20
    result = run(MEMORY_ACROSS_PROCESSES, Limits(cpu_seconds=2, wall_seconds=8.0, memory_bytes=cap))
    assert result.outcome is Outcome.MEMORY_LIMIT, result
    if (together := re.search(rb"held at once: (\d)\n", result.stdout)) is not None:
        assert int(together[1]) < 3  # the 144 MiB never all existed at once
    else:
        # The run was killed as a whole at the cap (gVisor: its Sentry with it);
        # its children never exit by themselves, so each that printed held then.
        assert result.signal == signal.SIGKILL, result
        assert result.stdout.count(b"held 48") < 3
    # The kernel charges whole pages: cgroup v1's recorded peak can read one page
    # past the limit it enforced (seen under gVisor); more than that is an escape.
    assert result.memory_peak_bytes is not None
    assert result.memory_peak_bytes <= cap + resource.getpagesize()


FDS_IN_FLIGHT = """
import array, os, socket
carrier, _keep = socket.socketpair()
fd, parked, stop = os.open('/dev/null', os.O_RDONLY), 0, None
def rights(*fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))]
while stop is None and parked < 4000:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        while parked < 4000:
            a.sendmsg([b'x'], rights(*[fd] * 200))
            parked += 200
    except BlockingIOError:
        pass
    except OSError as e:
        stop = e.errno
    try:
        carrier.sendmsg([b'x'], rights(a.fileno(), b.fileno()))
        parked += 2
    except OSError as e:
        stop = stop or e.errno
    a.close(); b.close()
print(parked, stop)
"""


def test_file_descriptors_in_flight_are_bounded(run: Run) -> None:
    result = run(FDS_IN_FLIGHT)
    assert result.outcome is Outcome.OK, result
    parked, stop = result.stdout.split()
    if backend_of(run) == "gvisor":
        # Stated difference (guarantees.NOT_ISOLATED): the Sentry has no unix_inflight
        # limit; what it parks is its own memory, inside the run's cgroup and cap.
        assert int(parked) >= 4000 and result.memory_peak_bytes is not None
        assert result.memory_peak_bytes <= FAST.memory_bytes
    else:
        # The kernel's bound on the run's own uid: RLIMIT_NOFILE, overshot by one message.
        assert stop == str(errno.ETOOMANYREFS).encode()
        assert int(parked) <= FAST.nofile + 253
