"""Every process forgets a shredded tenant's keys the moment the shred commits (issue 23, B9).

``tenant shred`` (:meth:`bastion.knowledge.service.KnowledgeService.shred_tenant`)
destroys the tenant's key-encryption key and wrapped data keys, and its
commit announces itself on the ``bastion_tenant_shred`` channel (PostgreSQL
LISTEN/NOTIFY, migration 0023) as the SHA-256 of the tenant id. Other
processes — the api, the gateway, the worker — may still hold what they
unwrapped before: data keys (:class:`~bastion.secrets.tenant_keys.TenantKeys`),
the vault's token keys (:class:`~bastion.safety.vault.PiiVault`), the
gateway's answers. :class:`ShredListener` has each of them drop the
tenant's share when the announcement arrives (a few milliseconds after the
commit); the caches' time limit (60 s) is only the fallback.

It fails closed. A shred announced while the listener was not connected is
never seen, so:

- when the connection is lost (an error, or no answer to a ping after
  ``ping_seconds`` of quiet) everything is dropped at once, and
  :class:`~bastion.secrets.tenant_keys.TenantKeys` keeps no unwrapped key until
  the listener is back (each use unwraps from the key ring, where a
  shredded tenant's KEK no longer exists);
- when it starts listening again everything is dropped once more.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import psycopg

from bastion.db.pool import Database
from bastion.logs import get_logger
from bastion.secrets.tenant_keys import TenantKeys

__all__ = ["CHANNEL", "Forgets", "ShredListener"]

CHANNEL = "bastion_tenant_shred"

_log = get_logger("bastion.knowledge")


class Forgets(Protocol):
    """What a shred listener clears: a cache of a tenant's keys or of its text."""

    def forget_announced(self, announced: str) -> None: ...

    def forget_all(self) -> None: ...


class ShredListener:
    """Listens for tenant shreds and has each of ``forgetters`` drop the tenant.

    Each :class:`~bastion.secrets.tenant_keys.TenantKeys` among them may cache keys
    only while this listener is listening.
    """

    def __init__(
        self,
        db: Database,
        *forgetters: Forgets,
        retry_seconds: float = 1.0,
        ping_seconds: float = 5.0,
    ) -> None:
        self._db = db
        self._forgetters = forgetters
        self._retry = retry_seconds
        self._ping = ping_seconds
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.backend_pid: int | None = None  # the listening connection's server process
        for forgetter in forgetters:
            if isinstance(forgetter, TenantKeys):
                forgetter.caching_allowed = self.listening.is_set

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

    def _forget_all(self) -> None:
        for forgetter in self._forgetters:
            forgetter.forget_all()

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._db.conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._forget_all()  # shreds before LISTEN were never seen
                    self.backend_pid = conn.info.backend_pid
                    self.listening.set()
                    while True:
                        async for notify in conn.notifies(timeout=self._ping):
                            for forgetter in self._forgetters:
                                forgetter.forget_announced(notify.payload)
                        # Quiet for a while: is the connection still there?
                        await asyncio.wait_for(conn.execute("SELECT 1"), self._ping)
            except (psycopg.Error, OSError, TimeoutError) as error:
                _log.warning("shred_listener_lost", error=type(error).__name__)
            finally:
                # Fail closed: until listening again, a shred would go unseen.
                self.listening.clear()
                self.backend_pid = None
                self._forget_all()
            await asyncio.sleep(self._retry)
