"""The AWS KMS backend against moto's server mode on 127.0.0.1 (an
API-compatible stand-in for AWS KMS, not AWS; tests/awskms_stack.py):
tenant KEKs as KMS keys bound to their encryption context, the shred, the
sealed master key, ``awskms://`` references, and every fault failing closed
with no secret in any output.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from bastion.api.problems import as_problem
from bastion.billing.webhooks import ActiveSecrets
from bastion.db.pool import Database
from bastion.knowledge.service import build_knowledge
from bastion.safety.vault import PiiVault, TokenNotFound, VaultKeyUnavailable, tokens_in
from bastion.secrets import KeyContext, KMSError, LocalKeystore, open_key_ring, resolve_ref
from bastion.secrets.awskms import SETTING_CONTEXT, AwsKmsKeystore, AwsKmsKMS
from bastion.secrets.errors import (
    InvalidSecretRef,
    KeystoreLocked,
    SecretsBackendRefused,
    SecretsBackendUnavailable,
)
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.awskms_stack import MASTER_ALIAS, Moto, _free_port, start_moto

pytestmark = pytest.mark.anyio

MARKER = "MARKER" + secrets.token_hex(17)  # 40 characters: an AWS secret key's length
TENANT = uuid4()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = start_moto(tmp_path_factory.mktemp("moto"), wrong_secret=MARKER)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.environ().items():
            patch.setenv(name, value)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        yield server
    server.stop()


def _ctx(purpose: str = "data-key", version: int = 1) -> KeyContext:
    return KeyContext(TENANT, purpose, version)


def test_data_keys_come_from_kms_bound_to_tenant_purpose_and_version(
    moto: Moto, tmp_path: Path
) -> None:
    kms = open_key_ring(moto.settings(tmp_path / "home", awskms_cache_seconds=0)).kms
    assert isinstance(kms, AwsKmsKMS)
    data_key, blob = kms.generate_data_key(_ctx())
    assert len(data_key) == 32 and data_key not in blob
    assert kms.unwrap(blob, _ctx()) == data_key
    assert kms.unwrap(kms.wrap(b"k" * 32, _ctx(version=2)), _ctx(version=2)) == b"k" * 32
    # The tenant's own KMS key behind its alias, tagged with the tenant.
    key = moto.root.describe_key(KeyId=kms.alias(TENANT))["KeyMetadata"]
    tags = moto.root.list_resource_tags(KeyId=key["KeyId"])["Tags"]
    assert {"TagKey": "bastion:tenant", "TagValue": str(TENANT)} in tags
    for wrong in (
        _ctx(purpose="pii-token-key"),
        _ctx(version=2),
        KeyContext(uuid4(), "data-key", 1),  # another tenant: no key of its own
    ):
        with pytest.raises(KMSError):
            kms.unwrap(blob, wrong)
    altered = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad in (altered, b"\xff\xfe", b""):
        with pytest.raises(KMSError):
            kms.unwrap(bad, _ctx())
    # Another tenant with a key of its own cannot open it either (AWS answers
    # IncorrectKeyException; moto an AccessDeniedException: refused both ways).
    other = KeyContext(uuid4(), "data-key", 1)
    kms.generate_data_key(other)
    with pytest.raises((KMSError, SecretsBackendRefused)):
        kms.unwrap(blob, other)


async def test_tenant_shred_disables_and_schedules_deletion_of_the_kms_key(
    moto: Moto, db: Database, tmp_path: Path
) -> None:
    settings = moto.settings(tmp_path / "home")
    kms = open_key_ring(settings).kms
    assert isinstance(kms, AwsKmsKMS)
    service = TenantService(db)
    tenant = await service.create_tenant(f"kms-{uuid4().hex[:8]}", "kms")
    owner = await service.add_member(tenant.id, f"owner-{uuid4().hex[:6]}@kms.test", "owner")
    redaction = await PiiVault(TenantKeys(kms)).tokenize(db, tenant.id, "write to ada@example.com")
    (token,) = tokens_in(redaction.text)
    key_id = moto.root.describe_key(KeyId=kms.alias(tenant.id))["KeyMetadata"]["KeyId"]
    async with db.tenant_tx(tenant.id, None, "system") as tx:  # what a backup would hold
        cur = await tx.execute(
            "SELECT version, wrapped FROM bastion.data_keys WHERE tenant_id = %s", (tenant.id,)
        )
        backed_up = [(row["version"], bytes(row["wrapped"])) for row in await cur.fetchall()]
    assert backed_up

    # What `bastion tenant shred` runs: the knowledge service on the configured key ring.
    await build_knowledge(settings, db, kms).shred_tenant(tenant.id)

    state = moto.root.describe_key(KeyId=key_id)["KeyMetadata"]
    assert state["KeyState"] == "PendingDeletion" and state["Enabled"] is False
    aliases = moto.root.list_aliases(KeyId=key_id)["Aliases"]
    assert aliases == []  # the alias is gone: nothing resolves the tenant's KEK
    fresh = open_key_ring(moto.settings(tmp_path / "h2")).kms
    for version, wrapped in backed_up:  # a backup's wrapped data keys open no more
        with pytest.raises(KMSError):
            fresh.unwrap(wrapped, KeyContext(tenant.id, "data-key", version))
    again = PiiVault(TenantKeys(fresh))
    with pytest.raises((VaultKeyUnavailable, TokenNotFound)):
        await again.detokenize(
            db, tenant.id, [token], user_id=owner, role="owner", reason="after the shred"
        )
    kms.destroy_tenant(tenant.id)  # twice: a no-op, not an error


def test_the_master_key_file_holds_only_a_kms_ciphertext(moto: Moto, tmp_path: Path) -> None:
    settings = moto.settings(tmp_path / "home")
    store = open_key_ring(settings).keystore
    assert isinstance(store, AwsKmsKeystore)
    store.set("api/marker", MARKER.encode())
    sealed = settings.resolved_master_key_file.read_bytes()
    assert len(sealed) > 32  # a KMS ciphertext, not the key
    # Without KMS the files open nothing, and no key sits in the home or keystore dir.
    with pytest.raises(KeystoreLocked):
        LocalKeystore(store.path, store.master_key_file).get("api/marker")
    for directory in (settings.home, settings.resolved_keys_dir):
        assert not directory.exists() or "master.key" not in os.listdir(directory)
    assert open_key_ring(settings).keystore.get("api/marker") == MARKER.encode()

    # An install that only now configures master_key_ref: its plain key is sealed once.
    plain_home = tmp_path / "plain"
    local = open_key_ring(moto.settings(plain_home, secrets_backend="local")).keystore
    local.set("kept", b"value")
    assert len(moto.settings(plain_home).resolved_master_key_file.read_bytes()) == 32
    sealed_ring = open_key_ring(moto.settings(plain_home))
    assert sealed_ring.keystore.get("kept") == b"value"
    assert len(moto.settings(plain_home).resolved_master_key_file.read_bytes()) > 32


def test_awskms_references_decrypt_setting_ciphertexts(moto: Moto, tmp_path: Path) -> None:
    value = f"whsec_{MARKER}"
    blob = moto.root.encrypt(
        KeyId=MASTER_ALIAS, Plaintext=value.encode(), EncryptionContext=SETTING_CONTEXT
    )["CiphertextBlob"]
    ref = f"awskms://{MASTER_ALIAS}#{base64.b64encode(blob).decode()}"
    settings = moto.settings(tmp_path / "home", stripe_webhook_secret_ref=ref)  # accepted
    store = open_key_ring(settings).keystore
    assert resolve_ref(store, ref) == value.encode()
    assert ActiveSecrets(store, settings.stripe_webhook_secret_ref).values() == (value.encode(),)

    errors: list[BaseException] = []
    for bad, says in (
        (f"awskms://{MASTER_ALIAS}", "names a KMS key, not a value"),
        (f"awskms://{MASTER_ALIAS}#{base64.b64encode(blob[:-2]).decode()}", "does not open"),
        (f"awskms://{MASTER_ALIAS}#not-base64!", "not base64"),
        ("bao://kv/bastion/stripe#webhook_secret", "not configured"),
    ):
        with pytest.raises(InvalidSecretRef) as caught:
            resolve_ref(store, bad)
        assert says in str(caught.value)
        errors.append(caught.value)
    with pytest.raises(SecretsBackendRefused) as missing:  # a key that does not exist
        resolve_ref(store, f"awskms://alias/nope#{base64.b64encode(blob).decode()}")
    assert "alias/nope" in str(missing.value)
    errors.append(missing.value)
    assert all(value not in str(e) + repr(e) for e in errors)


def test_a_kms_outage_is_survived_until_the_cache_ttl_then_fails_closed(tmp_path: Path) -> None:
    own = start_moto(tmp_path)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in own.environ().items():
                patch.setenv(name, value)
            kms = open_key_ring(own.settings(tmp_path / "home", awskms_cache_seconds=1.5)).kms
        data_key, blob = kms.generate_data_key(_ctx())
        own.stop()
        assert kms.unwrap(blob, _ctx()) == data_key  # cached: the outage is not felt
        time.sleep(1.6)
        with pytest.raises(SecretsBackendUnavailable) as caught:
            kms.unwrap(blob, _ctx())
    finally:
        own.stop()
    problem = as_problem(caught.value)
    assert problem.status == 503 and dict(problem.headers or {})["Retry-After"] == "5"
    assert str(problem.type).endswith("/secrets-backend-unavailable")
    assert str(caught.value) == f"secrets backend awskms at {own.url} is unreachable"


def test_an_unreachable_kms_stops_start_up_with_one_line(tmp_path: Path) -> None:
    addr = f"http://127.0.0.1:{_free_port()}"
    home = tmp_path / "home"
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        "BASTION_SECRETS_BACKEND": "awskms",
        "BASTION_AWSKMS_ENDPOINT_URL": addr,
        "BASTION_MASTER_KEY_REF": f"awskms://{MASTER_ALIAS}",
        "AWS_ACCESS_KEY_ID": "AKIA" + "A" * 16,
        "AWS_SECRET_ACCESS_KEY": MARKER,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bastion", "keys", "rotate", "jwt"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"error: secrets backend awskms at {addr} is unreachable\n"
    assert MARKER not in done.stdout + done.stderr
    for fallback in ("home-keys", "home-master"):  # no local key made instead
        assert not (tmp_path / fallback).exists()


def test_wrong_credentials_and_a_missing_key_give_clear_errors(
    moto: Moto,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    with pytest.raises(SecretsBackendRefused) as wrong:  # the `wrong` profile's secret: MARKER
        open_key_ring(moto.settings(tmp_path / "h", awskms_profile="wrong"))
    assert f"secrets backend awskms at {moto.url} refused" in str(wrong.value)
    errors.append(wrong.value)
    with pytest.raises(InvalidSecretRef) as unknown:
        open_key_ring(moto.settings(tmp_path / "h", awskms_profile="nobody"))
    errors.append(unknown.value)
    with pytest.raises(InvalidSecretRef) as unset:
        open_key_ring(moto.settings(tmp_path / "h", master_key_ref=None))
    assert "BASTION_MASTER_KEY_REF" in str(unset.value)
    errors.append(unset.value)
    missing_master = open_key_ring(
        moto.settings(tmp_path / "h", master_key_ref="awskms://alias/no")
    )
    with pytest.raises(SecretsBackendRefused) as missing:
        missing_master.keystore.set("x", MARKER.encode())
    assert "alias/no" in str(missing.value)
    errors.append(missing.value)
    assert not (tmp_path / "h-master" / "master.key").exists()  # nothing half-made

    rendered = [str(e) + repr(e) + repr(e.__cause__) + repr(e.__context__) for e in errors]
    problems = [
        repr(as_problem(e).__dict__) for e in errors if isinstance(e, SecretsBackendRefused)
    ]
    out, err = capfd.readouterr()
    assert MARKER not in "".join([*rendered, *problems, caplog.text, out, err])
