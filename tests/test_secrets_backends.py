"""The secret-store seam: a second Keystore/KMS plugs in through the one factory,
and the vault round-trips a PII token on it, on the real database.

The in-memory backend below is a real (if volatile) implementation of both
protocols, not a mock: it encrypts with AES-256-GCM under per-tenant KEKs it
holds, binds the encryption context as associated data, and destroys a
tenant's KEK on shred. Nothing of it touches the local keystore's files.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from bastion.compose import Overrides, build_api, build_gateway
from bastion.db.pool import Database
from bastion.identity.workload import WorkloadCA
from bastion.safety.vault import PiiVault, VaultKeyUnavailable, tokens_in
from bastion.secrets import (
    KMS,
    KeyContext,
    Keystore,
    KMSError,
    LocalKeystore,
    LocalKMS,
    SecretNotFound,
    SecretVersionInfo,
    open_key_ring,
)
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from bastion.tenants.service import TenantService

pytestmark = pytest.mark.anyio


class MemoryKeystore:
    """Named, versioned secrets in a dict (state lost on exit)."""

    def __init__(self) -> None:
        self._secrets: dict[str, list[tuple[int, str, bytes]]] = {}

    def get(self, name: str, version: int | None = None) -> bytes:
        return self._entry(name, version)[2]

    def current(self, name: str) -> tuple[int, bytes]:
        version, _state, value = self._entry(name, None)
        return version, value

    def current_version(self, name: str) -> int:
        return self._entry(name, None)[0]

    def versions(self, name: str) -> list[SecretVersionInfo]:
        if name not in self._secrets:
            raise SecretNotFound(name)
        return [SecretVersionInfo(v, "-", state, "-") for v, state, _ in self._secrets[name]]

    def list(self) -> list[str]:
        return sorted(self._secrets)

    def set(self, name: str, value: bytes) -> int:
        entries = self._secrets.setdefault(name, [])
        entries.append((len(entries) + 1, "active", value))
        return len(entries)

    def rotate(self, name: str, value: bytes | None = None) -> int:
        return self.set(name, secrets.token_bytes(32) if value is None else value)

    def retire(self, name: str, version: int) -> None:
        entries = self._secrets[name]
        entries[:] = [(v, "retired" if v == version else s, x) for v, s, x in entries]

    def ensure(self, name: str, generate: Callable[[], bytes]) -> bytes:
        try:
            return self.get(name)
        except SecretNotFound:
            self.set(name, generate())
            return self.get(name)

    def delete(self, name: str) -> None:
        if self._secrets.pop(name, None) is None:
            raise SecretNotFound(name)

    def _entry(self, name: str, version: int | None) -> tuple[int, str, bytes]:
        entries = [e for e in self._secrets.get(name, []) if version in (None, e[0])]
        if version is None:
            entries = [e for e in entries if e[1] == "active"]
        if not entries:
            raise SecretNotFound(name)
        return entries[-1]


class MemoryKMS:
    """Per-tenant KEKs in a dict; blobs are nonce || AES-256-GCM(data key)."""

    def __init__(self) -> None:
        self.keks: dict[UUID, bytes] = {}
        self.contexts: list[KeyContext] = []  # every context it was asked about

    def wrap(self, data_key: bytes, context: KeyContext) -> bytes:
        self.contexts.append(context)
        kek = self.keks.setdefault(context.tenant_id, secrets.token_bytes(32))
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(kek).encrypt(nonce, data_key, context.encode())

    def unwrap(self, blob: bytes, context: KeyContext) -> bytes:
        self.contexts.append(context)
        kek = self.keks.get(context.tenant_id)
        if kek is None:
            raise KMSError("the tenant has no KEK here")
        try:
            return AESGCM(kek).decrypt(blob[:12], blob[12:], context.encode())
        except (InvalidTag, ValueError):
            raise KMSError("does not verify") from None

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, bytes]:
        data_key = secrets.token_bytes(32)
        return data_key, self.wrap(data_key, context)

    def destroy_tenant(self, tenant_id: UUID) -> None:
        self.keks.pop(tenant_id, None)


def _typed(keystore: MemoryKeystore, kms: MemoryKMS) -> tuple[Keystore, KMS]:
    """The doubles as the protocols (mypy checks they conform structurally)."""
    return keystore, kms


def test_the_factory_builds_the_configured_local_backend(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    ring = open_key_ring(settings)
    assert isinstance(ring.keystore, LocalKeystore) and isinstance(ring.kms, LocalKMS)
    assert ring.keystore.path == settings.resolved_keystore_file
    assert ring.kms.keystore is ring.keystore  # the KEKs live in that same key ring
    assert not settings.resolved_keys_dir.exists()  # opening touches no file


def test_an_unavailable_backend_is_refused_never_replaced_by_the_local_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_SECRETS_BACKEND", "openbao")
    with pytest.raises(ValidationError):
        Settings(home=tmp_path / "home")


def test_the_composition_root_wires_an_overridden_backend_everywhere(tmp_path: Path) -> None:
    """Api and gateway take both parts from the overrides; no local key file appears."""
    settings = Settings(home=tmp_path / "home")
    keystore, kms = MemoryKeystore(), MemoryKMS()
    WorkloadCA(keystore, settings.workload_trust_domain).init()  # `bastion ca init`
    pool = Database("host=/nonexistent dbname=unused", b"k" * 32)  # never opened
    overrides = Overrides(database=pool, keystore=keystore, kms=kms)
    api, gateway = build_api(settings, overrides), build_gateway(settings, overrides)
    assert api.keystore is keystore and gateway.keystore is keystore
    assert gateway.tls is not None and gateway.tls.ca.keystore is keystore  # the workload CA
    assert api.knowledge.keys.kms is kms and api.knowledge.vault.keys.kms is kms
    assert gateway.service.vault is not None and gateway.service.vault.keys.kms is kms
    assert "jwt/signing" in keystore.list()  # identity's keys came from it too
    assert not settings.resolved_keys_dir.exists()


async def test_a_second_backend_plugs_in_and_the_vault_round_trips_a_token(
    db: Database, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home")
    keystore, kms = MemoryKeystore(), MemoryKMS()
    ring = open_key_ring(settings, keystore=keystore, kms=kms)
    assert _typed(keystore, kms) == (ring.keystore, ring.kms)
    assert ring.keystore is keystore and ring.kms is kms

    service = TenantService(db)
    tenant = await service.create_tenant(f"seam-{uuid4().hex[:8]}", "seam")
    owner = await service.add_member(tenant.id, f"owner-{uuid4().hex[:6]}@seam.test", "owner")
    keys = TenantKeys(ring.kms)
    vault = PiiVault(keys)
    redaction = await vault.tokenize(db, tenant.id, "write to ada@example.com")
    (token,) = tokens_in(redaction.text)
    assert "ada@example.com" not in redaction.text
    # A fresh vault (nothing cached) reveals it through the same backend.
    revealed = await PiiVault(TenantKeys(ring.kms)).detokenize(
        db, tenant.id, [token], user_id=owner, role="owner", reason="seam check"
    )
    assert [r.value for r in revealed] == ["ada@example.com"]

    # Every key went through this KMS, bound to the tenant and its purpose...
    assert {(c.tenant_id, c.purpose) for c in kms.contexts} == {
        (tenant.id, "data-key"),
        (tenant.id, "pii-token-key"),
    }
    # ...and none through the local key ring the settings name.
    assert not settings.resolved_keystore_file.exists()

    # Shredding destroys the tenant's KEK in this backend: nothing reveals any more.
    async with db.tenant_tx(tenant.id, None, "system") as tx:
        await keys.shred(tx, tenant.id)
    assert not kms.keks  # its only tenant's KEK is gone
    with pytest.raises(VaultKeyUnavailable):
        await PiiVault(TenantKeys(ring.kms)).detokenize(
            db, tenant.id, [token], user_id=owner, role="owner", reason="after the shred"
        )
