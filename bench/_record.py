"""Record a benchmark's headline figures, with the machine and date, for bench/report.py.

Each bench script calls :func:`record` where it prints its results. The file
``bench/results/<name>.json`` is replaced on every run; ``bench/report.py``
renders ``docs/benchmarks.md`` from those files. The results are committed
with the docs, so the page and its sources travel together.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypedDict

RESULTS = Path(os.environ.get("BASTION_BENCH_RESULTS", Path(__file__).parent / "results"))


class Row(TypedDict, total=False):
    """One headline figure: what was measured, the result, and the target if there is one."""

    figure: str
    result: str
    target: str


def row(figure: str, result: str, target: str = "") -> Row:
    made = Row(figure=figure, result=result)
    if target:
        made["target"] = target
    return made


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def host() -> dict[str, object]:
    """Facts about the machine a figure was measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": _commit(),
    }


def record(name: str, rows: list[Row], notes: str = "", output: str = "") -> Path:
    """Write ``bench/results/<name>.json``: the rows, the command, the host and the date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {
        "bench": name,
        "date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "host": host(),
        "rows": rows,
        "notes": notes,
    }
    if output:
        document["output"] = output
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


class _Tee:
    """Copies what a script prints, so its whole report can be recorded at exit."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self._partial = ""
        self.failed = False

    def write(self, text: str) -> int:
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        self.lines.extend(done)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


def record_output(name: str, rows: list[Row] | None = None) -> None:
    """Record everything the script prints from now on as ``bench/results/<name>.json``.

    For scripts whose report is a long table: the output is kept verbatim (as
    ``output``) and written when the script exits normally; a run that dies
    with an exception records nothing, so a broken run never replaces a good one.
    """
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    previous_hook = sys.excepthook

    def on_exception(*args: Any) -> None:
        tee.failed = True
        previous_hook(*args)

    def at_exit() -> None:
        sys.stdout = tee.stream
        if tee.failed:
            return
        text = "\n".join([*tee.lines, tee._partial]).strip("\n")
        record(name, rows or [], output=text)

    sys.excepthook = on_exception
    atexit.register(at_exit)
