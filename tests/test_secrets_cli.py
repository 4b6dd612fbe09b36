"""``bastion secrets``: values go in on stdin and come out only with --reveal."""

from __future__ import annotations

import hashlib
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.secrets import LocalKeystore
from bastion.secrets.cli import secrets_app
from bastion.settings import Settings

VALUE = "hunter2-very-secret-value"
# The sub-app on its own, exactly as a user could run it (no dependency on the main CLI).
RUN_APP = "from bastion.secrets.cli import secrets_app; secrets_app()"
_OVERRIDES = ("BASTION_KEYS_DIR", "BASTION_KEYSTORE_FILE", "BASTION_MASTER_KEY_FILE")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BASTION_HOME", str(home))
    for name in _OVERRIDES:  # an outer environment must not redirect the key files
        monkeypatch.delenv(name, raising=False)
    return home


def test_key_material_lives_outside_the_home(home: Path) -> None:
    """A backup of the home (the database, its files) carries no key: the
    keystore sits in ``<home>-keys`` beside it, its master key in ``<home>-master``."""
    assert CliRunner().invoke(secrets_app, ["set", "api/key"], input=VALUE).exit_code == 0
    keys = keys_dir(home)
    assert keys == home.with_name("home-keys")
    assert "keystore.bin" in {p.name for p in keys.iterdir()}
    assert "master.key" not in {p.name for p in keys.iterdir()}
    assert master_key_file(home) == home.with_name("home-master") / "master.key"
    assert master_key_file(home).is_file()
    assert not [p for p in home.rglob("*") if p.is_file()], "nothing key-like in the home"
    # An install from before the move keeps finding its keys where they are.
    legacy = home / "keys"
    legacy.mkdir()
    (legacy / "master.key").write_bytes(b"\0" * 32)
    assert keys_dir(home) == legacy


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
    return {**env, "BASTION_HOME": str(home)}


def keys_dir(home: Path) -> Path:
    """Where the CLI keeps key material for ``home``: beside it, not inside."""
    return Settings(home=home).resolved_keys_dir


def master_key_file(home: Path) -> Path:
    """Where the CLI keeps the master key for ``home``: apart from the keystore too."""
    return Settings(home=home).resolved_master_key_file


def _store(home: Path) -> LocalKeystore:
    return LocalKeystore(keys_dir(home) / "keystore.bin", master_key_file(home))


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


def _shown_fingerprints(name: str) -> list[str]:
    shown = CliRunner().invoke(secrets_app, ["get", name])
    assert shown.exit_code == 0, shown.output
    return re.findall(r"\b[0-9a-f]{16}\b", shown.stdout)


def test_the_fingerprint_of_a_short_secret_is_no_guessing_oracle(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --reveal nothing an offline guesser can test candidates against is
    shown: the fingerprint is keyed (an HMAC under a key of this keystore), so it
    is no piece of sha256(value), and the same value fingerprints differently in
    another keystore. Within one keystore equal values still look equal."""
    pin = "4821"  # 10^4 candidates: a plain hash of it is inverted at once
    runner = CliRunner()
    assert runner.invoke(secrets_app, ["set", "door/pin"], input=pin).exit_code == 0
    assert runner.invoke(secrets_app, ["set", "door/pin"], input=pin).exit_code == 0
    mine = _shown_fingerprints("door/pin")
    assert len(mine) == 2 and mine[0] == mine[1]  # two versions, one value
    for digest in (
        hashlib.sha256(pin.encode()).hexdigest(),
        hashlib.sha1(pin.encode()).hexdigest(),  # noqa: S324 - what must not be shown
        hashlib.md5(pin.encode()).hexdigest(),  # noqa: S324
    ):
        windows = {digest[i : i + 8] for i in range(len(digest) - 7)}
        assert not any(w in f for f in mine for w in windows), "a piece of a plain hash"
    other = tmp_path / "other-home"
    other.mkdir()
    monkeypatch.setenv("BASTION_HOME", str(other))
    assert runner.invoke(secrets_app, ["set", "door/pin"], input=pin).exit_code == 0
    theirs = _shown_fingerprints("door/pin")
    assert len(theirs) == 1 and theirs[0] != mine[0]


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
    master = master_key_file(home)
    master.write_bytes(b"\0" * 32)
    result = runner.invoke(secrets_app, ["get", "api/key", "--reveal"])
    assert result.exit_code == 1
    assert "cannot be decrypted" in result.stderr
    assert VALUE not in _output(result)


def test_real_subprocess(tmp_path: Path) -> None:
    env = _env(tmp_path)
    base = [sys.executable, "-c", RUN_APP]
    stored = subprocess.run(
        [*base, "set", "api/key"],
        input=VALUE.encode() + b"\n",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert stored.returncode == 0, stored.stderr
    assert b"stored version 1" in stored.stdout
    assert VALUE.encode() not in stored.stdout + stored.stderr
    assert _store(tmp_path).get("api/key") == VALUE.encode()  # the newline was stripped
    shown = subprocess.run([*base, "get", "api/key"], env=env, capture_output=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert b"api/key" in shown.stdout
    assert VALUE.encode() not in shown.stdout + shown.stderr
    revealed = subprocess.run(
        [*base, "get", "api/key", "--reveal"], env=env, capture_output=True, timeout=60
    )
    assert revealed.returncode == 0, revealed.stderr
    assert revealed.stdout == VALUE.encode()


def _read_until(fd: int, needle: bytes | None, seen: bytearray, deadline: float) -> None:
    """Append output of the pty ``fd`` to ``seen`` until ``needle`` (None: EOF)."""
    while (needle is None or needle not in seen) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen.extend(chunk)


def test_set_on_a_terminal_prompts_without_echo(tmp_path: Path) -> None:
    """On a real terminal the value comes from a hidden prompt and is not echoed."""
    env = _env(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        try:
            os.execve(sys.executable, [sys.executable, "-c", RUN_APP, "set", "tty/key"], env)
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        deadline = time.monotonic() + 30
        _read_until(fd, b"value: ", seen, deadline)
        assert b"value: " in seen, bytes(seen)
        # getpass turns echo off before it prints the prompt, so this is never shown.
        os.write(fd, VALUE.encode() + b"\n")
        _read_until(fd, b"stored version 1", seen, deadline)
        _read_until(fd, None, seen, deadline)  # everything the child wrote, to EOF
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert b"stored version 1" in seen
    assert VALUE.encode() not in seen
    assert _store(tmp_path).get("tty/key") == VALUE.encode()


def test_value_is_never_taken_from_argv(home: Path) -> None:
    result = CliRunner().invoke(secrets_app, ["set", "api/key", VALUE], input="from-stdin")
    assert result.exit_code != 0
    assert not (keys_dir(home) / "keystore.bin").exists()
    stored = CliRunner().invoke(secrets_app, ["set", "api/key"], input="from-stdin")
    assert stored.exit_code == 0
    assert _store(home).get("api/key") == b"from-stdin"


@pytest.mark.parametrize("args", [["set", "api/key"], ["rotate", "api/key", "--from-stdin"]])
def test_empty_stdin_is_a_one_line_error(home: Path, args: list[str]) -> None:
    result = CliRunner().invoke(secrets_app, args, input="\n")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: empty value on stdin"
    assert not (keys_dir(home) / "keystore.bin").exists()


def test_os_errors_are_one_line(home: Path) -> None:
    (keys_dir(home)).write_text("a file where the key directory should be")
    result = CliRunner().invoke(secrets_app, ["set", "api/key"], input=VALUE)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(keys_dir(home)) in lines[0]
    assert VALUE not in _output(result)
    assert isinstance(result.exception, SystemExit)


def test_invalid_settings_do_not_echo_their_input(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_PG_PORT", "not-a-port-hunter2")
    result = CliRunner().invoke(secrets_app, ["list"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: invalid settings: pg_port"
    assert "hunter2" not in _output(result)


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
