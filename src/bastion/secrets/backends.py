"""The one place a secret-store backend is chosen: :func:`open_key_ring`.

Everything else receives a :class:`~bastion.secrets.protocols.Keystore` and a
:class:`~bastion.secrets.protocols.KMS` from here (through the composition
code) and never names a backend: ``settings.secrets_backend`` picks the local
keystore, OpenBao/Vault (:mod:`bastion.secrets.openbao`) or AWS KMS
(:mod:`bastion.secrets.awskms`); both sign in here, so an unreachable store
stops start-up with one line naming it, and nothing falls back to a local key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bastion.logs import get_logger
from bastion.secrets.kms import LocalKMS
from bastion.secrets.protocols import KMS, Keystore
from bastion.secrets.store import LocalKeystore, _private_dir, _write_atomic
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
        if keystore is None:
            move_legacy_master_key(settings)
        store = keystore or LocalKeystore(
            settings.resolved_keystore_file, settings.resolved_master_key_file
        )
        return KeyRing(store, kms or LocalKMS(store))
    if settings.secrets_backend == "awskms":
        from bastion.secrets.awskms import open_awskms  # boto3 only when configured

        if keystore is not None and kms is not None:
            return KeyRing(keystore, kms)
        move_legacy_master_key(settings)
        kms_keystore, aws_kms = open_awskms(settings)
        return KeyRing(keystore or kms_keystore, kms or aws_kms)
    if settings.secrets_backend == "openbao":
        from bastion.secrets.openbao import open_openbao  # hvac only when configured

        if keystore is not None and kms is not None:
            return KeyRing(keystore, kms)
        bao_keystore, bao_kms = open_openbao(settings)
        return KeyRing(keystore or bao_keystore, kms or bao_kms)
    raise AssertionError(f"unknown secrets backend {settings.secrets_backend!r}")  # Literal


def move_legacy_master_key(settings: Settings) -> None:
    """Move an older install's master key out of the keystore directory.

    It used to sit beside ``keystore.bin``; now it lives in a directory of its
    own (:attr:`Settings.resolved_master_key_file`), so a backup of the
    keystore directory holds no key. Moved once, by rename or by a private
    copy then unlink when the two are on different file systems; never
    overwrites a master key already at the new place.
    """
    new, old = settings.resolved_master_key_file, settings.legacy_master_key_file
    if settings.master_key_file is not None or new == old or new.exists() or not old.exists():
        return
    _private_dir(new.parent)
    try:
        os.link(old, new)  # fails rather than replace; same file system only
    except FileExistsError:
        return  # another process moved it first
    except OSError:
        _write_atomic(new, old.read_bytes(), exclusive=True)
    old.unlink()
    get_logger("bastion.secrets").warning("master_key_moved", old=str(old), new=str(new))


def open_keystore(settings: Settings) -> Keystore:
    """Return the named secrets of the key ring ``settings`` configure."""
    return open_key_ring(settings).keystore
