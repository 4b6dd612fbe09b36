"""Tenant isolation in PostgreSQL itself, attacked as the app role.

Each test runs real SQL as ``bastion_app`` and checks both the refusal and
that nothing of the other tenant was read or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.db.pool import Database
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio


@dataclass
class Pair:
    a: UUID
    b: UUID
    alice: UUID  # owner of A
    bob: UUID  # owner of B
    a_doc: UUID
    b_doc: UUID


@pytest.fixture
async def pair(db: Database) -> Pair:
    svc = TenantService(db)
    suffix = uuid4().hex[:8]
    a = await svc.create_tenant(f"a-{suffix}", "Tenant A")
    b = await svc.create_tenant(f"b-{suffix}", "Tenant B")
    alice = await svc.add_member(a.id, f"alice-{suffix}@a.test", "owner")
    bob = await svc.add_member(b.id, f"bob-{suffix}@b.test", "owner")
    docs = {}
    for tenant, user, title in ((a.id, alice, "A ticket"), (b.id, bob, "B ticket")):
        async with db.tenant_tx(tenant, user, "owner") as tx:
            row = await (
                await tx.execute(
                    "INSERT INTO bastion.documents (title, created_by) "
                    "VALUES (%s, %s) RETURNING id",
                    (title, user),
                )
            ).fetchone()
            assert row is not None
            docs[tenant] = row["id"]
    return Pair(a.id, b.id, alice, bob, docs[a.id], docs[b.id])


async def _b_rows(db: Database, pair: Pair) -> list[dict[str, object]]:
    async with db.tenant_tx(pair.b, pair.bob, "owner") as tx:
        cur = await tx.execute("SELECT id, title FROM bastion.documents ORDER BY id")
        return await cur.fetchall()


async def test_tenant_sees_only_its_own_rows(db: Database, pair: Pair) -> None:
    async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
        docs = await (await tx.execute("SELECT id, tenant_id FROM bastion.documents")).fetchall()
        tenants = await (await tx.execute("SELECT id FROM bastion.tenants")).fetchall()
        by_id = await (
            await tx.execute("SELECT id FROM bastion.documents WHERE id = %s", (pair.b_doc,))
        ).fetchall()
    assert {d["tenant_id"] for d in docs} == {pair.a}
    assert pair.a_doc in {d["id"] for d in docs}
    assert [t["id"] for t in tenants] == [pair.a]
    assert by_id == []  # asking for B's row by its exact id finds nothing


async def test_no_tenant_set_sees_zero_rows_without_error(db: Database, pair: Pair) -> None:
    async with db.pool.connection() as conn:
        for table in ("documents", "tenants", "memberships", "users", "audit_events"):
            row = await (
                await conn.execute(f"SELECT count(*) AS n FROM bastion.{table}")
            ).fetchone()
            assert row is not None and row["n"] == 0, table


async def test_insert_of_other_tenant_row_is_refused(db: Database, pair: Pair) -> None:
    before = await _b_rows(db, pair)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute(
                "INSERT INTO bastion.documents (tenant_id, title) VALUES (%s, 'planted')",
                (pair.b,),
            )
    assert await _b_rows(db, pair) == before


async def test_moving_own_row_to_other_tenant_is_refused(db: Database, pair: Pair) -> None:
    before = await _b_rows(db, pair)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute(
                "UPDATE bastion.documents SET tenant_id = %s WHERE id = %s", (pair.b, pair.a_doc)
            )
    assert await _b_rows(db, pair) == before


async def test_update_and_delete_where_true_touch_only_own_rows(db: Database, pair: Pair) -> None:
    before = await _b_rows(db, pair)
    async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
        updated = await tx.execute("UPDATE bastion.documents SET title = 'overwritten' WHERE true")
        assert updated.rowcount >= 1
        targeted = await tx.execute(
            "UPDATE bastion.documents SET title = 'overwritten' WHERE id = %s", (pair.b_doc,)
        )
        assert targeted.rowcount == 0
        deleted = await tx.execute("DELETE FROM bastion.documents WHERE id = %s", (pair.b_doc,))
        assert deleted.rowcount == 0
    assert await _b_rows(db, pair) == before
    assert all(row["title"] == "B ticket" for row in before)


async def test_set_config_to_other_tenant_is_refused(db: Database, pair: Pair) -> None:
    """An injected set_config cannot forge the signed tenant context."""
    for setting, value in (("app.tenant_id", pair.b), ("app.user_id", pair.bob)):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
            async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
                await tx.execute("SELECT set_config(%s, %s, true)", (setting, str(value)))
                await tx.execute("SELECT title FROM bastion.documents")
    # Session-level (is_local = false) forgery is refused the same way.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute("SELECT set_config('app.tenant_id', %s, false)", (str(pair.b),))
            await tx.execute("UPDATE bastion.documents SET title = 'x' WHERE true")
    assert all(row["title"] == "B ticket" for row in await _b_rows(db, pair))


async def test_forging_role_is_refused(db: Database, pair: Pair) -> None:
    async with db.tenant_tx(pair.a, pair.alice, "viewer") as tx:
        await tx.execute("SELECT set_config('app.role', 'system', true)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed"):
            await tx.execute("SELECT count(*) FROM bastion.users")


async def test_reset_drops_to_zero_rows(db: Database, pair: Pair) -> None:
    async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
        await tx.execute("RESET app.tenant_id")
        rows = await (await tx.execute("SELECT id FROM bastion.documents")).fetchall()
        assert rows == []
        await tx.execute("RESET ALL")
        rows = await (await tx.execute("SELECT id FROM bastion.documents")).fetchall()
        assert rows == []


async def test_set_role_to_owner_or_superuser_is_refused(db: Database, pair: Pair) -> None:
    for role in ("bastion_owner", "postgres"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
                await tx.execute(f"SET ROLE {role}")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute("SET SESSION AUTHORIZATION postgres")
    assert await _b_rows(db, pair) != []


async def test_private_schema_and_key_are_out_of_reach(db: Database, pair: Pair) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute("SELECT * FROM bastion_private.context_key")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute("UPDATE bastion_private.context_key SET inner_pad = inner_pad")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute("ALTER TABLE bastion.documents DISABLE ROW LEVEL SECURITY")


async def test_settings_do_not_outlive_the_transaction(db: Database, pair: Pair) -> None:
    single = Database(db.pool.conninfo, db._context_key, min_size=1, max_size=1)
    async with single:
        async with single.tenant_tx(pair.a, pair.alice, "owner") as tx:
            pid = tx.info.backend_pid
        async with single.pool.connection() as conn:
            assert conn.info.backend_pid == pid  # the very same pooled connection
            row = await (
                await conn.execute(
                    "SELECT coalesce(current_setting('app.tenant_id', true), '') AS t, "
                    "(SELECT count(*) FROM bastion.documents) AS n"
                )
            ).fetchone()
    assert row == {"t": "", "n": 0}


async def test_rollback_on_error_leaves_nothing(db: Database, pair: Pair) -> None:
    with pytest.raises(RuntimeError):
        async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
            await tx.execute("INSERT INTO bastion.documents (title) VALUES ('half-written')")
            raise RuntimeError("boom")
    async with db.tenant_tx(pair.a, pair.alice, "owner") as tx:
        rows = await (
            await tx.execute("SELECT 1 FROM bastion.documents WHERE title = 'half-written'")
        ).fetchall()
    assert rows == []


@pytest.mark.parametrize("role", ["auditor", "billing-admin"])
async def test_auditors_and_billing_admins_never_write_documents(
    db: Database, pair: Pair, role: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(pair.a, pair.alice, role) as tx:
            await tx.execute("INSERT INTO bastion.documents (title) VALUES ('by an auditor')")
    async with db.tenant_tx(pair.a, pair.alice, role) as tx:
        changed = await tx.execute("UPDATE bastion.documents SET title = 'x' WHERE true")
        deleted = await tx.execute("DELETE FROM bastion.documents WHERE true")
    assert changed.rowcount == 0 and deleted.rowcount == 0


@pytest.mark.parametrize("role", ["viewer", "contributor", "auditor", "billing-admin"])
async def test_only_owners_change_memberships_and_role_requests(
    db: Database, pair: Pair, role: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(pair.a, pair.alice, role) as tx:
            await tx.execute(
                "INSERT INTO bastion.memberships (user_id, role) VALUES (%s, 'owner')",
                (pair.alice,),
            )
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(pair.a, pair.alice, role) as tx:
            await tx.execute(
                "INSERT INTO bastion.role_requests (user_id, role, requested_by, expires_at) "
                "VALUES (%s, 'owner', %s, now() + interval '1 hour')",
                (pair.alice, pair.alice),
            )


async def test_viewer_cannot_write_documents(db: Database, pair: Pair) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with db.tenant_tx(pair.a, pair.alice, "viewer") as tx:
            await tx.execute("INSERT INTO bastion.documents (title) VALUES ('by a viewer')")
    async with db.tenant_tx(pair.a, pair.alice, "viewer") as tx:
        changed = await tx.execute("UPDATE bastion.documents SET title = 'v' WHERE true")
        assert changed.rowcount == 0
        seen = await (await tx.execute("SELECT count(*) AS n FROM bastion.documents")).fetchone()
        assert seen is not None and seen["n"] >= 1  # viewers do read


def test_app_role_is_not_owner_superuser_or_bypassrls(database: DbHandles) -> None:
    with psycopg.connect(database.superuser) as conn:
        role = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb "
            "FROM pg_roles WHERE rolname = 'bastion_app'"
        ).fetchone()
        owned = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tableowner = 'bastion_app'"
        ).fetchone()
    assert role == (False, False, False, False)
    assert owned == (0,)


def test_every_tenant_table_has_forced_rls_and_a_policy(database: DbHandles) -> None:
    """Fails for any table added later in the app schema without RLS."""
    with psycopg.connect(database.superuser) as conn:
        tables = conn.execute(
            """
            SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
                   (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies,
                   EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                           AND a.attname = 'tenant_id' AND NOT a.attisdropped) AS has_tenant
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'bastion' AND c.relkind IN ('r', 'p')
            """
        ).fetchall()
    assert len(tables) >= 6
    unprotected = [
        name
        for name, enabled, forced, policies, _ in tables
        if not (enabled and forced and policies > 0)
    ]
    assert unprotected == []
    assert {name for name, *_rest, has_tenant in tables if has_tenant} >= {
        "documents",
        "memberships",
        "audit_events",
        "audit_heads",
    }
