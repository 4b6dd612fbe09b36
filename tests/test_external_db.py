"""``DATABASE_URL``: an external PostgreSQL instead of the embedded one.

Each bad target must fail with one clear line, exit non-zero, and leave
nothing half-created.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bastion.db.launcher import EmbeddedPostgres, ServerInfo, pg_install_dir
from tests.conftest import FAST_SETTINGS, short_tempdir


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bastion(home: Path, *args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    # Development mode: these tests hand the server's password in the URL.
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "DATABASE_URL": database_url,
        "BASTION_DEV_MODE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Development mode says once that it allows the literal (names only);
    # these tests look at the lines after it.
    kept = [line for line in result.stderr.splitlines() if "literal_secrets_allowed" not in line]
    result.stderr = "\n".join(kept) + ("\n" if kept else "")
    return result


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_tempdir("bastion-ext-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tcp_server(
    home: Path, pg_template: EmbeddedPostgres, request: pytest.FixtureRequest
) -> Iterator[ServerInfo]:
    """A server of its own on TCP; ``without_pgvector`` builds it from an install lacking it."""
    install = None
    if getattr(request, "param", None) == "without_pgvector":
        install = home / "pginstall-no-vector"
        shutil.copytree(pg_install_dir(), install, symlinks=True)
        for path in (install / "share" / "extension").glob("vector*"):
            path.unlink()
        (install / "lib" / "vector.so").unlink()
    server = EmbeddedPostgres(
        home / "ext-pg", port=_free_port(), install_dir=install, settings=FAST_SETTINGS
    )
    server.initdb(template=pg_template)
    try:
        yield server.start()
    finally:
        server.stop()


def _url(info: ServerInfo, dbname: str = "postgres", password: str | None = None) -> str:
    return f"postgresql://postgres:{password or info.password}@127.0.0.1:{info.port}/{dbname}"


def test_unreachable_database_is_one_clear_line(home: Path) -> None:
    url = f"postgresql://bastion:hunter2@127.0.0.1:{_free_port()}/bastion"
    result = _bastion(home, "db", "migrate", database_url=url)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot connect to PostgreSQL" in lines[0]
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in lines[0]
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_wrong_password_does_not_echo_it(home: Path, tcp_server: ServerInfo) -> None:
    result = _bastion(home, "db", "migrate", database_url=_url(tcp_server, password="wr0ngpass"))
    assert result.returncode == 1
    assert "password authentication failed" in result.stderr
    assert "wr0ngpass" not in result.stderr + result.stdout


def test_invalid_url_is_refused(home: Path) -> None:
    result = _bastion(home, "db", "migrate", database_url="not a url at all")
    assert result.returncode == 1
    assert "DATABASE_URL is not a valid PostgreSQL URL" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("tcp_server", ["without_pgvector"], indirect=True)
def test_server_without_pgvector_is_refused_and_nothing_created(
    home: Path, tcp_server: ServerInfo
) -> None:
    result = _bastion(home, "db", "migrate", database_url=_url(tcp_server))
    assert result.returncode == 1
    assert "lacks the pgvector extension" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with psycopg.connect(tcp_server.conninfo(via_tcp=True)) as conn:
        roles = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'bastion%%'"
        ).fetchone()
        schemas = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bastion%%'"
        ).fetchone()
    assert roles == (0,)
    assert schemas == (0,)


def test_external_database_is_provisioned_with_a_restricted_app_role(
    home: Path, tcp_server: ServerInfo
) -> None:
    with psycopg.connect(tcp_server.conninfo(via_tcp=True), autocommit=True) as conn:
        conn.execute("CREATE DATABASE appdb")
    url = _url(tcp_server, "appdb")
    first = _bastion(home, "db", "migrate", database_url=url)
    assert first.returncode == 0, first.stderr
    again = _bastion(home, "db", "migrate", database_url=url)  # idempotent
    assert again.returncode == 0, again.stderr
    with psycopg.connect(tcp_server.conninfo("appdb", via_tcp=True)) as conn:
        role = conn.execute(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'bastion_app'"
        ).fetchone()
        rls = conn.execute(
            "SELECT bool_and(relrowsecurity AND relforcerowsecurity) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'bastion' AND c.relkind = 'r'"
        ).fetchone()
    assert role == (False, False)
    assert rls == (True,)
    assert tcp_server.password not in first.stdout + first.stderr
