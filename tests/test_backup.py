"""Backups, WAL archiving and point-in-time restore (issue 20 item 2), on a real
embedded PostgreSQL of its own: a throwaway cluster under a Bastion home, the
backup taken by the real ``bastion db backup`` command, restores started with
the real server binaries. The session's shared ``database`` is not touched.

The scratch cluster uses 1 MB WAL segments (``pg_resetwal --wal-segsize``) so
that archiving and replay cost milliseconds (production keeps 16 MB), and lives
in RAM (``/dev/shm``) where there is one: each restore copies a whole data
directory, which a disk shared with other jobs makes take seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from bastion.backup import (
    BackupError,
    BaseBackup,
    base_backups,
    last_archived_commit,
    restore,
    take_base_backup,
    verify_backup,
)
from bastion.backup.cli import _report
from bastion.backup.drills import db_kill_drill
from bastion.cli import app
from bastion.db.launcher import EmbeddedPostgres
from bastion.db.service import embedded_server
from bastion.secrets.backends import open_key_ring
from bastion.settings import Settings
from tests.conftest import FAST_SETTINGS
from tests.test_drill_chart import assert_chart

SECRET = b"sk-live-provider-key-that-must-not-be-in-a-data-backup"


@dataclass
class Archived:
    root: Path
    location: Path
    settings: Settings
    env: dict[str, str]
    server: EmbeddedPostgres
    password: str
    backup: BaseBackup
    target: datetime  # after rows 1..50 committed, before 51..101


def _one_megabyte_segments(server: EmbeddedPostgres) -> None:
    owner = server.data_dir.stat()
    subprocess.run(
        [str(server.install_dir / "bin" / "pg_resetwal"), "--wal-segsize=1", str(server.data_dir)],
        check=True,
        capture_output=True,
        user=owner.st_uid,
        group=owner.st_gid,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )


def _switch_and_wait_archived(conn: psycopg.Connection[tuple[str | None]]) -> None:
    row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
    assert row is not None and row[0] is not None
    deadline = time.monotonic() + 20
    while True:
        done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
        if done is not None and (done[0] or "") >= row[0]:
            return
        assert time.monotonic() < deadline, "the segment was never archived"
        time.sleep(0.01)


def _listing(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


def _untouched(location: Path, before: dict[str, tuple[int, int]]) -> bool:
    """Nothing in ``location`` changed or appeared, except segments the running
    server went on archiving meanwhile (``archive_timeout`` after any write)."""
    after = _listing(location)
    new = set(after) - set(before)
    # Archiving a segment changes the wal/ folder itself, and basic_archive
    # writes each segment under a temporary name first, then renames it.
    archiving = {k for k in before if k == "wal" or k.startswith("wal/archtemp")}
    return all(after.get(k) == v for k, v in before.items() if k not in archiving) and all(
        k.startswith("wal/") for k in new
    )


def _linked_copy(location: Path, dest: Path) -> Path:
    """A copy whose files are hard links: cheap, and the original is untouched
    as long as a file is replaced (unlink + write), never written in place."""
    shutil.copytree(location, dest, copy_function=os.link)
    return dest


def _ram_or_tmp() -> Path:
    ram = Path("/dev/shm")
    return ram if ram.is_dir() else Path("/tmp")


def _scratch_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="bastion-backup-", dir=_ram_or_tmp()))
    root.chmod(0o711)  # the database's service user traverses it when we are root
    return root


@pytest.fixture(scope="module")
def archived(pg_template: EmbeddedPostgres) -> Iterator[Archived]:
    root = _scratch_root()
    location = root / "backup"
    settings = Settings(home=root / "home", backup_dir=location, backup_archive_timeout_seconds=1)
    env = {
        "BASTION_HOME": str(settings.home),
        "BASTION_BACKUP_DIR": str(location),
        "BASTION_BACKUP_ARCHIVE_TIMEOUT_SECONDS": "1",
    }
    server = embedded_server(settings)  # the app's own launcher: archiving on
    # Not under test: the durability of this machine's disk (the archive's own
    # temp-name-and-rename is basic_archive's, the base backup's sync pg_basebackup's).
    server.settings = {**server.settings, **FAST_SETTINGS}
    server.initdb(template=pg_template)
    _one_megabyte_segments(server)
    info = server.start()
    # Key material as an installation has it: a master key and a keystore
    # holding a provider key, beside the home (never inside it).
    open_key_ring(settings).keystore.set("provider/openai", SECRET)
    try:
        with psycopg.connect(info.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
            # `bastion db backup` minus its disk flush (not under test, slow on a shared disk).
            take_base_backup(location, info.conninfo(), sync=False)
            conn.execute("INSERT INTO ledger SELECT generate_series(1, 50)")
            target = datetime.now(UTC)
            conn.execute("INSERT INTO ledger SELECT generate_series(51, 100)")
            _switch_and_wait_archived(conn)
            conn.execute("INSERT INTO ledger VALUES (101)")
            _switch_and_wait_archived(conn)
        (backup,) = base_backups(location)
        yield Archived(root, location, settings, env, server, info.password, backup, target)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)  # the key dirs beside the home included


def _ids(server: EmbeddedPostgres) -> list[int]:
    info = server.start()  # already running (keep_running): attaches
    try:
        with psycopg.connect(info.conninfo()) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM ledger ORDER BY id").fetchall()]
    finally:
        server.stop()


def test_restore_to_a_time_recovers_exactly_the_rows_committed_before_it(
    archived: Archived,
) -> None:
    at_target = restore(
        archived.location,
        archived.target,
        archived.root / "at-target",
        password=archived.password,
        keep_running=True,
        settings=FAST_SETTINGS,
    )
    assert _ids(at_target) == list(range(1, 51))  # all before, none after

    newest = last_archived_commit(archived.location)
    assert newest is not None and newest > archived.target
    at_newest = restore(
        archived.location,
        newest,
        archived.root / "at-newest",
        password=archived.password,
        keep_running=True,
        settings=FAST_SETTINGS,
    )
    assert _ids(at_newest) == list(range(1, 102))  # up to the last archived commit


@pytest.mark.parametrize("where", ["before-backup-end", "after-last-archived-commit", "no-zone"])
def test_restore_target_outside_the_backup_range_is_refused_and_nothing_changes(
    archived: Archived, where: str
) -> None:
    newest = last_archived_commit(archived.location)
    assert newest is not None
    target = {
        "before-backup-end": (archived.backup.end_time - timedelta(milliseconds=1)).isoformat(),
        "after-last-archived-commit": (newest + timedelta(milliseconds=1)).isoformat(),
        "no-zone": archived.target.replace(tzinfo=None).isoformat(),
    }[where]
    into = archived.root / f"refused-{where}"
    before = _listing(archived.location)
    done = CliRunner().invoke(
        app,
        [
            "db",
            "restore",
            "--from",
            str(archived.location),
            "--to-time",
            target,
            "--into",
            str(into),
        ],
        env=archived.env,
    )
    assert done.exit_code == 1
    expected = {
        "before-backup-end": "before the end of the earliest base backup",
        "after-last-archived-commit": "after the newest archived commit",
        "no-zone": "needs a time zone",
    }[where]
    assert expected in done.stderr
    assert "Traceback" not in done.output
    assert not into.exists()  # nothing written
    assert _untouched(archived.location, before)  # the backup untouched


def test_verify_backup_passes_on_the_backup_and_fails_on_a_modified_file(
    archived: Archived,
) -> None:
    report = verify_backup(archived.location)
    assert report.segments >= 3 and report.last_commit is not None

    damaged = _linked_copy(archived.location, archived.root / "damaged")
    victim = archived.backup.path(damaged) / "postgresql.conf"
    content = bytearray(victim.read_bytes())
    content[0] ^= 0x01  # same size: only the manifest's SHA-256 tells
    victim.unlink()  # a new inode: the original backup keeps its file
    victim.write_bytes(bytes(content))
    with pytest.raises(BackupError, match="damaged"):
        verify_backup(damaged)
    done = CliRunner().invoke(app, ["db", "verify-backup", str(damaged)], env=archived.env)
    assert done.exit_code == 1 and "checksum mismatch" in done.stderr
    verify_backup(archived.location)  # the original is unharmed


def test_verify_backup_fails_on_a_missing_wal_segment(archived: Archived) -> None:
    gapped = _linked_copy(archived.location, archived.root / "gapped")
    report = verify_backup(gapped)
    size = (gapped / "wal" / report.first_segment).stat().st_size
    high, low = archived.backup.end_lsn.split("/")
    after_backup = ((int(high, 16) << 32) | int(low, 16)) // size + 1
    # After the base backup's own WAL (which pg_verifybackup checks): only the
    # chain check sees this gap; the newest segment is still there after it.
    middle = f"{int(report.first_segment[:16], 16):016X}{after_backup:08X}"
    assert middle < report.last_segment
    (gapped / "wal" / middle).unlink()
    with pytest.raises(BackupError, match=f"segment {middle} is missing"):
        verify_backup(gapped)
    with pytest.raises(BackupError, match="gap"):
        restore(gapped, archived.target, archived.root / "gapped-into", password=archived.password)
    assert not (archived.root / "gapped-into").exists()


def test_a_data_backup_holds_no_key_material(archived: Archived) -> None:
    settings = archived.settings
    master = settings.resolved_master_key_file.read_bytes()
    keystore = settings.resolved_keystore_file.read_bytes()
    assert len(master) >= 32 and len(keystore) > 64
    needles = {
        "master key": master,
        "master key (hex)": master.hex().encode(),
        "keystore": keystore[-64:],  # sealed secrets, past the file's fixed header
        "provider key": SECRET,
        "superuser password": archived.password.encode(),
    }
    files = [p for p in archived.location.rglob("*") if p.is_file()]
    assert len(files) > 100  # a whole data directory and its WAL
    for path in files:
        assert path.name not in {"master.key", "keystore.bin", "superuser.password"}
        data = path.read_bytes()
        for what, needle in needles.items():
            assert needle not in data, f"{what} found in {path}"

    # The key material goes elsewhere, and never into the data's places.
    inside = CliRunner().invoke(
        app, ["keys", "backup", "--to", str(archived.location / "keys")], env=archived.env
    )
    assert inside.exit_code == 1 and "kept apart from the data" in inside.stderr
    assert not (archived.location / "keys").exists()
    apart = archived.root / "key-backup"
    done = CliRunner().invoke(app, ["keys", "backup", "--to", str(apart)], env=archived.env)
    assert done.exit_code == 0, done.output
    assert (apart / "master.key").read_bytes() == master
    assert (apart / "keystore.bin").read_bytes() == keystore
    assert (apart / "master.key").stat().st_mode & 0o777 == 0o600


def test_a_drill_interrupted_by_ctrl_c_stops_its_server_removes_its_scratch_and_says_so(
    pg_template: EmbeddedPostgres,
) -> None:
    before = set(Path("/tmp").glob("bastion-drill-*"))
    seen: dict[str, object] = {}

    def press_ctrl_c_once_the_drill_writes() -> None:
        # As long as the drill may take to start its server and run: on a loaded
        # machine its server came up after a 60 s wait here had given up.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for scratch in set(Path("/tmp").glob("bastion-drill-*")) - before:
                with contextlib.suppress(OSError):
                    lines = (scratch / "pg" / "data" / "postmaster.pid").read_text().splitlines()
                    if len(lines) > 7 and lines[7].strip() == "ready":
                        seen.update(scratch=scratch, postmaster=int(lines[0]))
                        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, to this process
                        return
            time.sleep(0.02)

    presser = threading.Thread(target=press_ctrl_c_once_the_drill_writes, daemon=True)
    presser.start()
    result = db_kill_drill(before=60, template=pg_template)  # 60 s unless interrupted
    presser.join()
    assert result.interrupted and not result.passed
    assert "interrupted" in result.note and "never touched" in result.note
    assert isinstance(seen["scratch"], Path) and not seen["scratch"].exists()  # removed
    assert isinstance(seen["postmaster"], int)
    assert not _running(seen["postmaster"])  # its server stopped, not left running


def _running(pid: int) -> bool:
    try:  # an exited child not reaped yet is a zombie ("Z"): not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_backup_without_replication_rights_or_outside_the_archive_is_refused_and_writes_nothing(
    archived: Archived,
) -> None:
    info = archived.server.status()
    assert info is not None
    with psycopg.connect(info.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE ROLE backup_reader LOGIN PASSWORD 'reader-password'")
    reader = make_conninfo(info.conninfo(), user="backup_reader", password="reader-password")
    before = _listing(archived.location)
    with pytest.raises(BackupError, match=r"may not take a base backup.*REPLICATION"):
        take_base_backup(archived.location, reader)
    assert _untouched(archived.location, before)

    # The embedded server archives into BASTION_BACKUP_DIR: a base backup
    # anywhere else could never be rolled forward, so it is not taken.
    elsewhere = str(archived.root / "elsewhere")
    done = CliRunner().invoke(app, ["db", "backup", "--to", elsewhere], env=archived.env)
    assert done.exit_code == 1 and "archives its WAL to BASTION_BACKUP_DIR" in done.stderr
    assert not (archived.root / "elsewhere").exists()
    assert _untouched(archived.location, before)


def test_kill_9_of_the_database_under_writes_serves_again_within_10_s_losing_no_commit(
    pg_template: EmbeddedPostgres, tmp_path: Path
) -> None:
    result = db_kill_drill(
        before=0.5, after=0.3, template=pg_template, scratch_parent=_ram_or_tmp()
    )
    assert result.figures["rows_committed_before_kill"] > 0  # the kill landed under load
    assert result.figures["failed_writes"] > 0  # and the writes did see the outage
    assert result.figures["rows_lost"] == 0
    assert result.figures["rto_seconds"] <= 10
    assert result.passed and not result.interrupted
    # The chart's marks: the kill, then the restart, inside the writes' timeline.
    kill, restarted = result.marks["kill -9"], result.marks["restarted"]
    assert 0 < kill <= restarted < float(result.timeline[-1]["t"]) + 0.25
    # The command's report of this real run: JSON and, beside it, the PNG chart.
    _report("db-kill", result, True, tmp_path / "db-kill.json")
    assert json.loads((tmp_path / "db-kill.json").read_text())["marks"]["kill -9"] == kill
    assert_chart(tmp_path / "db-kill.png")


@pytest.fixture(scope="module")
def moto_s3(archived: Archived) -> Iterator[tuple[Any, dict[str, str]]]:
    """moto's server mode on 127.0.0.1 as the S3-compatible store; boto3 finds
    its (made-up) credentials in the environment, as in production."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        aws = {
            "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        client.create_bucket(Bucket="backups")
        env = {**archived.env, **aws, "BASTION_BACKUP_S3_ENDPOINT_URL": url}
        yield client, env
    finally:
        process.terminate()
        process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_backup_to_s3_verifies_restores_to_a_time_and_refuses_a_changed_object(
    archived: Archived, moto_s3: tuple[Any, dict[str, str]]
) -> None:
    s3, env = moto_s3
    cli = CliRunner()
    missing = cli.invoke(app, ["db", "backup", "--to", "s3://no-such-bucket/x"], env=env)
    assert missing.exit_code == 1 and "does not exist" in missing.stderr, missing.output
    assert "Traceback" not in missing.output

    done = cli.invoke(app, ["db", "backup", "--to", "s3://backups/prod"], env=env)
    assert done.exit_code == 0, done.output
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="backups")["Contents"]}
    (record,) = [k for k in keys if re.fullmatch(r"prod/base/[0-9TZ]+\.json", k)]
    stamp = record[len("prod/base/") : -len(".json")]
    assert f"prod/base/{stamp}.tar" in keys
    assert any(re.fullmatch(r"prod/wal/[0-9A-F]{24}", k) for k in keys)
    head = s3.head_object(Bucket="backups", Key=record, ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] and head.get("ChecksumSHA256")  # server-side checksum

    # Commits after the backup reach the bucket by backup-sync.
    info = archived.server.status()
    assert info is not None
    with psycopg.connect(info.conninfo(), autocommit=True) as conn:
        conn.execute("INSERT INTO ledger SELECT generate_series(1001, 1010)")
        target = datetime.now(UTC)
        conn.execute("INSERT INTO ledger VALUES (1011)")
        _switch_and_wait_archived(conn)
    synced = cli.invoke(app, ["db", "backup-sync", "--to", "s3://backups/prod"], env=env)
    assert synced.exit_code == 0 and "new WAL file(s)" in synced.stdout, synced.output
    again = cli.invoke(app, ["db", "backup-sync", "--to", "s3://backups/prod"], env=env)
    assert again.exit_code == 0 and again.stdout.startswith("0 new"), again.output

    verified = cli.invoke(app, ["db", "verify-backup", "s3://backups/prod"], env=env)
    assert verified.exit_code == 0, verified.output
    assert f"backup {stamp} verified" in verified.stdout

    into = archived.root / "from-s3"
    restored = cli.invoke(
        app,
        ["db", "restore", "--from", "s3://backups/prod", "--to-time", target.isoformat(),
         "--into", str(into)],
        env=env,
    )  # fmt: skip
    assert restored.exit_code == 0, restored.output
    assert _ids(EmbeddedPostgres(into, settings=FAST_SETTINGS)) == [
        *range(1, 102), *range(1001, 1011)
    ]  # fmt: skip

    # One object changed in the bucket (its recorded metadata kept): refused.
    victim = f"prod/base/{stamp}.tar"
    original = s3.get_object(Bucket="backups", Key=victim)
    content = bytearray(original["Body"].read())
    content[-1] ^= 0x01  # same size, in the tar's zero padding: only the digest tells
    s3.put_object(Bucket="backups", Key=victim, Body=bytes(content),
                  Metadata=original["Metadata"])  # fmt: skip
    damaged = cli.invoke(app, ["db", "verify-backup", "s3://backups/prod"], env=env)
    assert damaged.exit_code == 1 and "changed in the bucket" in damaged.stderr, damaged.output
    # And a sync never overwrites a segment the bucket holds with other content.
    segment = sorted(k for k in keys if re.fullmatch(r"prod/wal/[0-9A-F]{24}", k))[-1]
    s3.put_object(Bucket="backups", Key=segment, Body=b"x",
                  Metadata={"sha256": "0" * 64})  # fmt: skip
    refused = cli.invoke(app, ["db", "backup-sync", "--to", "s3://backups/prod"], env=env)
    assert refused.exit_code == 1 and "refusing to overwrite" in refused.stderr, refused.output
    assert s3.get_object(Bucket="backups", Key=segment)["Body"].read() == b"x"
