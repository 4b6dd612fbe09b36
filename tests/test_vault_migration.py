"""Migration 0006 (the PII vault) goes down to 0005 and back up cleanly, as the
schema owner (the later migrations go down and up around it)."""

from __future__ import annotations

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from bastion.db import provision
from tests.conftest import DbHandles


def _run(owner: str, action: str, revision: str) -> None:
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(owner), poolclass=NullPool
    )
    config = Config()
    config.set_main_option("script_location", str(provision._MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def _present(superuser: str) -> set[str]:
    with psycopg.connect(superuser) as conn:
        tables = conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'bastion'::regnamespace "
            "AND relname IN ('pii_vault', 'pii_token_keys') "
            "AND relrowsecurity AND relforcerowsecurity"
        ).fetchall()
        functions = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'bastion'::regnamespace "
            "AND proname = 'pii_reveal'"
        ).fetchall()
    return {r[0] for r in tables} | {r[0] for r in functions}


def test_0006_downgrades_and_upgrades_again(database: DbHandles) -> None:
    everything = {"pii_vault", "pii_token_keys", "pii_reveal"}
    assert _present(database.superuser) == everything
    _run(database.owner, "downgrade", "0005")
    assert _present(database.superuser) == set()
    _run(database.owner, "upgrade", "head")
    assert _present(database.superuser) == everything
