"""The ``bastion`` command line. Thin: parse, call a service, print."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from bastion.db.launcher import LauncherError
from bastion.db.provision import APP_ROLE, DatabaseError
from bastion.secrets.cli import secrets_app
from bastion.secrets.errors import SecretsError
from bastion.settings import Settings

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
app.add_typer(secrets_app, name="secrets")

out = Console()
err = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    # Plain print: one line, never re-wrapped to the terminal's width.
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _settings() -> Settings:
    return Settings()


def _embedded_only(settings: Settings) -> None:
    if settings.database_url:
        _fail("DATABASE_URL is set, so the embedded server is not used")


@app.callback()
def _main() -> None:
    """Errors become one clear line on stderr, never a traceback."""


@db_app.command("start")
def db_start() -> None:
    """Start the embedded server (or attach to it) and migrate the database."""
    from bastion.runtime import app_database

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
    from bastion.runtime import app_database

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
    except (DatabaseError, LauncherError, SecretsError) as exc:
        _fail(str(exc))
