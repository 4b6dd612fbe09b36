"""The signed tenant context, attacked from another session of ``bastion_app``.

The attacker holds an SQL session as the app role (an injection, or a stolen
database password) while the application serves other tenants on its own
pooled connections. Whatever the attacker can see or is handed — the other
sessions' activity, the settings, even a MAC the application computed (as if
it had leaked from a log) — must be worthless outside the one backend and the
one transaction it was made for (migration 0014). Every attack checks the
refusal and that nothing of the other tenant was read or written.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg.rows import dict_row

from bastion.access.roles import CHANNEL, announced_as
from bastion.db.pool import Database, TenantConnection, sign_context
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

Attacker = psycopg.AsyncConnection[dict[str, Any]]


@dataclass
class Victims:
    a: UUID
    b: UUID
    alice: UUID  # owner of A
    bob: UUID  # owner of B
    b_doc: UUID


@pytest.fixture
async def victims(db: Database, database: DbHandles) -> Victims:
    svc = TenantService(db)
    suffix = uuid4().hex[:8]
    a = await svc.create_tenant(f"ca-{suffix}", "Tenant A")
    b = await svc.create_tenant(f"cb-{suffix}", "Tenant B")
    alice = await svc.add_member(a.id, f"alice-{suffix}@a.test", "owner")
    bob = await svc.add_member(b.id, f"bob-{suffix}@b.test", "owner")
    async with db.tenant_tx(b.id, bob, "owner") as tx:
        row = await (
            await tx.execute(
                "INSERT INTO bastion.documents (title) VALUES ('B secret ticket') RETURNING id"
            )
        ).fetchone()
    assert row is not None
    async with await psycopg.AsyncConnection.connect(database.superuser, autocommit=True) as su:
        await su.execute(
            "INSERT INTO bastion.credentials (user_id, password_hash) VALUES (%s, 'bob-hash')",
            (bob,),
        )
    return Victims(a.id, b.id, alice, bob, row["id"])


@pytest.fixture
async def attacker(database: DbHandles) -> AsyncIterator[Attacker]:
    """A session of its own as the app role, outside the application's pool."""
    async with await psycopg.AsyncConnection.connect(
        database.app, autocommit=True, row_factory=dict_row
    ) as conn:
        yield conn


async def _b_titles(db: Database, v: Victims) -> list[str]:
    async with db.tenant_tx(v.b, v.bob, "owner") as tx:
        rows = await (await tx.execute("SELECT title FROM bastion.documents")).fetchall()
    return [r["title"] for r in rows]


async def _forge(conn: Attacker, tenant: UUID, user: UUID, role: str, sig: str) -> None:
    for name, value in (
        ("app.tenant_id", str(tenant)),
        ("app.user_id", str(user)),
        ("app.role", role),
        ("app.context_sig", sig),
    ):
        await conn.execute("SELECT set_config(%s, %s, true)", (name, value))


async def test_no_channel_shows_another_sessions_context(
    db: Database, attacker: Attacker, victims: Victims
) -> None:
    """While the application holds B's context open, nothing the attacker can
    query names it: not pg_stat_activity, not pg_settings."""
    async with db.tenant_tx(victims.b, victims.bob, "system") as tx:
        assert isinstance(tx, TenantConnection)
        await tx.enter_pending()  # the context is set and the session idles in it
        app_pid = tx.info.backend_pid
        activity = await (
            await attacker.execute("SELECT * FROM pg_stat_activity WHERE pid = %s", (app_pid,))
        ).fetchall()
        settings = await (
            await attacker.execute("SELECT name, setting FROM pg_settings WHERE name ~ '^app\\.'")
        ).fetchall()
    assert activity, "the attacker must at least see the session"
    seen = repr(activity) + repr(settings)
    assert str(victims.b) not in seen and str(victims.bob) not in seen
    assert "context_enter($1, $2, $3, $4)" in activity[0]["query"]
    assert not re.search(r"[0-9a-f]{64}", seen), "no MAC-shaped value is visible"


async def test_copied_settings_do_not_verify_in_another_session(
    db: Database, attacker: Attacker, victims: Victims
) -> None:
    """Settings read inside the application's transaction (everything an
    injection there could see) are refused in the attacker's own session."""
    async with db.tenant_tx(victims.b, victims.bob, "system") as tx:
        seen = await (
            await tx.execute(
                "SELECT current_setting('app.tenant_id') AS t, current_setting('app.user_id') AS u,"
                " current_setting('app.role') AS r, current_setting('app.context_sig') AS s"
            )
        ).fetchone()
        assert seen is not None
        async with attacker.transaction():  # concurrently, while B's context is live
            await _forge(attacker, seen["t"], seen["u"], seen["r"], seen["s"])
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
                await attacker.execute("SELECT title FROM bastion.documents")
    async with attacker.transaction():
        await _forge(attacker, seen["t"], seen["u"], seen["r"], seen["s"])
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await attacker.execute("SELECT password_hash FROM bastion.credentials")
    assert await _b_titles(db, victims) == ["B secret ticket"]


async def test_leaked_mac_is_refused_in_another_backend(
    db: Database, database: DbHandles, attacker: Attacker, victims: Victims
) -> None:
    """A MAC the application made (handed to the attacker, as if from a log) is
    refused by any other backend, for the value it was made for and any other."""
    async with db.tenant_tx(victims.a, victims.alice, "viewer") as tx:
        assert isinstance(tx, TenantConnection)
        await tx.enter_pending()
        app_pid, next_counter = tx.info.backend_pid, tx.counter
    row = await (await attacker.execute("SELECT bastion.context_open() AS first")).fetchone()
    assert row is not None
    for pid, counter in (
        (app_pid, next_counter - 1),  # the one the application just used
        (app_pid, next_counter),  # the application's next one
        (attacker.info.backend_pid, next_counter - 1),
        (attacker.info.backend_pid, row["first"] + 1),  # after the probe below
    ):
        mac = sign_context(database.context_key, victims.b, victims.bob, "system", pid, counter)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
            async with attacker.transaction():
                await attacker.execute(
                    "SELECT bastion.context_enter(%s, %s, 'system', %s)",
                    (victims.b, victims.bob, mac),
                )
    assert await _b_titles(db, victims) == ["B secret ticket"]


async def test_leaked_mac_is_refused_in_a_later_transaction_of_its_backend(
    db: Database, database: DbHandles, victims: Victims
) -> None:
    """SQL injected into a later request on the same pooled connection cannot
    replay an earlier transaction's context: each MAC is good for one counter
    value, which the database consumes."""
    db_one = Database(database.app, database.context_key, max_size=1)
    async with db_one:
        async with db_one.tenant_tx(victims.b, victims.bob, "system") as tx:
            assert isinstance(tx, TenantConnection)
            await tx.enter_pending()
            used = tx.counter - 1
            pid = tx.info.backend_pid
        leaked = sign_context(database.context_key, victims.b, victims.bob, "system", pid, used)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
            async with db_one.tenant_tx(victims.a, victims.alice, "viewer") as tx:
                assert tx.info.backend_pid == pid  # the same backend
                await tx.execute(
                    "SELECT bastion.context_enter(%s, %s, 'system', %s)",
                    (victims.b, victims.bob, leaked),
                )
        # The application's own next transaction on that pool still works.
        assert await _b_titles(db_one, victims) == ["B secret ticket"]


async def test_settings_do_not_survive_into_a_later_transaction(
    db: Database, victims: Victims
) -> None:
    """A transaction of the same backend that enters no context of its own (the
    app's unscoped lookups run so) cannot reuse the last one's settings."""
    db_one = Database(db.conninfo, db._context_key, max_size=1)
    async with db_one:
        async with db_one.tenant_tx(victims.b, victims.bob, "system") as tx:
            seen = await (
                await tx.execute(
                    "SELECT current_setting('app.tenant_id') AS t, current_setting('app.user_id')"
                    " AS u, current_setting('app.role') AS r,"
                    " current_setting('app.context_sig') AS s"
                )
            ).fetchone()
        assert seen is not None
        async with db_one.pool.connection() as conn, conn.transaction():
            for name, value in (
                ("app.tenant_id", seen["t"]),
                ("app.user_id", seen["u"]),
                ("app.role", seen["r"]),
                ("app.context_sig", seen["s"]),
            ):
                await conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
                await conn.execute("SELECT title FROM bastion.documents")


async def test_resetting_the_counter_gains_nothing(
    db: Database, database: DbHandles, victims: Victims
) -> None:
    """Injected SQL that drops the session's temporary state or opens a new
    counter is left with no context; the application's connection refuses its
    next context and is replaced, never reused with a forged one."""
    db_one = Database(database.app, database.context_key, max_size=1)
    async with db_one:
        for attack in ("DISCARD TEMP", "SELECT bastion.context_open()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
                async with db_one.tenant_tx(victims.a, victims.alice, "viewer") as tx:
                    await tx.execute(attack)
                    await tx.execute("SELECT title FROM bastion.documents")
            # The counter moved under the pool: that connection was dropped.
            assert await _b_titles(db_one, victims) == ["B secret ticket"]
        # Forgetting the cached sequence values changes nothing: still tenant A.
        async with db_one.tenant_tx(victims.a, victims.alice, "viewer") as tx:
            await tx.execute("DISCARD SEQUENCES")
            rows = await (await tx.execute("SELECT title FROM bastion.documents")).fetchall()
        assert rows == []
        assert await _b_titles(db_one, victims) == ["B secret ticket"]


async def test_app_role_may_not_create_temporary_objects(
    database: DbHandles, attacker: Attacker
) -> None:
    """The counter lives in temporary sequences the app role cannot make
    itself; a database that allows it is refused outright."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await attacker.execute("CREATE TEMPORARY SEQUENCE pg_temp.bastion_context_tag")
    async with await psycopg.AsyncConnection.connect(database.superuser, autocommit=True) as su:
        await su.execute(f'GRANT TEMPORARY ON DATABASE "{database.dbname}" TO bastion_app')
        try:
            async with await psycopg.AsyncConnection.connect(database.app) as conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="TEMPORARY"):
                    await conn.execute("SELECT bastion.context_open()")
        finally:
            await su.execute(f'REVOKE TEMPORARY ON DATABASE "{database.dbname}" FROM bastion_app')


async def test_concurrent_tenants_never_cross(db: Database, victims: Victims) -> None:
    """Many transactions of both tenants at once, on pooled connections: each
    is in exactly its own tenant and sees exactly its own documents."""

    async def read(tenant: UUID, user: UUID) -> tuple[UUID, str, int]:
        async with db.tenant_tx(tenant, user, "owner") as tx:
            row = await (
                await tx.execute(
                    "SELECT current_setting('app.tenant_id') AS t, count(*) AS n "
                    "FROM bastion.documents"
                )
            ).fetchone()
        assert row is not None
        return tenant, row["t"], row["n"]

    results = await asyncio.gather(
        *(
            read(victims.a, victims.alice) if i % 2 else read(victims.b, victims.bob)
            for i in range(40)
        )
    )
    expected = {victims.a: 0, victims.b: 1}
    assert all(t == str(tenant) and n == expected[tenant] for tenant, t, n in results)


async def test_membership_announcements_name_no_tenant_or_user(
    db: Database, attacker: Attacker, victims: Victims
) -> None:
    """Any app session may LISTEN: what B's membership changes announce is a
    digest that the roles cache matches, never B's or its member's ids."""
    await attacker.execute(f"LISTEN {CHANNEL}")
    newcomer = await TenantService(db).add_member(victims.b, "carol@b.test", "viewer")
    payloads = []
    async for notify in attacker.notifies(timeout=5, stop_after=1):
        payloads.append(notify.payload)
    assert payloads == [announced_as(victims.b, newcomer)]
    assert str(victims.b) not in payloads[0] and str(newcomer) not in payloads[0]


async def test_the_roles_read_takes_only_a_signed_context(
    db: Database, database: DbHandles, attacker: Attacker, victims: Victims
) -> None:
    """``bastion.member_roles`` (the guard's one-statement read) verifies the
    same MAC as ``context_enter``: with a forged or replayed one it answers
    nothing, while the application's own read still works."""
    assert await db.member_roles(victims.b, victims.bob) == {"owner"}
    row = await (await attacker.execute("SELECT bastion.context_open() AS first")).fetchone()
    assert row is not None
    pid = attacker.info.backend_pid
    for mac in (
        "0" * 64,
        sign_context(database.context_key, victims.b, victims.bob, "viewer", pid, row["first"] - 1),
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
            await attacker.execute(
                "SELECT bastion.member_roles(%s, %s, %s)", (victims.b, victims.bob, mac)
            )
