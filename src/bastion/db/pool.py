"""Connection pool of the app role and the tenant-scoped transaction.

Every query a request makes runs inside :meth:`Database.tenant_tx`: a
transaction on an *autocommit* connection that enters a signed tenant context
(tenant, user, role) through ``bastion.context_enter``. The context ends with
the transaction, so a pooled connection never carries one request's tenant
into the next.

The signature is an HMAC (RFC 2104) bound to the connection's backend pid and
to a counter that the database itself holds for that backend (migration
0014): a context is accepted once, in one backend, and is worthless anywhere
else. Its values travel as bind parameters, never as query text that
``pg_stat_activity`` would show to other sessions of the same role.

``BEGIN`` and the context are not sent on their own: they go in one libpq
pipeline with the transaction's first statement, so entering a context costs
no round trip of its own (and a transaction that runs nothing sends nothing).

Why autocommit: on a non-autocommit psycopg connection, ``transaction()`` opens
only a savepoint inside an implicit transaction, and a "local" setting made
there outlives the block until that outer transaction ends.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Self, cast
from uuid import UUID

import psycopg
from psycopg import AsyncConnection, AsyncCursor, AsyncTransaction
from psycopg.abc import Params, Query, QueryNoTemplate
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bastion.telemetry.tracing import span

ROLES = frozenset({"owner", "billing-admin", "auditor", "contributor", "viewer", "system"})

Conn = AsyncConnection[dict[str, Any]]


def sign_context(
    key: bytes, tenant_id: UUID, user_id: UUID | None, role: str, backend_pid: int, counter: int
) -> str:
    """Return the hex HMAC-SHA256 that ``bastion.context_enter`` checks: the
    context, for one backend and that backend's ``counter``-th context."""
    message = f"enter|{tenant_id}|{user_id or ''}|{role}|{backend_pid}|{counter}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


_ENTER = b"SELECT bastion.context_enter(%s, %s, %s, %s)"
_REFUSED = "tenant context is not signed by the application"
_MEMBER_ROLES = b"SELECT bastion.member_roles(%s, %s, %s) AS role"


def _context_refused(error: BaseException) -> bool:
    return (
        isinstance(error, psycopg.errors.InsufficientPrivilege)
        and error.diag.message_primary == _REFUSED
    )


class TenantConnection(AsyncConnection[dict[str, Any]]):
    """A pooled connection that enters its pending tenant context together
    with the first statement of the transaction."""

    context_key: bytes = b""
    counter: int = 0  # the next value of this backend's counter in the database
    pending: tuple[UUID, UUID | None, str] | None = None

    def _enter_params(self) -> tuple[UUID, UUID | None, str, str] | None:
        """Take the pending context; return ``context_enter``'s parameters."""
        if self.pending is None:
            return None
        tenant_id, user_id, role = self.pending
        self.pending = None
        counter, self.counter = self.counter, self.counter + 1
        mac = sign_context(
            self.context_key, tenant_id, user_id, role, self.info.backend_pid, counter
        )
        return tenant_id, user_id, role, mac

    async def enter_pending(self) -> None:
        """Send ``BEGIN`` and the pending context now, if any is pending."""
        params = self._enter_params()
        if params is None:
            return
        async with self.pipeline():
            await self.execute(b"BEGIN", prepare=False)
            await self.execute(_ENTER, params)

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        await self.enter_pending()
        async with super().transaction(savepoint_name, force_rollback) as tx:
            yield tx


class ContextCursor(AsyncCursor[dict[str, Any]]):
    """The cursor of a :class:`TenantConnection`: a statement that opens a
    tenant transaction is pipelined behind ``BEGIN`` and the context."""

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        conn = self.connection
        enter = conn._enter_params() if isinstance(conn, TenantConnection) else None
        statement = cast(QueryNoTemplate, query)  # Bastion sends no t-string templates
        if enter is None:
            return await super().execute(statement, params, prepare=prepare, binary=binary)
        async with conn.pipeline():
            await conn.execute(b"BEGIN", prepare=False)
            await conn.execute(_ENTER, enter)
            await super().execute(statement, params, prepare=prepare, binary=binary)
        return self

    async def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        conn = self.connection
        if isinstance(conn, TenantConnection):
            await conn.enter_pending()
        await super().executemany(query, params_seq, returning=returning)


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
            connection_class=TenantConnection,
            kwargs={"autocommit": True, "row_factory": dict_row, "cursor_factory": ContextCursor},
            configure=self._open_context,
            open=False,
            name="bastion-app",
        )

    async def _open_context(self, conn: Conn) -> None:
        """Give a new connection its backend's context counter and the key."""
        assert isinstance(conn, TenantConnection)
        row = await (await conn.execute("SELECT bastion.context_open() AS first")).fetchone()
        assert row is not None
        conn.counter = int(row["first"])
        conn.context_key = self._context_key

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

    @staticmethod
    def _check(tenant_id: UUID, user_id: UUID | None, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if not isinstance(tenant_id, UUID) or not (user_id is None or isinstance(user_id, UUID)):
            raise TypeError("tenant_id and user_id must be UUIDs")

    async def member_roles(self, tenant_id: UUID, user_id: UUID) -> frozenset[str]:
        """Return the roles ``user_id`` holds in ``tenant_id`` right now.

        Runs on every guarded request (so a revoked role stops at once), hence
        one statement (migration 0024): ``bastion.member_roles`` enters the
        signed context and selects under RLS, as :meth:`tenant_tx` would.
        """
        self._check(tenant_id, user_id, "viewer")
        with span("db.member_roles", {"bastion.tenant_id": tenant_id}):
            async with self.pool.connection() as conn:
                assert isinstance(conn, TenantConnection)
                conn.pending = (tenant_id, user_id, "viewer")
                params = conn._enter_params()
                assert params is not None
                try:
                    cursor = await conn.execute(_MEMBER_ROLES, (tenant_id, user_id, params[3]))
                except psycopg.Error as error:
                    if _context_refused(error):
                        await conn.close()
                    raise
                return frozenset(row["role"] for row in await cursor.fetchall())

    @asynccontextmanager
    async def tenant_tx(
        self, tenant_id: UUID, user_id: UUID | None, role: str
    ) -> AsyncIterator[Conn]:
        """Run a transaction as ``user_id`` with ``role`` in ``tenant_id``.

        Yields the connection; commits on normal exit and rolls back on an
        exception. Raises ValueError for an unknown role, and
        ``InsufficientPrivilege`` when the database refuses the context.
        """
        self._check(tenant_id, user_id, role)
        # One span per transaction (not per statement): the tenant and the role only.
        with span("db.tenant_tx", {"bastion.tenant_id": tenant_id, "bastion.role": role}):
            async with self.pool.connection() as conn:
                assert isinstance(conn, TenantConnection)
                conn.pending = (tenant_id, user_id, role)
                try:
                    yield conn
                except BaseException as error:
                    conn.pending = None
                    if _context_refused(error):
                        # The counter may have moved without us (injected SQL can
                        # call context_enter too): this connection never serves again.
                        await conn.close()
                    elif conn.info.transaction_status in (
                        TransactionStatus.INTRANS,
                        TransactionStatus.INERROR,
                    ):
                        await conn.execute("ROLLBACK")
                    raise
                if conn.pending is not None:  # nothing ran: no transaction was begun
                    conn.pending = None
                else:
                    await conn.execute("COMMIT")
