"""``bastion secrets``: values go in on stdin and come out only with --reveal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.secrets import LocalKeystore
from bastion.secrets.cli import secrets_app

VALUE = "hunter2-very-secret-value"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BASTION_HOME", str(tmp_path))
    return tmp_path


def _store(home: Path) -> LocalKeystore:
    return LocalKeystore(home / "keys" / "keystore.bin", home / "keys" / "master.key")


def _output(result: object) -> str:
    out = result.stdout  # type: ignore[attr-defined]
    err = result.stderr  # type: ignore[attr-defined]
    return f"{out}\n{err}"


def test_set_reads_stdin(home: Path) -> None:
    result = CliRunner().invoke(secrets_app, ["set", "api/key"], input=VALUE + "\n")
    assert result.exit_code == 0, result.output
    assert "stored version 1" in result.stdout
    assert VALUE not in _output(result)
    assert _store(home).get("api/key") == VALUE.encode()  # trailing newline stripped


def test_outputs_never_show_the_value(home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(secrets_app, ["set", "api/key"], input=VALUE).exit_code == 0
    listing = runner.invoke(secrets_app, ["list"])
    assert listing.exit_code == 0
    assert "api/key" in listing.stdout and "v1" in listing.stdout
    shown = runner.invoke(secrets_app, ["get", "api/key"])
    assert shown.exit_code == 0
    fingerprint = _store(home).versions("api/key")[0].fingerprint
    assert fingerprint in shown.stdout
    rotated = runner.invoke(secrets_app, ["rotate", "api/key"])
    assert rotated.exit_code == 0
    assert "version 2" in rotated.stdout
    new_value = _store(home).get("api/key")
    for result in (listing, shown, rotated, runner.invoke(secrets_app, ["get", "api/key"])):
        text = _output(result)
        assert VALUE not in text
        assert new_value.hex() not in text


def test_reveal_outputs_exactly_the_value(home: Path) -> None:
    runner = CliRunner()
    runner.invoke(secrets_app, ["set", "api/key"], input=VALUE)
    runner.invoke(secrets_app, ["set", "api/key"], input="second")
    result = runner.invoke(secrets_app, ["get", "api/key", "--reveal"])
    assert result.exit_code == 0
    assert result.stdout_bytes == b"second"
    old = runner.invoke(secrets_app, ["get", "api/key", "--reveal", "--version", "1"])
    assert old.stdout_bytes == VALUE.encode()


def test_rotate_from_stdin(home: Path) -> None:
    runner = CliRunner()
    runner.invoke(secrets_app, ["set", "api/key"], input=VALUE)
    result = runner.invoke(secrets_app, ["rotate", "api/key", "--from-stdin"], input="next\n")
    assert result.exit_code == 0
    assert "next" not in _output(result)
    assert _store(home).get("api/key") == b"next"
    assert _store(home).get("api/key", 1) == VALUE.encode()


@pytest.mark.parametrize("args", [["get", "nope"], ["get", "nope", "--reveal"], ["rotate", "A"]])
def test_errors_are_one_line(home: Path, args: list[str]) -> None:
    result = CliRunner().invoke(secrets_app, args)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash


def test_locked_keystore_is_a_clean_error(home: Path) -> None:
    runner = CliRunner()
    runner.invoke(secrets_app, ["set", "api/key"], input=VALUE)
    master = home / "keys" / "master.key"
    master.write_bytes(b"\0" * 32)
    result = runner.invoke(secrets_app, ["get", "api/key", "--reveal"])
    assert result.exit_code == 1
    assert "cannot be decrypted" in result.stderr
    assert VALUE not in _output(result)


def test_real_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "BASTION_HOME": str(tmp_path)}
    base = [sys.executable, "-m", "bastion", "secrets"]
    stored = subprocess.run(
        [*base, "set", "api/key"], input=VALUE.encode(), env=env, capture_output=True, timeout=60
    )
    assert stored.returncode == 0, stored.stderr
    assert VALUE.encode() not in stored.stdout + stored.stderr
    shown = subprocess.run([*base, "get", "api/key"], env=env, capture_output=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert b"api/key" in shown.stdout
    assert VALUE.encode() not in shown.stdout + shown.stderr
    assert _store(tmp_path).get("api/key") == VALUE.encode()


def test_list_survives_a_fully_retired_secret(home: Path) -> None:
    store = _store(home)
    store.set("old/key", b"v1")
    store.retire("old/key", 1)
    store.set("live/key", b"v")
    listing = CliRunner().invoke(secrets_app, ["list"])
    assert listing.exit_code == 0
    assert "old/key  (no active version)" in listing.stdout
    assert "live/key  (v1)" in listing.stdout


def test_get_of_a_missing_version_is_an_error(home: Path) -> None:
    _store(home).set("api/key", VALUE.encode())
    result = CliRunner().invoke(secrets_app, ["get", "api/key", "--version", "9"])
    assert result.exit_code == 1
    assert "version 9" in result.stderr
    assert VALUE not in _output(result)
