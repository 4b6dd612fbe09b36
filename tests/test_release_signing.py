"""Offline release signing (issue 21, item 4): ``bastion release`` signs the
wheel, its SBOM and the image digest with an Ed25519 key from the key ring
(DSSE envelopes of in-toto Statements), verification succeeds for what was
signed and fails on a changed artifact, a re-pointed statement, a foreign
key or a key set that would smuggle a private key."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.cli import app
from bastion.release.signing import (
    SECRET_NAME,
    ReleaseKeys,
    SignatureInvalid,
    digest_subject,
    file_subject,
    sign,
    verify,
)
from bastion.secrets import LocalKeystore
from tests.conftest import short_tempdir

IMAGE = "ghcr.io/example/bastion"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def ring_env() -> Iterator[tuple[dict[str, str], LocalKeystore]]:
    """A key ring of its own: the key lives there, never in a file of the repo."""
    base = short_tempdir("bastion-release-")
    keystore = LocalKeystore(base / "keys" / "keystore.bin", base / "master" / "master.key")
    env = {
        "BASTION_HOME": str(base / "home"),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "BASTION_LOG_LEVEL": "warning",
    }
    try:
        yield env, keystore
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["release", *args], env=env)
    return result.exit_code, result.output


def _artifacts(tmp_path: Path) -> tuple[Path, Path]:
    wheel = tmp_path / "bastion-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 64)
    sbom = tmp_path / "bastion.wheel.cdx.json"
    sbom.write_text(json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.6"}))
    return wheel, sbom


def _signed(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path, Path, Path]:
    wheel, sbom = _artifacts(tmp_path)
    keys = tmp_path / "keys.jwks.json"
    image_envelope = tmp_path / "image.digest.dsse.json"
    assert _run(env, "keys", "--out", str(keys))[0] == 0
    assert _run(env, "sign", str(wheel), str(sbom))[0] == 0
    assert _run(env, "sign-digest", IMAGE, DIGEST, "--out", str(image_envelope))[0] == 0
    return wheel, sbom, keys, image_envelope


def test_the_wheel_the_sbom_and_the_image_digest_verify_with_the_published_key_set(
    tmp_path: Path, ring_env: tuple[dict[str, str], LocalKeystore]
) -> None:
    env, keystore = ring_env
    wheel, sbom, keys, image_envelope = _signed(tmp_path, env)

    # The private key is in the key ring; the published set holds the public half only.
    assert keystore.versions(SECRET_NAME)
    published = json.loads(keys.read_text())
    assert [k["kty"] for k in published["keys"]] == ["OKP"]
    assert all("d" not in k for k in published["keys"])
    statement = json.loads(
        base64.b64decode(json.loads((tmp_path / f"{wheel.name}.dsse.json").read_text())["payload"])
    )
    assert statement["subject"] == [
        {"name": wheel.name, "digest": {"sha256": file_subject(wheel).sha256}}
    ]

    for artifact in (wheel, sbom):
        code, out = _run(
            env, "verify", f"{artifact}.dsse.json", "--keys", str(keys), "--artifact", str(artifact)
        )
        assert code == 0, out
    code, out = _run(
        env, "verify", str(image_envelope), "--keys", str(keys), "--name", IMAGE, "--digest", DIGEST
    )
    assert code == 0, out


def test_verification_fails_on_a_changed_artifact(
    tmp_path: Path, ring_env: tuple[dict[str, str], LocalKeystore]
) -> None:
    env, _ = ring_env
    wheel, sbom, keys, image_envelope = _signed(tmp_path, env)
    for artifact in (wheel, sbom):
        envelope = Path(f"{artifact}.dsse.json")
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit, same name, same size
        artifact.write_bytes(bytes(data))
        code, out = _run(
            env, "verify", str(envelope), "--keys", str(keys), "--artifact", str(artifact)
        )
        assert code == 1
        assert "verification failed: the artifact is not the one that was signed" in out
    other_digest = "sha256:" + "ac" * 32
    code, out = _run(
        env,
        "verify",
        str(image_envelope),
        "--keys",
        str(keys),
        "--name",
        IMAGE,
        "--digest",
        other_digest,
    )
    assert code == 1 and "verification failed" in out


def test_a_statement_re_pointed_at_another_artifact_does_not_verify(
    tmp_path: Path, ring_env: tuple[dict[str, str], LocalKeystore]
) -> None:
    env, _ = ring_env
    wheel, _, keys, _ = _signed(tmp_path, env)
    envelope_path = Path(f"{wheel}.dsse.json")
    envelope = json.loads(envelope_path.read_text())
    # An attacker ships a changed wheel and edits the statement to its digest.
    wheel.write_bytes(wheel.read_bytes() + b"backdoor")
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = file_subject(wheel).sha256
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    envelope_path.write_text(json.dumps(envelope))
    code, out = _run(
        env, "verify", str(envelope_path), "--keys", str(keys), "--artifact", str(wheel)
    )
    assert code == 1
    assert "no signature by a trusted key verifies" in out


def test_a_signature_by_a_key_outside_the_trusted_set_does_not_verify(
    tmp_path: Path, ring_env: tuple[dict[str, str], LocalKeystore]
) -> None:
    env, _ = ring_env
    wheel, _ = _artifacts(tmp_path)
    keys = tmp_path / "trusted.jwks.json"
    assert _run(env, "keys", "--out", str(keys))[0] == 0
    trusted = json.loads(keys.read_text())

    base = short_tempdir("bastion-release-other-")
    try:
        other = ReleaseKeys(LocalKeystore(base / "k" / "keystore.bin", base / "m" / "master.key"))
        forged = sign(other, file_subject(wheel))
        # Claiming the trusted key's id does not help: the signature is checked with it.
        forged["signatures"][0]["keyid"] = trusted["keys"][0]["kid"]
        with pytest.raises(SignatureInvalid, match="no signature by a trusted key"):
            verify(json.dumps(forged).encode(), file_subject(wheel), trusted)
        # Nor does handing the verifier a key set whose member is a private key.
        private = {"keys": [dict(other.current()[1].as_dict(private=True))]}
        with pytest.raises(SignatureInvalid, match="non-public key"):
            verify(json.dumps(forged).encode(), file_subject(wheel), private)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_only_a_sha256_digest_is_signed() -> None:
    for bad in ("sha256:" + "AB" * 32, "sha512:" + "ab" * 64, "ab" * 32, "sha256:abc"):
        with pytest.raises(ValueError):
            digest_subject(IMAGE, bad)
