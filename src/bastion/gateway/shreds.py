"""The gateway forgets a shredded tenant's answers the moment the shred commits.

``tenant shred`` (:meth:`bastion.knowledge.service.KnowledgeService.shred_tenant`)
announces itself on the ``bastion_tenant_shred`` channel (PostgreSQL
LISTEN/NOTIFY, migration 0023) as the SHA-256 of the tenant id. The answer
cache keeps answers that may quote the tenant's documents for up to 24 hours
(stale fallback); :class:`ShredListener` drops them when the announcement
arrives.

It fails safe, as :class:`bastion.access.roles.LiveRoles` does: a shred
announced while the listener was not connected was never seen, so every time
it (re)starts listening the whole answer cache is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from bastion.db.pool import Database
from bastion.gateway.cache import AnswerCache
from bastion.logs import get_logger

CHANNEL = "bastion_tenant_shred"

_log = get_logger("bastion.gateway")


class ShredListener:
    """Listens for tenant shreds and drops the tenant's entries from ``cache``."""

    def __init__(self, db: Database, cache: AnswerCache, *, retry_seconds: float = 1.0) -> None:
        self._db = db
        self._cache = cache
        self._retry = retry_seconds
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def start(self) -> None:
        """Start listening (inside the serving event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._db.conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._cache.forget_all()  # shreds before LISTEN were never seen
                    self.listening.set()
                    async for notify in conn.notifies():
                        self._cache.forget_announced(notify.payload)
            except (psycopg.Error, OSError) as error:
                _log.warning("shred_listener_lost", error=type(error).__name__)
            finally:
                self.listening.clear()
            await asyncio.sleep(self._retry)
