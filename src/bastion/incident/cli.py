"""``bastion incident …``: the runbook commands (docs/runbook.md).

Every command is idempotent (run twice, the second says "already"), audited
and reversible.

Pausing webhooks is *store-and-ack*, not 503: while paused the endpoints still
verify, store (encrypted) and acknowledge every event, and the worker does not
apply them; resume queues every held event, in arrival order. Why not 503: the
provider then owns the backlog — Stripe retries with exponential backoff for
up to three days and Adyen on its own schedule, so after a resume the events
trickle back over hours, in no useful order, and a long pause can get the
endpoint disabled by the provider. Stored events are already in our hands:
nothing depends on the provider's retry policy, and resume applies them all
at once.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar
from uuid import UUID

import typer
from rich.console import Console

from bastion.settings import Settings

if TYPE_CHECKING:
    from bastion.billing.wiring import Billing
    from bastion.db.pool import Database
    from bastion.incident.controls import IncidentControls, RouteKind
    from bastion.incident.service import IncidentService

incident_app = typer.Typer(help="Incident runbook commands.", no_args_is_help=True)

out = Console()
T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _operator() -> str:
    return f"operator:{getpass.getuser()}"


def _run(work: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``work(db)`` with the app database open; known failures are one line."""
    from bastion.db.provision import DatabaseError
    from bastion.db.service import app_database
    from bastion.errors import BastionError
    from bastion.secrets.errors import SecretsError

    async def run() -> T:
        async with app_database(Settings()) as db:
            return await work(db)

    try:
        return asyncio.run(run())
    except (DatabaseError, SecretsError) as exc:
        _fail(str(exc))
    except BastionError as exc:
        reason = exc.extensions.get("reason")
        _fail(f"{exc.detail or exc.title}{f' ({reason})' if reason else ''}")


def _billing(db: Database) -> Billing:
    from bastion.billing.wiring import build_billing
    from bastion.secrets.backends import open_keystore

    settings = Settings()
    return build_billing(settings, db, open_keystore(settings))


@incident_app.command("pause-webhooks")
def pause_webhooks(
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "incident",
) -> None:
    """Keep receiving (verify, store, acknowledge) webhooks, but apply none.

    Returns once no event is being applied any more (an apply under way ends first)."""
    _run(lambda db: _billing(db).service.pause(actor=_operator(), reason=reason))
    out.print("webhooks paused: events are stored and acknowledged, not applied")


@incident_app.command("resume-webhooks")
def resume_webhooks() -> None:
    """Apply every held event, in arrival order, and new ones again (none is left
    held: every writer reads the pause under the lock a resume waits for)."""
    held = _run(lambda db: _billing(db).service.resume(actor=_operator()))
    out.print(f"webhooks resumed: {held} held events queued for the worker")


# -- credentials and tenants (bastion.incident.service) ---------------------------------


def _incident(db: Database) -> IncidentService:
    from bastion.incident.service import IncidentService
    from bastion.secrets.backends import open_key_ring

    settings = Settings()
    ring = open_key_ring(settings)
    return IncidentService(db, settings, ring.keystore, ring.kms)


def _uuid(value: str, what: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        _fail(f"{what} must be an id (a UUID)")


async def _tenant(db: Database, ref: str) -> UUID:
    """A tenant named by its id or its slug (as the other incident commands take it)."""
    from bastion.incident.service import IncidentRefused
    from bastion.tenants.service import TenantService

    try:
        return UUID(ref)
    except ValueError:
        found = await TenantService(db).tenant_id(ref)
    if found is None:
        raise IncidentRefused("no such tenant")
    return found


@incident_app.command("revoke-keys")
def revoke_keys(
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "incident",
) -> None:
    """Retire every JWT, envelope and tool-call signing key NOW and sign with new
    ones: tokens, envelopes and tool calls signed by the old keys are refused by
    every process within about a second (no grace). Receipt keys are kept."""
    kinds = _run(lambda db: _incident(db).revoke_keys(actor=_operator(), reason=reason))
    out.print(f"keys revoked and reissued: {', '.join(kinds)}")


@incident_app.command("revoke-sessions")
def revoke_sessions(
    user: Annotated[str | None, typer.Option(help="a user's id: their sessions everywhere")] = None,
    tenant: Annotated[
        str | None, typer.Option(help="a tenant (slug or id): every session in it")
    ] = None,
    everyone: Annotated[bool, typer.Option("--all", help="every session of everyone")] = False,
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "incident",
) -> None:
    """End sessions: refresh tokens revoked and access tokens issued until now refused."""
    if everyone == (user is not None or tenant is not None):
        _fail("give --user and/or --tenant, or --all")
    user_id = _uuid(user, "--user") if user is not None else None

    async def work(db: Database) -> int:
        tenant_id = await _tenant(db, tenant) if tenant is not None else None
        return await _incident(db).revoke_sessions(
            tenant_id=tenant_id, user_id=user_id, actor=_operator(), reason=reason
        )

    revoked = _run(work)
    if revoked:
        out.print(f"sessions revoked: {revoked}; access tokens issued until now are refused")
    else:
        out.print("already: no live session left; access tokens issued until now are refused")


@incident_app.command("rotate-secret")
def rotate_secret(
    kind: Annotated[str, typer.Argument(help="provider | webhook")],
    name: Annotated[str, typer.Argument(help="the provider key's name, or stripe | adyen")],
) -> None:
    """Replace a leaked provider key or webhook secret (new value on stdin) and
    retire the old one at once (no overlap)."""
    settings = Settings()
    if kind == "webhook":
        refs = {"stripe": settings.stripe_webhook_secret_ref, "adyen": settings.adyen_hmac_key_ref}
        if name not in refs:
            _fail("webhook secrets: stripe or adyen")
        name = refs[name].removeprefix("local://")
    elif kind != "provider":
        _fail("rotate-secret takes provider KEY_NAME or webhook PROVIDER")
    value = sys.stdin.readline().rstrip("\n").encode()
    if not value:
        _fail("no value on stdin")
    changed = _run(
        lambda db: _incident(db).rotate_secret(
            kind, name, value, actor=_operator(), reason="leaked secret"
        )
    )
    out.print(
        f"{kind} {name}: rotated, older versions retired"
        if changed
        else f"already: {kind} {name} holds only this value"
    )


@incident_app.command("lockdown")
def lockdown(
    tenant: Annotated[str, typer.Option(help="the tenant (slug or id)")],
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "incident",
) -> None:
    """Make the tenant read-only in every process (writes refused, reads allowed)
    until an operator runs ``lift-lockdown``."""

    async def work(db: Database) -> bool:
        tenant_id = await _tenant(db, tenant)
        return await _incident(db).lockdown(tenant_id, actor=_operator(), reason=reason)

    changed = _run(work)
    out.print("tenant locked down: read-only" if changed else "already locked down")


@incident_app.command("lift-lockdown")
def lift_lockdown(
    tenant: Annotated[str, typer.Option(help="the tenant (slug or id)")],
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "resolved",
) -> None:
    """Lift a tenant's lockdown (operators only: no route of the api can)."""

    async def work(db: Database) -> bool:
        tenant_id = await _tenant(db, tenant)
        return await _incident(db).lift_lockdown(tenant_id, actor=_operator(), reason=reason)

    changed = _run(work)
    out.print("lockdown lifted" if changed else "already: the tenant was not locked down")


def _controls(db: Database) -> IncidentControls:
    from bastion.incident.controls import IncidentControls

    return IncidentControls(db)


async def _tenant_scope(db: Database, tenant: str | None, everyone: bool) -> UUID | None:
    """The tenant named by ``--tenant`` (its slug), or None for ``--all``."""
    if everyone or tenant is None:
        return None
    from bastion.tenants.service import TenantService

    tenant_id = await TenantService(db).tenant_id(tenant)
    if tenant_id is None:
        _fail(f"no tenant named {tenant!r}")
    return tenant_id


Switch = Callable[["IncidentControls", "UUID | None", str, str], Awaitable[bool]]


def _switch(
    tenant: str | None, everyone: bool, reason: str, flip: Switch, done: str, already: str
) -> None:
    if (tenant is None) == (not everyone):
        _fail("give --tenant SLUG or --all (one of them)")

    async def work(db: Database) -> bool:
        scope = await _tenant_scope(db, tenant, everyone)
        return await flip(_controls(db), scope, _operator(), reason)

    who = "every tenant" if everyone else f"tenant {tenant}"
    out.print(f"{who}: {done if _run(work) else already}")


TenantOption = Annotated[str | None, typer.Option(help="the tenant's slug")]
AllOption = Annotated[bool, typer.Option("--all", help="every tenant (a global switch)")]
ReasonOption = Annotated[str, typer.Option(help="why (recorded)")]


@incident_app.command("freeze-spend")
def freeze_spend(
    tenant: TenantOption = None, everyone: AllOption = False, reason: ReasonOption = "incident"
) -> None:
    """Refuse every paid gateway call (402 spend-frozen); nothing is reserved or charged."""
    _switch(
        tenant,
        everyone,
        reason,
        lambda c, t, a, r: c.freeze_spend(t, actor=a, reason=r),
        "spending frozen",
        "spending already frozen",
    )


@incident_app.command("unfreeze-spend")
def unfreeze_spend(
    tenant: TenantOption = None, everyone: AllOption = False, reason: ReasonOption = "resolved"
) -> None:
    """Lift a freeze (``--all`` lifts the global one; a tenant's own freeze stays)."""
    _switch(
        tenant,
        everyone,
        reason,
        lambda c, t, a, r: c.unfreeze_spend(t, actor=a, reason=r),
        "spending unfrozen",
        "spending already not frozen",
    )


@incident_app.command("disable-tools")
def disable_tools(
    tenant: TenantOption = None, everyone: AllOption = False, reason: ReasonOption = "incident"
) -> None:
    """Refuse requests declaring tools (403 tools-disabled); queued tool runs are not started."""
    _switch(
        tenant,
        everyone,
        reason,
        lambda c, t, a, r: c.disable_tools(t, actor=a, reason=r),
        "tools disabled",
        "tools already disabled",
    )


@incident_app.command("enable-tools")
def enable_tools(
    tenant: TenantOption = None, everyone: AllOption = False, reason: ReasonOption = "resolved"
) -> None:
    """Allow tools again (``--all`` lifts the global switch; a tenant's own stays)."""
    _switch(
        tenant,
        everyone,
        reason,
        lambda c, t, a, r: c.enable_tools(t, actor=a, reason=r),
        "tools enabled",
        "tools already enabled",
    )


def _route(model: str | None, provider: str | None) -> tuple[RouteKind, str]:
    if (model is None) == (provider is None):
        _fail("give --model NAME or --provider NAME (one of them)")
    return ("model", model) if model is not None else ("provider", provider or "")


ModelOption = Annotated[str | None, typer.Option(help="a model the gateway serves")]
ProviderOption = Annotated[
    str | None, typer.Option(help="a provider: its upstream host, local, or a target's name")
]


@incident_app.command("serve-cached")
def serve_cached(
    model: ModelOption = None, provider: ProviderOption = None, reason: ReasonOption = "incident"
) -> None:
    """Answer from each tenant's cache only (marked stale-fallback); a miss is 503.

    Every gateway follows within gateway_incident_ttl_seconds (1 s)."""
    kind, name = _route(model, provider)
    changed = _run(
        lambda db: _controls(db).serve_cached(kind, name, actor=_operator(), reason=reason)
    )
    out.print(f"{kind} {name}: {'served' if changed else 'already served'} from the cache only")


@incident_app.command("serve-live")
def serve_live(
    model: ModelOption = None, provider: ProviderOption = None, reason: ReasonOption = "resolved"
) -> None:
    """Call the providers again."""
    kind, name = _route(model, provider)
    changed = _run(
        lambda db: _controls(db).serve_live(kind, name, actor=_operator(), reason=reason)
    )
    out.print(f"{kind} {name}: {'served live again' if changed else 'already served live'}")
