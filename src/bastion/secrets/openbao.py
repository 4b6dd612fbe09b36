"""The OpenBao backend (serves HashiCorp Vault too): KV v2 for named secrets,
transit for the tenants' key-encryption keys.

* :class:`OpenBaoKeystore` (the :class:`~bastion.secrets.protocols.Keystore`):
  secret ``name`` is the KV v2 secret ``<prefix>/<name>``; its versions *are*
  the KV versions. KV versions are immutable, so "retired" is kept in the
  secret's ``custom_metadata``. Fingerprints are transit HMACs
  (``transit/hmac``) under a key that never leaves OpenBao.
* :class:`OpenBaoKMS` (the :class:`~bastion.secrets.protocols.KMS`): one
  transit key per tenant (``bastion-tenant-<id>``, ``aes256-gcm96``,
  ``derived=true``). Every wrap passes the encoded
  :class:`~bastion.secrets.protocols.KeyContext` as the transit ``context``,
  so the key that seals a data key is derived from (tenant, purpose,
  version): a blob presented under another context does not decrypt. One key
  per tenant (not one key with a context per tenant) because a derived key
  cannot be deleted alone: deleting the tenant's transit key is what makes
  ``bastion tenant shred`` hold in OpenBao. ``bastion keys rotate kek``
  rotates it with transit ``rotate`` (every older version still decrypts:
  a backup's blobs) and re-wraps the data keys with ``rewrap``, inside
  OpenBao (the policy needs ``transit/rewrap/*`` and ``list`` on
  ``transit/keys``).
* :class:`OpenBaoSession`: signs in with AppRole or a Kubernetes
  service-account token, renews its token at two thirds of its TTL, signs in
  again when renewal is refused or the token was revoked, and turns transport
  failures into :class:`SecretsBackendUnavailable` (503, ``Retry-After``)
  and refusals into :class:`SecretsBackendRefused`. hvac's exceptions are
  never chained: their text can carry request details.

Unwrapped data keys are cached in memory for ``openbao_cache_seconds``, keyed
by the exact wrapped blob and context: a call that reaches the cache has read
the blob from the database, which a shred deletes, and :meth:`OpenBaoKMS.destroy_tenant`
drops the tenant's entries at once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

import hvac
import hvac.exceptions
import requests

from bastion.secrets.errors import (
    InvalidSecretRef,
    KMSError,
    SecretNotFound,
    SecretsBackendRefused,
    SecretsBackendUnavailable,
)
from bastion.secrets.key_cache import DataKeyCache
from bastion.secrets.protocols import KeyContext, SecretVersionInfo
from bastion.secrets.store import _check_name
from bastion.settings import Settings

T = TypeVar("T")

FINGERPRINT_KEY = "bastion-keystore-fingerprint"
TENANT_KEY_PREFIX = "bastion-tenant-"
_TRANSPORT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
)


def read_reference(ref: str | None, what: str) -> str:
    """The value a ``file:/path`` or ``env:VARIABLE`` reference points to.

    Raises :class:`InvalidSecretRef` naming ``what`` (never the value: a
    literal put where a reference belongs is itself a secret).
    """
    if ref and ref.startswith("file:"):
        try:
            value = open(ref[5:], encoding="utf-8").read().strip()  # noqa: SIM115
        except OSError:
            raise InvalidSecretRef(f"{what}: the file it references cannot be read") from None
    elif ref and ref.startswith("env:"):
        value = os.environ.get(ref[4:], "").strip()
    else:
        raise InvalidSecretRef(f"{what} must be a reference: file:/path or env:VARIABLE")
    if not value:
        raise InvalidSecretRef(f"{what}: the value it references is empty")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class OpenBaoSession:
    """One signed-in hvac client, its token renewed before expiry."""

    def __init__(self, settings: Settings) -> None:
        if not settings.openbao_addr:
            raise InvalidSecretRef("BASTION_OPENBAO_ADDR is not set")
        self.settings = settings
        self.addr = settings.openbao_addr
        verify: bool | str = str(settings.openbao_ca_file) if settings.openbao_ca_file else True
        self.client = hvac.Client(
            url=self.addr, timeout=settings.openbao_timeout_seconds, verify=verify
        )
        self._lock = threading.Lock()
        self._renew_at: float | None = None  # None: signed out

    def _down(self) -> SecretsBackendUnavailable:
        return SecretsBackendUnavailable(f"secrets backend openbao at {self.addr} is unreachable")

    def sign_in(self) -> None:
        """Sign in with the configured method; raise a one-line error naming the address."""
        s = self.settings
        mount = s.openbao_auth_mount or s.openbao_auth
        try:
            if s.openbao_auth == "approle":
                role_id = read_reference(s.openbao_role_id_ref, "BASTION_OPENBAO_ROLE_ID_REF")
                secret_id = read_reference(s.openbao_secret_id_ref, "BASTION_OPENBAO_SECRET_ID_REF")
                answer = self.client.auth.approle.login(role_id, secret_id, mount_point=mount)
            else:
                if not s.openbao_kubernetes_role:
                    raise InvalidSecretRef("BASTION_OPENBAO_KUBERNETES_ROLE is not set")
                jwt = self._service_account_token()
                answer = self.client.auth.kubernetes.login(
                    s.openbao_kubernetes_role, jwt, mount_point=mount
                )
        except _TRANSPORT_ERRORS:
            raise self._down() from None
        except hvac.exceptions.VaultError:
            raise SecretsBackendRefused(
                f"secrets backend openbao at {self.addr} refused the {s.openbao_auth} sign-in "
                "(check the role and the credentials it references)"
            ) from None
        self._schedule(answer["auth"])

    def _service_account_token(self) -> str:
        """The pod's service-account JWT, read at every sign-in (the kubelet
        rotates a projected token in place). Errors name the file, never its text."""
        path = self.settings.openbao_kubernetes_token_file
        where = f"secrets backend openbao at {self.addr}: the Kubernetes service-account token"
        setting = "(BASTION_OPENBAO_KUBERNETES_TOKEN_FILE)"
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise InvalidSecretRef(f"{where} file {path} cannot be read {setting}") from None
        if not token:
            raise InvalidSecretRef(f"{where} file {path} is empty {setting}")
        return token

    def _schedule(self, auth: dict[str, Any]) -> None:
        # Renew at two thirds of the TTL (a token that cannot be renewed is
        # replaced by a new sign-in then); a token without TTL never expires.
        ttl = int(auth.get("lease_duration") or 0)
        self._renew_at = time.monotonic() + ttl * 2 / 3 if ttl else float("inf")

    def _fresh_token(self) -> None:
        with self._lock:
            if self._renew_at is None:
                self.sign_in()
            elif time.monotonic() >= self._renew_at:
                try:
                    self._schedule(self.client.auth.token.renew_self()["auth"])
                except _TRANSPORT_ERRORS:
                    raise self._down() from None
                except hvac.exceptions.VaultError:
                    self.sign_in()  # past its max TTL, or not renewable: a new token

    def call(self, operation: Callable[[hvac.Client], T]) -> T:
        """Run ``operation`` on the signed-in client.

        A refused token (revoked, expired) signs in once more and retries;
        unreachable → :class:`SecretsBackendUnavailable`; still refused →
        :class:`SecretsBackendRefused`. Other hvac errors (``InvalidPath``,
        ``InvalidRequest``) are the caller's to read.
        """
        self._fresh_token()
        try:
            try:
                return operation(self.client)
            except hvac.exceptions.Forbidden:
                with self._lock:
                    self.sign_in()
                return operation(self.client)
        except _TRANSPORT_ERRORS:
            raise self._down() from None
        except hvac.exceptions.Forbidden:
            raise SecretsBackendRefused(
                f"secrets backend openbao at {self.addr} denied the request "
                "(its policy does not grant this path to Bastion's role)"
            ) from None


class OpenBaoKeystore:
    """Named, versioned secrets in a KV v2 engine (see the module docstring)."""

    def __init__(self, session: OpenBaoSession, mount: str, prefix: str, transit: str) -> None:
        self.session = session
        self.mount = mount
        self.prefix = prefix.strip("/")
        self.transit = transit
        self._fingerprint_key_ready = False

    def _path(self, name: str) -> str:
        _check_name(name)
        return f"{self.prefix}/{name}"

    def _metadata(self, name: str) -> dict[str, Any]:
        path = self._path(name)
        try:
            answer = self.session.call(
                lambda c: c.secrets.kv.v2.read_secret_metadata(path, mount_point=self.mount)
            )
        except hvac.exceptions.InvalidPath:
            raise SecretNotFound(name) from None
        data: dict[str, Any] = answer["data"]
        return data

    @staticmethod
    def _retired(metadata: dict[str, Any]) -> set[int]:
        listed = (metadata.get("custom_metadata") or {}).get("retired", "")
        return {int(v) for v in listed.split(",") if v.isdigit()}

    def _states(self, metadata: dict[str, Any]) -> dict[int, str]:
        retired = self._retired(metadata)
        states: dict[int, str] = {}
        for number, info in metadata.get("versions", {}).items():
            version = int(number)
            if info.get("destroyed") or info.get("deletion_time"):
                states[version] = "destroyed"
            else:
                states[version] = "retired" if version in retired else "active"
        return dict(sorted(states.items()))

    def _read(self, name: str, version: int) -> bytes:
        path = self._path(name)
        try:
            answer = self.session.call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path, version=version, mount_point=self.mount, raise_on_deleted_version=True
                )
            )
            return _unb64(answer["data"]["data"]["value"])
        except hvac.exceptions.InvalidPath:
            raise SecretNotFound(f"{name} version {version}") from None
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise SecretNotFound(f"{name} version {version} is not a Bastion secret") from None

    def get(self, name: str, version: int | None = None) -> bytes:
        return self.current(name)[1] if version is None else self._read(name, version)

    def current(self, name: str) -> tuple[int, bytes]:
        active = [v for v, s in self._states(self._metadata(name)).items() if s == "active"]
        if not active:
            raise SecretNotFound(f"{name} has no active version")
        return active[-1], self._read(name, active[-1])

    def current_version(self, name: str) -> int:
        return self.current(name)[0]

    def versions(self, name: str) -> list[SecretVersionInfo]:
        metadata = self._metadata(name)
        created = {int(k): str(v.get("created_time", "")) for k, v in metadata["versions"].items()}
        return [
            SecretVersionInfo(
                version=version,
                created_at=created[version],
                state=state,
                fingerprint=self._fingerprint(self._read(name, version))
                if state != "destroyed"
                else "-",
            )
            for version, state in self._states(metadata).items()
        ]

    def _fingerprint(self, value: bytes) -> str:
        """64 bits of a transit HMAC-SHA256 (RFC 2104) of ``value``; the key stays in OpenBao."""
        transit = self.session.client.secrets.transit
        if not self._fingerprint_key_ready:
            self.session.call(
                lambda c: transit.create_key(FINGERPRINT_KEY, mount_point=self.transit)
            )
            self._fingerprint_key_ready = True
        answer = self.session.call(
            lambda c: transit.generate_hmac(
                FINGERPRINT_KEY, _b64(value), algorithm="sha2-256", mount_point=self.transit
            )
        )
        mac = _unb64(str(answer["data"]["hmac"]).rsplit(":", 1)[-1])
        return mac.hex()[:16]

    def list(self) -> list[str]:
        names: list[str] = []
        folders = [""]
        while folders:
            folder = folders.pop()
            try:
                answer = self.session.call(self._lister(f"{self.prefix}/{folder}"))
            except hvac.exceptions.InvalidPath:
                continue  # an empty folder
            for key in answer["data"]["keys"]:
                (folders if key.endswith("/") else names).append(folder + key)
        return sorted(names)

    def _lister(self, path: str) -> Callable[[hvac.Client], Any]:
        return lambda c: c.secrets.kv.v2.list_secrets(path, mount_point=self.mount)

    def _write(self, name: str, value: bytes, cas: int | None = None) -> int:
        path = self._path(name)
        try:
            answer = self.session.call(
                lambda c: c.secrets.kv.v2.create_or_update_secret(
                    path, secret={"value": _b64(value)}, cas=cas, mount_point=self.mount
                )
            )
        except hvac.exceptions.InvalidPath:
            raise SecretsBackendRefused(
                f"secrets backend openbao at {self.session.addr} has no KV v2 engine "
                f"at {self.mount}/"
            ) from None
        return int(answer["data"]["version"])

    def set(self, name: str, value: bytes) -> int:
        return self._write(name, value)

    def rotate(self, name: str, value: bytes | None = None) -> int:
        return self.set(name, os.urandom(32) if value is None else value)

    def retire(self, name: str, version: int) -> None:
        metadata = self._metadata(name)
        if version not in self._states(metadata):
            raise SecretNotFound(f"{name} version {version}")
        custom = dict(metadata.get("custom_metadata") or {})
        custom["retired"] = ",".join(str(v) for v in sorted(self._retired(metadata) | {version}))
        path = self._path(name)
        self.session.call(
            lambda c: c.secrets.kv.v2.update_metadata(
                path, custom_metadata=custom, mount_point=self.mount
            )
        )

    def ensure(self, name: str, generate: Callable[[], bytes]) -> bytes:
        try:
            return self.current(name)[1]
        except SecretNotFound:
            pass
        # Check-and-set 0: only the first of concurrent creators writes (the
        # others, or a secret whose every version is retired, are refused here).
        with contextlib.suppress(hvac.exceptions.InvalidRequest):
            self._write(name, generate(), cas=0)
        try:
            return self.current(name)[1]
        except SecretNotFound:
            self._write(name, generate())
            return self.current(name)[1]

    def read_reference(self, scheme: str, name: str, fragment: str | None) -> bytes:
        """A field of a KV v2 secret written by an operator: ``bao://kv/<path>#<field>``
        reads ``<field>`` of ``<kv mount>/<path>`` (its current version), as UTF-8."""
        ref = f"{scheme}://{name}"
        if scheme != "bao":
            raise InvalidSecretRef(
                f"secret backend {scheme}:// is not configured (BASTION_SECRETS_BACKEND=openbao)"
            )
        if not name.startswith("kv/") or not fragment:
            raise InvalidSecretRef(f"{ref}: an OpenBao reference is bao://kv/<path>#<field>")
        ref, path = f"{ref}#{fragment}", name.removeprefix("kv/")
        try:
            answer = self.session.call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path, mount_point=self.mount, raise_on_deleted_version=True
                )
            )
        except hvac.exceptions.InvalidPath:
            raise SecretNotFound(f"{ref}: no such secret in {self.mount}/") from None
        except SecretsBackendRefused as refused:
            raise SecretsBackendRefused(f"{ref}: {refused}") from None
        except SecretsBackendUnavailable as down:
            raise SecretsBackendUnavailable(f"{ref}: {down}") from None
        value = (answer.get("data") or {}).get("data", {}).get(fragment)
        if not isinstance(value, str) or not value:
            raise SecretNotFound(f"{ref}: the secret has no field {fragment!r}")
        return value.encode()

    def delete(self, name: str) -> None:
        self._metadata(name)  # SecretNotFound if absent
        path = self._path(name)
        self.session.call(
            lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point=self.mount)
        )


class OpenBaoKMS:
    """Tenant KEKs as transit keys (see the module docstring)."""

    def __init__(self, session: OpenBaoSession, mount: str, cache_seconds: float) -> None:
        self.session = session
        self.mount = mount
        self.cache_seconds = cache_seconds
        self._keys_made: set[UUID] = set()
        self._cache = DataKeyCache(cache_seconds)

    @staticmethod
    def key_name(tenant_id: UUID) -> str:
        """The transit key holding the tenant's KEK."""
        return f"{TENANT_KEY_PREFIX}{tenant_id}"

    def _transit(self) -> Any:
        return self.session.client.secrets.transit

    def _ensure_key(self, tenant_id: UUID) -> None:
        if tenant_id in self._keys_made:
            return
        name = self.key_name(tenant_id)
        try:
            # Creating an existing key changes nothing (an upsert of its policy).
            self.session.call(
                lambda c: self._transit().create_key(
                    name, key_type="aes256-gcm96", derived=True, mount_point=self.mount
                )
            )
        except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
            raise SecretsBackendRefused(
                f"secrets backend openbao at {self.session.addr} has no transit engine "
                f"at {self.mount}/"
            ) from None
        self._keys_made.add(tenant_id)

    def wrap(self, data_key: bytes, context: KeyContext) -> bytes:
        self._ensure_key(context.tenant_id)
        name = self.key_name(context.tenant_id)
        answer = self.session.call(
            lambda c: self._transit().encrypt_data(
                name, _b64(data_key), context=_b64(context.encode()), mount_point=self.mount
            )
        )
        blob = str(answer["data"]["ciphertext"]).encode("ascii")
        self._cache.remember(context, blob, data_key)
        return blob

    def unwrap(self, blob: bytes, context: KeyContext) -> bytes:
        cached = self._cache.get(context, blob)
        if cached is not None:
            return cached
        name = self.key_name(context.tenant_id)
        try:
            ciphertext = blob.decode("ascii")
            answer = self.session.call(
                lambda c: self._transit().decrypt_data(
                    name, ciphertext, context=_b64(context.encode()), mount_point=self.mount
                )
            )
            data_key = _unb64(answer["data"]["plaintext"])
        except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
            raise KMSError(
                "wrapped key does not verify (altered, another context, or shredded)"
            ) from None
        except (UnicodeDecodeError, KeyError, TypeError, ValueError, binascii.Error):
            raise KMSError("wrapped key is malformed") from None
        self._cache.remember(context, blob, data_key)
        return data_key

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, bytes]:
        data_key = os.urandom(32)
        return data_key, self.wrap(data_key, context)

    # -- rotation (RotatesKEKs): transit's own key versions ------------------------

    def tenant_keks(self) -> list[UUID]:
        try:
            answer = self.session.call(lambda c: self._transit().list_keys(mount_point=self.mount))
        except hvac.exceptions.InvalidPath:
            return []  # no transit key at all yet
        found: list[UUID] = []
        for name in answer["data"]["keys"]:
            if str(name).startswith(TENANT_KEY_PREFIX):
                with contextlib.suppress(ValueError):
                    found.append(UUID(str(name)[len(TENANT_KEY_PREFIX) :]))
        return found

    def _read_key(self, name: str) -> dict[str, Any]:
        answer = self.session.call(lambda c: self._transit().read_key(name, mount_point=self.mount))
        data: dict[str, Any] = answer["data"]
        return data

    def kek_versions(self, tenant_id: UUID) -> list[SecretVersionInfo]:
        name = self.key_name(tenant_id)
        data = self._read_key(name)
        oldest = int(data.get("min_decryption_version") or 1)
        return [
            SecretVersionInfo(
                version=int(number),
                created_at=_transit_time(created),
                state="active" if int(number) >= oldest else "retired",
                fingerprint="in-openbao",
            )
            for number, created in sorted(data["keys"].items(), key=lambda kv: int(kv[0]))
        ]

    def rotate_kek(self, tenant_id: UUID) -> int:
        """transit ``rotate``: encryptions use the new version at once; every older
        version still decrypts (``min_decryption_version`` is left alone)."""
        name = self.key_name(tenant_id)
        self.session.call(lambda c: self._transit().rotate_key(name, mount_point=self.mount))
        data = self._read_key(name)
        return int(data["latest_version"])

    def rewrap(self, blob: bytes, context: KeyContext) -> bytes:
        """transit ``rewrap``: the data key is re-encrypted inside OpenBao."""
        name = self.key_name(context.tenant_id)
        try:
            ciphertext = blob.decode("ascii")
            answer = self.session.call(
                lambda c: self._transit().rewrap_data(
                    name, ciphertext, context=_b64(context.encode()), mount_point=self.mount
                )
            )
            rewrapped = str(answer["data"]["ciphertext"]).encode("ascii")
        except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
            raise KMSError(
                "wrapped key does not verify (altered, another context, or shredded)"
            ) from None
        except (UnicodeDecodeError, KeyError, TypeError):
            raise KMSError("wrapped key is malformed") from None
        return rewrapped

    def destroy_tenant(self, tenant_id: UUID) -> None:
        self._cache.forget_tenant(tenant_id)
        self._keys_made.discard(tenant_id)
        name = self.key_name(tenant_id)
        try:
            self.session.call(lambda c: self._transit().read_key(name, mount_point=self.mount))
        except hvac.exceptions.InvalidPath:
            return  # no KEK here: nothing to destroy
        self.session.call(
            lambda c: self._transit().update_key_configuration(
                name, deletion_allowed=True, mount_point=self.mount
            )
        )
        self.session.call(lambda c: self._transit().delete_key(name, mount_point=self.mount))


def _transit_time(created: Any) -> str:
    """A transit key version's creation time (a Unix time, or RFC 3339 for some
    key types) as ISO 8601, like the keystore's ``created_at``."""
    if isinstance(created, int | float):
        return datetime.fromtimestamp(created, UTC).isoformat()
    try:
        return datetime.fromisoformat(str(created).replace("Z", "+00:00")).isoformat()
    except ValueError:
        return datetime.now(UTC).isoformat()


def open_openbao(settings: Settings) -> tuple[OpenBaoKeystore, OpenBaoKMS]:
    """Sign in now (an unreachable store stops start-up here) and return both parts."""
    session = OpenBaoSession(settings)
    session.sign_in()
    keystore = OpenBaoKeystore(
        session,
        settings.openbao_kv_mount,
        settings.openbao_kv_prefix,
        settings.openbao_transit_mount,
    )
    kms = OpenBaoKMS(session, settings.openbao_transit_mount, settings.openbao_cache_seconds)
    return keystore, kms
