"""Test harness: one embedded PostgreSQL per test session, a fresh database per
test module (cloned from a migrated template database), and helpers that make
tenants and users.

Nothing here is mocked: the server is the real embedded PostgreSQL 18 with
pgvector, reached as the real ``bastion_app`` role over its Unix socket.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bastion.db.launcher import EmbeddedPostgres, ServerInfo
from bastion.db.pool import Database
from bastion.db.provision import (
    APP_ROLE,
    OWNER_ROLE,
    QUEUE_ROLE,
    Target,
    provision,
    role_password,
)
from bastion.logs import configure_logging
from bastion.secrets import LocalKeystore

# Durability is not under test in most modules; these make a test server fast.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
TEMPLATE_DB = "bastion_template"


def short_tempdir(prefix: str) -> Path:
    """A private directory directly under /tmp.

    Unix socket paths are limited to 107 bytes, and as root the database's
    service user must be able to traverse every parent (pytest's own tmp dirs
    live under a 0700 directory).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o711)  # searchable, not listable
    return path


@pytest.fixture(scope="session", autouse=True)
def _redacting_logs() -> None:
    """Tests log like the processes do: JSON, redacted, warnings and up."""
    configure_logging("warning")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_template() -> EmbeddedPostgres:
    """An initialised, stopped data directory reused across test sessions."""
    template = EmbeddedPostgres(Path(f"/tmp/bastion-pgtemplate-{os.geteuid()}"))
    template.initdb()
    return template


@pytest.fixture(scope="session")
def pg_server(pg_template: EmbeddedPostgres) -> Iterator[tuple[EmbeddedPostgres, ServerInfo]]:
    base = short_tempdir("bastion-test-")
    server = EmbeddedPostgres(base / "pg", settings=FAST_SETTINGS)
    server.initdb(template=pg_template)
    info = server.start()
    try:
        yield server, info
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def keystore() -> Iterator[LocalKeystore]:
    base = short_tempdir("bastion-keys-")
    try:
        yield LocalKeystore(base / "keystore.bin", base / "master.key")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(
    pg_server: tuple[EmbeddedPostgres, ServerInfo], keystore: LocalKeystore
) -> Target:
    """The migrated database every test module's database is cloned from."""
    _server, info = pg_server
    target = Target(
        admin_conninfo=info.conninfo(),
        dbname=TEMPLATE_DB,
        create_database=True,
        description="test server",
    )
    provision(target, keystore)
    return target


@dataclass(frozen=True)
class DbHandles:
    """A migrated database of its own, and how to reach it as each role."""

    dbname: str
    superuser: str
    owner: str
    app: str
    context_key: bytes
    queue: str

    def superuser_env(self, keystore: LocalKeystore) -> dict[str, str]:
        """``DATABASE_URL`` and its password's reference, for a ``bastion`` process
        (settings refuse a password in the URL itself)."""
        params = conninfo_to_dict(self.superuser)
        keystore.set(SUPERUSER_PASSWORD_SECRET, str(params.pop("password")).encode())
        return {
            "DATABASE_URL": make_conninfo(**{k: str(v) for k, v in params.items()}),
            "BASTION_DATABASE_PASSWORD_REF": f"local://{SUPERUSER_PASSWORD_SECRET}",
        }


SUPERUSER_PASSWORD_SECRET = "db/test-superuser-password"  # a secret's name, not a value


_counter = itertools.count()


@pytest.fixture(scope="module")
def database(
    request: pytest.FixtureRequest,
    pg_server: tuple[EmbeddedPostgres, ServerInfo],
    template_database: Target,
    keystore: LocalKeystore,
) -> Iterator[DbHandles]:
    _server, info = pg_server
    module = re.sub(r"[^a-z0-9]", "_", request.module.__name__.lower())[-40:]
    dbname = f"t_{module}_{next(_counter)}"
    with psycopg.connect(info.conninfo(), autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                sql.Identifier(dbname), sql.Identifier(TEMPLATE_DB), sql.Identifier(OWNER_ROLE)
            )
        )
        # As provision() leaves a database it creates: no TEMPORARY for PUBLIC.
        admin.execute(
            sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(dbname))
        )
        admin.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
                sql.Identifier(dbname), sql.Identifier(APP_ROLE), sql.Identifier(QUEUE_ROLE)
            )
        )
    target = Target(
        admin_conninfo=info.conninfo(), dbname=dbname, create_database=True, description="test"
    )
    from bastion.db.provision import context_key

    yield DbHandles(
        dbname=dbname,
        superuser=target.admin_conninfo_on_db(),
        owner=target.conninfo(user=OWNER_ROLE, password=role_password(keystore, OWNER_ROLE)),
        app=target.conninfo(user=APP_ROLE, password=role_password(keystore, APP_ROLE)),
        context_key=context_key(keystore),
        queue=target.conninfo(user=QUEUE_ROLE, password=role_password(keystore, QUEUE_ROLE)),
    )
    with psycopg.connect(info.conninfo(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))


@pytest.fixture
async def db(database: DbHandles) -> AsyncIterator[Database]:
    """The app role's pool on this module's database."""
    async with Database(database.app, database.context_key, max_size=4) as pool:
        yield pool


# -- log capture ------------------------------------------------------------------------


class Captured:
    """The log lines written to a buffer, parsed."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def records(self) -> list[dict[str, Any]]:
        """Return every line as a JSON object (fails on a line that is not one)."""
        return [json.loads(line) for line in self.text.splitlines()]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Return the first record matching ``predicate``, waiting up to 2 s for
        the server thread to write it (the access line follows the response)."""
        deadline = time.monotonic() + 2
        while True:
            found = [r for r in self.records() if predicate(r)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching log line in:\n{self.text}")
            time.sleep(0.01)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield
    structlog.configure(**saved_structlog)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


@pytest.fixture
def logs(restore_logging: None) -> Captured:
    captured = Captured()
    configure_logging("debug", json=True, stream=captured.stream)
    return captured
