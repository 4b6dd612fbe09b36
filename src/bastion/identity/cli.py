"""``bastion ca``: the workload CA (issue 18) — init, issue, rotate, status.

The CA's private keys stay in the key ring; ``issue`` prints a certificate's
metadata only (an SVID's key lives in the memory of the process that asked
for it, so the command line never sees one).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from bastion.identity.workload import WORKLOADS, WorkloadCA, WorkloadError
from bastion.secrets.backends import open_key_ring
from bastion.secrets.errors import SecretsError
from bastion.settings import Settings

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
def issue(workload: Annotated[str, typer.Argument(help="api, gateway or worker")]) -> None:
    """Issue an SVID and print its metadata (a check that the CA issues)."""
    if workload not in WORKLOADS:
        print(f"error: workload must be one of {', '.join(WORKLOADS)}", file=sys.stderr)
        raise typer.Exit(2)
    try:
        svid = _ca().issue(workload)
    except (WorkloadError, SecretsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    _print(
        {
            "spiffe_id": svid.spiffe_id,
            "serial": f"{svid.cert.serial_number:x}",
            "not_before": svid.not_before.isoformat(),
            "not_after": svid.not_after.isoformat(),
        }
    )


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
