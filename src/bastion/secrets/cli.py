"""``bastion secrets``: manage the local key ring.

Values are read from standard input, never from argv (visible in ``ps`` and
shell history), and only ``get --reveal`` ever writes one out.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from bastion.secrets.backends import open_key_ring
from bastion.secrets.errors import SecretNotFound, SecretsError
from bastion.secrets.protocols import Keystore
from bastion.settings import LiteralSecretInSettings, Settings

secrets_app = typer.Typer(
    help="Named, versioned secrets in the local key ring.",
    no_args_is_help=True,
    # A traceback could show local variables, and those may hold a value.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)
_out = Console()


def _keystore() -> Keystore:
    """Return the keystore configured by ``Settings()`` (``BASTION_*`` variables)."""
    return open_key_ring(Settings()).keystore


def _read_value() -> bytes:
    """Return the value from stdin: hidden prompt on a terminal, else all of stdin.

    One trailing newline (from ``echo`` or a heredoc) is stripped. Raises
    :class:`SecretsError` for an empty value.
    """
    if sys.stdin.isatty():
        value = getpass.getpass("value: ").encode()
    else:
        value = sys.stdin.buffer.read()
        value = value[:-1] if value.endswith(b"\n") else value
    if not value:
        raise SecretsError("empty value on stdin")
    return value


def _fail(message: str) -> typer.Exit:
    """Print one line on stderr; return the exit to raise (status 1)."""
    print(f"error: {message}", file=sys.stderr)  # plain print: never re-wrapped
    return typer.Exit(1)


@contextlib.contextmanager
def _fail_cleanly() -> Iterator[None]:
    """Known failures become one line on stderr and exit status 1, no traceback.

    Messages come from our own errors, OS errors (a path and a reason) or the
    names of invalid settings: none of them can carry a secret value.
    """
    try:
        yield
    except (SecretsError, LiteralSecretInSettings) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{exc.strerror or exc}: {exc.filename}") from None
    except ValidationError as exc:
        # Not str(exc): pydantic quotes the offending input (e.g. a DATABASE_URL).
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise _fail(f"invalid settings: {fields}") from None


@secrets_app.command("set")
def set_secret(name: str) -> None:
    """Store a new version of NAME; the value is read from stdin."""
    with _fail_cleanly():
        version = _keystore().set(name, _read_value())
    _out.print(f"{name}: stored version {version}", highlight=False)


@secrets_app.command("get")
def get_secret(
    name: str,
    version: Annotated[int | None, typer.Option(help="a specific version")] = None,
    reveal: Annotated[bool, typer.Option(help="write the raw value to stdout")] = False,
) -> None:
    """Show NAME's versions (metadata only), or its value with --reveal."""
    with _fail_cleanly():
        keystore = _keystore()
        if reveal:
            sys.stdout.buffer.write(keystore.get(name, version))
            sys.stdout.buffer.flush()
            return
        infos = keystore.versions(name)
        if version is not None and all(info.version != version for info in infos):
            raise SecretNotFound(f"{name} version {version}")
    table = Table(title=name)
    # The fingerprint is keyed (HMAC under a key of this keystore): it tells
    # versions apart here, and is no oracle to test guesses of the value against.
    for column in ("version", "state", "created", "fingerprint (keyed)"):
        table.add_column(column)
    for info in infos:
        if version is None or info.version == version:
            table.add_row(str(info.version), info.state, info.created_at, info.fingerprint)
    _out.print(table)


@secrets_app.command("list")
def list_secrets() -> None:
    """List the names in the key ring with their current versions."""
    with _fail_cleanly():
        keystore = _keystore()
        for name in keystore.list():
            try:
                current = f"v{keystore.current_version(name)}"
            except SecretNotFound:
                current = "no active version"
            _out.print(f"{name}  ({current})", highlight=False)


@secrets_app.command("rotate")
def rotate_secret(
    name: str,
    from_stdin: Annotated[bool, typer.Option(help="read the new value from stdin")] = False,
) -> None:
    """Add a new version of NAME (random 32 bytes unless --from-stdin)."""
    with _fail_cleanly():
        version = _keystore().rotate(name, _read_value() if from_stdin else None)
    _out.print(
        f"{name}: rotated to version {version}; older versions stay readable", highlight=False
    )


@secrets_app.command("scan")
def scan_secrets(
    path: Annotated[Path, typer.Argument(help="a file, a directory or a git repository")],
    sarif_file: Annotated[
        Path | None, typer.Option("--sarif", help="write the findings as SARIF 2.1.0")
    ] = None,
    history: Annotated[
        bool, typer.Option(help="also scan every commit when PATH is a git repository")
    ] = True,
) -> None:
    """Find secrets in PATH (and its git history); exit 1 if any is found.

    Each finding shows where it is, its kind, a redacted preview and a
    fingerprint, never the secret. A line marked ``bastion: allow-secret``
    (a comment, with the reason) is skipped.
    """
    from bastion import __version__
    from bastion.secrets.scan import sarif, scan

    if not path.exists():  # status 2: a usage error, not a finding (1)
        print(f"error: no such file or directory: {path}", file=sys.stderr)
        raise typer.Exit(2)
    with _fail_cleanly():
        try:
            findings = scan(path, history=history)
        except ValueError as exc:  # a malformed allow file
            raise SecretsError(str(exc)) from None
        if sarif_file is not None:
            sarif_file.parent.mkdir(parents=True, exist_ok=True)
            sarif_file.write_text(json.dumps(sarif(findings, path, __version__), indent=2) + "\n")
    for finding in findings:
        where = f" (commit {finding.commit[:12]})" if finding.commit else ""
        print(
            f"{finding.path}:{finding.line}:{finding.column}: {finding.rule.rule_id} "
            f"{finding.preview} fingerprint {finding.fingerprint}{where}"
        )
    if findings:
        print(f"{len(findings)} secret(s) found", file=sys.stderr)
        raise typer.Exit(1)
    print(f"no secrets found in {path}", file=sys.stderr)
