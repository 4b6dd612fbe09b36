"""``bastion keys``: rotate any kind of key, and show every key's state."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from bastion.rotation import KINDS, KeyStatus, RotationPlan, RotationRefused, results_json
from bastion.secrets.errors import SecretsError
from bastion.settings import Settings

keys_app = typer.Typer(help="Keys: rotation and status.", no_args_is_help=True)
out = Console()


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _plan(settings: Settings) -> RotationPlan:
    from bastion.db.service import app_database, resolve_target
    from bastion.secrets.backends import open_key_ring

    ring = open_key_ring(settings)
    return RotationPlan(
        settings,
        ring.keystore,
        ring.kms,
        app_database(settings, max_size=2),
        admin_conninfo=lambda: resolve_target(settings, start=False).admin_conninfo,
    )


@keys_app.command("rotate")
def rotate_command(
    kind: Annotated[str, typer.Argument(help=", ".join(KINDS))],
    name: Annotated[
        str | None, typer.Option(help="the one key of the kind (a webhook's or model's secret)")
    ] = None,
    value_stdin: Annotated[
        bool, typer.Option(help="read the new value from stdin (webhook, provider)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Rotate KIND now: the new key is published before it is used, the old one
    keeps verifying through its overlap window. Audited; a repeat is a no-op
    while the new key is still pending."""
    if kind not in KINDS:
        _fail(f"unknown key kind {kind!r}: choose {', '.join(KINDS)}")
    value = sys.stdin.readline().rstrip("\n").encode() if value_stdin else None
    if value_stdin and not value:
        _fail("no value on stdin")

    async def run() -> list[dict[str, object]]:
        plan = _plan(Settings())
        assert plan.db is not None
        async with plan.db:
            return results_json(await plan.rotate(kind, name=name, value=value))

    try:
        results = asyncio.run(run())
    except RotationRefused as exc:
        _fail(str(exc))
    except SecretsError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        did = f"new version {r['rotated']}" if r["rotated"] is not None else "not due, unchanged"
        retired = f"; retired {r['retired']}" if r["retired"] else ""
        rewrapped = f"; {r['rewrapped']} data keys re-wrapped" if r["rewrapped"] else ""
        out.print(f"{r['kind']} {r['name']}: {did}{retired}{rewrapped}", highlight=False)


@keys_app.command("status")
def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every key's kind, version, age, next rotation and state (active, pending,
    verifying, retired); exit 2 if a key in use is overdue."""
    from bastion.secrets.backends import open_key_ring

    settings = Settings()
    try:
        ring = open_key_ring(settings)
        # Status reads the key ring only: no database, no admin connection.
        plan = RotationPlan(settings, ring.keystore, ring.kms, db=None)
        rows = plan.status()
    except SecretsError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        out.print(_table(rows))
    if any(r.overdue for r in rows):
        raise typer.Exit(2)


def _table(rows: list[KeyStatus]) -> Table:
    table = Table("kind", "key", "version", "age (days)", "state", "next rotation")
    now = datetime.now(UTC)
    for r in rows:
        due = "" if r.next_rotation is None else r.next_rotation.date().isoformat()
        if r.overdue:
            due = f"OVERDUE since {due}"
        elif r.next_rotation is not None and r.next_rotation < now:
            due = "now"
        table.add_row(r.kind, r.name, str(r.version), f"{r.age_days:.1f}", r.state, due)
    return table
