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
