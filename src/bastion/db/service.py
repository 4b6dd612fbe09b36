"""Where the database is (the embedded server, or an external ``DATABASE_URL``),
and the app's pool and the job queue's conninfo on it, from settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bastion.db.launcher import EmbeddedPostgres
from bastion.db.pool import Database
from bastion.db.provision import (
    APP_ROLE,
    QUEUE_ROLE,
    DatabaseError,
    Target,
    app_credentials,
    provision,
    role_password,
)
from bastion.secrets.backends import open_keystore
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import resolve_ref
from bastion.settings import Settings


def embedded_server(settings: Settings) -> EmbeddedPostgres:
    """Return the launcher of the embedded server under ``settings.home``."""
    archive = settings.backup_dir / "wal" if settings.backup_dir is not None else None
    return EmbeddedPostgres(
        settings.postgres_dir,
        port=settings.pg_port,
        archive_dir=archive,
        archive_timeout=settings.backup_archive_timeout_seconds,
    )


def describe_url(url: str) -> str:
    """Return ``url`` with its password removed, for messages and logs."""
    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "DATABASE_URL (unparseable)"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"DATABASE_URL {params.get('user') or ''}@{host}:{port}/{params.get('dbname') or ''}"


def resolve_target(settings: Settings, *, start: bool = True) -> Target:
    """Return the database target, starting the embedded server if needed.

    Raises :class:`DatabaseError` if ``DATABASE_URL`` cannot be parsed or the
    embedded server is not running and ``start`` is False.
    """
    if settings.database_url:
        try:
            params = conninfo_to_dict(settings.database_url)
        except Exception:
            raise DatabaseError(
                "DATABASE_URL is not a valid PostgreSQL URL "
                "(expected postgresql://user:password@host:port/dbname)"
            ) from None
        dbname = params.get("dbname")
        if not dbname:
            raise DatabaseError("DATABASE_URL names no database (…/dbname)")
        admin_conninfo = settings.database_url
        if settings.database_password_ref:
            # The password is a reference (settings refuse one in the URL).
            password = resolve_ref(open_keystore(settings), settings.database_password_ref)
            admin_conninfo = make_conninfo(admin_conninfo, password=password.decode())
        return Target(
            admin_conninfo=admin_conninfo,
            dbname=str(dbname),
            create_database=False,
            description=describe_url(settings.database_url),
        )
    server = embedded_server(settings)
    info = server.start() if start else server.status()
    if info is None:
        raise DatabaseError("the embedded PostgreSQL server is not running (bastion db start)")
    return Target(
        admin_conninfo=info.conninfo(),
        dbname=settings.database_name,
        create_database=True,
        description=f"embedded server in {server.base_dir}",
    )


def app_database(settings: Settings, *, migrate: bool = False, max_size: int = 10) -> Database:
    """Return the app role's (unopened) pool.

    With ``migrate`` the embedded server is started if needed and the database
    provisioned and migrated first; without it the database must be ready.
    Raises :class:`DatabaseError` with a one-line reason.
    """
    keystore = open_keystore(settings)
    target = resolve_target(settings, start=migrate)
    credentials = provision(target, keystore) if migrate else app_credentials(target, keystore)
    db = Database(credentials.conninfo, credentials.context_key, max_size=max_size)
    follow_role_password(db, keystore, APP_ROLE)
    return db


def follow_role_password(db: Database, keystore: Keystore, role: str) -> None:
    """Make every new connection of ``db``'s pool read the role's password from
    the key ring as it connects, so that ``bastion keys rotate db-password``
    reaches a running process at its next connection, with no restart.

    Connections already open stay (PostgreSQL checks a password only at
    sign-in); a keyword password overrides the one in the conninfo. The read
    is the key ring's (the local file: well under a millisecond), made only
    when the pool opens a connection, never per query.
    """
    static = db.pool.kwargs
    fixed: dict[str, Any] = dict(static) if isinstance(static, dict) else {}

    def kwargs() -> dict[str, Any]:
        return {**fixed, "password": role_password(keystore, role)}

    db.pool.kwargs = kwargs


def queue_conninfo(settings: Settings) -> str:
    """Return the job queue role's conninfo (the database must be provisioned)."""
    keystore = open_keystore(settings)
    return app_credentials(resolve_target(settings, start=False), keystore).queue_conninfo


def queue_password(settings: Settings) -> Callable[[], str]:
    """Return a reader of the job queue role's current password, from the key
    ring (for :func:`bastion.worker.queue.queue_app`: a rotated password is the
    one the queue's next connection signs in with)."""
    keystore = open_keystore(settings)
    return lambda: role_password(keystore, QUEUE_ROLE)
