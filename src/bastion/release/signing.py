"""Offline signatures over release artifacts: DSSE envelopes of in-toto Statements.

CI signs the wheel, its SBOM and the image digest keyless with Sigstore;
offline (``make ci``) the same three are signed here with an Ed25519 key from
the key ring (secret ``release/signing``, a :class:`~bastion.secrets.keyring.JwkRing`),
never with a key file in the repository.

Each signature is a DSSE v1 envelope (secure-systems-lab/dsse, "envelope.md"
and "protocol.md": the signature covers ``PAE(payloadType, payload)``, so the
type cannot be swapped) whose payload is an in-toto Statement v1
(in-toto/attestation, "spec/v1/statement.md") naming its subject by SHA-256.
The ``keyid`` is the key's RFC 7638 thumbprint. Verifying takes the trusted
public keys as a JWK Set (RFC 7517, exported by ``bastion release keys``),
recomputes the digest of the artifact in hand and fails on any change to the
artifact, the statement or the signature, and on a key not in the set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from bastion.errors import BastionError, Kind
from bastion.secrets.keyring import JwkRing
from bastion.secrets.protocols import Keystore

SECRET_NAME = "release/signing"  # noqa: S105 - a secret's name, not a secret
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://bastion.dev/release/v1"
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
_MAX_ENVELOPE_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024


class SignatureInvalid(BastionError):
    """The envelope does not verify for the artifact in hand (never says which byte)."""

    slug = "release-signature-invalid"
    title = "Release signature does not verify"
    kind = Kind.UNPROCESSABLE


class ReleaseKeys(JwkRing[OKPKey]):
    """The Ed25519 release-signing keys in the key ring.

    A new key signs at once (no publish-ahead): verifiers get the key set
    with the release, not from a cache that must learn it first.
    """

    def __init__(self, keystore: Keystore) -> None:
        super().__init__(
            keystore,
            secret_name=SECRET_NAME,
            key_type=OKPKey,
            curve="Ed25519",
            algorithm="Ed25519",
            publish_ahead=timedelta(0),
        )


@dataclass(frozen=True)
class Subject:
    """What a statement is about: a name and its SHA-256 (lowercase hex)."""

    name: str
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": {"sha256": self.sha256}}


def file_subject(path: Path) -> Subject:
    """The subject of a file: its base name and the SHA-256 of its bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return Subject(path.name, digest.hexdigest())


def digest_subject(name: str, digest: str) -> Subject:
    """The subject of an image (or any) digest ``sha256:<64 hex>`` under ``name``.

    Raises :class:`ValueError` for anything else: a digest is never guessed.
    """
    match = _SHA256.fullmatch(digest.strip())
    if match is None or not name:
        raise ValueError("expected a name and a digest of the form sha256:<64 lowercase hex>")
    return Subject(name, match.group(1))


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding (protocol.md)."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign(keys: ReleaseKeys, subject: Subject) -> dict[str, Any]:
    """A DSSE envelope over an in-toto Statement v1 about ``subject``."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [subject.as_json()],
        "predicateType": PREDICATE_TYPE,
        "predicate": {},
    }
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    kid, key = keys.current()
    private = key.private_key
    if not isinstance(private, Ed25519PrivateKey):  # the ring parses Ed25519 only
        raise RuntimeError("the release key ring holds a non-Ed25519 key")
    signature = private.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": kid, "sig": base64.b64encode(signature).decode()}],
    }


def trusted_keys(jwks: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 public keys of a JWK Set by RFC 7638 thumbprint.

    A ``kid`` is recomputed from the key, never taken from the set, so a set
    cannot attach a trusted name to another key. Private members are refused:
    a trust file holds public keys only. Raises :class:`SignatureInvalid`.
    """
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        raise SignatureInvalid("the trusted key set is not a JWK Set")
    trusted: dict[str, Ed25519PublicKey] = {}
    for member in keys:
        if not isinstance(member, dict) or "d" in member:
            raise SignatureInvalid("the trusted key set holds a non-public key")
        if member.get("kty") != "OKP" or member.get("crv") != "Ed25519":
            continue
        try:
            key = OKPKey.import_key(member)
        except (JoseError, ValueError, TypeError):
            raise SignatureInvalid("the trusted key set holds an unreadable key") from None
        public = key.public_key
        if isinstance(public, Ed25519PublicKey):
            trusted[key.thumbprint()] = public
    if not trusted:
        raise SignatureInvalid("the trusted key set holds no Ed25519 key")
    return trusted


def verify(envelope: bytes, subject: Subject, jwks: Mapping[str, Any]) -> dict[str, Any]:
    """Return the statement of ``envelope`` if a trusted key signed it and it
    names ``subject`` (same name and SHA-256); raise :class:`SignatureInvalid`
    otherwise."""
    trusted = trusted_keys(jwks)
    if len(envelope) > _MAX_ENVELOPE_BYTES:
        raise SignatureInvalid("the envelope is too large")
    try:
        document = json.loads(envelope)
        payload_type = document["payloadType"]
        payload = base64.b64decode(document["payload"], validate=True)
        signatures = document["signatures"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SignatureInvalid("not a DSSE envelope") from None
    if payload_type != PAYLOAD_TYPE or not isinstance(signatures, list):
        raise SignatureInvalid("not an in-toto DSSE envelope")
    message = pae(payload_type, payload)
    if not any(_verifies(entry, message, trusted) for entry in signatures):
        raise SignatureInvalid("no signature by a trusted key verifies")
    # Only a verified payload is parsed.
    try:
        statement = json.loads(payload)
    except ValueError:
        raise SignatureInvalid("the statement is not JSON") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise SignatureInvalid("not an in-toto Statement v1")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise SignatureInvalid("not a Bastion release statement")
    if subject.as_json() not in (statement.get("subject") or []):
        raise SignatureInvalid("the artifact is not the one that was signed")
    return statement


def _verifies(entry: object, message: bytes, trusted: Mapping[str, Ed25519PublicKey]) -> bool:
    if not isinstance(entry, dict):
        return False
    keyid = entry.get("keyid")
    key = trusted.get(keyid) if isinstance(keyid, str) else None
    if key is None:
        return False
    try:
        key.verify(base64.b64decode(str(entry.get("sig", "")), validate=True), message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
