"""The ``bastion`` command line against a real embedded server of its own."""

from __future__ import annotations

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
from tests.conftest import short_tempdir


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    path = short_tempdir("bastion-cli-")
    yield path
    subprocess.run(
        [sys.executable, "-m", "bastion", "db", "stop"],
        env={**os.environ, "BASTION_HOME": str(path)},
        check=False,
    )
    shutil.rmtree(path, ignore_errors=True)


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["BASTION_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _secrets(home: Path) -> list[bytes]:
    store = LocalKeystore(home / "keys" / "keystore.bin", home / "keys" / "master.key")
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


def test_serve_api_answers_and_logs_no_secrets(home: Path) -> None:
    assert _run(home, "db", "start").returncode == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BASTION_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert ready is not None and ready.status_code == 200
        missing = httpx.get(f"http://127.0.0.1:{port}/missing", timeout=2)
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
    finally:
        proc.send_signal(signal.SIGTERM)
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
    weak = _run_stdin(
        home,
        "password123\n",
        "user",
        "add",
        "--tenant",
        "cli-desk",
        "--email",
        "weak@cli.test",
        "--role",
        "viewer",
        "--password-stdin",
    )
    assert weak.returncode == 1 and "password refused" in weak.stderr
    assert "password123" not in weak.stdout + weak.stderr
    password = "plum orchard ledger 9 quietly"
    added = _run_stdin(
        home,
        password + "\n",
        "user",
        "add",
        "--tenant",
        "cli-desk",
        "--email",
        "ann@cli.test",
        "--role",
        "contributor",
        "--password-stdin",
    )
    assert added.returncode == 0, added.stderr
    assert password not in added.stdout + added.stderr
    bad_role = _run(
        home, "user", "add", "--tenant", "cli-desk", "--email", "x@cli.test", "--role", "emperor"
    )
    assert bad_role.returncode == 1 and "unknown role" in bad_role.stderr
    rotated = _run(home, "keys", "rotate", "jwt")
    assert rotated.returncode == 0 and "new JWT signing key" in rotated.stdout

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(BASTION_HOME=str(home), BASTION_API_PORT=str(port))
    api = subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", "api"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        login = subprocess.run(
            [
                sys.executable,
                "-m",
                "bastion",
                "login",
                "--tenant",
                "cli-desk",
                "--email",
                "ann@cli.test",
            ],
            input=password + "\n",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert login.returncode == 0, login.stderr
        body = json.loads(login.stdout)
        assert body["token_type"] == "DPoP" and body["access_token"].count(".") == 2
        key_file = Path(body["dpop_key_file"])
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert '"d"' in key_file.read_text()  # the private key, kept out of stdout
        assert '"d"' not in login.stdout
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "bastion",
                "login",
                "--tenant",
                "cli-desk",
                "--email",
                "ann@cli.test",
            ],
            input="wrong password entirely\n",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1 and "login refused" in refused.stderr
    finally:
        api.terminate()
        api.wait(15)


def _run_stdin(home: Path, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["BASTION_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


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
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(BASTION_HOME=str(home), BASTION_POLICY_DIR=str(broken))
    assert _run(home, "db", "start").returncode == 0
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "serve", "api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "roles.cedar:" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_lifetime_over_an_hour_refuses_to_start(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(BASTION_HOME=str(home), BASTION_ACCESS_TOKEN_MINUTES="61")
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "serve", "api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "access tokens may live at most 60 minutes" in result.stderr
    assert "Traceback" not in result.stderr
