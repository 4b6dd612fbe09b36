"""``bastion ca``: the workload CA (issue 18) — init, issue, rotate, status.

The CA's private keys stay in the key ring; ``issue`` prints a certificate's
metadata only (an SVID's key lives in the memory of the process that asked
for it, so the command line never sees one) — except ``issue scraper
--out DIR``, which hands an outside metrics scraper its SVID in files, outside
``BASTION_HOME``, and ``issue server --dns NAME --out DIR``, a development
certificate (and key) for the public HTTPS listeners, outside it too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from bastion.identity.workload import WORKLOADS, WorkloadCA, WorkloadError
from bastion.secrets.backends import open_key_ring
from bastion.secrets.errors import SecretsError
from bastion.settings import Settings

SCRAPER = "scraper"  # the metrics scraper's workload name (settings.metrics_scraper_id)
SERVER = "server"  # a development certificate for the public (HTTPS) listeners

ca_app = typer.Typer(
    help="The workload CA: SPIFFE X.509-SVIDs for api, gateway and worker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)


def _ca() -> WorkloadCA:
    settings = Settings()
    return WorkloadCA(open_key_ring(settings).keystore, settings.workload_trust_domain)


def _print(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


@ca_app.command()
def init() -> None:
    """Create the root and a first intermediate in the key ring (idempotent)."""
    try:
        created = _ca().init()
    except (WorkloadError, SecretsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print("created" if created else "already initialised")


@ca_app.command()
def issue(
    workload: Annotated[
        str,
        typer.Argument(
            help="api, gateway, worker, scraper (the metrics scraper), or server "
            "(a development HTTPS certificate for the public listeners)"
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="write the SVID for a scraper to this directory, outside BASTION_HOME: "
            "svid.pem (leaf and intermediate), svid.key (0600), bundle.pem (the root); "
            "for server: tls.crt, tls.key (0600), ca.crt"
        ),
    ] = None,
    dns: Annotated[list[str] | None, typer.Option(help="server: a DNS name (repeatable)")] = None,
    ip: Annotated[list[str] | None, typer.Option(help="server: an IP address (repeatable)")] = None,
) -> None:
    """Issue an SVID and print its metadata (a check that the CA issues), or,
    with ``--out``, hand a scraper its SVID (Prometheus' ``tls_config``:
    cert_file, key_file, ca_file). It lives an hour: reissue every half hour.
    ``server --dns NAME --out DIR``: the public listeners' certificate for
    development (BASTION_PUBLIC_TLS_CERT_FILE=DIR/tls.crt, ..._KEY_FILE=DIR/tls.key;
    clients trust DIR/ca.crt); it lives 30 days."""
    if workload == SERVER:
        _issue_server(out, dns or [], ip or [])
        return
    if workload not in (*WORKLOADS, SCRAPER):
        print(
            f"error: workload must be one of {', '.join((*WORKLOADS, SCRAPER, SERVER))}",
            file=sys.stderr,
        )
        raise typer.Exit(2)
    settings = Settings()
    if out is not None:
        # Bastion's own processes keep their keys in memory; only an outside
        # scraper needs one in a file, and never beside the key ring.
        if workload != SCRAPER:
            print("error: only the scraper's SVID is written out", file=sys.stderr)
            raise typer.Exit(2)
        if out.resolve().is_relative_to(settings.home.resolve()):
            print("error: --out must be outside BASTION_HOME", file=sys.stderr)
            raise typer.Exit(2)
    try:
        ca = _ca()
        svid = ca.issue(workload)
        root = ca.root_pem()
    except (WorkloadError, SecretsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(out / "svid.key", svid.key_pem(), 0o600)
        _write(out / "svid.pem", svid.chain_pem(), 0o644)
        _write(out / "bundle.pem", root.encode(), 0o644)
    _print(
        {
            "spiffe_id": svid.spiffe_id,
            "serial": f"{svid.cert.serial_number:x}",
            "not_before": svid.not_before.isoformat(),
            "not_after": svid.not_after.isoformat(),
        }
    )


def _issue_server(out: Path | None, dns: list[str], ip: list[str]) -> None:
    if out is None or out.resolve().is_relative_to(Settings().home.resolve()):
        print("error: server needs --out, outside BASTION_HOME", file=sys.stderr)
        raise typer.Exit(2)
    try:
        ca = _ca()
        cert = ca.issue_server(dns, ip)
        root = ca.root_pem()
    except (WorkloadError, SecretsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(out / "tls.key", cert.key_pem(), 0o600)
    _write(out / "tls.crt", cert.chain_pem(), 0o644)
    _write(out / "ca.crt", root.encode(), 0o644)
    _print(
        {
            "names": [*dns, *ip],
            "serial": f"{cert.cert.serial_number:x}",
            "not_after": cert.not_after.isoformat(),
        }
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically, created with ``mode`` (a reader never sees
    half a key, nor a key another user could read for a moment)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


@ca_app.command()
def rotate(
    retire: Annotated[
        int | None, typer.Option(help="also retire this intermediate version")
    ] = None,
) -> None:
    """Sign a new intermediate (the old ones keep vouching until retired)."""
    try:
        ca = _ca()
        version = ca.rotate_intermediate()
        if retire is not None:
            ca.retire_intermediate(retire)
    except (WorkloadError, SecretsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"intermediate version {version} is current")


@ca_app.command()
def status() -> None:
    """The root's and the intermediates' metadata (never a key)."""
    try:
        _print(_ca().status())
    except (WorkloadError, SecretsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
