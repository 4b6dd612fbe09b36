"""The one place a secret-store backend is chosen: :func:`open_key_ring`.

Everything else receives a :class:`~bastion.secrets.protocols.Keystore` and a
:class:`~bastion.secrets.protocols.KMS` from here (through the composition
code) and never names a backend: ``settings.secrets_backend`` picks the local
keystore or OpenBao/Vault (:mod:`bastion.secrets.openbao`, which signs in
here, so an unreachable store stops start-up with one line naming it).
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.secrets.kms import LocalKMS
from bastion.secrets.protocols import KMS, Keystore
from bastion.secrets.store import LocalKeystore
from bastion.settings import Settings


@dataclass(frozen=True)
class KeyRing:
    """The configured backend: named secrets and the tenants' KEKs."""

    keystore: Keystore
    kms: KMS


def open_key_ring(
    settings: Settings, *, keystore: Keystore | None = None, kms: KMS | None = None
) -> KeyRing:
    """The key ring ``settings`` configure; ``keystore`` or ``kms`` replace a part.

    Overrides are for tests and for callers that already hold the keystore
    (the KMS is then built on that one, not on a second handle). Opening the
    local keystore touches no file (it reads and fails closed on first use);
    opening OpenBao signs in and raises
    :class:`~bastion.secrets.errors.SecretsBackendUnavailable` if it cannot.
    """
    if settings.secrets_backend == "local":
        store = keystore or LocalKeystore(
            settings.resolved_keystore_file, settings.resolved_master_key_file
        )
        return KeyRing(store, kms or LocalKMS(store))
    if settings.secrets_backend == "openbao":
        from bastion.secrets.openbao import open_openbao  # hvac only when configured

        if keystore is not None and kms is not None:
            return KeyRing(keystore, kms)
        bao_keystore, bao_kms = open_openbao(settings)
        return KeyRing(keystore or bao_keystore, kms or bao_kms)
    raise AssertionError(f"unknown secrets backend {settings.secrets_backend!r}")  # Literal


def open_keystore(settings: Settings) -> Keystore:
    """Return the named secrets of the key ring ``settings`` configure."""
    return open_key_ring(settings).keystore
