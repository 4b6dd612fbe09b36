"""``bastion receipts``: verify a signed receipt, manage the receipt keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import jsonsafe
from bastion.billing.receipts import (
    KEYS_PATH,
    ReceiptInvalid,
    ReceiptKeys,
    jwks_lookup,
    verify_receipt,
)
from bastion.settings import Settings

receipts_app = typer.Typer(help="Signed receipts (Ed25519 JWS).", no_args_is_help=True)

_MAX_JWKS_BYTES = 256 * 1024


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _load_jwks(source: str) -> dict[str, Any]:
    """The JWK Set at an http(s) URL or in a local file."""
    if source.startswith(("https://", "http://")):
        import httpx

        try:
            response = httpx.get(source, timeout=10, follow_redirects=False)
        except httpx.HTTPError as exc:
            _fail(f"cannot fetch the receipt keys: {type(exc).__name__}")
        if response.status_code != 200 or len(response.content) > _MAX_JWKS_BYTES:
            _fail(f"cannot fetch the receipt keys: HTTP {response.status_code}")
        text = response.text
    else:
        try:
            text = Path(source).read_text()
        except OSError as exc:
            _fail(f"cannot read {source}: {exc.strerror}")
    try:
        value = jsonsafe.loads(text)
    except ValueError:
        _fail("the receipt keys are not JSON")
    if not isinstance(value, dict):
        _fail("the receipt keys are not a JWK Set")
    return dict(value)


@receipts_app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="receipt file (JWS JSON or compact)")],
    jwks: Annotated[
        str | None,
        typer.Option(help=f"JWK Set URL or file (default: the api's {KEYS_PATH})"),
    ] = None,
) -> None:
    """Verify FILE against the published receipt keys; print its content.

    Exit 0 if it verifies, 1 if it does not (the reason on stderr).
    """
    try:
        document = file.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror}")
    source = jwks or Settings().resolved_issuer + KEYS_PATH
    try:
        verified = verify_receipt(document, jwks_lookup(_load_jwks(source)))
    except ReceiptInvalid as invalid:
        _fail(f"receipt does not verify: {invalid.reason}")
    print(json.dumps({"valid": True, "kid": verified.kid, "receipt": verified.payload}, indent=2))


def _keys() -> ReceiptKeys:
    from bastion.secrets.backends import open_keystore

    return ReceiptKeys(open_keystore(Settings()))


@receipts_app.command("keys")
def keys_command() -> None:
    """Print the published JWK Set (public keys only)."""
    print(json.dumps(_keys().jwks(), indent=2))


@receipts_app.command("rotate-key")
def rotate_key_command() -> None:
    """Add a new receipt key: published now, signing after 5 minutes; old keys keep verifying."""
    print(_keys().rotate())


# A kid is a base64url thumbprint and may begin with "-": without this, click
# would read such a kid as an unknown option.
@receipts_app.command("retire-key", context_settings={"ignore_unknown_options": True})
def retire_key_command(kid: Annotated[str, typer.Argument(help="the key's kid")]) -> None:
    """Withdraw a receipt key: receipts it signed stop verifying."""
    try:
        _keys().retire(kid)
    except KeyError:
        _fail("no active receipt key with that kid")
    except ValueError as exc:
        _fail(str(exc))
    print(f"retired {kid}")
