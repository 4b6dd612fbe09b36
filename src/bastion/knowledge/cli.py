"""``bastion ingest`` and ``bastion search``: the knowledge base from the terminal."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from uuid import UUID

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bastion.settings import Settings

if TYPE_CHECKING:  # the heavy imports (numpy, pypdf, ...) wait for the command to run
    from bastion.db.pool import Database
    from bastion.knowledge.ingest import IngestReport
    from bastion.knowledge.service import KnowledgeService, ReencodeReport, SearchHit

TenantOption = Annotated[str, typer.Option(help="tenant slug")]
NamespaceOption = Annotated[str, typer.Option(help="knowledge base of the tenant")]


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


async def _tenant(db: Database, slug: str) -> UUID:
    from bastion.tenants.service import TenantService

    tenant_id = await TenantService(db).tenant_id(slug)
    if tenant_id is None:
        _fail(f"no tenant named {slug!r}")
    assert tenant_id is not None
    return tenant_id


def ingest_progress(console: Console) -> Progress:
    """Files, chunks and embeddings per second, as one rich progress display."""
    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )


async def run_ingest(
    kb: KnowledgeService,
    tenant_id: UUID,
    namespace: str,
    files: list[Path],
    console: Console,
) -> IngestReport:
    """Ingest ``files`` with a live progress bar on ``console``."""
    from bastion.knowledge.ingest import ingest_files

    with ingest_progress(console) as progress:
        file_bar = progress.add_task("files", total=len(files), rate="")
        chunk_bar = progress.add_task("chunks", total=0, rate="")

        def on_progress(event: str, n: int) -> None:
            task = progress.tasks[chunk_bar]
            if event == "chunks":
                progress.update(chunk_bar, total=(task.total or 0) + n)
            else:
                progress.advance(chunk_bar, n)
                speed = progress.tasks[chunk_bar].speed
                progress.update(chunk_bar, rate=f"{speed:,.0f} emb/s" if speed else "")

        return await ingest_files(
            kb,
            tenant_id,
            namespace,
            files,
            on_file=lambda _path: progress.advance(file_bar),
            progress=on_progress,
        )


def ingest_command(
    paths: Annotated[list[Path], typer.Argument(help="files or directories")],
    tenant: TenantOption,
    namespace: NamespaceOption = "default",
) -> None:
    """Index files (.md .txt .html .pdf) into a tenant's knowledge base; resumable."""
    from bastion.db.service import app_database
    from bastion.knowledge.ingest import discover
    from bastion.knowledge.service import build_knowledge
    from bastion.secrets.backends import open_key_ring

    settings = Settings()
    files = discover(paths)
    if not files:
        _fail("no .md, .txt, .html or .pdf files found")
    console = Console()

    async def run() -> IngestReport:
        async with app_database(settings) as db:
            kb = build_knowledge(settings, db, open_key_ring(settings).kms)
            return await run_ingest(kb, await _tenant(db, tenant), namespace, files, console)

    report = asyncio.run(run())
    console.print(
        f"{report.indexed} indexed, {report.skipped} already indexed, "
        f"{len(report.failed)} failed; {report.chunks} chunks "
        f"({report.embedded} embedded by this run)",
        highlight=False,
    )
    for path, reason in report.failed.items():
        console.print(f"  failed: {path} ({reason})", highlight=False)
    if report.failed:
        raise typer.Exit(1)


knowledge_app = typer.Typer(help="Knowledge bases.", no_args_is_help=True)


@knowledge_app.command("reencode")
def reencode_command(tenant: TenantOption) -> None:
    """Key what a tenant's knowledge bases stored before migration 0025: rotate
    their vectors by the tenant's secret transform and seal their titles."""
    from bastion.db.service import app_database
    from bastion.knowledge.service import build_knowledge
    from bastion.secrets.backends import open_key_ring

    settings = Settings()

    async def run() -> ReencodeReport:
        async with app_database(settings) as db:
            kb = build_knowledge(settings, db, open_key_ring(settings).kms)
            return await kb.reencode(await _tenant(db, tenant))

    report = asyncio.run(run())
    console = Console()
    console.print(
        f"{tenant}: {report.namespaces} knowledge bases re-encoded ({report.chunks} vectors "
        f"rotated), {report.titles} titles sealed",
        highlight=False,
    )
    if report.partitions:
        # Their dead tuples still hold the plain vectors; the app role cannot vacuum.
        console.print(
            "as the database owner, run: VACUUM " + ", ".join(report.partitions), highlight=False
        )


def hits_table(hits: list[SearchHit], width: int = 100) -> Table:
    table = Table("score", "document", "chunk", show_lines=False)
    for hit in hits:
        text = " ".join(hit.text.split())
        table.add_row(
            f"{hit.score:.3f}", hit.title, text[:width] + ("…" if len(text) > width else "")
        )
    return table


def search_command(
    query: Annotated[str, typer.Argument(help="what to look for")],
    tenant: TenantOption,
    namespace: NamespaceOption = "default",
    k: Annotated[int, typer.Option(min=1, max=100)] = 5,
) -> None:
    """Search a tenant's knowledge base (as the operator) and print the best chunks."""
    from bastion.db.service import app_database
    from bastion.knowledge.errors import NamespaceNotFound
    from bastion.knowledge.service import Actor, build_knowledge
    from bastion.secrets.backends import open_key_ring

    settings = Settings()

    async def run() -> list[SearchHit]:
        async with app_database(settings) as db:
            kb = build_knowledge(settings, db, open_key_ring(settings).kms)
            tenant_id = await _tenant(db, tenant)
            try:
                return await kb.search(
                    Actor(tenant_id, None, "system"), namespace, query=query, k=k
                )
            except NamespaceNotFound:  # never created, or shredded
                _fail(f"tenant {tenant!r} has no knowledge base {namespace!r}")
                raise

    Console().print(hits_table(asyncio.run(run())))
