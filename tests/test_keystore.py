"""The local keystore: real files, real AES-GCM, real processes; nothing mocked."""

from __future__ import annotations

import base64
import multiprocessing
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from bastion.api.problems import as_problem
from bastion.errors import BastionError
from bastion.gateway.app import build_routers
from bastion.secrets import (
    InsecurePermissions,
    InvalidSecretRef,
    KeystoreLocked,
    LocalKeystore,
    MasterKeyMissing,
    SecretNotFound,
    SecretRef,
    resolve_ref,
)
from bastion.secrets.backends import open_key_ring
from bastion.secrets.store import MAGIC, _write_atomic
from bastion.settings import LiteralSecretInSettings, ModelRoute, Settings

VALUE = b"s3cr3t-value-that-must-never-leak"


def _keystore() -> LocalKeystore:
    settings = Settings()
    return LocalKeystore(settings.resolved_keystore_file, settings.resolved_master_key_file)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BASTION_HOME", str(home))
    for name in ("BASTION_KEYS_DIR", "BASTION_KEYSTORE_FILE", "BASTION_MASTER_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)  # the key files must land under tmp_path
    return home


@pytest.fixture
def ks(home: Path) -> LocalKeystore:
    store = _keystore()
    # Key material sits beside the home, never in it (a backup of one is not
    # a backup of the other); the master key in a directory of its own again.
    assert store.path == tmp_keys(home) / "keystore.bin"
    assert store.master_key_file == home.with_name(home.name + "-master") / "master.key"
    return store


def tmp_keys(home: Path) -> Path:
    return home.with_name(home.name + "-keys")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- files at rest ----------------------------------------------------------------


def test_files_are_private_and_hold_no_plaintext(ks: LocalKeystore) -> None:
    ks.set("api/key", VALUE)
    assert _mode(ks.path) == 0o600
    assert _mode(ks.master_key_file) == 0o600
    assert len(ks.master_key_file.read_bytes()) == 32
    blob = ks.path.read_bytes()
    assert blob.startswith(MAGIC)
    assert VALUE not in blob
    assert base64.b64encode(VALUE) not in blob
    assert b"api/key" not in blob  # names are encrypted too
    assert b"active" not in blob and b"created_at" not in blob  # the JSON is encrypted
    assert ks.get("api/key") == VALUE
    assert _mode(ks.path.parent) == 0o700  # the directory we created is private too


def test_rewrites_hold_no_plaintext_and_stay_private(ks: LocalKeystore) -> None:
    ks.set("api/key", VALUE)
    ks.rotate("api/key")
    ks.set("db/password", b"second-secret-value")
    blob = ks.path.read_bytes()
    for secret in (VALUE, b"second-secret-value", ks.get("api/key")):
        assert secret not in blob
        assert base64.b64encode(secret) not in blob
    assert _mode(ks.path) == 0o600
    leftovers = [p.name for p in ks.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # atomic writes leave no temporary files behind


def test_existing_master_key_is_used_never_replaced(home: Path) -> None:
    keys = home / "keys"
    keys.mkdir(mode=0o700)
    master = keys / "master.key"
    chosen = secrets.token_bytes(32)
    master.write_bytes(chosen)
    master.chmod(0o600)
    store = LocalKeystore(keys / "keystore.bin", master)
    store.set("api/key", VALUE)
    assert master.read_bytes() == chosen
    assert LocalKeystore(keys / "keystore.bin", master).get("api/key") == VALUE


def test_backed_up_directories_hold_no_master_key_and_old_installs_move_it(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An install from before the move: the master key beside the keystore.
    legacy = LocalKeystore(tmp_keys(home) / "keystore.bin", tmp_keys(home) / "master.key")
    legacy.set("api/key", VALUE)
    master = legacy.master_key_file.read_bytes()
    with caplog.at_level("WARNING"):
        ring = open_key_ring(Settings())
    assert ring.keystore.get("api/key") == VALUE  # the same key, moved
    moved = home.with_name(home.name + "-master") / "master.key"
    assert moved.read_bytes() == master and _mode(moved) == 0o600
    assert _mode(moved.parent) == 0o700
    assert "master_key_moved" in caplog.text
    # What a backup takes (the data: the home; the keystore directory) holds
    # no master key, by name or by content.
    ring.keystore.set("db/password", b"another")
    for directory in (home, tmp_keys(home)):
        for path in directory.rglob("*"):
            assert path.name != "master.key"
            assert not path.is_file() or master not in path.read_bytes()


def test_master_key_creation_never_overwrites(tmp_path: Path) -> None:
    """The master key is created with link(2), which fails on an existing file."""
    master = tmp_path / "master.key"
    master.write_bytes(b"k" * 32)
    with pytest.raises(FileExistsError):
        _write_atomic(master, b"x" * 32, exclusive=True)
    assert master.read_bytes() == b"k" * 32
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]  # temp file removed


def test_reading_an_empty_keystore_creates_nothing(ks: LocalKeystore) -> None:
    assert ks.list() == []
    with pytest.raises(SecretNotFound):
        ks.get("api/key")
    assert not ks.path.exists()
    assert not ks.master_key_file.exists()


def test_files_unreadable_by_other_users() -> None:
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        store = LocalKeystore(base / "keys" / "keystore.bin", base / "keys" / "master.key")
        store.set("api/key", VALUE)
        store.path.parent.chmod(0o755)  # only the file mode stands in the way
        assert _mode(store.path) == 0o600
        assert _mode(store.master_key_file) == 0o600
        if os.geteuid() != 0:
            for path in (store.path, store.master_key_file):
                assert path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) == 0
            return
        control = base / "keys" / "control.txt"
        control.write_bytes(b"readable")
        control.chmod(0o644)
        ok = subprocess.run(["cat", str(control)], user="nobody", capture_output=True)
        assert ok.returncode == 0 and ok.stdout == b"readable"  # the setup is meaningful
        for path in (store.path, store.master_key_file):
            result = subprocess.run(["cat", str(path)], user="nobody", capture_output=True)
            assert result.returncode != 0
            assert result.stdout == b""
            assert b"Permission denied" in result.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- failing closed ---------------------------------------------------------------


def test_wrong_master_key_is_locked(ks: LocalKeystore) -> None:
    ks.set("api/key", VALUE)
    right = ks.master_key_file.read_bytes()
    wrong = secrets.token_bytes(32)
    assert wrong != right
    ks.master_key_file.write_bytes(wrong)
    ks.master_key_file.chmod(0o600)
    with pytest.raises(KeystoreLocked) as info:
        ks.get("api/key")
    message = str(info.value)
    assert str(ks.path) in message
    assert "failing closed" in message
    for key in (right, wrong):
        assert key.hex() not in message
        assert key.hex().upper() not in message
        assert base64.b64encode(key).decode() not in message
        assert repr(key) not in message
    assert VALUE.decode() not in message
    before = ks.path.read_bytes()
    with pytest.raises(KeystoreLocked):
        ks.set("other", b"x")  # writers fail closed too, never overwrite
    assert ks.path.read_bytes() == before
    ks.master_key_file.write_bytes(right)
    assert ks.get("api/key") == VALUE  # the right key still opens it: nothing was lost


def test_short_master_key_is_locked(ks: LocalKeystore) -> None:
    ks.set("api/key", VALUE)
    ks.master_key_file.write_bytes(b"\x01" * 16)
    with pytest.raises(KeystoreLocked) as info:
        ks.get("api/key")
    assert str(ks.master_key_file) in str(info.value)
    assert "failing closed" in str(info.value)


def test_any_flipped_byte_is_locked(ks: LocalKeystore) -> None:
    """Every single byte (header, nonce, ciphertext, tag) is covered, one at a time."""
    ks.set("api/key", VALUE)
    original = ks.path.read_bytes()
    assert len(original) > len(MAGIC) + 12 + 16
    for offset in range(len(original)):
        for mask in (0x01, 0x80):
            blob = bytearray(original)
            blob[offset] ^= mask
            ks.path.write_bytes(bytes(blob))
            with pytest.raises(KeystoreLocked) as info:
                ks.list()
            assert str(ks.path) in str(info.value), offset
            assert "failing closed" in str(info.value)
    ks.path.write_bytes(original)
    assert ks.get("api/key") == VALUE  # the control: the unaltered file opens


def test_appended_byte_is_locked(ks: LocalKeystore) -> None:
    ks.set("api/key", VALUE)
    ks.path.write_bytes(ks.path.read_bytes() + b"\0")
    with pytest.raises(KeystoreLocked):
        ks.get("api/key")


def test_truncated_keystore_is_locked(ks: LocalKeystore) -> None:
    ks.set("api/key", VALUE)
    ks.path.write_bytes(ks.path.read_bytes()[:20])
    with pytest.raises(KeystoreLocked):
        ks.get("api/key")


def test_missing_master_key(ks: LocalKeystore) -> None:
    ks.set("api/key", VALUE)
    ks.master_key_file.unlink()
    with pytest.raises(MasterKeyMissing) as info:
        ks.get("api/key")
    assert str(ks.path) in str(info.value)
    with pytest.raises(MasterKeyMissing):
        ks.set("other", b"x")
    assert not ks.master_key_file.exists()  # no new key silently generated


@pytest.mark.parametrize("which", ["keystore", "master"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o666])
def test_group_or_other_access_is_refused(ks: LocalKeystore, which: str, mode: int) -> None:
    ks.set("api/key", VALUE)
    path = ks.path if which == "keystore" else ks.master_key_file
    path.chmod(mode)
    for action in (lambda: ks.get("api/key"), lambda: ks.set("api/key", b"new")):
        with pytest.raises(InsecurePermissions) as info:
            action()
        assert str(path) in str(info.value)
    path.chmod(0o600)
    assert ks.get("api/key") == VALUE  # nothing was written while refused
    assert ks.current_version("api/key") == 1


def test_permissive_master_key_is_refused_before_any_keystore(home: Path) -> None:
    keys = home / "keys"
    keys.mkdir()
    master = keys / "master.key"
    master.write_bytes(secrets.token_bytes(32))
    master.chmod(0o644)
    store = LocalKeystore(keys / "keystore.bin", master)
    with pytest.raises(InsecurePermissions):
        store.set("api/key", VALUE)
    assert not store.path.exists()


# -- versions ---------------------------------------------------------------------


def test_set_get_versions(ks: LocalKeystore) -> None:
    with pytest.raises(SecretNotFound):
        ks.get("db/password")
    assert ks.set("db/password", b"one") == 1
    assert ks.set("db/password", b"two") == 2
    assert ks.get("db/password") == b"two"
    assert ks.get("db/password", 1) == b"one"
    assert ks.current_version("db/password") == 2
    infos = ks.versions("db/password")
    assert [i.version for i in infos] == [1, 2]
    assert [i.state for i in infos] == ["active", "active"]
    assert infos[0].fingerprint != infos[1].fingerprint
    assert all(len(i.fingerprint) == 16 for i in infos)
    assert all(i.created_at for i in infos)
    for info in infos:
        text = repr(info)
        assert "one" not in text and "two" not in text
        assert base64.b64encode(b"one").decode() not in text
    with pytest.raises(SecretNotFound):
        ks.get("db/password", 7)
    assert ks.list() == ["db/password"]


def test_rotate_and_retire(ks: LocalKeystore) -> None:
    ks.set("jwt/signing", b"first")
    assert ks.rotate("jwt/signing") == 2
    rotated = ks.get("jwt/signing")
    assert rotated != b"first" and len(rotated) == 32
    assert ks.get("jwt/signing", 1) == b"first"
    assert ks.rotate("jwt/signing", b"third") == 3
    ks.retire("jwt/signing", 3)
    assert ks.current_version("jwt/signing") == 2
    assert ks.get("jwt/signing") == rotated
    assert ks.get("jwt/signing", 3) == b"third"
    assert [i.state for i in ks.versions("jwt/signing")] == ["active", "active", "retired"]
    ks.retire("jwt/signing", 1)
    ks.retire("jwt/signing", 2)
    with pytest.raises(SecretNotFound):
        ks.get("jwt/signing")
    assert ks.get("jwt/signing", 1) == b"first"


def test_ensure_is_stable(ks: LocalKeystore) -> None:
    first = ks.ensure("app/token", lambda: secrets.token_bytes(32))
    second = ks.ensure("app/token", lambda: secrets.token_bytes(32))
    assert first == second
    assert len(first) == 32
    assert ks.current_version("app/token") == 1
    assert ks.ensure("app/token", lambda: b"never used") == first


def test_delete(ks: LocalKeystore) -> None:
    ks.set("a", b"1")
    ks.set("b", b"2")
    ks.delete("a")
    assert ks.list() == ["b"]
    with pytest.raises(SecretNotFound):
        ks.get("a")
    with pytest.raises(SecretNotFound):
        ks.delete("a")


@pytest.mark.parametrize("name", ["../x", "a/../b", "A", "", "/abs", "a b", "x" * 129])
def test_invalid_names(ks: LocalKeystore, name: str) -> None:
    with pytest.raises(InvalidSecretRef):
        ks.set(name, b"v")
    with pytest.raises(InvalidSecretRef):
        ks.ensure(name, lambda: b"v")
    assert not ks.path.exists()


# -- concurrency ------------------------------------------------------------------


def _set_one(path: str, master: str, index: int, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    LocalKeystore(Path(path), Path(master)).set(f"proc/{index}", f"value-{index}".encode())


def _ensure_one(path: str, master: str, barrier: object, queue: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    value = LocalKeystore(Path(path), Path(master)).ensure(
        "shared/key", lambda: secrets.token_bytes(32)
    )
    queue.put(value)  # type: ignore[attr-defined]


def test_concurrent_writers_lose_nothing(ks: LocalKeystore) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    procs = [
        ctx.Process(target=_set_one, args=(str(ks.path), str(ks.master_key_file), i, barrier))
        for i in range(8)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert ks.list() == sorted(f"proc/{i}" for i in range(8))
    for i in range(8):
        assert ks.get(f"proc/{i}") == f"value-{i}".encode()


def test_concurrent_ensure_agrees(ks: LocalKeystore) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    queue = ctx.Queue()
    args = (str(ks.path), str(ks.master_key_file), barrier, queue)
    procs = [ctx.Process(target=_ensure_one, args=args) for _ in range(4)]
    for proc in procs:
        proc.start()
    values = [queue.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert len(set(values)) == 1
    assert values[0] == ks.get("shared/key")
    assert ks.current_version("shared/key") == 1


# -- references -------------------------------------------------------------------


def test_secret_ref_parse() -> None:
    assert SecretRef.parse("local://a/b") == SecretRef("local", "a/b", None)
    assert SecretRef.parse("local://a#3") == SecretRef("local", "a", 3)
    assert SecretRef.parse("vault://x") == SecretRef("vault", "x", None)


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "a/b",
        "local:/a",
        "local://",
        "local://a#",
        "local://a#x",
        "local://../x",
        "LOCAL://a",
        "local://A",
        "local://a#-1",
    ],
)
def test_secret_ref_invalid(ref: str) -> None:
    with pytest.raises(InvalidSecretRef):
        SecretRef.parse(ref)


def test_resolve_ref(ks: LocalKeystore) -> None:
    ks.set("db/key", b"v1")
    ks.set("db/key", b"v2")
    assert resolve_ref(ks, "local://db/key") == b"v2"
    assert resolve_ref(ks, "local://db/key#1") == b"v1"
    assert resolve_ref(ks, SecretRef("local", "db/key", 1)) == b"v1"
    with pytest.raises(InvalidSecretRef) as info:
        resolve_ref(ks, "vault://x")
    assert "vault" in str(info.value)
    with pytest.raises(SecretNotFound):
        resolve_ref(ks, "local://db/other")


def test_a_marker_secret_in_the_local_keystore_never_reaches_output(
    home: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level("DEBUG")
    marker = "MARKER-" + secrets.token_hex(12)
    store = open_key_ring(Settings()).keystore
    store.set("providers/marker", marker.encode())
    # Normal paths: the reference resolves, and a gateway provider is built on it.
    ref = "local://providers/marker"
    assert resolve_ref(store, ref) == marker.encode()
    route = ModelRoute(name="m", provider="openai_compatible", base_url="http://x", api_key_ref=ref)
    assert build_routers([route], store, embedder="hashing")["m"] is not None
    # Failure paths: a missing name, an unconfigured scheme, the marker put
    # where a reference belongs, and a keystore file altered on disk.
    errors: list[BaseException] = []
    for bad in ("local://providers/absent", "bao://kv/x#y", "local://providers/marker#9"):
        with pytest.raises((SecretNotFound, InvalidSecretRef)) as caught:
            resolve_ref(store, bad)
        errors.append(caught.value)
    with pytest.raises(LiteralSecretInSettings) as literal:
        Settings(stripe_webhook_secret_ref=marker)
    errors.append(literal.value)
    assert isinstance(store, LocalKeystore)
    blob = bytearray(store.path.read_bytes())
    blob[-1] ^= 1
    store.path.write_bytes(bytes(blob))
    with pytest.raises(KeystoreLocked) as locked:
        resolve_ref(store, ref)
    errors.append(locked.value)
    rendered = [str(e) + repr(e) + repr(e.__cause__) + repr(e.__context__) for e in errors]
    problems = [repr(as_problem(e).__dict__) for e in errors if isinstance(e, BastionError)]
    out, err = capfd.readouterr()
    assert problems and marker not in "".join([*rendered, *problems, caplog.text, out, err])
