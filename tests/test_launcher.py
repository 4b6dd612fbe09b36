"""The embedded PostgreSQL launcher, on real servers started for each test."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bastion.db.launcher import SERVICE_USER, EmbeddedPostgres, PortInUse
from tests.conftest import short_tempdir

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def base(pg_template: EmbeddedPostgres) -> Iterator[Path]:
    path = short_tempdir("bastion-launch-")
    yield path / "pg"
    server = EmbeddedPostgres(path / "pg")
    server.stop()
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _server(base: Path, template: EmbeddedPostgres, **kwargs: object) -> EmbeddedPostgres:
    server = EmbeddedPostgres(base, **kwargs)  # type: ignore[arg-type]
    server.initdb(template=template)
    return server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_socket_dir_and_password_file_are_private(
    base: Path, pg_template: EmbeddedPostgres
) -> None:
    info = _server(base, pg_template).start()
    assert stat.S_IMODE(info.socket_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((base / "superuser.password").stat().st_mode) == 0o600
    assert stat.S_IMODE((base / "data").stat().st_mode) == 0o700
    assert (info.socket_dir / f".s.PGSQL.{info.port}").is_socket()
    hba = (base / "data" / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules)


def test_connection_without_password_is_refused(base: Path, pg_template: EmbeddedPostgres) -> None:
    port = _free_port()
    info = _server(base, pg_template, port=port).start()
    assert info.tcp
    for host in (str(info.socket_dir), "127.0.0.1"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", password="")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", password="x")
    with psycopg.connect(info.conninfo(via_tcp=True)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tcp_listens_only_when_asked(base: Path, pg_template: EmbeddedPostgres) -> None:
    info = _server(base, pg_template).start()
    assert not info.tcp
    with psycopg.connect(info.conninfo()) as conn:
        row = conn.execute("SELECT current_setting('listen_addresses')").fetchone()
    assert row == ("",)


def test_another_os_user_cannot_connect(base: Path, pg_template: EmbeddedPostgres) -> None:
    info = _server(base, pg_template).start()
    argv, env = EmbeddedPostgres(base).psql_argv()
    env = {"PATH": "/usr/bin:/bin", **env}
    # As the owner of the secret, with the password: works.
    ok = subprocess.run([*argv, "-tAc", "SELECT 42"], env=env, capture_output=True, text=True)
    assert ok.stdout.strip() == "42"
    if AS_ROOT:
        # Another OS user, even holding the password, cannot reach the socket.
        other = subprocess.run(
            [*argv, "-tAc", "SELECT 42"], env=env, capture_output=True, text=True, user="nobody"
        )
        assert other.returncode != 0
        assert "42" not in other.stdout
        assert "Permission denied" in other.stderr or "permission denied" in other.stderr.lower()
        read = subprocess.run(
            ["cat", str(base / "superuser.password")], capture_output=True, user="nobody"
        )
        assert read.returncode != 0 and read.stdout == b""
    else:
        assert stat.S_IMODE(info.socket_dir.stat().st_mode) & 0o077 == 0


def test_server_runs_as_dedicated_user_with_builtin_locale_and_mmap(
    base: Path, pg_template: EmbeddedPostgres
) -> None:
    info = _server(base, pg_template).start()
    uid = int(Path(f"/proc/{info.pid}/status").read_text().split("Uid:")[1].split()[0])
    if AS_ROOT:
        entry = pwd.getpwnam(SERVICE_USER)
        assert uid == entry.pw_uid != 0
        assert entry.pw_shell.endswith("nologin")
    else:
        assert uid == os.getuid()
    with psycopg.connect(info.conninfo()) as conn:
        dsm = conn.execute("SHOW dynamic_shared_memory_type").fetchone()
        locale = conn.execute(
            "SELECT datlocprovider, datlocale FROM pg_database WHERE datname = 'postgres'"
        ).fetchone()
        encryption = conn.execute("SHOW password_encryption").fetchone()
    assert dsm == ("mmap",)
    assert locale == ("b", "C.UTF-8")
    assert encryption == ("scram-sha-256",)


def test_modes_outside_base_dir_are_untouched(pg_template: EmbeddedPostgres) -> None:
    parent = short_tempdir("bastion-parent-")
    parent.chmod(0o751)
    before = stat.S_IMODE(parent.stat().st_mode)
    server = EmbeddedPostgres(parent / "pg")
    try:
        server.initdb(template=pg_template)
        server.start()
        assert stat.S_IMODE(parent.stat().st_mode) == before
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(parent)], check=False)


def test_data_survives_stop_start_and_kill9(base: Path, pg_template: EmbeddedPostgres) -> None:
    server = _server(base, pg_template)
    info = server.start()
    with psycopg.connect(info.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('before stop')")
    assert server.stop() is True
    assert server.status() is None
    info = server.start()
    with psycopg.connect(info.conninfo(), autocommit=True) as conn:
        conn.execute("INSERT INTO kept VALUES ('before kill -9')")
    os.kill(info.pid, signal.SIGKILL)
    _wait_gone(info.pid)
    assert (base / "data" / "postmaster.pid").exists()  # stale lock file left behind
    assert server.status() is None
    again = server.start()  # recovers: crash recovery replays the WAL
    assert again.pid != info.pid
    with psycopg.connect(again.conninfo()) as conn:
        rows = conn.execute("SELECT v FROM kept ORDER BY v").fetchall()
    assert rows == [("before kill -9",), ("before stop",)]


def test_two_processes_starting_at_once_share_one_server(
    base: Path, pg_template: EmbeddedPostgres
) -> None:
    _server(base, pg_template)  # initialised, not running
    code = (
        "import sys; from pathlib import Path; from bastion.db.launcher import EmbeddedPostgres; "
        "print(EmbeddedPostgres(Path(sys.argv[1])).start().pid)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(base)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    pids = {int(p.communicate(timeout=60)[0].strip()) for p in procs}
    assert len(pids) == 1
    status = EmbeddedPostgres(base).status()
    assert status is not None and status.pid in pids


def test_server_left_by_a_killed_parent_is_reused(
    base: Path, pg_template: EmbeddedPostgres
) -> None:
    _server(base, pg_template)
    code = (
        "import sys, time; from pathlib import Path; "
        "from bastion.db.launcher import EmbeddedPostgres; "
        "print(EmbeddedPostgres(Path(sys.argv[1])).start().pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(base)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.kill()  # kill -9 of the process that started the server
    parent.wait()
    info = EmbeddedPostgres(base).start()
    assert info.pid == pid  # the orphaned server is found and reused, not duplicated
    with psycopg.connect(info.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_busy_port_gives_a_clear_error(base: Path, pg_template: EmbeddedPostgres) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = _server(base, pg_template, port=port)
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start()
    assert server.status() is None


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not Path(f"/proc/{pid}").exists():
            return
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not exit")
