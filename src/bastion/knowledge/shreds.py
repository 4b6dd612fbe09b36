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
from typing import Protocol

from bastion.db.notify import Listener
from bastion.db.pool import Database
from bastion.secrets.tenant_keys import TenantKeys

__all__ = ["CHANNEL", "Forgets", "ShredListener"]

CHANNEL = "bastion_tenant_shred"


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
        self._forgetters = forgetters
        self.listening = asyncio.Event()
        self._listener = Listener(
            db,  # signs in as the pool does now: a rotated password is followed
            CHANNEL,
            on_notify=self._forget_announced,
            on_ready=self._ready,
            on_lost=self._lost,
            retry_seconds=retry_seconds,
            ping_seconds=ping_seconds,
        )
        for forgetter in forgetters:
            if isinstance(forgetter, TenantKeys):
                forgetter.caching_allowed = self.listening.is_set

    @property
    def backend_pid(self) -> int | None:
        """The listening connection's server process, while there is one."""
        return self._listener.backend_pid

    def start(self) -> None:
        """Start listening (inside the serving event loop)."""
        self._listener.start()

    async def aclose(self) -> None:
        await self._listener.aclose()

    def _forget_all(self) -> None:
        for forgetter in self._forgetters:
            forgetter.forget_all()

    def _forget_announced(self, payload: str) -> None:
        for forgetter in self._forgetters:
            forgetter.forget_announced(payload)

    def _ready(self) -> None:
        self._forget_all()  # shreds before LISTEN were never seen
        self.listening.set()

    def _lost(self) -> None:
        # Fail closed: until listening again, a shred would go unseen.
        self.listening.clear()
        self._forget_all()
