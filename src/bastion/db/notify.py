"""One LISTEN loop for every in-memory cache that PostgreSQL announcements keep valid.

A cache invalidated by ``NOTIFY`` (PostgreSQL, "LISTEN" and "NOTIFY") can only
be trusted while its listener is connected: an announcement made while nobody
listened is never delivered. :class:`Listener` therefore fails closed for its
owner: ``on_ready`` runs each time it (re)starts listening (drop what was cached
before), ``on_lost`` whenever the connection ends (stop trusting the cache),
and after ``ping_seconds`` of quiet it pings, so that a connection that died
without a word is noticed too.

Given the app's :class:`~bastion.db.pool.Database`, it signs in as its pool
does at that moment: a database password rotated since start-up
(``bastion keys rotate db-password``, which the pool follows) is the one a
reconnect uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import psycopg

from bastion.db.pool import Database
from bastion.logs import get_logger
from bastion.secrets.errors import SecretsError

_log = get_logger("bastion.db")


class Listener:
    """Listens on ``channel`` and hands each payload to ``on_notify``, reconnecting forever."""

    def __init__(
        self,
        conninfo: str | Database,
        channel: str,
        *,
        on_notify: Callable[[str], None],
        on_ready: Callable[[], None],
        on_lost: Callable[[], None],
        retry_seconds: float = 1.0,
        ping_seconds: float = 5.0,
    ) -> None:
        if not channel.isidentifier():  # spliced into LISTEN: an identifier only
            raise ValueError("a channel is a plain identifier")
        self._source = conninfo
        self._channel = channel
        self._on_notify = on_notify
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._retry = retry_seconds
        self._ping = ping_seconds
        self._task: asyncio.Task[None] | None = None
        self.backend_pid: int | None = None  # the listening connection's server process

    def start(self) -> None:
        """Start listening (inside the serving event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if isinstance(self._source, str):
            return await psycopg.AsyncConnection.connect(self._source, autocommit=True)
        # The password the pool would sign in with now (a keyword password
        # overrides the conninfo's); nothing else of its connection setup.
        settings: Any = self._source.pool.kwargs
        if callable(settings):
            settings = settings()
            if inspect.isawaitable(settings):
                settings = await settings
        password = (settings or {}).get("password")
        extra = {"password": password} if password else {}
        return await psycopg.AsyncConnection.connect(
            self._source.conninfo, autocommit=True, **extra
        )

    async def _run(self) -> None:
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(f"LISTEN {self._channel}")
                    self.backend_pid = conn.info.backend_pid
                    self._on_ready()  # announcements before LISTEN were never seen
                    while True:
                        async for notify in conn.notifies(timeout=self._ping):
                            self._on_notify(notify.payload)
                        # Quiet for a while: is the connection still there?
                        await asyncio.wait_for(conn.execute("SELECT 1"), self._ping)
            # SecretsError: the key ring's password could not be read; retry as well.
            except (psycopg.Error, OSError, TimeoutError, SecretsError) as error:
                _log.warning("listener_lost", channel=self._channel, error=type(error).__name__)
            finally:
                self.backend_pid = None
                self._on_lost()
            await asyncio.sleep(self._retry)
