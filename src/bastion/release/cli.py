"""``bastion release``: sign and verify the build's artifacts offline.

``keys`` prints the public JWK Set verifiers trust; ``sign`` writes one DSSE
envelope per file (``<file>.dsse.json``); ``sign-digest`` signs an image
digest; ``verify`` exits 1 unless the envelope verifies for the artifact in
hand under the given key set. The private key never leaves the key ring.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.release.signing import (
    ReleaseKeys,
    SignatureInvalid,
    Subject,
    digest_subject,
    file_subject,
    sign,
    verify,
)
from bastion.secrets.backends import open_key_ring
from bastion.secrets.errors import SecretsError
from bastion.settings import Settings

release_app = typer.Typer(
    help="Offline Ed25519 signatures (DSSE, in-toto) over wheels, SBOMs and image digests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)


def _keys() -> ReleaseKeys:
    return ReleaseKeys(open_key_ring(Settings()).keystore)


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


def _write(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@release_app.command("keys")
def keys_command(
    out: Annotated[Path | None, typer.Option(help="Write the JWK Set here, not stdout.")] = None,
) -> None:
    """Print the public JWK Set of the release keys (creates the first key)."""
    try:
        ring = _keys()
        ring.current()
        document = ring.jwks()
    except SecretsError as exc:
        raise _fail(str(exc)) from None
    if out is None:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        _write(out, document)


@release_app.command("sign")
def sign_command(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True)],
) -> None:
    """Sign each file; write ``<file>.dsse.json`` beside it."""
    try:
        ring = _keys()
        for path in files:
            target = path.with_name(path.name + ".dsse.json")
            _write(target, sign(ring, file_subject(path)))
            print(f"signed {path.name} -> {target}")
    except SecretsError as exc:
        raise _fail(str(exc)) from None


@release_app.command("sign-digest")
def sign_digest_command(
    name: Annotated[str, typer.Argument(help="The image name, e.g. ghcr.io/org/bastion.")],
    digest: Annotated[str, typer.Argument(help="sha256:<64 hex>")],
    out: Annotated[Path, typer.Option(help="Where to write the envelope.")],
) -> None:
    """Sign an image digest (or any ``sha256:`` digest) under ``name``."""
    try:
        subject = digest_subject(name, digest)
        _write(out, sign(_keys(), subject))
    except (ValueError, SecretsError) as exc:
        raise _fail(str(exc)) from None
    print(f"signed {name}@sha256:{subject.sha256} -> {out}")


@release_app.command("verify")
def verify_command(
    envelope: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    keys: Annotated[Path, typer.Option(help="The trusted public JWK Set.", exists=True)],
    artifact: Annotated[Path | None, typer.Option(help="The file that was signed.")] = None,
    name: Annotated[str | None, typer.Option(help="With --digest: the image name.")] = None,
    digest: Annotated[str | None, typer.Option(help="sha256:<64 hex> that was signed.")] = None,
) -> None:
    """Exit 0 if ENVELOPE verifies for the artifact (or digest) under KEYS, else 1."""
    try:
        subject: Subject
        if artifact is not None and digest is None:
            subject = file_subject(artifact)
        elif artifact is None and digest is not None and name is not None:
            subject = digest_subject(name, digest)
        else:
            raise _fail("give --artifact FILE, or --name NAME with --digest sha256:...")
        verify(envelope.read_bytes(), subject, json.loads(keys.read_text(encoding="utf-8")))
    except (SignatureInvalid, ValueError) as exc:
        raise _fail(f"verification failed: {exc}") from None
    except OSError as exc:
        raise _fail(f"{exc.strerror or exc}: {exc.filename}") from None
    print(f"verified {subject.name} sha256:{subject.sha256}")
