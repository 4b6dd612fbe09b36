"""Where the database is: the embedded server, or an external ``DATABASE_URL``."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from bastion.db.launcher import EmbeddedPostgres
from bastion.db.provision import DatabaseError, Target
from bastion.settings import Settings


def embedded_server(settings: Settings) -> EmbeddedPostgres:
    """Return the launcher of the embedded server under ``settings.home``."""
    return EmbeddedPostgres(settings.postgres_dir, port=settings.pg_port)


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
        return Target(
            admin_conninfo=settings.database_url,
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
