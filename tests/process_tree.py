"""Which processes a process started, from /proc (Linux): for tests that prove
no child outlives its job."""

from __future__ import annotations

import os
from pathlib import Path


def children(pid: int) -> list[int]:
    """The live (not zombie) children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def forked_by_forkserver(pid: int = 0) -> list[int]:
    """The live children of the multiprocessing forkserver that ``pid`` (default:
    this process) started: the runs of :func:`bastion.limited_process.run_limited`."""
    found = []
    for child in children(pid or os.getpid()):
        if "multiprocessing.forkserver" in cmdline(child):
            found.extend(children(child))
    return found
