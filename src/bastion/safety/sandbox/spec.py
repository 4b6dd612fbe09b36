"""What a sandboxed run is given (:class:`RunSpec`, :class:`Limits`) and what it
returns (:class:`Result` with a normalised :class:`Outcome`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MiB = 1 << 20
# The interpreter sandboxed code runs with (the system's, read-only inside).
PYTHON = "/usr/bin/python3"


class Outcome(enum.StrEnum):
    """How a run ended, whatever the backend (stable strings: audited and shown)."""

    OK = "ok"  # exited 0
    EXIT = "exit"  # exited non-zero on its own
    WALL_TIMEOUT = "wall_timeout"  # killed at the wall-clock deadline
    CPU_LIMIT = "cpu_limit"  # SIGXCPU / SIGKILL at RLIMIT_CPU, or the cgroup's CPU time
    MEMORY_LIMIT = "memory_limit"  # OOM-killed in its cgroup, or MemoryError at the cap
    PIDS_LIMIT = "pids_limit"  # fork refused by the pids cgroup / RLIMIT_NPROC
    FSIZE_LIMIT = "fsize_limit"  # SIGXFSZ or EFBIG at RLIMIT_FSIZE
    OUTPUT_LIMIT = "output_limit"  # killed for writing more than the capture cap
    SECCOMP_VIOLATION = "seccomp_violation"  # killed by the seccomp filter (SIGSYS)
    SANDBOX_ERROR = "sandbox_error"  # the sandbox itself failed; nothing ran, or unknown


class Isolation(enum.IntEnum):
    """Isolation strength, weakest first; a configured minimum fails closed below it."""

    LANDLOCK = 1  # same kernel, no namespaces: Landlock + seccomp + rlimits + own uid
    NAMESPACES = 2  # bubblewrap: every namespace, seccomp, cgroup, rlimits, own uid
    GVISOR = 3  # gVisor's user-space kernel between the code and the host kernel
    MICROVM = 4  # a Firecracker microVM with its own guest kernel


@dataclass(frozen=True)
class Limits:
    """Per-run limits; the defaults are CHECKLIST M2's (256 MB, 5 s CPU)."""

    memory_bytes: int = 256 * MiB
    cpu_seconds: int = 5  # RLIMIT_CPU is whole seconds
    wall_seconds: float = 10.0
    pids: int = 64
    fsize_bytes: int = 16 * MiB
    nofile: int = 64
    tmpfs_bytes: int = 64 * MiB
    # Each of stdout and stderr; past it the run is killed (``output_limit``).
    output_bytes: int = 1 * MiB

    def __post_init__(self) -> None:
        if self.memory_bytes < 16 * MiB or self.cpu_seconds < 1 or self.wall_seconds <= 0:
            raise ValueError("limits too small to start a process")
        if min(self.pids, self.fsize_bytes, self.nofile, self.tmpfs_bytes) < 1:
            raise ValueError("limits must be positive")
        if self.output_bytes < 1:
            raise ValueError("output cap must be positive")


@dataclass(frozen=True)
class RunSpec:
    """A command to run in the sandbox; ``argv[0]`` is a path inside it (``/usr/bin/...``)."""

    argv: tuple[str, ...]
    stdin: bytes = b""
    limits: Limits = field(default_factory=Limits)
    # Added to the clean environment (PATH, HOME, LANG, TMPDIR); nothing else is inherited.
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0].startswith("/"):
            raise ValueError("argv[0] must be an absolute path inside the sandbox")
        if any("\0" in a for a in self.argv) or any("\0" in k + v for k, v in self.env):
            raise ValueError("NUL byte in argv or env")


@dataclass(frozen=True)
class Result:
    """What a run produced. ``stdout``/``stderr`` hold at most the capture cap."""

    outcome: Outcome
    backend: str
    exit_code: int | None = None  # the command's exit status when it exited
    signal: int | None = None  # the signal that ended it, when one did
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    wall_seconds: float = 0.0
    cpu_seconds: float | None = None  # from the run's cgroup, when there is one
    memory_peak_bytes: int | None = None
    detail: str = ""  # short, safe to show (never contains output)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def text(self, limit: int | None = None) -> str:
        """stdout as text: undecodable bytes replaced, so binary output is safe to show."""
        data = self.stdout if limit is None else self.stdout[:limit]
        return data.decode("utf-8", errors="replace")
