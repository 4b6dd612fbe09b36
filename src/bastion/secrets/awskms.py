"""The AWS KMS backend: one KMS key per tenant as its key-encryption key.

* :class:`AwsKmsKMS` (the :class:`~bastion.secrets.protocols.KMS`): the
  tenant's KEK is a symmetric KMS key found by its alias
  ``alias/<prefix><tenant id>`` (created on first use). Data keys come from
  ``GenerateDataKey`` and are unwrapped with ``Decrypt``; both pass the
  :class:`~bastion.secrets.protocols.KeyContext` as the KMS *encryption
  context* (tenant, purpose, version), which KMS binds to the ciphertext as
  AES-GCM associated data: a blob presented under another context, or to
  another tenant's key, does not decrypt (AWS KMS Developer Guide,
  "Encryption context"). ``Decrypt`` also names the expected key, so a blob
  of another key is refused rather than decrypted by whichever key made it.
* ``bastion keys rotate kek`` rotates the tenant's key on demand
  (``RotateKeyOnDemand``: same key and alias, new material; older material
  still decrypts) and re-encrypts its data keys inside KMS (``ReEncrypt``).
* Shredding a tenant disables its key at once (nothing decrypts under it from
  that moment), schedules its deletion (KMS's waiting period is 7 to 30
  days; a disabled key cannot be used in it) and deletes the alias.
* Transport failures become :class:`SecretsBackendUnavailable` (503,
  ``Retry-After``); refused credentials :class:`SecretsBackendRefused`.
  botocore's exceptions are never chained: they carry request details.

Unwrapped data keys are cached for ``awskms_cache_seconds`` keyed by the exact
blob and context, as in :mod:`bastion.secrets.openbao`; a shred drops the
tenant's entries. Named secrets stay in the local keystore, whose master key
this backend can wrap (:class:`KmsMasterKeySealer`).

Tests run against moto's server mode, an API-compatible stand-in for AWS KMS,
not AWS itself.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from uuid import UUID

import boto3
import botocore.config
import botocore.exceptions

from bastion.secrets.errors import (
    InvalidSecretRef,
    KMSError,
    SecretsBackendRefused,
    SecretsBackendUnavailable,
)
from bastion.secrets.key_cache import DataKeyCache
from bastion.secrets.protocols import KeyContext, SecretVersionInfo
from bastion.secrets.store import LocalKeystore
from bastion.settings import Settings

T = TypeVar("T")

# Error codes meaning "these credentials are not accepted" (AWS common errors).
_REFUSED = {
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "AccessDeniedException",
    "AccessDenied",
    "ExpiredTokenException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
}
# Error codes meaning "this blob does not open under this key and context".
_NOT_OPENED = {
    "InvalidCiphertextException",
    "IncorrectKeyException",
    "NotFoundException",
    "DisabledException",
    "KMSInvalidStateException",
    "KeyUnavailableException",
}


def _code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: botocore.exceptions.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class AwsKmsSession:
    """One boto3 KMS client and the translation of its failures."""

    def __init__(self, settings: Settings) -> None:
        self.region = settings.awskms_region
        self.addr = settings.awskms_endpoint_url or f"https://kms.{self.region}.amazonaws.com"
        config = botocore.config.Config(
            connect_timeout=settings.awskms_timeout_seconds,
            read_timeout=settings.awskms_timeout_seconds,
            retries={"mode": "standard", "total_max_attempts": 2},
        )
        try:
            session = boto3.Session(profile_name=settings.awskms_profile)
        except botocore.exceptions.ProfileNotFound:
            raise InvalidSecretRef("BASTION_AWSKMS_PROFILE names no configured profile") from None
        self.client: Any = session.client(
            "kms",
            region_name=self.region,
            endpoint_url=settings.awskms_endpoint_url,
            config=config,
        )

    def down(self) -> SecretsBackendUnavailable:
        return SecretsBackendUnavailable(f"secrets backend awskms at {self.addr} is unreachable")

    def refused(self, code: str) -> SecretsBackendRefused:
        return SecretsBackendRefused(
            f"secrets backend awskms at {self.addr} refused Bastion's credentials ({code}); "
            "check the credentials boto3 finds and the key policy"
        )

    def call(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation`` on the client; unreachable → :class:`SecretsBackendUnavailable`,
        refused credentials → :class:`SecretsBackendRefused`. Other ``ClientError``\\ s
        (``NotFoundException``, ``InvalidCiphertextException``) are the caller's."""
        try:
            return operation(self.client)
        except botocore.exceptions.NoCredentialsError:
            raise SecretsBackendRefused(
                f"secrets backend awskms at {self.addr}: boto3 found no credentials"
            ) from None
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError,
        ):
            raise self.down() from None
        except botocore.exceptions.ClientError as error:
            code = _code(error)
            if code in _REFUSED or _status(error) in (401, 403):
                raise self.refused(code if code in _REFUSED else "HTTP 403") from None
            if _status(error) >= 500:
                raise self.down() from None
            raise

    def check(self) -> None:
        """One signed request now: start-up stops here if KMS is unreachable or
        refuses the credentials."""
        self.call(lambda c: c.list_aliases(Limit=1))


class AwsKmsKMS:
    """Tenant KEKs as KMS keys behind aliases (see the module docstring)."""

    def __init__(
        self,
        session: AwsKmsSession,
        *,
        alias_prefix: str,
        cache_seconds: float,
        deletion_window_days: int = 7,
    ) -> None:
        self.session = session
        self.alias_prefix = alias_prefix
        self.cache_seconds = cache_seconds
        self.deletion_window_days = deletion_window_days
        self._keys_made: set[UUID] = set()
        self._cache = DataKeyCache(cache_seconds)

    def alias(self, tenant_id: UUID) -> str:
        """The alias of the KMS key holding the tenant's KEK."""
        return f"alias/{self.alias_prefix}{tenant_id}"

    @staticmethod
    def encryption_context(context: KeyContext) -> dict[str, str]:
        return {
            "tenant": str(context.tenant_id),
            "purpose": context.purpose,
            "version": str(context.version),
        }

    def _ensure_key(self, tenant_id: UUID) -> None:
        if tenant_id in self._keys_made:
            return
        alias = self.alias(tenant_id)
        try:
            self.session.call(lambda c: c.describe_key(KeyId=alias))
        except botocore.exceptions.ClientError as error:
            if _code(error) != "NotFoundException":
                raise self._refused_key(alias) from None
            self._create_key(tenant_id, alias)
        self._keys_made.add(tenant_id)

    def _create_key(self, tenant_id: UUID, alias: str) -> None:
        made = self.session.call(
            lambda c: c.create_key(
                Description=f"Bastion KEK of tenant {tenant_id}",
                KeyUsage="ENCRYPT_DECRYPT",
                KeySpec="SYMMETRIC_DEFAULT",
                Tags=[{"TagKey": "bastion:tenant", "TagValue": str(tenant_id)}],
            )
        )
        key_id = made["KeyMetadata"]["KeyId"]
        try:
            self.session.call(lambda c: c.create_alias(AliasName=alias, TargetKeyId=key_id))
        except botocore.exceptions.ClientError as error:
            # Another process created the tenant's key first: use its key, drop ours.
            if _code(error) != "AlreadyExistsException":
                raise self._refused_key(alias) from None
            self.session.call(
                lambda c: c.schedule_key_deletion(
                    KeyId=key_id, PendingWindowInDays=self.deletion_window_days
                )
            )

    def _refused_key(self, alias: str) -> SecretsBackendRefused:
        return SecretsBackendRefused(
            f"secrets backend awskms at {self.session.addr} cannot use or create the key "
            f"{alias} (check the key policy)"
        )

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, bytes]:
        self._ensure_key(context.tenant_id)
        alias = self.alias(context.tenant_id)
        try:
            answer = self.session.call(
                lambda c: c.generate_data_key(
                    KeyId=alias,
                    KeySpec="AES_256",
                    EncryptionContext=self.encryption_context(context),
                )
            )
        except botocore.exceptions.ClientError:
            raise self._refused_key(alias) from None
        data_key, blob = bytes(answer["Plaintext"]), bytes(answer["CiphertextBlob"])
        self._cache.remember(context, blob, data_key)
        return data_key, blob

    def wrap(self, data_key: bytes, context: KeyContext) -> bytes:
        self._ensure_key(context.tenant_id)
        alias = self.alias(context.tenant_id)
        try:
            answer = self.session.call(
                lambda c: c.encrypt(
                    KeyId=alias,
                    Plaintext=data_key,
                    EncryptionContext=self.encryption_context(context),
                )
            )
        except botocore.exceptions.ClientError:
            raise self._refused_key(alias) from None
        blob = bytes(answer["CiphertextBlob"])
        self._cache.remember(context, blob, data_key)
        return blob

    def unwrap(self, blob: bytes, context: KeyContext) -> bytes:
        cached = self._cache.get(context, blob)
        if cached is not None:
            return cached
        alias = self.alias(context.tenant_id)
        try:
            answer = self.session.call(
                lambda c: c.decrypt(
                    CiphertextBlob=blob,
                    KeyId=alias,
                    EncryptionContext=self.encryption_context(context),
                )
            )
        except botocore.exceptions.ClientError as error:
            if _code(error) in _NOT_OPENED or _status(error) == 400:
                raise KMSError(
                    "wrapped key does not verify (altered, another context, or shredded)"
                ) from None
            raise self._refused_key(alias) from None
        data_key = bytes(answer["Plaintext"])
        self._cache.remember(context, blob, data_key)
        return data_key

    # -- rotation (RotatesKEKs) -------------------------------------------------------
    # KMS's on-demand rotation (RotateKeyOnDemand): the key keeps its id and
    # alias, new material encrypts from then on, and every earlier material
    # still decrypts what it made (AWS KMS Developer Guide, "Rotating keys").
    # A new key with the alias moved would instead strand every blob of the
    # old key, since Decrypt names the key it expects. AWS allows a bounded
    # number of on-demand rotations per key (25 at the time of writing): at
    # the default yearly period, decades.

    def tenant_keks(self) -> list[UUID]:
        prefix = f"alias/{self.alias_prefix}"
        pages = self.session.call(lambda c: list(c.get_paginator("list_aliases").paginate()))
        found: list[UUID] = []
        for entry in (a for page in pages for a in page.get("Aliases", [])):
            name = str(entry.get("AliasName", ""))
            if name.startswith(prefix) and entry.get("TargetKeyId"):
                with contextlib.suppress(ValueError):
                    found.append(UUID(name[len(prefix) :]))
        return found

    def _key_id(self, tenant_id: UUID) -> tuple[str, Any]:
        alias = self.alias(tenant_id)
        try:
            described = self.session.call(lambda c: c.describe_key(KeyId=alias))
        except botocore.exceptions.ClientError:
            raise self._refused_key(alias) from None
        return str(described["KeyMetadata"]["KeyId"]), described["KeyMetadata"]["CreationDate"]

    def _rotations(self, key_id: str) -> list[Any]:
        pages = self.session.call(
            lambda c: list(c.get_paginator("list_key_rotations").paginate(KeyId=key_id))
        )
        return [r["RotationDate"] for page in pages for r in page.get("Rotations", [])]

    def kek_versions(self, tenant_id: UUID) -> list[SecretVersionInfo]:
        """Version 1 is the key's creation, each rotation the next version."""
        key_id, created = self._key_id(tenant_id)
        dates = [created, *sorted(self._rotations(key_id))]
        return [
            SecretVersionInfo(n, when.isoformat(), "active", "in-awskms")
            for n, when in enumerate(dates, start=1)
        ]

    def rotate_kek(self, tenant_id: UUID) -> int:
        key_id, _created = self._key_id(tenant_id)
        try:
            self.session.call(lambda c: c.rotate_key_on_demand(KeyId=key_id))
        except botocore.exceptions.ClientError:
            raise self._refused_key(self.alias(tenant_id)) from None
        return 1 + len(self._rotations(key_id))

    def rewrap(self, blob: bytes, context: KeyContext) -> bytes:
        """``ReEncrypt`` to the same key: its newest material; the data key's
        plaintext stays inside KMS."""
        alias = self.alias(context.tenant_id)
        bound = self.encryption_context(context)
        try:
            answer = self.session.call(
                lambda c: c.re_encrypt(
                    CiphertextBlob=blob,
                    SourceKeyId=alias,
                    SourceEncryptionContext=bound,
                    DestinationKeyId=alias,
                    DestinationEncryptionContext=bound,
                )
            )
        except botocore.exceptions.ClientError as error:
            if _code(error) in _NOT_OPENED or _status(error) == 400:
                raise KMSError(
                    "wrapped key does not verify (altered, another context, or shredded)"
                ) from None
            raise self._refused_key(alias) from None
        return bytes(answer["CiphertextBlob"])

    def destroy_tenant(self, tenant_id: UUID) -> None:
        self._cache.forget_tenant(tenant_id)
        self._keys_made.discard(tenant_id)
        alias = self.alias(tenant_id)
        try:
            described = self.session.call(lambda c: c.describe_key(KeyId=alias))
        except botocore.exceptions.ClientError as error:
            if _code(error) == "NotFoundException":
                return  # no KEK here: nothing to destroy
            raise self._refused_key(alias) from None
        key_id = described["KeyMetadata"]["KeyId"]
        try:
            # Disabled first: from now on nothing decrypts under it, whatever
            # happens to the scheduled deletion (which KMS lets an admin cancel).
            self.session.call(lambda c: c.disable_key(KeyId=key_id))
            self.session.call(
                lambda c: c.schedule_key_deletion(
                    KeyId=key_id, PendingWindowInDays=self.deletion_window_days
                )
            )
            self.session.call(lambda c: c.delete_alias(AliasName=alias))
        except botocore.exceptions.ClientError:
            raise self._refused_key(alias) from None


class KmsMasterKeySealer:
    """Wraps the local keystore's master key under one KMS key (``master_key_ref``):
    the master key file then holds only a KMS ciphertext, which opens nothing
    without KMS and Bastion's credentials."""

    CONTEXT: ClassVar[dict[str, str]] = {"bastion": "keystore-master-key"}

    def __init__(self, session: AwsKmsSession, key_id: str) -> None:
        self.session = session
        self.key_id = key_id

    def seal(self, master_key: bytes) -> bytes:
        return encrypt_with(self.session, self.key_id, master_key, self.CONTEXT)

    def unseal(self, sealed: bytes) -> bytes:
        return decrypt_with(self.session, self.key_id, sealed, self.CONTEXT, "the master key file")


def encrypt_with(
    session: AwsKmsSession, key_id: str, plaintext: bytes, context: dict[str, str]
) -> bytes:
    """``Encrypt`` under ``key_id`` bound to ``context``."""
    try:
        answer = session.call(
            lambda c: c.encrypt(KeyId=key_id, Plaintext=plaintext, EncryptionContext=context)
        )
    except botocore.exceptions.ClientError:
        raise SecretsBackendRefused(
            f"secrets backend awskms at {session.addr} cannot use the key {key_id} "
            "(missing, disabled, or not granted)"
        ) from None
    return bytes(answer["CiphertextBlob"])


def decrypt_with(
    session: AwsKmsSession, key_id: str, blob: bytes, context: dict[str, str], what: str
) -> bytes:
    """``Decrypt`` of ``blob`` under ``key_id`` and ``context``; errors name ``what``."""
    try:
        answer = session.call(
            lambda c: c.decrypt(CiphertextBlob=blob, KeyId=key_id, EncryptionContext=context)
        )
    except botocore.exceptions.ClientError as error:
        if _code(error) == "NotFoundException":
            raise SecretsBackendRefused(
                f"{what}: secrets backend awskms at {session.addr} has no key {key_id}"
            ) from None
        if _code(error) in _NOT_OPENED or _status(error) == 400:
            raise KMSError(f"{what} does not open under {key_id}; failing closed") from None
        raise SecretsBackendRefused(
            f"{what}: secrets backend awskms at {session.addr} cannot use the key {key_id}"
        ) from None
    return bytes(answer["Plaintext"])


# The encryption context of a secret setting's ciphertext
# (``aws kms encrypt --encryption-context bastion=setting``).
SETTING_CONTEXT = {"bastion": "setting"}


class AwsKmsKeystore(LocalKeystore):
    """The local keystore of the awskms backend: its master key sealed by KMS, and
    ``awskms://alias/<name>#<base64 ciphertext>`` references decrypted by KMS."""

    def __init__(
        self, keystore_file: Path, master_key_file: Path, session: AwsKmsSession, master_key: str
    ) -> None:
        super().__init__(
            keystore_file, master_key_file, sealer=KmsMasterKeySealer(session, master_key)
        )
        self.session = session

    def read_reference(self, scheme: str, name: str, fragment: str | None) -> bytes:
        if scheme != "awskms":
            raise InvalidSecretRef(
                f"secret backend {scheme}:// is not configured (BASTION_SECRETS_BACKEND=awskms)"
            )
        ref = f"awskms://{name}"
        if not fragment:
            raise InvalidSecretRef(
                f"{ref} names a KMS key, not a value: a secret setting takes "
                f"{ref}#<base64 ciphertext of aws kms encrypt --encryption-context bastion=setting>"
            )
        try:
            blob = base64.b64decode(fragment, validate=True)
        except (ValueError, binascii.Error):
            raise InvalidSecretRef(f"{ref}#...: the ciphertext is not base64") from None
        try:
            return decrypt_with(self.session, name, blob, SETTING_CONTEXT, f"{ref}#...")
        except KMSError:
            raise InvalidSecretRef(f"{ref}#...: the ciphertext does not open") from None


def open_awskms(settings: Settings) -> tuple[AwsKmsKeystore, AwsKmsKMS]:
    """Check KMS now (an unreachable one stops start-up here) and return both parts."""
    ref = settings.master_key_ref
    if not ref or not ref.startswith("awskms://"):
        raise InvalidSecretRef(
            "BASTION_SECRETS_BACKEND=awskms needs BASTION_MASTER_KEY_REF=awskms://alias/<name>: "
            "the KMS key that wraps the local keystore's master key"
        )
    session = AwsKmsSession(settings)
    session.check()
    keystore = AwsKmsKeystore(
        settings.resolved_keystore_file,
        settings.resolved_master_key_file,
        session,
        ref.removeprefix("awskms://"),
    )
    kms = AwsKmsKMS(
        session,
        alias_prefix=settings.awskms_alias_prefix,
        cache_seconds=settings.awskms_cache_seconds,
        deletion_window_days=settings.awskms_deletion_window_days,
    )
    return keystore, kms
