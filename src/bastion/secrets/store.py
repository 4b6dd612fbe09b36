"""The local keystore: named, versioned secrets in one encrypted file.

File format: ``b"BKS1"`` || 12-byte nonce || AES-256-GCM(JSON document), with the
magic header as associated data (NIST SP 800-38D). The 32-byte master key sits
in its own 0600 file, outside the database and the repository; a wrong key or
any altered byte makes the whole file unreadable: the keystore fails closed.

Writers take an exclusive ``flock`` on a sibling ``.lock`` file and re-read the
file inside it, then replace it atomically, so concurrent processes never lose
an update.

A version's *fingerprint* (what ``bastion secrets get`` shows without
``--reveal``) tells versions apart without being a guessing oracle: it is
HMAC-SHA256 (RFC 2104) of the value under a key derived from the master key
with HKDF (RFC 5869), never a plain hash. An unsalted SHA-256 of a short
secret (a 6-digit PIN, a dictionary password) is inverted by trying
candidates offline; a keyed one needs the master key, and the same value
fingerprints differently in two keystores.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.encoding import b64_decode, b64_encode
from bastion.logs import get_logger
from bastion.secrets.errors import (
    InsecurePermissions,
    InvalidSecretRef,
    KeystoreLocked,
    MasterKeyMissing,
    SecretNotFound,
)
from bastion.secrets.protocols import Keystore, MasterKeySealer, ReadsReferences, SecretVersionInfo

MAGIC = b"BKS1"
_NONCE = 12
# HKDF info of the fingerprint key: one key, one use (NIST SP 800-57 part 1, 5.2).
_FINGERPRINT_INFO = b"bastion/keystore/fingerprint/v1"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}$")
# The name part of a bao:// or awskms:// reference: a path or an alias.
_EXTERNAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")
EXTERNAL_SCHEMES = ("bao", "awskms")

Document = dict[str, list[dict[str, Any]]]


class LocalKeystore:
    """Named, versioned secrets in an AES-256-GCM file under a local master key:
    the local :class:`~bastion.secrets.protocols.Keystore`.

    Every method may raise :class:`KeystoreLocked` (wrong key, altered file),
    :class:`MasterKeyMissing` or :class:`InsecurePermissions`: the keystore
    fails closed and never falls back to an empty or new one.
    """

    def __init__(
        self, keystore_file: Path, master_key_file: Path, *, sealer: MasterKeySealer | None = None
    ) -> None:
        self.path = keystore_file
        self.master_key_file = master_key_file
        self._lock_path = keystore_file.with_name(keystore_file.name + ".lock")
        # With a sealer (master_key_ref) the file holds the key wrapped by a KMS;
        # the unwrapped key is kept for as long as the file holds that blob.
        self.sealer = sealer
        self._unsealed: tuple[bytes, bytes] | None = None

    # -- reading ----------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> bytes:
        """Return the value of ``name`` (its current version unless ``version``).

        Raises :class:`SecretNotFound`, or :class:`KeystoreLocked` /
        :class:`MasterKeyMissing` / :class:`InsecurePermissions` if the file
        cannot be opened.
        """
        entry = self._version(self._load(), name, version)
        return _value(entry)

    def current_version(self, name: str) -> int:
        """Return the current (newest active) version number of ``name``.

        Raises :class:`SecretNotFound` if there is none.
        """
        return self.current(name)[0]

    def current(self, name: str) -> tuple[int, bytes]:
        """Return ``(version, value)`` of the current version, read together.

        Raises :class:`SecretNotFound` if there is none.
        """
        entry = self._version(self._load(), name, None)
        return int(entry["version"]), _value(entry)

    def versions(self, name: str) -> list[SecretVersionInfo]:
        """Return metadata (no values) of every version of ``name``, oldest first.

        Raises :class:`SecretNotFound` for an unknown name.
        """
        doc = self._load()
        if name not in doc:
            raise SecretNotFound(name)
        key = _fingerprint_key(self._master_key(create=False))
        return [
            SecretVersionInfo(
                version=int(v["version"]),
                created_at=str(v["created_at"]),
                state=str(v["state"]),
                fingerprint=hmac.new(key, _value(v), hashlib.sha256).hexdigest()[:16],
            )
            for v in doc[name]
        ]

    def list(self) -> list[str]:
        """Return the names of all secrets, sorted."""
        return sorted(self._load())

    # -- writing ----------------------------------------------------------------

    def set(self, name: str, value: bytes) -> int:
        """Add ``value`` as the new current version of ``name``; return its version.

        Raises :class:`InvalidSecretRef` for a malformed name.
        """
        _check_name(name)
        with self._writing() as doc:
            return _append(doc, name, value)

    def rotate(self, name: str, value: bytes | None = None) -> int:
        """Add a new version (random 32 bytes unless ``value``); return it.

        Older versions stay readable so holders of the old one keep working
        during the overlap window, until they are retired.
        """
        return self.set(name, secrets.token_bytes(32) if value is None else value)

    def retire(self, name: str, version: int) -> None:
        """Mark ``version`` retired: still readable by number, never current.

        Raises :class:`SecretNotFound` for an unknown name or version.
        """
        with self._writing() as doc:
            entry = self._version(doc, name, version)
            entry["state"] = "retired"

    def ensure(self, name: str, generate: Callable[[], bytes]) -> bytes:
        """Return the current value of ``name``, creating it with ``generate()``.

        Concurrent callers agree on one value: creation happens under the lock.
        Raises :class:`InvalidSecretRef` for a malformed name.
        """
        _check_name(name)
        with contextlib.suppress(SecretNotFound):
            return self.get(name)
        with self._writing() as doc:
            if name not in doc or not any(v["state"] == "active" for v in doc[name]):
                _append(doc, name, generate())
            return _value(self._version(doc, name, None))

    def delete(self, name: str) -> None:
        """Remove ``name`` and all its versions; raise :class:`SecretNotFound` if absent."""
        with self._writing() as doc:
            if doc.pop(name, None) is None:
                raise SecretNotFound(name)

    # -- file handling -----------------------------------------------------------

    @staticmethod
    def _version(doc: Document, name: str, version: int | None) -> dict[str, Any]:
        """Return the entry of ``version`` (newest active if None) or raise SecretNotFound."""
        entries = doc.get(name)
        if not entries:
            raise SecretNotFound(name)
        if version is None:
            active = [v for v in entries if v["state"] == "active"]
            if not active:
                raise SecretNotFound(f"{name} has no active version")
            return active[-1]
        for entry in entries:
            if int(entry["version"]) == version:
                return entry
        raise SecretNotFound(f"{name} version {version}")

    def _master_key(self, *, create: bool) -> bytes:
        """Return the 32-byte master key, creating it only for a brand-new keystore.

        Raises :class:`MasterKeyMissing` if the keystore exists without its key,
        :class:`InsecurePermissions` if the key file is group/other accessible,
        :class:`KeystoreLocked` if it does not hold 32 bytes.
        """
        if not self.master_key_file.exists():
            if self.path.exists():
                raise MasterKeyMissing(
                    f"keystore {self.path} exists but its master key "
                    f"{self.master_key_file} is missing; refusing to continue"
                )
            if not create:
                raise SecretNotFound("the keystore is empty")
            _private_dir(self.master_key_file.parent)
            fresh = secrets.token_bytes(32)
            stored = self.sealer.seal(fresh) if self.sealer is not None else fresh
            # Exclusive: an existing master key is never replaced, whatever races.
            _write_atomic(self.master_key_file, stored, exclusive=True)
        _require_private(self.master_key_file)
        key = self._unseal(self.master_key_file.read_bytes())
        if len(key) != 32:
            raise KeystoreLocked(
                f"master key file {self.master_key_file} does not hold a 32-byte key; "
                "failing closed"
            )
        return key

    def _unseal(self, stored: bytes) -> bytes:
        """The master key from the file's bytes: as they are, or unwrapped by the sealer.

        A plain 32-byte key found where a sealed one belongs (an install that
        just configured ``master_key_ref``) is sealed in place, once.
        """
        if self.sealer is None:
            return stored
        if self._unsealed is not None and self._unsealed[0] == stored:
            return self._unsealed[1]
        if len(stored) == 32:
            sealed = self.sealer.seal(stored)
            _write_atomic(self.master_key_file, sealed)
            get_logger("bastion.secrets").warning(
                "master_key_sealed", file=str(self.master_key_file)
            )
            self._unsealed = (sealed, stored)
            return stored
        key = self.sealer.unseal(stored)
        self._unsealed = (stored, key)
        return key

    def _load(self) -> Document:
        """Return the decrypted document (``{}`` if there is no keystore yet).

        Raises :class:`KeystoreLocked` on a wrong key or any altered byte.
        """
        if not self.path.exists():
            if self.master_key_file.exists():
                _require_private(self.master_key_file)
            return {}
        _require_private(self.path)
        key = self._master_key(create=False)
        blob = self.path.read_bytes()
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _NONCE + 16:
            raise KeystoreLocked(f"keystore {self.path} is not a Bastion keystore; failing closed")
        nonce, ciphertext = blob[len(MAGIC) : len(MAGIC) + _NONCE], blob[len(MAGIC) + _NONCE :]
        try:
            plaintext = AESGCM(key).decrypt(nonce, ciphertext, MAGIC)
        except InvalidTag:
            raise KeystoreLocked(
                f"keystore {self.path} cannot be decrypted with the master key "
                f"{self.master_key_file} (wrong key or altered file); failing closed"
            ) from None
        doc: Document = json.loads(plaintext)
        return doc

    def _save(self, doc: Document) -> None:
        key = self._master_key(create=True)
        nonce = secrets.token_bytes(_NONCE)
        plaintext = json.dumps(doc, sort_keys=True).encode()
        _write_atomic(self.path, MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, MAGIC))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Document]:
        """Yield the current document under the exclusive lock; save it on success."""
        _private_dir(self.path.parent)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            doc = self._load()  # re-read under the lock: another writer may have won
            yield doc
            self._save(doc)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class SecretRef:
    """A reference to a secret: ``local://jwt/signing``, ``local://db/key#3`` (a
    version), ``bao://kv/bastion/stripe#webhook_secret`` (a field of an OpenBao
    KV v2 secret) or ``awskms://alias/name#<ciphertext>`` (a value KMS decrypts).

    ``fragment`` is what follows ``#`` for the other schemes; never show it
    (an awskms one is a ciphertext): :meth:`display` names the reference.
    """

    scheme: str
    name: str
    version: int | None = None
    fragment: str | None = None

    @classmethod
    def parse(cls, ref: str) -> SecretRef:
        """Parse ``scheme://name[#version or fragment]``; raise :class:`InvalidSecretRef`
        (naming the scheme at most: the text given may be a misplaced secret)."""
        match = re.fullmatch(r"([a-z][a-z0-9]*)://([^#\s]+)(?:#(\S+))?", ref)
        if match is None:
            raise InvalidSecretRef(
                "a secret reference looks like local://name[#version], "
                "bao://kv/path#field or awskms://alias/name"
            )
        scheme, name, fragment = match.groups()
        if scheme == "local":
            _check_name(name)
            if fragment is not None and not fragment.isdigit():
                raise InvalidSecretRef("a local:// reference's #version is a number")
            return cls(scheme, name, int(fragment) if fragment else None)
        if not _EXTERNAL_NAME.fullmatch(name) or ".." in name.split("/"):
            raise InvalidSecretRef(f"malformed {scheme}:// reference")
        return cls(scheme, name, None, fragment)

    def display(self) -> str:
        """The reference as it may be shown: an awskms ciphertext is elided."""
        if self.version is not None:
            return f"{self.scheme}://{self.name}#{self.version}"
        if self.fragment is not None and self.scheme != "awskms":
            return f"{self.scheme}://{self.name}#{self.fragment}"
        return f"{self.scheme}://{self.name}" + ("#..." if self.fragment else "")


def resolve_ref(keystore: Keystore, ref: str | SecretRef) -> bytes:
    """Return the value a reference points to, through the configured backend.

    ``local://`` reads ``keystore`` (whichever backend it is); ``bao://`` and
    ``awskms://`` are read by a keystore that :class:`ReadsReferences` of its
    backend (the OpenBao keystore, the awskms one). Raises
    :class:`InvalidSecretRef` for a scheme whose backend is not configured,
    :class:`SecretNotFound` for a missing path or field; errors name the
    reference, never a value.
    """
    parsed = SecretRef.parse(ref) if isinstance(ref, str) else ref
    if parsed.scheme == "local":
        return keystore.get(parsed.name, parsed.version)
    if parsed.scheme not in EXTERNAL_SCHEMES:
        raise InvalidSecretRef(
            f"unknown secret backend {parsed.scheme}:// (local://, bao://, awskms://)"
        )
    if not isinstance(keystore, ReadsReferences):
        raise InvalidSecretRef(
            f"secret backend {parsed.scheme}:// is not configured "
            "(BASTION_SECRETS_BACKEND=local reads local:// only)"
        )
    return keystore.read_reference(parsed.scheme, parsed.name, parsed.fragment)


def _check_name(name: str) -> None:
    """Raise :class:`InvalidSecretRef` unless ``name`` is a valid secret name."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidSecretRef(f"invalid secret name {name!r}")


def _append(doc: Document, name: str, value: bytes) -> int:
    """Append ``value`` as a new active version of ``name``; return its number."""
    entries = doc.setdefault(name, [])
    version = max((int(v["version"]) for v in entries), default=0) + 1
    entries.append(
        {
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "state": "active",
            "value": b64_encode(value),
        }
    )
    return version


def _fingerprint_key(master_key: bytes) -> bytes:
    """The key fingerprints are HMACs under: HKDF-SHA256 (RFC 5869) of the master key."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=_FINGERPRINT_INFO).derive(master_key)


def _value(entry: dict[str, Any]) -> bytes:
    """A version's value, decoded strictly (RFC 4648 section 4, one spelling per
    value); raise :class:`KeystoreLocked` for anything else: fail closed."""
    try:
        return b64_decode(entry["value"])
    except (ValueError, TypeError):
        raise KeystoreLocked("a keystore entry's value is malformed; failing closed") from None


def _require_private(path: Path) -> None:
    """Raise :class:`InsecurePermissions` if group or others have any access to ``path``."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecurePermissions(
            f"{path} is accessible to group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )


def _private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; a directory we create is 0700."""
    if path.is_dir():
        return  # an existing directory is the operator's choice; file modes still hold
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # explicitly: mkdir's mode is filtered by the umask


def _write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (0600) so readers see the old or the new file whole.

    With ``exclusive`` the file must not exist yet (``FileExistsError`` otherwise).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails rather than replace
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself must survive a crash
    finally:
        os.close(directory)
