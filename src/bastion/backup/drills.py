"""Disaster drills on a scratch server: a point-in-time restore and a kill -9.

Each drill builds its own embedded PostgreSQL in a scratch directory (the
installation's own database is never touched), writes a steady stream of
committed rows, causes the disaster and measures what the issue's targets
name (issue 20):

* ``pitr``: WAL archiving on, a base backup, rows; then a restore to the time
  of the last committed row. RPO = that time minus the commit time of the
  newest row recovered (target ≤ 1 s); also the archive lag, the RPO when the
  server is lost outright (bounded by ``archive_timeout``).
* ``db-kill``: rows under steady load, ``kill -9`` of the postmaster, restart
  through the launcher. RTO = kill to the next committed row (target ≤ 10 s);
  every acknowledged row must be there afterwards (target 0 lost).

Each reports its figures, the targets, and the writes per quarter second (ok
and failed) as JSON. Ctrl-C stops the drill, brings a killed server back up,
stops the scratch servers and removes the scratch directory; the result says
it was interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bastion.backup import last_archived_commit, restore, take_base_backup
from bastion.db.launcher import EmbeddedPostgres, LauncherError

BIN_SECONDS = 0.25
RPO_TARGET_SECONDS = 1.0
RTO_TARGET_SECONDS = 10.0
SCRATCH_SERVERS = ("pg", "restored")
# Short (a Unix socket path is at most 107 bytes) and searchable by the
# database's service user when we are root, unlike a private TMPDIR.
SCRATCH_PARENT = Path("/tmp")  # noqa: S108 - a fresh 0711 mkdtemp directory under it


@dataclass
class DrillResult:
    """A drill's figures, their targets, the writes (or requests) over time and
    the incident's moments on that time axis (``marks``: label to seconds)."""

    name: str
    figures: dict[str, float | int] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    passed: bool = False
    interrupted: bool = False
    note: str = ""
    timeline: list[dict[str, float | int]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, label: str, seconds: float) -> None:
        self.marks[label] = round(seconds, 3)

    def as_json(self) -> dict[str, Any]:
        return {
            "drill": self.name,
            "passed": self.passed,
            "interrupted": self.interrupted,
            "note": self.note,
            "figures": self.figures,
            "targets": self.targets,
            "timeline": self.timeline,
            "marks": self.marks,
        }


class _Writer(threading.Thread):
    """Inserts one row at a time, each its own committed transaction; keeps the
    ids the server acknowledged and the time and outcome of every attempt."""

    def __init__(self, conninfo: str, pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.conninfo = conninfo
        self.pause = pause
        self.stop = threading.Event()
        self.acked: list[int] = []
        self.attempts: list[tuple[float, bool]] = []
        self.first_ok_after: dict[float, float] = {}
        self.started = time.monotonic()

    def run(self) -> None:
        next_id = 1
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=2)
                conn.execute("INSERT INTO drill_rows (id) VALUES (%s)", (next_id,))
                self.acked.append(next_id)
                self.attempts.append((time.monotonic(), True))
            except psycopg.Error:
                self.attempts.append((time.monotonic(), False))
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                time.sleep(0.02)
            next_id += 1  # an id is never reused: an unacknowledged one may be in
            time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def back_since(self, moment: float) -> float | None:
        """When writes succeeded again after the first failure after ``moment``
        (a backend of a killed postmaster may still commit for an instant)."""
        attempts = [(t, ok) for t, ok in list(self.attempts) if t > moment]
        first_fail = next((t for t, ok in attempts if not ok), None)
        if first_fail is None:
            return None
        return next((t for t, ok in attempts if ok and t > first_fail), None)

    def timeline(self, origin: float) -> list[dict[str, float | int]]:
        bins: dict[int, list[int]] = {}
        for moment, ok in self.attempts:
            slot = bins.setdefault(int((moment - origin) / BIN_SECONDS), [0, 0])
            slot[0 if ok else 1] += 1
        return [
            {"t": round(k * BIN_SECONDS, 2), "ok": v[0], "failed": v[1]}
            for k, v in sorted(bins.items())
        ]


@contextlib.contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bastion-drill-", dir=parent))
    root.chmod(0o711)  # the database's service user traverses it when we are root
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start_scratch(server: EmbeddedPostgres, template: EmbeddedPostgres | None) -> str:
    server.initdb(template=template)
    info = server.start()
    with psycopg.connect(info.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE drill_rows (id bigint PRIMARY KEY)")
    return info.conninfo()


def _stop_scratch_servers(root: Path) -> None:
    """Stop whatever server a drill started under ``root``, wherever it was
    interrupted (before its own variables were even assigned)."""
    for base in SCRATCH_SERVERS:
        with contextlib.suppress(LauncherError):
            EmbeddedPostgres(root / base).stop()


def pitr_drill(
    *,
    seconds: float = 3.0,
    archive_timeout: int = 1,
    template: EmbeddedPostgres | None = None,
    scratch_parent: Path = SCRATCH_PARENT,
) -> DrillResult:
    """Archive, back up, write rows, restore to the last commit; measure the RPO."""
    result = DrillResult(
        "pitr",
        targets={"rpo_seconds": f"<= {RPO_TARGET_SECONDS:g}", "rows_lost": "0"},
    )
    writer: _Writer | None = None
    with _scratch(scratch_parent) as root:
        try:
            location = root / "backup"
            source = EmbeddedPostgres(
                root / "pg",
                archive_dir=location / "wal",
                archive_timeout=archive_timeout,
                settings={"track_commit_timestamp": "on"},
            )
            conninfo = _start_scratch(source, template)
            take_base_backup(location, conninfo)
            writer = _Writer(conninfo)
            writer.start()
            time.sleep(seconds)
            writer.stop.set()
            writer.join()
            result.mark("writes stop", time.monotonic() - writer.started)
            with psycopg.connect(conninfo) as conn:
                row = conn.execute(
                    "SELECT max(pg_xact_commit_timestamp(xmin)) FROM drill_rows"
                ).fetchone()
            if row is None or row[0] is None:
                raise LauncherError("the drill committed no row")
            last_commit: datetime = row[0]
            stopped = time.monotonic()
            while (last_archived_commit(location) or last_commit) < last_commit:
                if time.monotonic() - stopped > archive_timeout * 5 + 10:
                    raise LauncherError("the archive did not catch up with the last commit")
                time.sleep(0.05)
            archive_lag = time.monotonic() - stopped
            began = time.monotonic()
            restored = restore(
                location,
                last_commit,
                root / "restored",
                password=source.password_file.read_text(),
                keep_running=True,
                settings={"track_commit_timestamp": "on"},
            )
            restore_seconds = time.monotonic() - began
            info = restored.start()
            with psycopg.connect(info.conninfo()) as conn:
                found = conn.execute(
                    "SELECT count(*), max(pg_xact_commit_timestamp(xmin)), "
                    "array_agg(id) FROM drill_rows"
                ).fetchone()
            assert found is not None
            present = set(found[2] or [])
            recovered_last: datetime | None = found[1]
            rpo = (
                (last_commit - recovered_last).total_seconds()
                if recovered_last is not None
                else float("inf")
            )
            result.figures = {
                "rows_committed": len(writer.acked),
                "rows_recovered": int(found[0]),
                "rows_lost": len(set(writer.acked) - present),
                "rpo_seconds": round(rpo, 6),
                "archive_lag_seconds": round(archive_lag, 3),
                "archive_timeout_seconds": archive_timeout,
                "restore_seconds": round(restore_seconds, 3),
            }
            result.passed = rpo <= RPO_TARGET_SECONDS and result.figures["rows_lost"] == 0
            result.note = (
                "archive lag: the RPO had the server been lost outright "
                "(bounded by archive_timeout plus archiving time)"
            )
        except KeyboardInterrupt:
            result.interrupted = True
            result.note = _restored_note()
        finally:
            if writer is not None:
                writer.stop.set()
                writer.join(timeout=5)
                result.timeline = writer.timeline(writer.started)
            _stop_scratch_servers(root)
    return result


def db_kill_drill(
    *,
    before: float = 1.5,
    after: float = 1.5,
    template: EmbeddedPostgres | None = None,
    scratch_parent: Path = SCRATCH_PARENT,
) -> DrillResult:
    """Write rows, kill -9 the postmaster, restart it; measure RTO and rows lost."""
    result = DrillResult(
        "db-kill",
        targets={"rto_seconds": f"<= {RTO_TARGET_SECONDS:g}", "rows_lost": "0"},
    )
    server: EmbeddedPostgres | None = None
    writer: _Writer | None = None
    killed = False
    with _scratch(scratch_parent) as root:
        try:
            server = EmbeddedPostgres(root / "pg")
            conninfo = _start_scratch(server, template)
            writer = _Writer(conninfo)
            writer.start()
            time.sleep(before)
            info = server.status()
            assert info is not None
            acked_before = len(writer.acked)
            kill_at = time.monotonic()
            os.kill(info.pid, signal.SIGKILL)
            killed = True
            result.mark("kill -9", kill_at - writer.started)
            _wait_dead(server, info.pid)  # what a supervisor learns from SIGCHLD
            server.start()
            killed = False
            restarted = time.monotonic() - kill_at
            result.mark("restarted", kill_at + restarted - writer.started)
            deadline = kill_at + RTO_TARGET_SECONDS * 3
            while (first_ok := writer.back_since(kill_at)) is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            time.sleep(after)
            writer.stop.set()
            writer.join()
            if first_ok is None:
                raise LauncherError(
                    f"the database did not serve again within {RTO_TARGET_SECONDS * 3:g} s "
                    "of the kill"
                )
            with psycopg.connect(conninfo) as conn:
                rows = conn.execute("SELECT id FROM drill_rows").fetchall()
            present = {r[0] for r in rows}
            lost = len(set(writer.acked) - present)
            rto = first_ok - kill_at
            failed = sum(1 for _, ok in writer.attempts if not ok)
            result.figures = {
                "rows_committed_before_kill": acked_before,
                "rows_committed": len(writer.acked),
                "rows_lost": lost,
                "rto_seconds": round(rto, 3),
                "restart_seconds": round(restarted, 3),
                "failed_writes": failed,
            }
            result.passed = rto <= RTO_TARGET_SECONDS and lost == 0
        except KeyboardInterrupt:
            result.interrupted = True
            if killed and server is not None:
                server.start()  # the drill killed it: bring it back before leaving
            result.note = _restored_note()
        finally:
            if writer is not None:
                writer.stop.set()
                writer.join(timeout=5)
                result.timeline = writer.timeline(writer.started)
            _stop_scratch_servers(root)
    return result


def _wait_dead(server: EmbeddedPostgres, pid: int) -> None:
    """Return once the killed postmaster is gone (reaped, if it is our child)."""
    deadline = time.monotonic() + RTO_TARGET_SECONDS
    while server.status() is not None and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.005)


def _restored_note() -> str:
    return (
        "interrupted: the drill's writes stopped, a scratch server it had killed was "
        "started again, every scratch server stopped and the scratch directory removed; "
        "the installation's own database was never touched"
    )
