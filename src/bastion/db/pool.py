"""Connection pool of the app role and the tenant-scoped transaction.

Every query a request makes runs inside :meth:`Database.tenant_tx`, which
opens a transaction on an *autocommit* connection and sets ``app.tenant_id``,
``app.user_id``, ``app.role`` and their HMAC signature with ``SET LOCAL`` (the same as
``set_config(..., true)``: transaction-local) in the same round trip as
``BEGIN``. The settings end with the transaction, so a pooled connection never
carries one request's tenant into the next.

Why autocommit: on a non-autocommit psycopg connection, ``transaction()`` opens
only a savepoint inside an implicit transaction, and a "local" setting made
there outlives the block until that outer transaction ends.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

ROLES = frozenset({"owner", "billing-admin", "auditor", "contributor", "viewer", "system"})

Conn = AsyncConnection[dict[str, Any]]


def sign_context(key: bytes, tenant_id: UUID, user_id: UUID | None, role: str) -> str:
    """Return the hex HMAC-SHA256 the database checks on a tenant context."""
    message = f"{tenant_id}|{user_id or ''}|{role}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class Database:
    """The app role's pool. Open it with :meth:`open` (or ``async with``)."""

    def __init__(
        self, conninfo: str, context_key: bytes, *, min_size: int = 1, max_size: int = 10
    ) -> None:
        self._context_key = context_key
        self._conninfo = conninfo
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
            name="bastion-app",
        )

    @property
    def conninfo(self) -> str:
        """The app role's connection string, for a connection of its own (LISTEN)."""
        return self._conninfo

    async def open(self) -> None:
        """Open the pool and wait for its first connection (fails if unreachable)."""
        await self.pool.open(wait=True, timeout=10)

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ping(self) -> None:
        """Raise if the database cannot answer a trivial query (readiness)."""
        async with self.pool.connection(timeout=2) as conn:
            await conn.execute("SELECT 1")

    def _begin(self, tenant_id: UUID, user_id: UUID | None, role: str) -> str:
        """Return ``BEGIN`` plus the signed tenant context, as one simple query."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if not isinstance(tenant_id, UUID) or not (user_id is None or isinstance(user_id, UUID)):
            raise TypeError("tenant_id and user_id must be UUIDs")
        signature = sign_context(self._context_key, tenant_id, user_id, role)
        # SET LOCAL is cheaper than SELECT set_config(...) (no plan, no result
        # row). Every value is a UUID, a role from ROLES or hex (checked above),
        # so none can carry a quote; formatting here saves psycopg's per-call
        # composition.
        return (
            f"BEGIN; SET LOCAL app.tenant_id = '{tenant_id}'; "
            f"SET LOCAL app.user_id = '{user_id or ''}'; SET LOCAL app.role = '{role}'; "
            f"SET LOCAL app.context_sig = '{signature}'"
        )

    async def member_roles(self, tenant_id: UUID, user_id: UUID) -> frozenset[str]:
        """Return the roles ``user_id`` holds in ``tenant_id`` right now.

        Runs on every guarded request (so a revoked role stops at once), hence
        one round trip: BEGIN, the signed context, the select and COMMIT go
        as a single simple query, RLS applying as in :meth:`tenant_tx`.
        """
        query = (
            self._begin(tenant_id, user_id, "viewer")
            + f"; SELECT role FROM bastion.memberships WHERE user_id = '{user_id}'; COMMIT"
        )
        async with self.pool.connection() as conn:
            cursor = conn.cursor()
            await cursor.execute(query.encode(), prepare=False)
            roles: set[str] = set()
            while True:
                if cursor.description is not None:
                    roles.update(row["role"] for row in await cursor.fetchall())
                if not cursor.nextset():
                    break
            return frozenset(roles)

    @asynccontextmanager
    async def tenant_tx(
        self, tenant_id: UUID, user_id: UUID | None, role: str
    ) -> AsyncIterator[Conn]:
        """Run a transaction as ``user_id`` with ``role`` in ``tenant_id``.

        Yields the connection; commits on normal exit and rolls back on an
        exception. Raises ValueError for an unknown role.
        """
        begin = self._begin(tenant_id, user_id, role)
        async with self.pool.connection() as conn:
            await conn.execute(begin.encode(), prepare=False)
            try:
                yield conn
            except BaseException:
                if conn.info.transaction_status != TransactionStatus.UNKNOWN:
                    await conn.execute("ROLLBACK")
                raise
            else:
                await conn.execute("COMMIT")
