"""The ``bastion`` command line. Thin: parse, call a service, print."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from bastion.access.authorize import PolicyError
from bastion.access.cli import policy_app
from bastion.audit.cli import audit_app
from bastion.backup.cli import (
    backup_command,
    backup_sync_command,
    drill_app,
    keys_backup_command,
    restore_command,
    verify_command,
)
from bastion.billing.cli import billing_app
from bastion.billing.receipts_cli import receipts_app
from bastion.check.cli import check_app
from bastion.db.launcher import LauncherError
from bastion.db.provision import APP_ROLE, DatabaseError
from bastion.deploy.cli import deploy_app
from bastion.detectors.cli import detectors_app
from bastion.identity.cli import ca_app
from bastion.identity.workload import WorkloadError
from bastion.incident.cli import incident_app
from bastion.knowledge.cli import ingest_command, knowledge_app, search_command
from bastion.release.cli import release_app
from bastion.rotation.cli import keys_app
from bastion.safety.sandbox.cli import sandbox_app
from bastion.secrets.cli import secrets_app
from bastion.secrets.errors import SecretsError
from bastion.settings import (
    LiteralSecretInSettings,
    PlainInternalHttpRefused,
    PlainPublicHttpRefused,
    PublicUrlUnset,
    Settings,
)

app = typer.Typer(
    name="bastion",
    help="Secure-by-default backend for multi-tenant AI applications.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(
    help="The database: embedded PostgreSQL or DATABASE_URL.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
db_app.command("backup")(backup_command)
db_app.command("backup-sync")(backup_sync_command)
db_app.command("restore")(restore_command)
db_app.command("verify-backup")(verify_command)
keys_app.command("backup")(keys_backup_command)
app.add_typer(drill_app, name="drill")
app.add_typer(secrets_app, name="secrets")
app.add_typer(check_app, name="check")
app.add_typer(deploy_app, name="deploy")
app.add_typer(release_app, name="release")
app.add_typer(ca_app, name="ca")
app.add_typer(policy_app, name="policy")
app.command("ingest")(ingest_command)
app.command("search")(search_command)
app.add_typer(knowledge_app, name="knowledge")

out = Console()
err = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    # Plain print: one line, never re-wrapped to the terminal's width.
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _settings() -> Settings:
    try:
        return Settings()
    # The settings' own refusals name the setting to change, never a value.
    except (LiteralSecretInSettings, PlainInternalHttpRefused, PublicUrlUnset) as exc:
        _fail(str(exc))
    except ValidationError as exc:
        # Field names and reasons only: pydantic's own text repeats the input,
        # which may be a URL with a password in it.
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        _fail(f"invalid settings: {reasons}")


def _embedded_only(settings: Settings) -> None:
    if settings.database_url:
        _fail("DATABASE_URL is set, so the embedded server is not used")


@app.callback()
def _main() -> None:
    """Errors become one clear line on stderr, never a traceback."""
    from bastion.logs import configure_logging

    # Redacting JSON logs from the first line on: structlog's unconfigured
    # default would print tracebacks with local variables, secrets included.
    configure_logging("warning")


@db_app.command("start")
def db_start() -> None:
    """Start the embedded server (or attach to it) and migrate the database."""
    from bastion.db.service import app_database

    settings = _settings()
    _embedded_only(settings)
    with _errors():
        app_database(settings, migrate=True)
        from bastion.db.service import embedded_server

        info = embedded_server(settings).status()
    assert info is not None
    where = f"127.0.0.1:{info.port} and " if info.tcp else ""
    out.print(f"PostgreSQL running (pid {info.pid}), listening on {where}{info.socket_dir}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded server."""
    from bastion.db.service import embedded_server

    settings = _settings()
    _embedded_only(settings)
    with _errors():
        stopped = embedded_server(settings).stop()
    out.print("PostgreSQL stopped" if stopped else "PostgreSQL was not running")


@db_app.command("status")
def db_status() -> None:
    """Say whether the embedded server is running; exit 3 if it is not."""
    from bastion.db.service import embedded_server

    settings = _settings()
    _embedded_only(settings)
    info = embedded_server(settings).status()
    if info is None:
        out.print("PostgreSQL is not running")
        raise typer.Exit(3)
    tcp = f", TCP 127.0.0.1:{info.port}" if info.tcp else ""
    out.print(f"PostgreSQL running (pid {info.pid}), socket {info.socket_dir}{tcp}")


@db_app.command("url")
def db_url() -> None:
    """Print the app role's connection URL (the password stays in the key ring)."""
    from bastion.db.service import describe_url, embedded_server

    settings = _settings()
    if settings.database_url:
        out.print(describe_url(settings.database_url), highlight=False)
        return
    info = embedded_server(settings).status()
    if info is None:
        _fail("the embedded PostgreSQL server is not running (bastion db start)")
    print(
        f"postgresql://{APP_ROLE}@/{settings.database_name}?host={info.socket_dir}&port={info.port}"
    )
    err.print("password: bastion secrets get db/bastion-app-password --reveal", highlight=False)


@db_app.command("psql", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def db_psql(ctx: typer.Context) -> None:
    """Open psql on the embedded server as its superuser (extra args go to psql)."""
    from bastion.db.service import embedded_server

    settings = _settings()
    _embedded_only(settings)
    with _errors():
        argv, env = embedded_server(settings).psql_argv(settings.database_name)
    # The password goes through the environment, never argv (visible in ps).
    os.execve(argv[0], argv + list(ctx.args), {**os.environ, **env})


@db_app.command("migrate")
def db_migrate() -> None:
    """Create roles and extensions as needed and migrate to the latest schema."""
    from bastion.db.service import app_database

    with _errors():
        app_database(_settings(), migrate=True)
    out.print("database migrated")


@app.command("serve")
def serve(
    process: Annotated[str, typer.Argument(help="api, gateway or worker")],
    port: Annotated[int | None, typer.Option(help="listen port (default from settings)")] = None,
) -> None:
    """Run one of Bastion's processes in the foreground."""
    from bastion.processes import run_process

    if process not in ("api", "gateway", "worker"):
        _fail(f"unknown process {process!r}: choose api, gateway or worker")
    with _errors():
        run_process(process, _settings(), port=port)


@app.command("up")
def up() -> None:
    """Start the embedded database, api, gateway and worker; Ctrl-C stops them."""
    from bastion.processes import run_stack

    with _errors():
        run_stack(_settings(), out)


@app.command("openapi")
def openapi_command(
    out_dir: Annotated[
        str, typer.Option("--out", help="directory for api.json and gateway.json")
    ] = "docs/openapi",
) -> None:
    """Write the OpenAPI documents of the api and the gateway (sorted JSON)."""
    from pathlib import Path

    from bastion.compose import openapi_documents

    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name, document in openapi_documents().items():
        (target / f"{name}.json").write_text(openapi_json(document))
        out.print(f"wrote {target / f'{name}.json'}")


def openapi_json(document: object) -> str:
    """The committed form of an OpenAPI document: sorted keys, one space indent."""
    import json

    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


@app.command("demo")
def demo() -> None:
    """Play the support-desk scenario on the embedded stack and print a report."""
    from bastion.demo.scenario import run_demo

    with _errors():
        ok = asyncio.run(run_demo(_settings(), out))
    if not ok:
        raise typer.Exit(1)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn known failures into one line on stderr and exit status 1."""
    try:
        yield
    except (
        DatabaseError,
        LauncherError,
        SecretsError,
        PolicyError,
        WorkloadError,
        PlainPublicHttpRefused,
    ) as exc:
        _fail(str(exc))


tenant_app = typer.Typer(help="Tenants.", no_args_is_help=True)
user_app = typer.Typer(help="Users and their roles in tenants.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(user_app, name="user")
app.add_typer(keys_app, name="keys")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(billing_app, name="billing")
app.add_typer(incident_app, name="incident")
app.add_typer(receipts_app, name="receipts")
app.add_typer(audit_app, name="audit")
app.add_typer(detectors_app, name="detectors")


@tenant_app.command("create")
def tenant_create(slug: str, name: Annotated[str, typer.Option(help="display name")] = "") -> None:
    """Create a tenant."""
    from bastion.tenants.errors import TenantExists

    async def run() -> str:
        from bastion.db.service import app_database
        from bastion.tenants.service import TenantService

        async with app_database(_settings()) as db:
            tenant = await TenantService(db).create_tenant(slug, name or slug)
        return str(tenant.id)

    with _errors():
        try:
            tenant_id = asyncio.run(run())
        except TenantExists:
            _fail(f"a tenant named {slug!r} already exists")
    out.print(f"tenant {slug} created: {tenant_id}", highlight=False)


@tenant_app.command("shred")
def tenant_shred(
    slug: str,
    yes: Annotated[bool, typer.Option("--yes", help="confirm: this cannot be undone")] = False,
) -> None:
    """Delete a tenant's documents, knowledge bases and vault, and destroy its data keys."""
    if not yes:
        _fail("this destroys the tenant's documents and keys for good; add --yes")

    async def run() -> int:
        from bastion.db.service import app_database
        from bastion.knowledge.service import build_knowledge
        from bastion.secrets.backends import open_key_ring
        from bastion.tenants.service import TenantService

        settings = _settings()
        async with app_database(settings) as db:
            tenant_id = await TenantService(db).tenant_id(slug)
            if tenant_id is None:
                _fail(f"no tenant named {slug!r}")
            kb = build_knowledge(settings, db, open_key_ring(settings).kms)
            return await kb.shred_tenant(tenant_id)

    with _errors():
        deleted = asyncio.run(run())
    out.print(
        f"{slug}: {deleted} documents deleted, knowledge bases and vault dropped, "
        "data keys destroyed",
        highlight=False,
    )


@user_app.command("add")
def user_add(
    tenant: Annotated[str, typer.Option(help="tenant slug")],
    email: Annotated[str, typer.Option()],
    role: Annotated[str, typer.Option(help="owner, billing-admin, auditor, contributor, viewer")],
    password_stdin: Annotated[bool, typer.Option(help="read a password from stdin")] = False,
) -> None:
    """Add a user to a tenant with a role (and set their password)."""
    from bastion.identity.errors import PasswordReused, WeakPassword
    from bastion.tenants.errors import UnknownRole

    password = _read_secret("password: ") if password_stdin else None

    async def run() -> str:
        from bastion.db.service import app_database
        from bastion.identity.passwords import PasswordService
        from bastion.tenants.service import TenantService

        async with app_database(_settings()) as db:
            tenants = TenantService(db)
            tenant_id = await tenants.tenant_id(tenant)
            if tenant_id is None:
                _fail(f"no tenant named {tenant!r}")
            user_id = await tenants.add_member(tenant_id, email, role)
            if password is not None:
                async with db.tenant_tx(tenant_id, None, "system") as tx:
                    await PasswordService().set_password(
                        tx, user_id, password, user_inputs=[email, tenant]
                    )
        return str(user_id)

    with _errors():
        try:
            user_id = asyncio.run(run())
        except UnknownRole:
            _fail(f"unknown role {role!r}")
        except (WeakPassword, PasswordReused) as exc:
            _fail(f"password refused: {exc}")
    out.print(f"{email} is {role} of {tenant} (user {user_id})", highlight=False)


@app.command("login")
def login_command(
    tenant: Annotated[str, typer.Option(help="tenant slug")],
    email: Annotated[str, typer.Option()],
    totp: Annotated[str | None, typer.Option(help="TOTP code, if the account has MFA")] = None,
) -> None:
    """Sign in with the PKCE flow; print a DPoP-bound token pair as JSON.

    The password is read from stdin. The DPoP private key is written to a 0600
    file whose path is printed with the tokens: a token is useless without it.
    """
    import json

    import httpx

    from bastion.identity.client import LoginFailed, login

    settings = _settings()
    password = _read_secret("password: ")

    async def run() -> dict[str, object]:
        async with httpx.AsyncClient(timeout=10) as http:
            tokens = await login(
                http,
                settings.resolved_issuer,
                tenant=tenant,
                email=email,
                password=password,
                totp=totp,
            )
        key_dir = settings.home / "dpop-keys"
        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file = key_dir / f"{tokens.key.thumbprint}.jwk"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(tokens.key.to_json())
        return {
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
            "token_type": "DPoP",
            "expires_in": tokens.expires_in,
            "dpop_key_file": str(key_file),
        }

    try:
        result = asyncio.run(run())
    except LoginFailed as exc:
        _fail(f"login refused: {exc}")
    except httpx.TransportError:
        _fail(f"cannot reach the api at {settings.resolved_issuer} (bastion up)")
    print(json.dumps(result, indent=2))


def _read_secret(prompt: str) -> str:
    import getpass

    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\n")
