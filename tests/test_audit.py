"""The audit table is append-only for every role, and events commit with their change."""

from __future__ import annotations

from uuid import uuid4

import psycopg
import pytest

from bastion import audit
from bastion.db.pool import Database
from bastion.tenants.service import Tenant, TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio


@pytest.fixture
async def tenant(db: Database) -> Tenant:
    return await TenantService(db).create_tenant(f"audit-{uuid4().hex[:8]}", "Audited")


async def _events(db: Database, tenant: Tenant) -> list[dict[str, object]]:
    async with db.tenant_tx(tenant.id, None, "auditor") as tx:
        cur = await tx.execute(
            "SELECT seq, actor, action, target, details FROM bastion.audit_events ORDER BY seq"
        )
        return await cur.fetchall()


async def test_record_assigns_gapless_seq_in_the_same_transaction(
    db: Database, tenant: Tenant
) -> None:
    async with db.tenant_tx(tenant.id, None, "system") as tx:
        await audit.record(
            tx, actor="user:1", action="doc.create", target="doc:1", details={"title": "x"}
        )
        await audit.record(tx, actor="user:1", action="doc.update", target="doc:1")
    with pytest.raises(RuntimeError):
        async with db.tenant_tx(tenant.id, None, "system") as tx:
            await audit.record(tx, actor="user:1", action="doc.delete", target="doc:1")
            raise RuntimeError("the change failed, so its event must not remain")
    events = await _events(db, tenant)
    assert [e["action"] for e in events] == ["tenant.create", "doc.create", "doc.update"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[1]["details"] == {"title": "x"}


async def test_viewer_can_append_but_not_read(db: Database, tenant: Tenant) -> None:
    async with db.tenant_tx(tenant.id, None, "viewer") as tx:
        await audit.record(tx, actor="user:v", action="doc.read", target="doc:1")
        seen = await (await tx.execute("SELECT count(*) AS n FROM bastion.audit_events")).fetchone()
    assert seen == {"n": 0}
    assert [e["action"] for e in await _events(db, tenant)][-1] == "doc.read"


async def test_seq_cannot_be_chosen_by_the_caller(db: Database, tenant: Tenant) -> None:
    async with db.tenant_tx(tenant.id, None, "system") as tx:
        await tx.execute(
            "INSERT INTO bastion.audit_events (seq, actor, action) VALUES (999, 'x', 'forged')"
        )
    assert [e["seq"] for e in await _events(db, tenant)] == [1, 2]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE bastion.audit_events SET action = 'tampered'",
        "DELETE FROM bastion.audit_events",
        "TRUNCATE bastion.audit_events",
    ],
)
async def test_app_role_cannot_change_audit_events(
    db: Database, tenant: Tenant, statement: str
) -> None:
    before = await _events(db, tenant)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(tenant.id, None, "system") as tx:
            await tx.execute(statement)
    assert await _events(db, tenant) == before


@pytest.mark.parametrize("who", ["owner", "superuser"])
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE bastion.audit_events SET action = 'tampered'",
        "DELETE FROM bastion.audit_events",
        "TRUNCATE bastion.audit_events",
    ],
)
async def test_owner_and_superuser_cannot_change_audit_events(
    db: Database, database: DbHandles, tenant: Tenant, who: str, statement: str
) -> None:
    before = await _events(db, tenant)
    conninfo = database.owner if who == "owner" else database.superuser
    with (
        psycopg.connect(conninfo, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute(statement)
    assert await _events(db, tenant) == before
