"""``bastion detectors …``: an operator's view of the detectors' firings, and their undo."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar
from uuid import UUID

import typer
from rich.console import Console
from rich.table import Table

from bastion.settings import Settings

if TYPE_CHECKING:
    from bastion.db.pool import Database
    from bastion.detectors.runner import DetectorService

detectors_app = typer.Typer(help="Live detectors: firings and their undo.", no_args_is_help=True)

out = Console()
T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _run(work: Callable[[Database], Awaitable[T]]) -> T:
    from bastion.db.provision import DatabaseError
    from bastion.db.service import app_database
    from bastion.secrets.errors import SecretsError

    async def run() -> T:
        async with app_database(Settings()) as db:
            return await work(db)

    try:
        return asyncio.run(run())
    except (DatabaseError, SecretsError) as exc:
        _fail(str(exc))


def _service(db: Database) -> DetectorService:
    from bastion.detectors.response import Responder
    from bastion.detectors.runner import DetectorService
    from bastion.incident.controls import IncidentControls

    return DetectorService(db, Responder(IncidentControls(db), None))


@detectors_app.command("list")
def list_firings(
    tenant: Annotated[str | None, typer.Option(help="one tenant's id")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """The newest firings: rule, tenant, why, what was done, whether undone."""
    try:
        tenant_id = UUID(tenant) if tenant else None
    except ValueError:
        _fail("--tenant must be a tenant id (a UUID)")
    firings = _run(lambda db: _service(db).firings(limit=limit, tenant_id=tenant_id))
    if as_json:
        for f in firings:
            row = {
                "id": f.id,
                "rule": f.rule,
                "tenant_id": str(f.tenant_id),
                "subject": f.subject,
                "reason": f.reason,
                "actions": list(f.actions),
                "fired_at": f.fired_at.isoformat(),
                "responded": f.responded_at is not None,
                "undone_by": f.undone_by,
            }
            print(json.dumps(row))
        return
    table = Table("id", "rule", "tenant", "why", "actions", "undone")
    for f in firings:
        table.add_row(
            str(f.id),
            f.rule,
            str(f.tenant_id),
            f.reason,
            ", ".join(f.actions) or "alert",
            f.undone_by or "",
        )
    out.print(table)


@detectors_app.command("undo")
def undo(
    firing: Annotated[int, typer.Argument(help="the firing's id (bastion detectors list)")],
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "false positive",
) -> None:
    """Undo a firing's response: lift the tenant's spend freeze and tool pause
    (audited; revoked sessions stay revoked, their users sign in again)."""
    actor = f"operator:{getpass.getuser()}"
    done = _run(lambda db: _service(db).undo(firing, actor=actor, reason=reason))
    if done is None:
        _fail("no such firing, or it was undone already")
    out.print(f"firing {firing} undone: {json.dumps(done)}")
