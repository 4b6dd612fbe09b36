"""Migration 0008 (meter reports, receipts, checkout sessions) goes down to 0007
and back up cleanly, as the schema owner."""

from __future__ import annotations

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from bastion.db import provision
from tests.conftest import DbHandles

TABLES = ("meter_reports", "receipts", "checkout_sessions")


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
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'bastion' AND tablename = ANY(%s)",
            (list(TABLES),),
        ).fetchall()
        policies = conn.execute(
            "SELECT count(*) FROM pg_policy WHERE polname = 'budget_due_lookup'"
        ).fetchone()
    return {r[0] for r in rows} | ({"budget_due_lookup"} if policies == (1,) else set())


def test_0008_downgrades_and_upgrades_again(database: DbHandles) -> None:
    assert _present(database.superuser) == {*TABLES, "budget_due_lookup"}
    _run(database.owner, "downgrade", "0007")
    assert _present(database.superuser) == set()
    _run(database.owner, "upgrade", "head")
    assert _present(database.superuser) == {*TABLES, "budget_due_lookup"}
