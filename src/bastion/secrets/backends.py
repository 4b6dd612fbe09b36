"""The one place a secret-store backend is chosen: :func:`open_key_ring`.

Everything else receives a :class:`~bastion.secrets.protocols.Keystore` and a
:class:`~bastion.secrets.protocols.KMS` from here (through the composition
code) and never names a backend. An OpenBao/Vault or AWS KMS backend is one
more branch on ``settings.secrets_backend``.
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
    (the KMS is then built on that one, not on a second handle). Opening
    touches no file: the local keystore reads and fails closed on first use.
    """
    if settings.secrets_backend == "local":
        store = keystore or LocalKeystore(
            settings.resolved_keystore_file, settings.resolved_master_key_file
        )
        return KeyRing(store, kms or LocalKMS(store))
    raise AssertionError(f"unknown secrets backend {settings.secrets_backend!r}")  # Literal
