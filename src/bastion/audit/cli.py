"""``bastion audit``: verify the hash chain against the exported checkpoints, export events.

bastion audit verify [--tenant T] [--since N]   exit 0 intact, 2 tampered
bastion audit export [--tenant T] [--out FILE]  JSON lines for a SIEM
bastion audit checkpoint                        sign and export the heads now
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar
from uuid import UUID

import typer

from bastion.audit.checkpoints import (
    AuditKeys,
    Checkpointer,
    DirectorySink,
    checkpoint_dir,
    read_history,
)
from bastion.audit.verify import all_tenants, export_events, verify_trail
from bastion.db.pool import Database
from bastion.settings import Settings

audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)

T = TypeVar("T")


def _run(work: Callable[[Settings, Database], Awaitable[T]]) -> T:
    from bastion.db.service import app_database

    settings = Settings()

    async def run() -> T:
        async with app_database(settings) as db:
            return await work(settings, db)

    return asyncio.run(run())


def _keys(settings: Settings) -> AuditKeys:
    from bastion.secrets.backends import open_key_ring

    return AuditKeys(open_key_ring(settings).keystore)


@audit_app.command("verify")
def verify_command(
    tenant: Annotated[UUID | None, typer.Option(help="only this tenant")] = None,
    since: Annotated[
        int | None, typer.Option(help="trust checkpoint N and check only what follows")
    ] = None,
) -> None:
    """Find altered, removed, inserted and reordered events, and truncation.

    Prints a JSON report; exit 0 when intact, 2 when anything does not hold.
    """

    async def work(settings: Settings, db: Database) -> dict[str, object]:
        history = read_history(DirectorySink(checkpoint_dir(settings)), _keys(settings).public_key)
        return (await verify_trail(db, history, tenant=tenant, since=since)).as_dict()

    report = _run(work)
    print(json.dumps(report, indent=2))
    if not report["intact"]:
        raise typer.Exit(2)


@audit_app.command("export")
def export_command(
    tenant: Annotated[UUID | None, typer.Option(help="only this tenant")] = None,
    out: Annotated[Path | None, typer.Option(help="file to write (default: stdout)")] = None,
) -> None:
    """Write the events as JSON lines (with their hashes) for a SIEM."""

    async def work(_settings: Settings, db: Database) -> int:
        stream = sys.stdout if out is None else out.open("w", encoding="utf-8")
        try:
            total = 0
            for each in [tenant] if tenant is not None else await all_tenants(db):
                total += await export_events(db, each, stream)
            return total
        finally:
            if out is not None:
                stream.close()

    count = _run(work)
    print(f"exported {count} events", file=sys.stderr)


@audit_app.command("checkpoint")
def checkpoint_command() -> None:
    """Sign every tenant head that grew, now, and export it to the sink."""

    async def work(settings: Settings, db: Database) -> int | None:
        sink = DirectorySink(checkpoint_dir(settings))
        return await Checkpointer(db, _keys(settings), sink).run_once(force=True)

    number = _run(work)
    print("nothing to sign" if number is None else f"checkpoint {number}")
