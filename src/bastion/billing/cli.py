"""``bastion billing …``: the plan catalogue, plan changes, approvals, reconciliation.

(``bastion incident pause-webhooks / resume-webhooks`` live in bastion.incident.cli.)
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bastion.settings import Settings

if TYPE_CHECKING:
    from bastion.billing.wiring import Billing

billing_app = typer.Typer(help="Plans, subscriptions and provider webhooks.", no_args_is_help=True)

out = Console()
T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _operator() -> str:
    return f"operator:{getpass.getuser()}"


def _run(work: Callable[..., Awaitable[T]]) -> T:
    """Run ``work(billing)`` with the app database open; known failures are one line."""
    from bastion.billing.wiring import build_billing
    from bastion.db.provision import DatabaseError
    from bastion.db.service import app_database
    from bastion.errors import BastionError
    from bastion.secrets.backends import open_keystore
    from bastion.secrets.errors import SecretsError

    async def run() -> T:
        settings = Settings()
        async with app_database(settings) as db:
            return await work(build_billing(settings, db, open_keystore(settings)), db)

    try:
        return asyncio.run(run())
    except (DatabaseError, SecretsError) as exc:
        _fail(str(exc))
    except BastionError as exc:
        reason = exc.extensions.get("reason")
        _fail(f"{exc.detail or exc.title}{f' ({reason})' if reason else ''}")


@billing_app.command("plans")
def plans() -> None:
    """List the plan catalogue."""
    catalogue = _run(lambda billing, _db: billing.catalogue.list())
    table = Table()
    for column in ("plan", "tokens/month", "calls/month", "rpm", "models", "overage", "price"):
        table.add_column(column)
    for p in catalogue:
        table.add_row(
            p.code,
            f"{p.monthly_token_budget:,}",
            f"{p.monthly_call_budget:,}",
            str(p.requests_per_minute),
            ",".join(p.models_allowed),
            p.overage_policy,
            p.stripe_price_id or "",
        )
    out.print(table)


@billing_app.command("plan-set")
def plan_set(
    code: str,
    name: Annotated[str, typer.Option()],
    tokens: Annotated[int, typer.Option(min=0, help="monthly token budget")],
    calls: Annotated[int, typer.Option(min=0, help="monthly call budget")],
    rpm: Annotated[int, typer.Option(min=0, help="requests per minute")],
    models: Annotated[str, typer.Option(help="comma-separated, or *")] = "*",
    overage: Annotated[str, typer.Option(help="block or metered")] = "block",
    stripe_price: Annotated[str | None, typer.Option(help="Stripe price id")] = None,
    rank: Annotated[int, typer.Option(help="display order: higher is dearer")] = 0,
    price: Annotated[
        int, typer.Option(min=0, help="monthly price in minor units (cents), an integer")
    ] = 0,
    currency: Annotated[str, typer.Option(help="ISO 4217 code, lower case")] = "usd",
    active: Annotated[
        bool, typer.Option(help="offered (an inactive plan is assignable to no one)")
    ] = True,
    reason: Annotated[
        str, typer.Option(help="why (recorded if it needs approval)")
    ] = "catalogue edit",
) -> None:
    """Create or change a plan of the catalogue.

    An edit that gives the plan's subscribers more for their money (a larger
    budget, another model, a lower price) is not applied: it becomes a
    request that a second operator approves (``bastion billing approve``).
    """
    from bastion.billing.errors import CatalogueEditNeedsApproval
    from bastion.billing.plans import Plan

    plan = Plan(
        code=code,
        name=name,
        rank=rank,
        monthly_token_budget=tokens,
        monthly_call_budget=calls,
        requests_per_minute=rpm,
        models_allowed=tuple(m.strip() for m in models.split(",") if m.strip()),
        overage_policy=overage,
        stripe_price_id=stripe_price,
        active=active,
        monthly_price=price,
        currency=currency,
    )

    async def work(billing: Billing, _db: object) -> str | None:
        try:
            await billing.catalogue.put(plan, actor=_operator())
        except CatalogueEditNeedsApproval:
            request = await billing.approvals.request_catalogue_edit(
                plan, operator=_operator(), reason=reason
            )
            return str(request.id)
        return None

    pending = _run(work)
    if pending is None:
        out.print(f"plan {code} saved")
    else:
        out.print(
            f"plan {code}: the edit gives subscribers more; pending approval {pending} "
            f"(a second operator runs: bastion billing approve {pending})"
        )


@billing_app.command("change-plan")
def change_plan(
    tenant: Annotated[str, typer.Option(help="tenant slug")],
    plan: Annotated[str, typer.Option()],
    reason: Annotated[str, typer.Option(help="why (recorded)")],
) -> None:
    """Put a tenant on a plan: a downgrade now; an upgrade (a plan that costs or
    gives more) once a second operator approves it (``bastion billing approve``)."""
    from bastion.tenants.service import TenantService

    async def work(billing: Billing, db: object) -> str:
        from bastion.db.pool import Database

        assert isinstance(db, Database)
        tenant_id = await TenantService(db).tenant_id(tenant)
        if tenant_id is None:
            _fail(f"no tenant named {tenant!r}")
        assert tenant_id is not None
        if await billing.service.is_upgrade(tenant_id, plan):
            request = await billing.approvals.request_tenant_plan(
                tenant_id, plan, operator=_operator(), reason=reason
            )
            return (
                f"{tenant} -> {plan} is an upgrade: pending approval {request.id} "
                f"(a second operator runs: bastion billing approve {request.id})"
            )
        sub = await billing.service.change_plan(
            tenant_id, plan, actor=_operator(), reason=reason, source="operator"
        )
        return f"{tenant} is on plan {sub.plan_code}"

    out.print(_run(work))


@billing_app.command("approve")
def approve(request: Annotated[str, typer.Argument(help="the request id")]) -> None:
    """Approve another operator's pending plan change (never your own) and apply it."""
    from uuid import UUID

    try:
        request_id = UUID(request)
    except ValueError:
        _fail("not a request id")

    async def work(billing: Billing, _db: object) -> str:
        decided = await billing.approvals.approve(request_id, operator=_operator())
        return f"approved: {decided.kind} {decided.plan_code} (requested by {decided.requested_by})"

    out.print(_run(work))


@billing_app.command("requests")
def requests() -> None:
    """Plan changes waiting for a second operator."""
    pending = _run(lambda billing, _db: billing.approvals.pending())
    table = Table()
    for column in ("id", "kind", "tenant", "plan", "from", "requested by", "expires", "reason"):
        table.add_column(column)
    for r in pending:
        table.add_row(
            str(r.id),
            r.kind,
            str(r.tenant_id or ""),
            r.plan_code,
            r.from_plan or "",
            r.requested_by,
            r.expires_at.isoformat(timespec="minutes"),
            r.reason,
        )
    out.print(table)


@billing_app.command("reconcile")
def reconcile(
    since: Annotated[int | None, typer.Option(help="unix time to list events from")] = None,
    provider: Annotated[
        str, typer.Option(help="stripe (its API) or adyen (the stored events: no list API)")
    ] = "stripe",
) -> None:
    """Compare with the provider: recover missed events, route, repair drift."""
    if provider not in ("stripe", "adyen"):
        _fail("--provider is stripe or adyen")
    report = _run(lambda billing, _db: billing.reconciler.run(since=since, provider=provider))
    for key, value in vars(report).items():
        out.print(f"{key.replace('_', ' ')}: {value}")


@billing_app.command("events")
def events() -> None:
    """Stored webhook events by status (ignored = unknown types; unrouted = unknown
    customers, waiting for reconciliation)."""
    counts = _run(lambda billing, _db: billing.service.event_counts())
    for status in sorted(counts):
        out.print(f"{status}: {counts[status]}")
