"""The ``bastion`` command line against a real embedded server of its own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
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


def test_db_stop(home: Path) -> None:
    assert _run(home, "db", "start").returncode == 0
    stopped = _run(home, "db", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert _run(home, "db", "status").returncode == 3
