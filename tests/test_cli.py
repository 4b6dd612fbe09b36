"""The ``bastion`` command line against a real embedded server of its own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from tests.conftest import short_tempdir


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    path = short_tempdir("bastion-cli-")
    yield path
    _run(path, "db", "stop")
    shutil.rmtree(path, ignore_errors=True)


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment on ``home``, with the embedded database."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return {**env, "BASTION_HOME": str(home), **extra}


def _run(
    home: Path, *args: str, stdin: str | None = None, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        input=stdin,
        env=_env(home, **extra_env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _secrets(home: Path) -> list[bytes]:
    settings = Settings(home=home)
    store = LocalKeystore(settings.resolved_keystore_file, settings.resolved_master_key_file)
    return [store.get(name) for name in store.list()]


def test_db_lifecycle_and_no_secret_in_output(home: Path) -> None:
    assert _run(home, "db", "status").returncode == 3
    started = _run(home, "db", "start")
    assert started.returncode == 0, started.stderr
    assert "PostgreSQL running" in started.stdout
    status = _run(home, "db", "status")
    assert status.returncode == 0 and "running" in status.stdout
    url = _run(home, "db", "url")
    assert url.stdout.startswith("postgresql://bastion_app@/bastion?host=")
    psql = _run(home, "db", "psql", "-tAc", "SELECT current_database()")
    assert psql.returncode == 0, psql.stderr
    assert psql.stdout.strip() == "bastion"
    outputs = "".join(r.stdout + r.stderr for r in (started, status, url, psql))
    secrets = _secrets(home)
    assert len(secrets) >= 3  # role passwords and the context key live in the key ring
    for value in secrets:
        assert value.hex() not in outputs
        assert value.decode(errors="ignore") not in outputs or len(value) < 8
    superuser = (home / "postgres" / "superuser.password").read_text().strip()
    assert superuser not in outputs


@contextlib.contextmanager
def _api(home: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``bastion serve api`` on a free port, ready; yields its URL and process
    (stdout and stderr piped together); stops it on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", "api"],
        # Plain HTTP on loopback: development mode (bastion.serve.public_tls).
        env=_env(home, BASTION_API_PORT=str(port), BASTION_DEV_MODE="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the api did not become ready"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def test_serve_api_answers_and_logs_no_secrets(home: Path) -> None:
    assert _run(home, "db", "start").returncode == 0
    # Internal calls go over mTLS by default: without the workload CA the api
    # does not start, and says in one line what to run.
    no_ca = _run(home, "serve", "api", BASTION_DEV_MODE="1")
    assert no_ca.returncode == 1 and "Traceback" not in no_ca.stderr
    assert no_ca.stderr.splitlines()[-1] == "error: no workload CA: run `bastion ca init`"
    initialised = _run(home, "ca", "init")
    assert initialised.returncode == 0, initialised.stderr
    with _api(home) as (url, proc):
        missing = httpx.get(f"{url}/missing", timeout=2)
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
    logs, _ = proc.communicate(timeout=15)
    assert '"path": "/missing"' in logs and '"status": 404' in logs
    for value in _secrets(home):
        assert value.hex() not in logs
        if len(value) >= 8:
            assert value.decode(errors="ignore") not in logs


def test_unknown_process_is_refused(home: Path) -> None:
    result = _run(home, "serve", "mailer")
    assert result.returncode == 1
    assert "unknown process 'mailer'" in result.stderr


def test_tenant_user_keys_and_login_commands(home: Path) -> None:
    assert _run(home, "db", "start").returncode == 0
    created = _run(home, "tenant", "create", "cli-desk", "--name", "CLI desk")
    assert created.returncode == 0, created.stderr
    again = _run(home, "tenant", "create", "cli-desk")
    assert again.returncode == 1 and "already exists" in again.stderr
    weak = _run(
        home,
        "user",
        "add",
        "--tenant",
        "cli-desk",
        "--email",
        "weak@cli.test",
        "--role",
        "viewer",
        "--password-stdin",
        stdin="password123\n",
    )
    assert weak.returncode == 1 and "password refused" in weak.stderr
    assert "password123" not in weak.stdout + weak.stderr
    password = "plum orchard ledger 9 quietly"
    added = _run(
        home,
        "user",
        "add",
        "--tenant",
        "cli-desk",
        "--email",
        "ann@cli.test",
        "--role",
        "contributor",
        "--password-stdin",
        stdin=password + "\n",
    )
    assert added.returncode == 0, added.stderr
    assert password not in added.stdout + added.stderr
    bad_role = _run(
        home, "user", "add", "--tenant", "cli-desk", "--email", "x@cli.test", "--role", "emperor"
    )
    assert bad_role.returncode == 1 and "unknown role" in bad_role.stderr
    rotated = _run(home, "keys", "rotate", "jwt")
    assert rotated.returncode == 0 and "jwt/signing: new version" in rotated.stdout

    with _api(home) as (url, proc):
        login = _run(
            home,
            "login",
            "--tenant",
            "cli-desk",
            "--email",
            "ann@cli.test",
            stdin=password + "\n",
            BASTION_API_PORT=url.rsplit(":", 1)[1],
        )
        assert login.returncode == 0, login.stderr
        body = json.loads(login.stdout)
        assert body["token_type"] == "DPoP" and body["access_token"].count(".") == 2
        key_file = Path(body["dpop_key_file"])
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert '"d"' in key_file.read_text()  # the private key, kept out of stdout
        assert '"d"' not in login.stdout
        refused = _run(
            home,
            "login",
            "--tenant",
            "cli-desk",
            "--email",
            "ann@cli.test",
            stdin="wrong password entirely\n",
            BASTION_API_PORT=url.rsplit(":", 1)[1],
        )
        assert refused.returncode == 1 and "login refused" in refused.stderr
    proc.communicate(timeout=15)


def test_db_stop(home: Path) -> None:
    assert _run(home, "db", "start").returncode == 0
    stopped = _run(home, "db", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert _run(home, "db", "status").returncode == 3


def test_broken_policy_refuses_to_start_with_file_and_line(home: Path, tmp_path: Path) -> None:
    from bastion.access.authorize import DEFAULT_POLICY_DIR

    broken = tmp_path / "policies"
    shutil.copytree(DEFAULT_POLICY_DIR, broken)
    (broken / "roles.cedar").write_text(
        (broken / "roles.cedar").read_text() + "\npermit (principal, action, resource\n"
    )
    assert _run(home, "db", "start").returncode == 0
    result = _run(home, "serve", "api", BASTION_POLICY_DIR=str(broken), BASTION_DEV_MODE="1")
    assert result.returncode == 1
    assert "roles.cedar:" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_lifetime_over_an_hour_refuses_to_start(home: Path) -> None:
    result = _run(home, "serve", "api", BASTION_ACCESS_TOKEN_MINUTES="61", BASTION_DEV_MODE="1")
    assert result.returncode == 1
    assert "access tokens may live at most 60 minutes" in result.stderr
    assert "Traceback" not in result.stderr


def test_ingest_search_and_shred_commands(home: Path, tmp_path: Path) -> None:
    tickets = Path(__file__).parent.parent / "src" / "bastion" / "demo" / "tickets" / "acme"
    assert _run(home, "db", "start").returncode == 0
    assert _run(home, "tenant", "create", "kb-desk").returncode == 0
    hashing = {"BASTION_EMBEDDER": "hashing"}
    first = _run(home, "ingest", str(tickets), "--tenant", "kb-desk", **hashing)
    assert first.returncode == 0, first.stderr
    assert "10 indexed, 0 already indexed, 0 failed" in first.stdout
    again = _run(home, "ingest", str(tickets), "--tenant", "kb-desk", **hashing)
    assert "0 indexed, 10 already indexed" in again.stdout
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"\x00\x01\x02" * 100)
    refused = _run(home, "ingest", str(junk), "--tenant", "kb-desk", **hashing)
    assert refused.returncode == 1 and "(binary)" in refused.stdout
    found = _run(home, "search", "refund double charge", "--tenant", "kb-desk", **hashing)
    assert found.returncode == 0 and "Refund" in found.stdout
    assert "@" not in found.stdout  # e-mail addresses were redacted before indexing
    unconfirmed = _run(home, "tenant", "shred", "kb-desk")
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
    shred = _run(home, "tenant", "shred", "kb-desk", "--yes")
    assert shred.returncode == 0 and "10 documents deleted" in shred.stdout
    # The knowledge base went with the shred (its partition dropped: tests/test_shred.py).
    gone = _run(home, "search", "refund double charge", "--tenant", "kb-desk", **hashing)
    assert gone.returncode == 1 and "Refund" not in gone.stdout
    assert "has no knowledge base 'default'" in gone.stderr and "Traceback" not in gone.stderr
