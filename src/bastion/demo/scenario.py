"""``bastion demo``: the support-desk scenario, as far as Bastion has come.

Two tenants of a support desk, each with users in every role and its own
tickets. The demo starts the embedded stack, plays the scenario against it
(really: HTTP to the running processes, SQL as the app role), prints a report
of every check, and stops what it started. Each later capability adds its
part of the scenario here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from bastion.db.pool import Database
from bastion.db.provision import DatabaseError
from bastion.db.service import embedded_server, resolve_target
from bastion.processes import stack
from bastion.runtime import app_database
from bastion.settings import Settings
from bastion.tenants.service import MEMBER_ROLES, TenantService

DEMO_DATABASE = "bastion_demo"

TENANTS = {
    "acme-support": (
        "Acme Support Desk",
        [
            ("Router keeps rebooting", "Customer reports the X200 router reboots every hour."),
            ("Refund for order 1042", "Double charge on the March invoice; refund requested."),
            ("Cannot reset password", "Reset e-mail never arrives; spam folder checked."),
        ],
    ),
    "globex-support": (
        "Globex Support Desk",
        [
            ("Dashboard shows stale data", "Numbers on the sales dashboard lag by a day."),
            ("API rate limit too low", "Batch import hits 429 after 100 requests."),
        ],
    ),
}


@dataclass
class Report:
    """Checks in the order they ran: (section, what, passed, detail)."""

    rows: list[tuple[str, str, bool, str]] = field(default_factory=list)

    def check(self, section: str, what: str, passed: bool, detail: str = "") -> None:
        self.rows.append((section, what, passed, detail))

    @property
    def ok(self) -> bool:
        return all(passed for _s, _w, passed, _d in self.rows)


@dataclass
class DemoTenant:
    id: UUID
    slug: str
    name: str
    users: dict[str, UUID]
    tickets: list[UUID]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run_demo(settings: Settings, console: Console) -> bool:
    """Play the scenario; print the report; return True if every check passed."""
    if settings.database_url:
        raise DatabaseError("the demo runs on the embedded server; unset DATABASE_URL")
    settings = settings.model_copy(
        update={
            "database_name": DEMO_DATABASE,
            "api_port": _free_port(),
            "gateway_port": _free_port(),
            "worker_port": _free_port(),
        }
    )
    report = Report()
    console.rule("[bold]Bastion demo: a support desk with two tenants")

    server = embedded_server(settings)
    started = time.perf_counter()
    was_running = server.status() is not None
    target = resolve_target(settings)  # starts the embedded server
    report.check(
        "database",
        "embedded PostgreSQL 18 + pgvector up",
        True,
        f"{'attached' if was_running else 'started'} in {time.perf_counter() - started:.2f} s, "
        f"scram-sha-256, socket in a 0700 dir",
    )
    _fresh_database(target.admin_conninfo, DEMO_DATABASE)
    try:
        with stack(settings, log_dir=settings.home / "log" / "demo") as urls:
            _check_processes(report, urls)
            db = app_database(settings, max_size=4)
            async with db:
                tenants = await _seed(db)
                report.check(
                    "tenants",
                    "two tenants with a user in every role and their own tickets",
                    True,
                    ", ".join(
                        f"{t.slug}: {len(t.users)} users, {len(t.tickets)} tickets" for t in tenants
                    ),
                )
                await _check_isolation(report, db, tenants)
                await _check_audit(report, db, tenants)
    finally:
        if not was_running:
            server.stop()
    report.check(
        "shutdown", "stopped what the demo started", server.status() is None or was_running
    )
    _print(console, report)
    return report.ok


def _fresh_database(admin_conninfo: str, dbname: str) -> None:
    with psycopg.connect(admin_conninfo, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _check_processes(report: Report, urls: dict[str, str]) -> None:
    with httpx.Client(timeout=5) as client:
        for process, url in urls.items():
            ready = client.get(f"{url}/readyz")
            report.check("processes", f"{process} ready", ready.status_code == 200, url)
        missing = client.get(f"{urls['api']}/no/such/route")
        report.check(
            "processes",
            "unknown route answers RFC 9457 problem+json",
            missing.status_code == 404
            and missing.headers.get("content-type", "").startswith("application/problem+json"),
            f"{missing.status_code} {missing.json().get('type', '')}",
        )


async def _seed(db: Database) -> list[DemoTenant]:
    service = TenantService(db)
    tenants = []
    for slug, (name, tickets) in TENANTS.items():
        tenant = await service.create_tenant(slug, name, actor="demo")
        domain = slug.split("-")[0]
        users = {
            role: await service.add_member(
                tenant.id, f"{role.replace('-', '.')}@{domain}.example", role, actor="demo"
            )
            for role in MEMBER_ROLES
        }
        ids = []
        async with db.tenant_tx(tenant.id, users["contributor"], "contributor") as tx:
            for title, body in tickets:
                cur = await tx.execute(
                    "INSERT INTO bastion.documents (title, body, created_by) "
                    "VALUES (%s, %s, %s) RETURNING id",
                    (title, body, users["contributor"]),
                )
                row = await cur.fetchone()
                assert row is not None
                ids.append(row["id"])
        tenants.append(DemoTenant(tenant.id, slug, name, users, ids))
    return tenants


async def _refused(action: Callable[[], Awaitable[object]]) -> str | None:
    """Run ``action``; return the refusal's error class name, or None if it passed."""
    try:
        await action()
    except psycopg.errors.InsufficientPrivilege as exc:
        return type(exc).__name__
    return None


async def _check_isolation(report: Report, db: Database, tenants: list[DemoTenant]) -> None:
    for mine, other in ((tenants[0], tenants[1]), (tenants[1], tenants[0])):
        for role, user in mine.users.items():
            async with db.tenant_tx(mine.id, user, role) as tx:
                rows = await (await tx.execute("SELECT id FROM bastion.documents")).fetchall()
            seen = {r["id"] for r in rows}
            report.check(
                "isolation",
                f"{mine.slug} {role} sees only own tickets",
                seen == set(mine.tickets),
                f"{len(seen)} visible, {len(seen & set(other.tickets))} of {other.slug}",
            )
        owner = mine.users["owner"]

        async def by_id(
            tenant: DemoTenant = mine, who: UUID = owner, target: UUID = other.tickets[0]
        ) -> list[dict[str, Any]]:
            async with db.tenant_tx(tenant.id, who, "owner") as tx:
                cur = await tx.execute("SELECT * FROM bastion.documents WHERE id = %s", (target,))
                return await cur.fetchall()

        report.check(
            "isolation",
            f"{mine.slug} owner asks for a {other.slug} ticket by id",
            await by_id() == [],
            "0 rows",
        )

        async def forge(
            tenant: DemoTenant = mine, who: UUID = owner, victim: DemoTenant = other
        ) -> None:
            async with db.tenant_tx(tenant.id, who, "owner") as tx:
                await tx.execute("SELECT set_config('app.tenant_id', %s, true)", (str(victim.id),))
                await tx.execute("SELECT * FROM bastion.documents")

        refusal = await _refused(forge)
        report.check(
            "isolation",
            f"{mine.slug}: injected set_config to {other.slug}",
            refusal is not None,
            f"refused ({refusal})",
        )

        async def plant(
            tenant: DemoTenant = mine, who: UUID = owner, victim: DemoTenant = other
        ) -> None:
            async with db.tenant_tx(tenant.id, who, "owner") as tx:
                await tx.execute(
                    "INSERT INTO bastion.documents (tenant_id, title) VALUES (%s, 'planted')",
                    (victim.id,),
                )

        refusal = await _refused(plant)
        report.check(
            "isolation",
            f"{mine.slug}: insert into {other.slug}",
            refusal is not None,
            f"refused by RLS ({refusal})",
        )

    viewer_tenant = tenants[0]

    async def viewer_write() -> None:
        async with db.tenant_tx(viewer_tenant.id, viewer_tenant.users["viewer"], "viewer") as tx:
            await tx.execute("INSERT INTO bastion.documents (title) VALUES ('by a viewer')")

    refusal = await _refused(viewer_write)
    report.check(
        "isolation", "viewer writes a ticket", refusal is not None, f"refused by RLS ({refusal})"
    )
    async with db.pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) AS n FROM bastion.documents")).fetchone()
    report.check("isolation", "query with no tenant set", row == {"n": 0}, "0 rows, no error")


async def _check_audit(report: Report, db: Database, tenants: list[DemoTenant]) -> None:
    for tenant in tenants:
        async with db.tenant_tx(tenant.id, tenant.users["auditor"], "auditor") as tx:
            rows = await (
                await tx.execute("SELECT seq, action FROM bastion.audit_events ORDER BY seq")
            ).fetchall()
        seqs = [r["seq"] for r in rows]
        report.check(
            "audit",
            f"{tenant.slug} audit trail, gapless",
            seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 0,
            f"{len(rows)} events: " + ", ".join(sorted({r["action"] for r in rows})),
        )

    async def tamper(tenant: DemoTenant = tenants[0]) -> None:
        async with db.tenant_tx(tenant.id, tenant.users["owner"], "owner") as tx:
            await tx.execute("DELETE FROM bastion.audit_events")

    refusal = await _refused(tamper)
    report.check("audit", "owner deletes audit events", refusal is not None, f"refused ({refusal})")


def _print(console: Console, report: Report) -> None:
    table = Table(show_lines=False)
    table.add_column("area")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for section, what, passed, detail in report.rows:
        table.add_row(section, what, "[green]PASS[/]" if passed else "[red]FAIL[/]", detail)
    console.print(table)
    passed_count = sum(1 for row in report.rows if row[2])
    colour = "green" if report.ok else "red"
    console.print(f"[bold {colour}]{passed_count}/{len(report.rows)} checks passed[/]")
