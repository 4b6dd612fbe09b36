"""Bring a PostgreSQL database to Bastion's schema, with its two roles.

* ``bastion_owner`` owns the schema and runs the migrations (embedded server);
  with an external ``DATABASE_URL`` the URL's own role plays that part.
* ``bastion_app`` is what the processes connect as: not an owner, NOSUPERUSER,
  NOBYPASSRLS, and only the grants the migrations give it.
* ``bastion_queue`` is the worker's connection to the job queue (the
  ``procrastinate`` schema) and has no grant on tenant tables.

Role passwords and the tenant-context HMAC key live in the key ring
(``local://db/...``); nothing here is read from config as a value.

Every precondition (reachable, PostgreSQL >= 15, pgvector available) is checked
before anything is created, so a bad target leaves nothing half-made.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from bastion.secrets.protocols import Keystore

OWNER_ROLE = "bastion_owner"
APP_ROLE = "bastion_app"
QUEUE_ROLE = "bastion_queue"
MIN_SERVER_VERSION = 150000
_PROVISION_LOCK = 0x62617374  # "bast": serialises concurrent provisioning
_MIGRATIONS = Path(__file__).parent / "migrations"


class DatabaseError(RuntimeError):
    """The database target cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Target:
    """A PostgreSQL server and database Bastion should use.

    ``admin_conninfo`` reaches the server as a role that may create roles,
    databases and extensions; ``dbname`` is the database Bastion lives in;
    ``create_database`` says whether provisioning may create it (embedded) or
    must find it (external).
    """

    admin_conninfo: str
    dbname: str
    create_database: bool
    description: str

    def admin_conninfo_on_db(self) -> str:
        """Return the admin conninfo pointed at Bastion's database."""
        return make_conninfo(self.admin_conninfo, dbname=self.dbname)

    def conninfo(self, *, user: str, password: str, dbname: str | None = None) -> str:
        """Return a conninfo for ``user`` on this target's host and database."""
        params = {
            k: v
            for k, v in conninfo_to_dict(self.admin_conninfo).items()
            if k not in ("user", "password", "dbname") and v is not None
        }
        return make_conninfo(
            "", **params, dbname=dbname or self.dbname, user=user, password=password
        )


@dataclass(frozen=True)
class AppCredentials:
    """What a process needs to connect as the app role."""

    conninfo: str
    context_key: bytes
    queue_conninfo: str


def role_password(keystore: Keystore, role: str) -> str:
    """Return the role's password from the key ring, creating it on first use."""
    return keystore.ensure(
        f"db/{role.replace('_', '-')}-password", lambda: secrets.token_urlsafe(32).encode()
    ).decode()


def context_key(keystore: Keystore) -> bytes:
    """Return the HMAC key that signs tenant contexts (created on first use)."""
    return keystore.ensure("db/context-key", lambda: secrets.token_bytes(32))


def app_credentials(target: Target, keystore: Keystore) -> AppCredentials:
    """Return the app role's connection details for ``target``."""
    return AppCredentials(
        conninfo=target.conninfo(user=APP_ROLE, password=role_password(keystore, APP_ROLE)),
        context_key=context_key(keystore),
        queue_conninfo=target.conninfo(
            user=QUEUE_ROLE, password=role_password(keystore, QUEUE_ROLE)
        ),
    )


def provision(target: Target, keystore: Keystore) -> AppCredentials:
    """Create roles, database and extensions as needed and migrate to head.

    Idempotent and safe to run from several processes at once. Returns the app
    role's credentials. Raises :class:`DatabaseError` with a one-line reason.
    """
    with _connect(target.admin_conninfo, target.description) as admin:
        _check_server(admin, target.description)
        # Held until the end, so two processes starting at once provision in turn.
        admin.execute("SELECT pg_advisory_lock(%s)", (_PROVISION_LOCK,))
        owner_conninfo = _ensure_roles_and_database(admin, target, keystore)
        with _connect(target.admin_conninfo_on_db(), target.description) as db_admin:
            _ensure_extensions(db_admin)
        migrate(owner_conninfo)
        with psycopg.connect(owner_conninfo, autocommit=True) as owner:
            _store_context_key(owner, context_key(keystore))
    return app_credentials(target, keystore)


def _store_context_key(owner: psycopg.Connection[tuple[object, ...]], key: bytes) -> None:
    # RFC 2104: the key padded to the SHA-256 block size, XORed with ipad/opad.
    block = key.ljust(64, b"\0")
    owner.execute(
        "INSERT INTO bastion_private.context_key (id, inner_pad, outer_pad) "
        "VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE "
        "SET inner_pad = EXCLUDED.inner_pad, outer_pad = EXCLUDED.outer_pad",
        (bytes(b ^ 0x36 for b in block), bytes(b ^ 0x5C for b in block)),
    )


def migrate(owner_conninfo: str) -> None:
    """Run the Alembic migrations to head as the schema owner."""
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(owner_conninfo),
        poolclass=NullPool,
    )
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def _connect(conninfo: str, description: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        # libpq's first line says what failed ("... port 5432 failed: Connection
        # refused"); the rest is generic advice.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0].removeprefix("connection failed: ") if lines else "connection failed"
        raise DatabaseError(
            f"cannot connect to PostgreSQL ({description}): {_scrub(reason, conninfo)}. "
            f"Check that the server is running and the URL is right, or unset DATABASE_URL "
            f"to use the embedded server"
        ) from None


def _scrub(text: str, conninfo: str) -> str:
    password = conninfo_to_dict(conninfo).get("password")
    return text.replace(str(password), "***") if password else text


def _check_server(conn: psycopg.Connection[tuple[object, ...]], description: str) -> None:
    row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    version = int(str(row[0])) if row else 0
    if version < MIN_SERVER_VERSION:
        raise DatabaseError(
            f"PostgreSQL ({description}) is version {version // 10000}; Bastion needs 15 or newer"
        )
    found = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    if found is None:
        raise DatabaseError(
            f"PostgreSQL ({description}) lacks the pgvector extension; install pgvector "
            f"on that server, or unset DATABASE_URL to use the embedded server, which ships it"
        )


def _ensure_roles_and_database(
    admin: psycopg.Connection[tuple[object, ...]], target: Target, keystore: Keystore
) -> str:
    """Create/refresh the roles (and the database when allowed); return the owner conninfo."""
    _ensure_role(admin, APP_ROLE, role_password(keystore, APP_ROLE))
    _ensure_role(admin, QUEUE_ROLE, role_password(keystore, QUEUE_ROLE))
    # Sessions as the app role are short and bounded: a stuck query or an open
    # transaction cannot hold locks (or a pooled connection) forever.
    admin.execute(
        sql.SQL(
            "ALTER ROLE {} SET statement_timeout = '30s'; "
            "ALTER ROLE {} SET idle_in_transaction_session_timeout = '60s'"
        ).format(sql.Identifier(APP_ROLE), sql.Identifier(APP_ROLE))
    )
    if not target.create_database:
        _revoke_temporary(admin, target)
        return target.admin_conninfo
    owner_password = role_password(keystore, OWNER_ROLE)
    _ensure_role(admin, OWNER_ROLE, owner_password)
    exists = admin.execute(
        "SELECT 1 FROM pg_database WHERE datname = %s", (target.dbname,)
    ).fetchone()
    if exists is None:
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(target.dbname), sql.Identifier(OWNER_ROLE)
            )
        )
    admin.execute(
        sql.SQL(
            "REVOKE ALL ON DATABASE {} FROM PUBLIC; GRANT CONNECT ON DATABASE {} TO {}, {}"
        ).format(
            sql.Identifier(target.dbname),
            sql.Identifier(target.dbname),
            sql.Identifier(APP_ROLE),
            sql.Identifier(QUEUE_ROLE),
        )
    )
    return target.conninfo(user=OWNER_ROLE, password=owner_password)


def _revoke_temporary(admin: psycopg.Connection[tuple[object, ...]], target: Target) -> None:
    """Take TEMPORARY on an existing database from PUBLIC and the app roles.

    The tenant context lives in temporary sequences that only the schema
    owner may touch (migration 0014); a role that could create temporary
    objects itself could replace them, so ``bastion.context_open`` refuses
    to work for one.
    """
    try:
        admin.execute(
            sql.SQL(
                "REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC, {app}, {queue}; "
                "GRANT TEMPORARY ON DATABASE {db} TO CURRENT_USER"  # the schema owner's own
            ).format(
                db=sql.Identifier(target.dbname),
                app=sql.Identifier(APP_ROLE),
                queue=sql.Identifier(QUEUE_ROLE),
            )
        )
    except psycopg.errors.InsufficientPrivilege:
        raise DatabaseError(
            f"the database role in DATABASE_URL may not revoke TEMPORARY on {target.dbname!r} "
            f"from PUBLIC; do it once as the database's owner"
        ) from None


def _ensure_role(admin: psycopg.Connection[tuple[object, ...]], role: str, password: str) -> None:
    exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    try:
        admin.execute(
            sql.SQL(
                verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS PASSWORD {}"
            ).format(sql.Identifier(role), sql.Literal(password))
        )
    except psycopg.errors.InsufficientPrivilege:
        raise DatabaseError(
            f"the database role in DATABASE_URL may not create or alter role {role!r}; "
            f"grant it CREATEROLE or create {role!r} (LOGIN NOBYPASSRLS) yourself"
        ) from None


def _ensure_extensions(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE EXTENSION IF NOT EXISTS citext")
    except psycopg.errors.InsufficientPrivilege:
        raise DatabaseError(
            "the database role may not create the vector and citext extensions; "
            "create them once as a superuser"
        ) from None
