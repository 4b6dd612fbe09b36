"""LocalKEK (one named KEK) and LocalKMS (per-tenant KEKs): envelope encryption on the
real keystore; nothing mocked."""

from __future__ import annotations

import secrets
import struct
from pathlib import Path
from uuid import uuid4

import pytest

from bastion.secrets import KeyContext, KMSError, LocalKEK, LocalKeystore, LocalKMS

CONTEXT = b"tenant=42;purpose=chunks"


@pytest.fixture
def keystore(tmp_path: Path) -> LocalKeystore:  # shadows the session-wide conftest fixture
    return LocalKeystore(tmp_path / "keys" / "keystore.bin", tmp_path / "keys" / "master.key")


@pytest.fixture
def kms(keystore: LocalKeystore) -> LocalKEK:
    return LocalKEK(keystore)


def _kek_version(blob: bytes) -> int:
    return int(struct.unpack(">I", blob[1:5])[0])


def test_wrap_unwrap_round_trip(kms: LocalKEK, keystore: LocalKeystore) -> None:
    data_key = secrets.token_bytes(32)
    blob = kms.wrap(data_key, CONTEXT)
    assert data_key not in blob
    assert blob[0] == 1
    assert _kek_version(blob) == 1
    assert len(blob) == 5 + 12 + 32 + 16
    assert kms.unwrap(blob, CONTEXT) == data_key
    kek = keystore.get("kms/kek")
    assert len(kek) == 32
    assert kek not in blob
    assert kms.wrap(data_key, CONTEXT) != blob  # fresh nonce every time


def test_wrong_context_fails(kms: LocalKEK) -> None:
    blob = kms.wrap(secrets.token_bytes(32), CONTEXT)
    with pytest.raises(KMSError):
        kms.unwrap(blob, b"tenant=43;purpose=chunks")
    with pytest.raises(KMSError):
        kms.unwrap(blob, b"")


@pytest.mark.parametrize("offset", [0, 1, 4, 5, 16, 17, 30, -1])
def test_altered_blob_fails(kms: LocalKEK, offset: int) -> None:
    data_key = secrets.token_bytes(32)
    blob = bytearray(kms.wrap(data_key, CONTEXT))
    blob[offset] ^= 0x01
    with pytest.raises(KMSError) as info:
        kms.unwrap(bytes(blob), CONTEXT)
    assert data_key.hex() not in str(info.value)


@pytest.mark.parametrize("length", [0, 5, 32])
def test_truncated_blob_fails(kms: LocalKEK, length: int) -> None:
    blob = kms.wrap(secrets.token_bytes(32), CONTEXT)
    with pytest.raises(KMSError):
        kms.unwrap(blob[:length], CONTEXT)


def test_rotation_keeps_old_blobs(kms: LocalKEK, keystore: LocalKeystore) -> None:
    old_key = secrets.token_bytes(32)
    old_blob = kms.wrap(old_key, CONTEXT)
    assert _kek_version(old_blob) == 1
    assert keystore.rotate("kms/kek") == 2
    new_key = secrets.token_bytes(32)
    new_blob = kms.wrap(new_key, CONTEXT)
    assert _kek_version(new_blob) == 2
    assert kms.unwrap(old_blob, CONTEXT) == old_key
    assert kms.unwrap(new_blob, CONTEXT) == new_key
    # A blob claiming the other KEK version does not verify.
    forged = new_blob[:1] + struct.pack(">I", 1) + new_blob[5:]
    with pytest.raises(KMSError):
        kms.unwrap(forged, CONTEXT)
    keystore.retire("kms/kek", 1)
    assert kms.unwrap(old_blob, CONTEXT) == old_key  # retired, still readable by number
    assert _kek_version(kms.wrap(new_key, CONTEXT)) == 2


def test_generate_data_key(kms: LocalKEK) -> None:
    data_key, blob = kms.generate_data_key(CONTEXT)
    assert len(data_key) == 32
    assert data_key not in blob
    assert kms.unwrap(blob, CONTEXT) == data_key
    other, _ = kms.generate_data_key(CONTEXT)
    assert other != data_key
    with pytest.raises(KMSError):
        kms.unwrap(blob, b"other")


def test_kms_on_a_fresh_keystore_shares_the_kek(keystore: LocalKeystore) -> None:
    blob = LocalKEK(keystore).wrap(b"k" * 32, CONTEXT)
    again = LocalKeystore(keystore.path, keystore.master_key_file)
    assert LocalKEK(again).unwrap(blob, CONTEXT) == b"k" * 32
    with pytest.raises(KMSError):
        LocalKEK(again, kek_name="kms/other").unwrap(blob, CONTEXT)


def test_wrap_labels_the_blob_with_the_key_that_wrapped_it(tmp_path: Path) -> None:
    """Version and key come from one read, so each blob names its own KEK."""
    store = LocalKeystore(tmp_path / "keystore.bin", tmp_path / "master.key")
    kms = LocalKEK(store)
    blobs = []
    for _ in range(3):
        blobs.append(kms.wrap(b"k" * 32, b"ctx"))
        store.rotate("kms/kek")
    assert [int.from_bytes(b[1:5], "big") for b in blobs] == [1, 2, 3]
    assert all(kms.unwrap(b, b"ctx") == b"k" * 32 for b in blobs)


def test_unknown_kek_version_fails(kms: LocalKEK) -> None:
    blob = kms.wrap(secrets.token_bytes(32), CONTEXT)
    for version in (0, 2, 2**32 - 1):
        forged = blob[:1] + struct.pack(">I", version) + blob[5:]
        with pytest.raises(KMSError):
            kms.unwrap(forged, CONTEXT)


def test_blob_from_another_keystore_fails(kms: LocalKEK, tmp_path: Path) -> None:
    blob = kms.wrap(secrets.token_bytes(32), CONTEXT)
    elsewhere = LocalKeystore(
        tmp_path / "other" / "keystore.bin", tmp_path / "other" / "master.key"
    )
    with pytest.raises(KMSError):
        LocalKEK(elsewhere).unwrap(blob, CONTEXT)  # no KEK at all there
    LocalKEK(elsewhere).wrap(b"x" * 32, CONTEXT)  # now a KEK v1 of its own
    with pytest.raises(KMSError):
        LocalKEK(elsewhere).unwrap(blob, CONTEXT)


def test_local_kms_keeps_each_tenant_under_its_own_kek(keystore: LocalKeystore) -> None:
    """The KMS picks the KEK from the context's tenant and binds the whole context."""
    kms = LocalKMS(keystore)
    a, b = uuid4(), uuid4()
    data_key, blob = kms.generate_data_key(KeyContext(a, "data-key", 1))
    assert kms.unwrap(blob, KeyContext(a, "data-key", 1)) == data_key
    assert {f"kms/tenants/{a}"} <= set(keystore.list())
    for other in (
        KeyContext(b, "data-key", 1),  # another tenant: another KEK
        KeyContext(a, "pii-token-key", 1),  # another purpose
        KeyContext(a, "data-key", 2),  # another version
    ):
        with pytest.raises(KMSError):
            kms.unwrap(blob, other)
    # The stored spelling is the one every existing blob was bound to.
    old = LocalKEK(keystore, kek_name=f"kms/tenants/{a}")
    assert old.unwrap(blob, f"tenant={a};purpose=data-key;version=1".encode()) == data_key


def test_local_kms_destroy_shreds_only_that_tenant(keystore: LocalKeystore) -> None:
    kms = LocalKMS(keystore)
    a, b = uuid4(), uuid4()
    blob_a = kms.wrap(b"a" * 32, KeyContext(a, "data-key"))
    blob_b = kms.wrap(b"b" * 32, KeyContext(b, "data-key"))
    kms.destroy_tenant(a)
    kms.destroy_tenant(a)  # idempotent
    assert f"kms/tenants/{a}" not in keystore.list()
    with pytest.raises(KMSError):
        kms.unwrap(blob_a, KeyContext(a, "data-key"))
    assert kms.unwrap(blob_b, KeyContext(b, "data-key")) == b"b" * 32
