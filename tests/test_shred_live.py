"""Other processes drop a shredded tenant's unwrapped keys within a second (issue 23, B9).

Two "processes" on the real embedded PostgreSQL, each with its own Database
pool, TenantKeys and vault, sharing only the key ring file: the api that
shreds, and a gateway-like one that had the tenant's data key and token key
in memory. Before the fix the second kept (and used) them for 60 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.db.pool import Database
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.knowledge.shreds import ShredListener
from bastion.safety.vault import PiiVault
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import KeyUnavailable, TenantKeys
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

DEADLINE_SECONDS = 2.0


@pytest.fixture
async def other(database: DbHandles) -> AsyncIterator[Database]:
    """The other process's own pool."""
    async with Database(database.app, database.context_key, max_size=2) as db:
        yield db


async def _tenant_with_keys(db: Database, kb: KnowledgeService) -> Actor:
    tenant = await TenantService(db).create_tenant(f"sh-{uuid4().hex[:8]}", "shred")
    owner = await TenantService(db).add_member(tenant.id, f"o-{uuid4().hex[:6]}@x.test", "owner")
    actor = Actor(tenant.id, owner, "owner")
    await kb.create_namespace(actor, "support")
    # A data key and a token key exist: the vault holds a value.
    await kb.vault.tokenize(db, tenant.id, "mail jane@example.com")
    return actor


async def _load_keys(db: Database, vault: PiiVault, tenant_id: UUID) -> None:
    """What the other process does when it serves the tenant: unwrap and keep its keys."""
    async with db.tenant_tx(tenant_id, None, "system") as tx:
        await vault.keys.get(tx, tenant_id, 1)
        assert await vault._existing_token_key(tx, tenant_id) is not None
    assert vault.keys.holds_key_of(tenant_id) and vault.holds_key_of(tenant_id)


async def _until(condition: object, deadline: float) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < deadline, "not within the deadline"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_another_process_drops_and_refuses_a_shredded_tenant_s_keys(
    db: Database, other: Database, keystore: LocalKeystore
) -> None:
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    a, b = await _tenant_with_keys(db, kb), await _tenant_with_keys(db, kb)
    vault = PiiVault(TenantKeys(LocalKMS(keystore)))  # the other process's
    listener = ShredListener(other, vault.keys, vault)
    listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        for who in (a, b):
            await _load_keys(other, vault, who.tenant_id)

        await kb.shred_tenant(a.tenant_id)

        took = await _until(
            lambda: (
                not vault.keys.holds_key_of(a.tenant_id) and not vault.holds_key_of(a.tenant_id)
            ),
            DEADLINE_SECONDS,
        )
        # It refuses the key: not in memory, and not in the key ring either.
        async with other.tenant_tx(a.tenant_id, None, "system") as tx:
            with pytest.raises(KeyUnavailable):
                await vault.keys.get(tx, a.tenant_id, 1)
        # The other tenant's keys are still held.
        assert vault.keys.holds_key_of(b.tenant_id) and vault.holds_key_of(b.tenant_id)
        assert took < DEADLINE_SECONDS
    finally:
        await listener.aclose()


async def test_a_process_that_lost_its_listener_holds_no_key(
    db: Database, other: Database, keystore: LocalKeystore, database: DbHandles
) -> None:
    """Fail closed: when the listening connection dies (here, terminated by the
    server), every key is dropped at once and none is kept until it listens
    again; then keys are cached as before."""
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    a = await _tenant_with_keys(db, kb)
    vault = PiiVault(TenantKeys(LocalKMS(keystore)))
    listener = ShredListener(other, vault.keys, vault, retry_seconds=1.5)
    listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        await _load_keys(other, vault, a.tenant_id)
        pid = listener.backend_pid
        assert pid is not None
        with psycopg.connect(database.superuser, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

        await _until(
            lambda: (
                not listener.listening.is_set()
                and not vault.keys.holds_key_of(a.tenant_id)
                and not vault.holds_key_of(a.tenant_id)
            ),
            DEADLINE_SECONDS,
        )
        # While it is not listening, a key in use is not kept.
        async with other.tenant_tx(a.tenant_id, None, "system") as tx:
            await vault.keys.get(tx, a.tenant_id, 1)
            await vault._existing_token_key(tx, a.tenant_id)
        assert not vault.keys.holds_key_of(a.tenant_id) and not vault.holds_key_of(a.tenant_id)
        # Back: keys are kept again.
        await asyncio.wait_for(listener.listening.wait(), 10)
        await _load_keys(other, vault, a.tenant_id)
    finally:
        await listener.aclose()
