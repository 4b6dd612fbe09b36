"""Base backups, continuous WAL archiving and point-in-time recovery.

PostgreSQL 18 docs §25.3 ("Continuous Archiving and Point-in-Time Recovery"):
a base backup (``pg_basebackup``, plain format, with a SHA-256 backup
manifest) plus every WAL segment archived after it rebuilds the database as it
was at any committed moment between the backup's end and the last archived
commit. The embedded server archives through the bundled ``basic_archive``
module (temporary name, fsync, rename; a different file of the same name is
never overwritten): see :class:`bastion.db.launcher.EmbeddedPostgres`.

A backup location holds data only::

    DIR/wal/                  the WAL archive (written by the server)
    DIR/base/<stamp>/         one base backup: a data directory + backup_manifest
    DIR/base/<stamp>.json     its start and end LSN, timeline and end time

Key material (the keystore, the master key, the embedded server's superuser
password file) lives outside the home and is never copied here: a stolen data
backup decrypts nothing, and ``tenant shred`` holds for it. ``bastion keys
backup`` copies the key material to another place of the operator's choosing.

Every refusal happens before anything is written: a restore target outside
the backup's range, a target directory that is not empty, a broken WAL chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from bastion.db.launcher import EmbeddedPostgres, LauncherError, pg_install_dir
from bastion.errors import BastionError, Kind

WAL_DIR = "wal"
BASE_DIR = "base"
# A WAL segment file name: timeline, log and segment, 8 hex digits each.
_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
# pg_waldump's transaction records: "COMMIT 2026-12-06 16:44:14.123456 UTC".
_COMMIT = re.compile(
    r"\b(?:COMMIT|ABORT)(?:_PREPARED)? (?:\d+: )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC"
)


class BackupError(BastionError):
    """A backup, a verification or a restore was refused or failed."""

    slug = "backup-refused"
    title = "Backup or restore refused"
    kind = Kind.UNPROCESSABLE


@dataclass(frozen=True)
class BaseBackup:
    """One base backup and the WAL range it needs to be consistent."""

    name: str
    timeline: int
    start_lsn: str
    end_lsn: str
    end_time: datetime  # wall clock after the backup and its last WAL were archived

    def path(self, location: Path) -> Path:
        return location / BASE_DIR / self.name

    def to_json(self) -> str:
        record = asdict(self)
        record["end_time"] = self.end_time.isoformat()
        return json.dumps(record, indent=1)


@dataclass(frozen=True)
class ArchiveReport:
    """What ``verify_backup`` found: the backup checked and the WAL chain after it."""

    backup: BaseBackup
    segments: int
    first_segment: str
    last_segment: str
    last_commit: datetime | None


# -- taking a backup ---------------------------------------------------------------


def take_base_backup(
    location: Path,
    conninfo: str,
    *,
    install_dir: Path | None = None,
    stream_wal: bool = False,
    sync: bool = True,
) -> BaseBackup:
    """Run ``pg_basebackup`` into ``location/base/<stamp>`` and return its record.

    ``conninfo`` is a libpq string of a role allowed to replicate (a superuser
    or a role WITH REPLICATION). Without ``stream_wal`` the backup relies on
    the server's WAL archive (the embedded server's ``archive_dir``): the
    server returns only once the backup's last segment is archived. With it,
    the WAL the backup needs is copied into it (an external server whose
    archive is not ours). Written under a temporary name and renamed when
    complete, so a failed run leaves no half backup behind. ``sync=False``
    skips flushing the files to disk (tests on a throwaway disk only).
    """
    _require_replication(conninfo)
    base = location / BASE_DIR
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    partial = base / f".{stamp}.partial"
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    password = str(params.pop("password", "") or "")
    argv = [
        _bin("pg_basebackup", install_dir),
        "--dbname",
        psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items() if v is not None}),
        "--pgdata",
        str(partial),
        "--format=plain",
        "--checkpoint=fast",
        "--manifest-checksums=SHA256",
        "--wal-method=stream" if stream_wal else "--wal-method=none",
        "--no-password",
        *([] if sync else ["--no-sync"]),
    ]
    # The password goes through the environment, never argv (visible in ps).
    env = {**_tool_env(), **({"PGPASSWORD": password} if password else {})}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise BackupError(f"pg_basebackup failed: {done.stderr.strip()[-1000:]}")
    timeline, start_lsn, end_lsn = _manifest_wal_range(partial / "backup_manifest")
    record = BaseBackup(stamp, timeline, start_lsn, end_lsn, datetime.now(UTC))
    (base / f"{stamp}.json").write_text(record.to_json())
    partial.rename(base / stamp)
    _fsync_dir(base)
    return record


def _require_replication(conninfo: str) -> None:
    try:
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT current_user, rolreplication OR rolsuper FROM pg_roles "
                "WHERE rolname = current_user"
            ).fetchone()
    except psycopg.Error as exc:
        raise BackupError(f"cannot connect to the database: {type(exc).__name__}") from None
    if row is None or not row[1]:
        who = row[0] if row else "this role"
        raise BackupError(
            f"the role {who!r} may not take a base backup: pg_basebackup needs a superuser "
            f"or a role WITH REPLICATION (ALTER ROLE {who} REPLICATION) and a replication "
            "line in pg_hba.conf; ask the database's operator, or use their backups"
        )


def base_backups(location: Path) -> list[BaseBackup]:
    """Return the complete base backups in ``location``, oldest first."""
    found = []
    for meta in sorted((location / BASE_DIR).glob("*.json")):
        if not (meta.with_suffix("")).is_dir():
            continue
        record = json.loads(meta.read_text())
        record["end_time"] = datetime.fromisoformat(record["end_time"])
        found.append(BaseBackup(**record))
    return found


# -- verifying ---------------------------------------------------------------------


def verify_backup(
    location: Path, *, backup: BaseBackup | None = None, install_dir: Path | None = None
) -> ArchiveReport:
    """Check a base backup and the WAL chain after it; raise :class:`BackupError`.

    ``pg_verifybackup`` checks every file against the manifest's SHA-256 and
    parses the WAL the backup needs; then every segment from the backup's start
    to the newest archived one must be present (no gap) and parse.
    """
    backup = backup or _latest(location)
    wal = location / WAL_DIR
    done = subprocess.run(
        [
            _bin("pg_verifybackup", install_dir),
            "--wal-directory",
            str(wal),
            str(backup.path(location)),
        ],
        capture_output=True,
        text=True,
        env=_tool_env(),
        check=False,
    )
    if done.returncode != 0:
        raise BackupError(f"base backup {backup.name} is damaged: {done.stderr.strip()[-1000:]}")
    chain = _wal_chain(wal, backup)
    _waldump(wal, chain[0], chain[-1], install_dir, start_lsn=backup.start_lsn)
    return ArchiveReport(
        backup,
        len(chain),
        chain[0],
        chain[-1],
        last_archived_commit(location, backup=backup, install_dir=install_dir),
    )


def _wal_chain(wal: Path, backup: BaseBackup) -> list[str]:
    """Return the archived segments of the backup's timeline from its start on,
    or raise if one is missing in between."""
    segments = sorted(
        p.name
        for p in wal.iterdir()
        if _SEGMENT.match(p.name) and int(p.name[:8], 16) == backup.timeline
    )
    if not segments:
        raise BackupError("the WAL archive holds no segment of the backup's timeline")
    size = (wal / segments[0]).stat().st_size  # every archived segment is whole
    per_log = 0x1_0000_0000 // size
    first = _lsn(backup.start_lsn) // size
    numbers = {_name_number(name, per_log): name for name in segments}
    last = max(numbers)
    missing = [n for n in range(first, last + 1) if n not in numbers]
    if missing:
        name = _number_name(backup.timeline, missing[0], per_log)
        raise BackupError(
            f"the WAL archive has a gap: segment {name} is missing "
            f"({len(missing)} segment(s) missing after the base backup)"
        )
    return [numbers[n] for n in range(first, last + 1)]


def last_archived_commit(
    location: Path, *, backup: BaseBackup | None = None, install_dir: Path | None = None
) -> datetime | None:
    """Return the time of the newest commit (or abort) in the archive, or None.

    This is the latest moment a restore can reach: the end of the backup's
    range. Scans the newest segments first and stops at the first with one.
    """
    backup = backup or _latest(location)
    wal = location / WAL_DIR
    chain = _wal_chain(wal, backup)
    for name in reversed(chain):
        stamps = _COMMIT.findall(_waldump(wal, name, name, install_dir, transactions=True))
        if stamps:
            return datetime.fromisoformat(stamps[-1]).replace(tzinfo=UTC)
    return None


def _waldump(
    wal: Path,
    first: str,
    last: str,
    install_dir: Path | None,
    *,
    start_lsn: str | None = None,
    transactions: bool = False,
) -> str:
    """Run pg_waldump over the segments ``first``..``last`` (each record's CRC is
    checked as it is read); return its output or raise on damaged WAL."""
    argv = [_bin("pg_waldump", install_dir), "--path", str(wal)]
    argv += ["--rmgr=Transaction"] if transactions else ["--quiet"]
    if start_lsn is not None:
        argv += ["--start", start_lsn]
    done = subprocess.run(
        [*argv, first, last], capture_output=True, text=True, env=_tool_env(), check=False
    )
    # A record running on into the next, not yet archived, segment ends the
    # newest one early: that is the archive's edge, not damage.
    if done.returncode != 0 and "could not find file" not in done.stderr:
        raise BackupError(f"the WAL archive is damaged: {done.stderr.strip()[-500:]}")
    return done.stdout


# -- restoring ---------------------------------------------------------------------


def restore(
    location: Path,
    target_time: datetime,
    into: Path,
    *,
    password: str,
    install_dir: Path | None = None,
    timeout: float = 120.0,
    keep_running: bool = False,
    settings: dict[str, str] | None = None,
    own_archive: bool = False,
) -> EmbeddedPostgres:
    """Rebuild the database as it was at ``target_time`` into the launcher base
    directory ``into`` (PostgreSQL 18 docs §25.3.5), then promote it.

    Refused, with nothing written, when ``target_time`` has no time zone, lies
    before the end of every base backup or after the newest archived commit,
    when the WAL chain is broken, or when ``into`` is not empty. ``password``
    becomes the restored server's superuser password file (the backup holds
    none). Returns the launcher of the restored server, stopped unless
    ``keep_running``. ``own_archive``: ``location`` is a private download (an
    S3 backup): its WAL is handed to the server's user, whose
    ``restore_command`` reads it.
    """
    target_time = _aware(target_time)
    backup = backup_for(base_backups(location), target_time)
    report = verify_backup(location, backup=backup, install_dir=install_dir)
    if report.last_commit is None:
        raise BackupError(
            "the target time is after the newest archived commit: none has been archived "
            "since the base backup yet (each is, at most archive_timeout after it commits)"
        )
    if target_time > report.last_commit:
        raise BackupError(
            f"the target time is after the newest archived commit "
            f"({report.last_commit.isoformat()}): the archive cannot prove what happened "
            "later; choose a time at or before it"
        )
    if into.exists() and any(into.iterdir()):
        raise BackupError(f"{into} is not empty: restore into a new directory")
    wal = location / WAL_DIR
    recovery = {
        # cp exits non-zero for a segment not in the archive: the end of it.
        "restore_command": f"cp {_percent_escaped(wal)}/%f %p",
        "recovery_target_timeline": str(backup.timeline),
    }
    if target_time < report.last_commit:
        # Replay stops before the first commit later than the target (inclusive).
        recovery["recovery_target_time"] = target_time.isoformat(sep=" ")
        recovery["recovery_target_action"] = "promote"
    # else the target is the newest archived commit: replay all of the archive
    # (a time target needs a later commit to stop at, and there is none).
    server = EmbeddedPostgres(
        into, install_dir=install_dir, settings={**recovery, **(settings or {})}
    )
    try:
        server.adopt_data_dir(backup.path(location), password)
        signal_file = server.data_dir / "recovery.signal"
        signal_file.touch()
        owner = server.data_dir.stat()
        os.chown(signal_file, owner.st_uid, owner.st_gid)
        if own_archive:
            for path in [wal, *wal.iterdir()]:
                os.chown(path, owner.st_uid, owner.st_gid)
        info = server.start(timeout=timeout)
        _wait_promoted(server, info.conninfo(), timeout)
    except BaseException as exc:  # Ctrl-C included: never leave a half-restored server up
        with contextlib.suppress(LauncherError):
            server.stop()
        if isinstance(exc, LauncherError | BackupError):
            raise BackupError(f"the restore did not complete: {exc}") from None
        raise
    if not keep_running:
        server.stop()
    # The restored server starts normally from now on: no recovery settings.
    return EmbeddedPostgres(into, install_dir=install_dir, settings=settings)


def _aware(target_time: datetime) -> datetime:
    if target_time.tzinfo is None:
        raise BackupError("the target time needs a time zone (e.g. 2026-01-31T12:00:00Z)")
    return target_time.astimezone(UTC)


def backup_for(backups: list[BaseBackup], target_time: datetime) -> BaseBackup:
    """Return the newest of ``backups`` (oldest first) that ended by ``target_time``."""
    target_time = _aware(target_time)
    candidates = [b for b in backups if b.end_time <= target_time]
    if not candidates:
        earliest = min((b.end_time for b in backups), default=None)
        raise BackupError(
            "the target time is before the end of the earliest base backup"
            + (f" ({earliest.isoformat()})" if earliest else " (there is none)")
            + ": nothing to restore from"
        )
    return candidates[-1]


def _wait_promoted(server: EmbeddedPostgres, conninfo: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.status() is None:
            tail = server.log_file.read_text(errors="replace").splitlines()[-5:]
            raise BackupError("the server stopped during recovery: " + " | ".join(tail))
        with (
            contextlib.suppress(psycopg.OperationalError),
            psycopg.connect(conninfo, connect_timeout=5) as conn,
        ):
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return
        if time.monotonic() > deadline:
            raise BackupError("the restored server did not finish recovery in time")
        time.sleep(0.05)


# -- helpers -----------------------------------------------------------------------


def _latest(location: Path) -> BaseBackup:
    found = base_backups(location)
    if not found:
        raise BackupError(f"no base backup in {location} (bastion db backup --to {location})")
    return found[-1]


def _manifest_wal_range(manifest: Path) -> tuple[int, str, str]:
    ranges = json.loads(manifest.read_text())["WAL-Ranges"]
    return int(ranges[0]["Timeline"]), ranges[0]["Start-LSN"], ranges[-1]["End-LSN"]


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def _name_number(name: str, per_log: int) -> int:
    return int(name[8:16], 16) * per_log + int(name[16:24], 16)


def _number_name(timeline: int, number: int, per_log: int) -> str:
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def _percent_escaped(path: Path) -> str:
    # restore_command runs through sh; PostgreSQL expands %-escapes first.
    return shlex.quote(str(path)).replace("%", "%%")


def _bin(name: str, install_dir: Path | None) -> str:
    return str((install_dir or pg_install_dir()) / "bin" / name)


def _tool_env() -> dict[str, str]:
    # A clean environment (nothing of ours leaks into the tools), times in UTC.
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
